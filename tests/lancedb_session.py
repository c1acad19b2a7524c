"""LanceDB's own Python client (lancedb 0.40.0 from PyPI) against the service.

    python tests/lancedb_session.py <url> <api-key> <table>

Runs the session a LanceDB user runs on a remote table (open it, declare a
computed column, refresh it as a job and wait), then lists jobs, opens the
job again and cancels a finished one. Prints one JSON document with what the
client returned; the Rust test that runs it checks the table itself.
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from typing import Any

import lancedb


def session(url: str, api_key: str, table_name: str) -> dict[str, Any]:
    db = lancedb.connect("db://tests", api_key=api_key, region="us-east-1", host_override=url)
    table = db.open_table(table_name)
    out: dict[str, Any] = {
        "opened_version": table.version,
        "schema": [(f.name, str(f.type), f.nullable) for f in table.schema],
    }
    added = table.add_columns(computed={"y": "x * 2 + 1"})
    out["add_columns_version"] = added.version
    job = table.refresh_column_async("y")
    result = job.wait(timeout=timedelta(seconds=120))
    out["job_id"] = job.id
    out["result"] = {
        "rows_assigned": result.rows_assigned,
        "rows_failed": result.rows_failed,
        "rows_remaining": result.rows_remaining,
        "source_version": result.source_version,
        "published_version": result.published_version,
    }
    out["status"] = job.status()
    out["spec"] = job.spec
    out["listed"] = [
        {"job_id": info.job_id, "table": info.table, "state": info.state} for info in db.list_jobs()
    ]
    reopened = db.open_job(job.id)
    out["reopened_state"] = reopened.status()
    out["version_after"] = db.open_table(table_name).version
    try:
        db.cancel_job(job.id)
        out["cancel_finished"] = "accepted"
    except Exception as err:  # the client raises HttpError on a 409
        out["cancel_finished"] = f"{type(err).__name__}: {getattr(err, 'status_code', None)}"
    try:
        table.refresh_column_async("no_such_column")
        out["unknown_column"] = "accepted"
    except Exception as err:
        out["unknown_column"] = f"{type(err).__name__}: {getattr(err, 'status_code', None)}"
    return out


def main() -> None:
    url, api_key, table_name = sys.argv[1:4]
    print(json.dumps(session(url, api_key, table_name), default=str))


if __name__ == "__main__":
    main()
