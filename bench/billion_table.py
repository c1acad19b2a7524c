"""Writes the billion-row benchmark table with pylance, or reuses it.

    python bench/billion_table.py URI [--rows N] [--fragments F]

The table holds `x` (int64, the row's number) and `s` (a short string of
1 to 17 "s", as the other benchmark tables). It is kept between runs: when
URI already holds exactly N rows in F fragments with these two columns at
its latest version, it is reused; columns a killed run left behind are
dropped and their files cleaned up; anything else is written afresh.
Prints one JSON line: rows, fragments, bytes on disk, seconds spent writing
(0 when reused).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from datetime import timedelta

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

SCHEMA = pa.schema([pa.field("x", pa.int64()), pa.field("s", pa.string())])
BATCH_ROWS = 1 << 20
# "s" * 1 ... "s" * 17, picked by x % 17 as the sample table does.
WORDS = pa.array(["s" * (n + 1) for n in range(17)], pa.string())


def batches(rows: int) -> Iterator[pa.RecordBatch]:
    for start in range(0, rows, BATCH_ROWS):
        x = np.arange(start, min(start + BATCH_ROWS, rows), dtype=np.int64)
        s = pc.take(WORDS, pa.array(x % 17))
        yield pa.RecordBatch.from_arrays([pa.array(x), s], schema=SCHEMA)


def size_on_disk(uri: str) -> int:
    total = 0
    for folder, _, files in os.walk(uri):
        total += sum(os.path.getsize(os.path.join(folder, name)) for name in files)
    return total


def reusable(uri: str, rows: int, fragments: int) -> bool:
    """True when the table at `uri` is this benchmark's, once any column a
    killed run left behind is dropped."""
    if not os.path.isdir(uri):
        return False
    try:
        dataset = lance.dataset(uri)
    except (OSError, ValueError):
        return False
    names = dataset.schema.names
    if names[:2] != ["x", "s"]:
        return False
    if len(dataset.get_fragments()) != fragments or dataset.count_rows() != rows:
        return False
    if len(names) > 2:
        dataset.drop_columns(names[2:])
    lance.dataset(uri).cleanup_old_versions(older_than=timedelta(0), delete_unverified=True)
    return True


def write(uri: str, rows: int, fragments: int) -> None:
    if os.path.exists(uri):
        shutil.rmtree(uri)
    reader = pa.RecordBatchReader.from_batches(SCHEMA, batches(rows))
    lance.write_dataset(
        reader,
        uri,
        mode="create",
        max_rows_per_file=rows // fragments,
        max_rows_per_group=BATCH_ROWS,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("uri")
    parser.add_argument("--rows", type=int, default=1_000_000_000)
    parser.add_argument("--fragments", type=int, default=1_000)
    args = parser.parse_args()
    if args.rows % args.fragments:
        parser.error("--rows must be a multiple of --fragments")
    began = time.perf_counter()
    written = not reusable(args.uri, args.rows, args.fragments)
    if written:
        write(args.uri, args.rows, args.fragments)
    seconds = time.perf_counter() - began if written else 0.0
    print(
        json.dumps(
            {
                "rows": args.rows,
                "fragments": len(lance.dataset(args.uri).get_fragments()),
                "bytes": size_on_disk(args.uri),
                "seconds": round(seconds, 1),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
