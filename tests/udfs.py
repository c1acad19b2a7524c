"""User functions the Rust integration tests declare, and their payloads.

    python tests/udfs.py payloads <state-dir>   # JSON {name: base64 cloudpickle} on stdout
    python tests/udfs.py expect <name> [<json list of x> | -] [--skip]
        # the function applied here to x (a JSON list, read from stdin when
        # "-" or absent); --skip: rows it raises on are null, as a job with
        # on_error "skip" leaves them

Functions are defined in this script (run as __main__), so cloudpickle
pickles them by value: the worker processes need only pyarrow, cloudpickle
and numpy. `state-dir` is where functions that die once leave their mark.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time
from typing import Any

import cloudpickle
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

STATE = os.environ.get("UDF_TEST_STATE", "/tmp")


def double_plus_one(batch: pa.RecordBatch) -> pa.Array:
    """Vectorised: x * 2 + 1 with pyarrow.compute."""
    return pc.add(pc.multiply(batch.column("x"), 2), 1)


def slow_double_plus_one(batch: pa.RecordBatch) -> pa.Array:
    """x * 2 + 1, taking 30 ms a call: a job long enough for another writer
    to change the table while it runs; and while `<state>/hold` exists (at
    most 2 minutes), held, so a test can have the change land mid-job."""
    time.sleep(0.03)
    hold = os.path.join(STATE, "hold")
    deadline = time.monotonic() + 120
    while os.path.exists(hold) and time.monotonic() < deadline:
        time.sleep(0.05)
    return double_plus_one(batch)


def identity(batch: pa.RecordBatch) -> pa.Array:
    """The runtime's own cost per batch."""
    return batch.column("x")


def row_by_row(batch: pa.RecordBatch) -> pa.Array:
    """CPU-bound Python, one row at a time (a sum of squares below x % 200)."""
    out = []
    for x in batch.column("x").to_pylist():
        total = 0
        for i in range((x or 0) % 200):
            total += i * i
        out.append(total)
    return pa.array(out, pa.int64())


def two_outputs(batch: pa.RecordBatch) -> pa.StructArray:
    """Two columns from one struct: a = x + 1, b = length(s) as float32."""
    x = batch.column("x")
    return pa.StructArray.from_arrays(
        [pc.add(x, 1), pc.cast(pc.utf8_length(batch.column("s")), pa.float32())],
        names=["a", "b"],
    )


class Scaled:
    """A class with setup(): the factor is built once per process."""

    def __init__(self) -> None:
        self.factor: int | None = None

    def setup(self) -> None:
        self.factor = 3

    def __call__(self, batch: pa.RecordBatch) -> pa.Array:
        if self.factor is None:
            raise RuntimeError("setup() was not called")
        return pc.multiply(batch.column("x"), self.factor)


def with_call_rows(batch: pa.RecordBatch) -> pa.StructArray:
    """y = x * 2 + 1 and n = the rows of the call that computed it: how a
    runtime split the batches it was given."""
    rows = batch.num_rows
    return pa.StructArray.from_arrays(
        [double_plus_one(batch), pa.array([rows] * rows, pa.int64())],
        names=["y", "n"],
    )


class Padded:
    """x * 2 + 1, carrying 20 KB of data: its pickle is over the 16 KB a
    column's binding keeps inline, so it is stored beside the table."""

    def __init__(self) -> None:
        self.padding = bytes(range(256)) * 80

    def __call__(self, batch: pa.RecordBatch) -> pa.Array:
        return pc.add(pc.multiply(batch.column("x"), 2), 1)


def raises_on_sevens(batch: pa.RecordBatch) -> pa.Array:
    """Raises for any row whose x ends in 7 (mod 1000)."""
    xs = batch.column("x").to_pylist()
    bad = [x for x in xs if x is not None and x % 1000 == 7]
    if bad:
        raise ValueError(f"cannot handle x = {bad[0]}")
    return pc.add(batch.column("x"), 10)


def raises_on_sevens_until_fixed(batch: pa.RecordBatch) -> pa.Array:
    """As raises_on_sevens until the file `fixed` is in the state directory
    (a bug fixed, a service back up); then fine."""
    if os.path.exists(os.path.join(STATE, "fixed")):
        return pc.add(batch.column("x"), 10)
    return raises_on_sevens(batch)


