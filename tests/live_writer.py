"""Another writer of a table a backfill is filling, with pylance, as users
have it: the live-table tests run it while a job runs.

    python tests/live_writer.py URI add-column NAME SQL
    python tests/live_writer.py URI compact [ROWS_PER_FRAGMENT]
    python tests/live_writer.py URI update WHERE COLUMN SQL
    python tests/live_writer.py URI delete WHERE
    python tests/live_writer.py URI append FIRST_ID COUNT
    python tests/live_writer.py URI drop-column NAME
    python tests/live_writer.py URI patch-x MODULUS ADD
    python tests/live_writer.py URI orphans COLUMN...
    python tests/live_writer.py URI soak SECONDS SEED FIRST_ID
    python tests/live_writer.py URI busy FIRST_ID APPEND_MS COMPACT_S

Appended rows have `x = id` and `s = str(id)`; every other column is
null. `soak` appends, deletes, updates `x` and compacts at random for
SECONDS seconds, and prints what it did as JSON: the operations by kind,
the rows appended, and the ids of the rows it deleted. `busy` appends 100
rows every APPEND_MS milliseconds and compacts every COMPACT_S seconds
until its standard input closes, then prints its counts as JSON.
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import lance
import lance.commit
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute


def appended(ds: lance.LanceDataset, first: int, count: int) -> pa.Table:
    """Rows `first..first + count` in the table's schema."""
    ids = pa.array(range(first, first + count), pa.int64())
    columns = []
    for field in ds.schema:
        if field.name in ("id", "x"):
            columns.append(ids.cast(field.type))
        elif field.name == "s":
            columns.append(pa.array([str(i) for i in range(first, first + count)], field.type))
        else:
            columns.append(pa.nulls(count, field.type))
    return pa.Table.from_arrays(columns, schema=ds.schema)


def append(uri: str, first: int, count: int) -> None:
    ds = lance.dataset(uri)
    lance.write_dataset(appended(ds, first, count), uri, mode="append")


def compact(uri: str, rows: int) -> None:
    lance.dataset(uri).optimize.compact_files(target_rows_per_fragment=rows, num_threads=1)


def update(uri: str, where: str, column: str, sql: str) -> None:
    lance.dataset(uri).update({column: sql}, where=where)


def delete(uri: str, where: str) -> None:
    lance.dataset(uri).delete(where)


def patch_x(uri: str, modulus: int, add: int) -> None:
    """Adds `add` to `x` of the rows whose id is a multiple of `modulus`,
    rewriting the column in place (new files for `x` in the fragments
    holding those rows, every row where it was)."""
    ds = lance.dataset(uri)
    rows = ds.to_table(columns=["id", "x"], filter=f"id % {modulus} = 0")
    source = pa.table({"id": rows.column("id"), "x": pa.compute.add(rows.column("x"), add)})
    (ds.merge_insert("id").when_matched_update_all().write_mode("rewrite_columns").execute(source))


def orphans(uri: str, columns: list[str]) -> list[str]:
    """Data files of the table no version references that hold only some
    of `columns`: files a backfill of those columns staged and left behind.
    (Another writer's failed commits leave files of their own, holding
    every column a compaction or an update rewrote.)"""
    from lance.file import LanceFileReader

    ds = lance.dataset(uri)
    referenced: set[str] = set()
    for version in ds.versions():
        at = lance.dataset(uri, version=version["version"])
        for fragment in at.get_fragments():
            referenced.update(f.path for f in fragment.metadata.files)
    left = []
    data = Path(uri) / "data"
    for path in sorted(data.glob("*.lance")) if data.is_dir() else []:
        if path.name in referenced:
            continue
        names = {field.name for field in LanceFileReader(str(path)).metadata().schema}
        if names and names <= set(columns):
            left.append(path.name)
    return left


def soak(uri: str, seconds: float, seed: int, first: int) -> dict[str, object]:
    """Keeps changing the table; returns what it did."""
    rng = random.Random(seed)
    counts = {"append": 0, "delete": 0, "update": 0, "compact": 0}
    deleted: list[int] = []
    next_id = first
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        kind = rng.choices(list(counts), weights=[5, 2, 2, 1])[0]
        try:
            if kind == "append":
                count = rng.randint(1, 200)
                append(uri, next_id, count)
                next_id += count
            elif kind == "delete":
                victim = rng.randrange(0, next_id)
                delete(uri, f"id = {victim}")
                deleted.append(victim)
            elif kind == "update":
                modulus = rng.randint(50, 500)
                update(uri, f"id % {modulus} = {rng.randrange(modulus)}", "x", "x + 1")
            else:
                compact(uri, rng.choice([2_000, 10_000, 50_000]))
        except OSError as err:
            # A commit of ours lost to a concurrent one: as a user would, try
            # the next operation.
            print(f"{kind} failed: {err}", file=sys.stderr)
            continue
        counts[kind] += 1
        time.sleep(rng.uniform(0.0, 0.2))
    return {"operations": counts, "appended": next_id - first, "deleted": deleted}


def busy(uri: str, first: int, append_ms: int, compact_s: float) -> dict[str, int]:
    """Appends and compacts on a schedule until stdin closes."""
    import select

    counts = {"append": 0, "compact": 0}
    next_id = first
    last_compact = time.monotonic()
    while not select.select([sys.stdin], [], [], append_ms / 1000)[0]:
        try:
            append(uri, next_id, 100)
            next_id += 100
            counts["append"] += 1
            if time.monotonic() - last_compact >= compact_s:
                compact(uri, 1_000_000)
                counts["compact"] += 1
                last_compact = time.monotonic()
        except OSError as err:
            print(f"failed: {err}", file=sys.stderr)
    return counts


def retried(action: Callable[[], object], tries: int = 20) -> None:
    """Runs `action`, again after a retryable commit conflict, as a user of
    pylance does: Lance refuses a `Merge` (a new column) whose read version
    another commit (a backfill's) has passed."""
    for attempt in range(tries):
        try:
            action()
            return
        except lance.commit.CommitConflictError:
            if attempt + 1 == tries:
                raise
            time.sleep(0.05 * (attempt + 1))


def main() -> None:
    uri, op, *args = sys.argv[1:]
    if op == "add-column":
        retried(lambda: lance.dataset(uri).add_columns({args[0]: args[1]}))
    elif op == "compact":
        retried(lambda: compact(uri, int(args[0]) if args else 1_000_000))
    elif op == "update":
        retried(lambda: update(uri, args[0], args[1], args[2]))
    elif op == "delete":
        retried(lambda: delete(uri, args[0]))
    elif op == "append":
        retried(lambda: append(uri, int(args[0]), int(args[1])))
    elif op == "drop-column":
        retried(lambda: lance.dataset(uri).drop_columns([args[0]]))
    elif op == "patch-x":
        retried(lambda: patch_x(uri, int(args[0]), int(args[1])))
    elif op == "busy":
        json.dump(busy(uri, int(args[0]), int(args[1]), float(args[2])), sys.stdout)
    elif op == "orphans":
        json.dump(orphans(uri, args), sys.stdout)
    elif op == "soak":
        json.dump(soak(uri, float(args[0]), int(args[1]), int(args[2])), sys.stdout)
    else:
        raise SystemExit(f"unknown operation {op}")


if __name__ == "__main__":
    main()
