"""The project's Python client (python/lance_backfill_client) against `serve`.

    python tests/client_session.py <url> <api-key> <table>

A user's session: declare a SQL column with `computed()`, price it with
`dry_run`, fill it and wait; declare a Python function that raises on some
rows, price it with its time per 1,000 rows and describe the estimate,
fill it skipping them and read which with `errors`; declare a maintained
column with `context=`; list and describe. Prints one JSON
document with what the client returned; the Rust test that runs it checks
the table itself.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from lance_backfill_client import Client, computed, describe_estimate, udf_column  # noqa: E402


def plus_five_except_sevens(batch: pa.RecordBatch) -> pa.Array:
    x = batch.column("x")
    bad = pc.filter(x, pc.equal(pc.bit_wise_and(x, pa.scalar(1023, pa.int64())), 7))
    if len(bad) > 0:
        raise ValueError(f"cannot handle x = {bad[0].as_py()}")
    return pc.add(x, 5)


def session(url: str, api_key: str, table: str) -> dict[str, Any]:
    client = Client(url, api_key=api_key)
    out: dict[str, Any] = {}
    client.add_columns(table, [computed("y", "x * 2 + 1")])
    out["dry_run"] = client.dry_run(table, "y", where="x >= 100")
    job_y = client.backfill(table, "y")
    out["y"] = client.wait(job_y, 120, progress=False)

    entry = udf_column(plus_five_except_sevens, input_columns=["x"], output=pa.int64(), name="z")
    client.add_columns(table, [entry])
    out["z_dry_run"] = client.dry_run(table, "z", function_ms_per_1k_rows=10)
    out["z_dry_run_text"] = describe_estimate(out["z_dry_run"])
    job_z = client.backfill(table, "z", context={"on_error": "skip", "max_skip_fraction": 0.5})
    out["z"] = client.wait(job_z, 120, progress=False)
    out["z_errors"] = client.errors(job_z)

    added = client.add_columns(table, [computed("w", "x - 1")], context={"auto_backfill": True})
    out["w_added"] = added
    maintained = (added.get("context") or {}).get("job_id")
    if maintained:
        out["w"] = client.wait(maintained, 120, progress=False)

    out["listed"] = [(j["job_id"], j["state"]) for j in client.list_jobs(table)]
    out["listed_done"] = [j["job_id"] for j in client.list_jobs(table, state="DONE", limit=2)]
    out["listed_everywhere"] = [j["job_id"] for j in client.list_jobs()]
    described = client.describe(table)
    out["described"] = [f["name"] for f in described["schema"]["fields"]]
    out["ids"] = {"y": job_y, "z": job_z, "w": maintained}
    return out


def main() -> None:
    url, api_key, table = sys.argv[1:4]
    print(json.dumps(session(url, api_key, table), default=str))


if __name__ == "__main__":
    main()