def dies_once(batch: pa.RecordBatch) -> pa.Array:
    """Kills its process the first time it meets x = 4242; fine afterwards."""
    mark = os.path.join(STATE, "died-once")
    xs = batch.column("x").to_pylist()
    if 4242 in xs and not os.path.exists(mark):
        with open(mark, "w") as f:
            f.write("died")
        sys.stderr.write("about to die on x = 4242\n")
        sys.stderr.flush()
        os._exit(9)
    return pc.add(batch.column("x"), 5)


def always_dies(batch: pa.RecordBatch) -> pa.Array:
    """Kills its process on every batch holding x = 4242."""
    if 4242 in batch.column("x").to_pylist():
        sys.stderr.write("dying on x = 4242 again\n")
        sys.stderr.flush()
        os._exit(9)
    return batch.column("x")


def wrong_length(batch: pa.RecordBatch) -> pa.Array:
    return batch.column("x").slice(1)


def wrong_type(batch: pa.RecordBatch) -> pa.Array:
    return pc.cast(batch.column("x"), pa.string())


def embed(batch: pa.RecordBatch) -> np.ndarray:
    """64 float32 per row from s, with numpy: a 2-D array."""
    lengths = np.array(pc.utf8_length(batch.column("s")).to_pylist(), dtype=np.float32)
    grid = np.arange(64, dtype=np.float32)
    return np.outer(lengths, np.ones(64, dtype=np.float32)) + grid


def environment(batch: pa.RecordBatch) -> pa.Array:
    """Every row: the process's whole environment, one NAME=value a line."""
    text = "\n".join(f"{name}={value}" for name, value in sorted(os.environ.items()))
    return pa.array([text] * batch.num_rows, pa.string())


def probe_paths(batch: pa.RecordBatch) -> pa.Array:
    """Each row's `s` is a path: "read" when the function could open it (a
    file) or list it (a directory), else "refused: <why>"."""

    def probe(path: str | None) -> str:
        try:
            if path and os.path.isdir(path):
                os.listdir(path)
            elif path:
                with open(path, "rb") as f:
                    f.read(1)
            else:
                return "no path"
            return "read"
        except OSError as err:
            return f"refused: {type(err).__name__}"

    return pa.array([probe(p) for p in batch.column("s").to_pylist()], pa.string())


def pid(batch: pa.RecordBatch) -> pa.Array:
    """Every row: the id of the process the function runs in."""
    return pa.array([os.getpid()] * batch.num_rows, pa.int64())


FUNCTIONS: dict[str, Any] = {
    "environment": environment,
    "probe_paths": probe_paths,
    "pid": pid,
    "double_plus_one": double_plus_one,
    "slow_double_plus_one": slow_double_plus_one,
    "identity": identity,
    "row_by_row": row_by_row,
    "two_outputs": two_outputs,
    "with_call_rows": with_call_rows,
    "scaled": Scaled(),
    "large_payload": Padded(),
    "raises_on_sevens": raises_on_sevens,
    "raises_on_sevens_until_fixed": raises_on_sevens_until_fixed,
    "dies_once": dies_once,
    "always_dies": always_dies,
    "wrong_length": wrong_length,
    "wrong_type": wrong_type,
    "embed": embed,
}


def payloads(state: str) -> dict[str, str]:
    os.environ["UDF_TEST_STATE"] = state
    global STATE
    STATE = state
    return {
        name: base64.b64encode(cloudpickle.dumps(function)).decode()
        for name, function in FUNCTIONS.items()
    }


def expect(name: str, xs: list[int | None], skip: bool) -> list[Any]:
    """The function applied to a batch of x, set up as the runtime sets it up;
    with `skip`, row by row, null where it raises."""
    function = FUNCTIONS[name]
    setup = getattr(function, "setup", None)
    if callable(setup):
        setup()
    batch = pa.RecordBatch.from_arrays([pa.array(xs, pa.int64())], names=["x"])
    if not skip:
        return function(batch).to_pylist()
    values: list[Any] = []
    for row in range(batch.num_rows):
        try:
            values.extend(function(batch.slice(row, 1)).to_pylist())
        except Exception:  # noqa: BLE001 - any exception is a skipped row
            values.append(None)
    return values


def main() -> None:
    command = sys.argv[1]
    if command == "payloads":
        json.dump(payloads(sys.argv[2]), sys.stdout)
    elif command == "expect":
        args = [arg for arg in sys.argv[2:] if arg != "--skip"]
        text = args[1] if len(args) > 1 and args[1] != "-" else sys.stdin.read()
        json.dump(expect(args[0], json.loads(text), "--skip" in sys.argv[2:]), sys.stdout)
    else:
        raise SystemExit(f"unknown command {command}")


if __name__ == "__main__":
    main()
