"""A small HTTP client for a lance-backfill service (standard library only)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Union

TableId = Union[str, Sequence[str]]

TERMINAL_STATES = ("DONE", "FAILED", "CANCELLED")

# AlterTableBackfillColumnsRequest fields besides `column` (Lance Namespace 0.13).
BACKFILL_FIELDS = frozenset(
    {
        "identity",
        "id",
        "context",
        "branch",
        "where",
        "concurrency",
        "intra_applier_concurrency",
        "min_checkpoint_size",
        "max_checkpoint_size",
        "batch_checkpoint_flush_interval_seconds",
        "read_version",
        "task_size",
        "num_frags",
        "checkpoint_size",
        "commit_granularity",
        "cluster",
        "manifest",
    }
)


class LanceBackfillError(Exception):
    """An error response of the service: HTTP `status` and Lance Namespace `code`.

    The body is the spec's `ErrorResponse`: `error`, `code`, `detail`,
    `instance` (each may be missing from a non-conforming response).
    """

    def __init__(
        self,
        status: int,
        code: Optional[int],
        error: str,
        detail: Optional[str] = None,
        instance: Optional[str] = None,
        body: Any = None,
    ) -> None:
        self.status = status
        self.code = code
        self.error = error
        self.detail = detail
        self.instance = instance
        self.body = body
        text = f"HTTP {status}"
        if code is not None:
            text += f", code {code}"
        text += f": {error}"
        if detail and detail != error:
            text += f" ({detail})"
        super().__init__(text)


class JobFailedError(Exception):
    """A job that ended FAILED or CANCELLED; `job` is its last state."""

    def __init__(self, job: Mapping[str, Any]) -> None:
        self.job = dict(job)
        self.state = job.get("state")
        reason = job.get("error") or "no reason given"
        super().__init__(f"job {job.get('job_id')} {self.state}: {reason}")


def table_path(table_id: TableId, delimiter: str = "$") -> str:
    """The `{id}` path segment: namespace parts and table name joined by
    `delimiter`, percent-encoded (the delimiter too, as `%24`)."""
    if isinstance(table_id, str):
        parts = [table_id]
    else:
        parts = list(table_id)
        for p in parts:
            if delimiter in p:
                raise ValueError(f"table id part {p!r} contains the delimiter {delimiter!r}")
    if not parts or any(not isinstance(p, str) or not p for p in parts):
        raise ValueError(f"table id must be non-empty strings, got {table_id!r}")
    return urllib.parse.quote(delimiter.join(parts), safe="")


class Client:
    """Calls a lance-backfill service at `url` (e.g. `http://127.0.0.1:8080`).

    `api_key` is sent as `x-api-key`, `token` as `Authorization: Bearer`;
    each method also takes `api_key=` to override it for one call.
    """

    def __init__(
        self,
        url: str,
        api_key: Optional[str] = None,
        *,
        token: Optional[str] = None,
        timeout: float = 30.0,
        delimiter: str = "$",
    ) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.token = token
        self.timeout = timeout
        self.delimiter = delimiter

    # --- routes ------------------------------------------------------------

    def add_columns(
        self,
        table_id: TableId,
        entries: Sequence[Any],
        *,
        branch: Optional[str] = None,
        api_key: Optional[str] = None,
    ) -> Dict[str, Any]:
        """`POST /v1/table/{id}/add_columns` with `{"new_columns": entries}`.

        Entries are dicts (as `udf_column` makes) or official client models.
        Returns the response body (`AlterTableAddColumnsResponse`).
        """
        if isinstance(entries, Mapping):
            entries = [entries]
        body: Dict[str, Any] = {"new_columns": [_as_dict(e) for e in entries]}
        if branch is not None:
            body["branch"] = branch
        return self._request("POST", self._table(table_id, "add_columns"), body, api_key=api_key)

    def backfill(
        self,
        table_id: TableId,
        column: str,
        *,
        api_key: Optional[str] = None,
        idempotency_key: Optional[str] = None,
        **fields: Any,
    ) -> str:
        """`POST /v1/table/{id}/backfill_column`; returns the job id.

        `fields` are `AlterTableBackfillColumnsRequest` fields (`where`,
        `concurrency`, `commit_granularity`, `branch`, ...).
        """
        unknown = sorted(set(fields) - BACKFILL_FIELDS)
        if unknown:
            raise TypeError(
                f"unknown backfill field(s) {unknown}; known: {sorted(BACKFILL_FIELDS)}"
            )
        body = {"column": column}
        body.update({k: v for k, v in fields.items() if v is not None})
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        reply = self._request(
            "POST",
            self._table(table_id, "backfill_column"),
            body,
            api_key=api_key,
            headers=headers,
        )
        job_id = reply.get("job_id") if isinstance(reply, dict) else None
        if not isinstance(job_id, str) or not job_id:
            raise LanceBackfillError(200, None, f"response has no job_id: {reply!r}", body=reply)
        return job_id

    def job(self, job_id: str, *, api_key: Optional[str] = None) -> Dict[str, Any]:
        """`GET /v1/job/{job_id}`: state, error, parameters, metrics, events."""
        return self._request(
            "GET", f"/v1/job/{urllib.parse.quote(job_id, safe='')}", api_key=api_key
        )

    def cancel(self, job_id: str, *, api_key: Optional[str] = None) -> Dict[str, Any]:
        """`POST /v1/job/{job_id}/cancel`."""
        path = f"/v1/job/{urllib.parse.quote(job_id, safe='')}/cancel"
        return self._request("POST", path, {}, api_key=api_key)

    def wait(
        self,
        job_id: str,
        timeout: Optional[float] = None,
        *,
        poll_interval: float = 0.5,
        check: bool = True,
        on_progress: Optional[Callable[[Dict[str, Any]], None]] = None,
        api_key: Optional[str] = None,
    ) -> Dict[str, Any]:
        """Poll the job until it is DONE, FAILED or CANCELLED; return it.

        With `check` (the default) a FAILED or CANCELLED job raises
        `JobFailedError`. Raises `TimeoutError` after `timeout` seconds.
        `on_progress` is called with each polled job.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.job(job_id, api_key=api_key)
            if on_progress is not None:
                on_progress(job)
            state = job.get("state")
            if state in TERMINAL_STATES:
                if check and state != "DONE":
                    raise JobFailedError(job)
                return job
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"job {job_id} still {state} after {timeout} s")
                time.sleep(min(poll_interval, left))
            else:
                time.sleep(poll_interval)

    # --- plumbing ----------------------------------------------------------

    def _table(self, table_id: TableId, op: str) -> str:
        return f"/v1/table/{table_path(table_id, self.delimiter)}/{op}" + (
            ""
            if self.delimiter == "$"
            else "?delimiter=" + urllib.parse.quote(self.delimiter, safe="")
        )

    def _request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        api_key: Optional[str] = None,
        headers: Optional[Mapping[str, str]] = None,
    ) -> Any:
        data = None
        all_headers = {"Accept": "application/json"}
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            all_headers["Content-Type"] = "application/json"
        key = api_key if api_key is not None else self.api_key
        if key:
            all_headers["x-api-key"] = key
        if self.token:
            all_headers["Authorization"] = f"Bearer {self.token}"
        if headers:
            all_headers.update(headers)
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=all_headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            raise _error_from(e.code, e.read()) from None
        if not raw:
            return {}
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            raise LanceBackfillError(
                200, None, f"response is not JSON: {raw[:200]!r}", body=raw
            ) from None


def _error_from(status: int, raw: bytes) -> LanceBackfillError:
    try:
        body = json.loads(raw) if raw else None
    except json.JSONDecodeError:
        body = None
    if isinstance(body, dict):
        code = body.get("code")
        return LanceBackfillError(
            status,
            code if isinstance(code, int) else None,
            str(body.get("error") or body.get("detail") or f"HTTP {status}"),
            detail=body.get("detail"),
            instance=body.get("instance"),
            body=body,
        )
    text = raw.decode("utf-8", "replace").strip()[:500] if raw else f"HTTP {status}"
    return LanceBackfillError(status, None, text or f"HTTP {status}", body=raw)


def _as_dict(entry: Any) -> Dict[str, Any]:
    if isinstance(entry, Mapping):
        return dict(entry)
    if hasattr(entry, "to_dict"):
        return entry.to_dict()
    raise TypeError(f"expected an AddColumnsEntry dict or model, got {type(entry).__name__}")
