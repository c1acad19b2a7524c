"""A small HTTP client for a lance-backfill service (standard library only)."""

from __future__ import annotations

import http.client
import json
import random
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Union

TableId = Union[str, Sequence[str]]

TERMINAL_STATES = ("DONE", "FAILED", "CANCELLED")

# Statuses worth asking again: throttled, or the service briefly unable to answer.
RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
# A page of jobs, as the service lists them.
JOBS_PAGE_SIZE = 100

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


def computed(name: str, expression: str) -> Dict[str, Any]:
    """An `add_columns` entry declaring `name` as the SQL `expression` over the
    table's columns (e.g. `computed("y", "x * 2 + 1")`); `backfill` fills it."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a column name must be a non-empty string, got {name!r}")
    if not isinstance(expression, str) or not expression.strip():
        raise ValueError(f"column {name!r}: the expression must be non-empty SQL")
    return {"name": name, "computed": expression}


def context_of(context: Optional[Mapping[str, Any]]) -> Optional[Dict[str, str]]:
    """A request's `context` as the spec types it (string to string): booleans
    become `true`/`false`, numbers their decimal text."""
    if context is None:
        return None
    out: Dict[str, str] = {}
    for key, value in context.items():
        if not isinstance(key, str):
            raise TypeError(f"context keys are strings, got {key!r}")
        if isinstance(value, bool):
            out[key] = "true" if value else "false"
        elif isinstance(value, (str, int, float)):
            out[key] = str(value)
        else:
            raise TypeError(f"context[{key!r}] must be a string, number or bool, got {value!r}")
    return out


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
        context: Optional[Mapping[str, Any]] = None,
        api_key: Optional[str] = None,
    ) -> Dict[str, Any]:
        """`POST /v1/table/{id}/add_columns` with `{"new_columns": entries}`.

        Entries are dicts (as `udf_column` and `computed` make) or official
        client models. `context` e.g. `{"auto_backfill": True}` keeps the
        columns filled as rows arrive (its job ids come back in the answer's
        `context`). Returns the response body (`AlterTableAddColumnsResponse`).
        """
        if isinstance(entries, Mapping):
            entries = [entries]
        body: Dict[str, Any] = {"new_columns": [_as_dict(e) for e in entries]}
        if branch is not None:
            body["branch"] = branch
        if context is not None:
            body["context"] = context_of(context)
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
        `concurrency`, `commit_granularity`, `branch`, `context`, ...);
        `context` takes Python values (`{"on_error": "skip"}`,
        `{"retry_failed_of": job_id}`).
        """
        reply = self._backfill_request(table_id, column, fields, api_key, idempotency_key)
        job_id = reply.get("job_id") if isinstance(reply, dict) else None
        if not isinstance(job_id, str) or not job_id:
            raise LanceBackfillError(200, None, f"response has no job_id: {reply!r}", body=reply)
        return job_id

    def dry_run(
        self,
        table_id: TableId,
        column: str,
        *,
        api_key: Optional[str] = None,
        function_ms_per_1k_rows: Optional[float] = None,
        **fields: Any,
    ) -> Dict[str, Any]:
        """What `backfill` with the same arguments would do, without doing it:
        the fragments, tasks, rows and commits it would plan (`context.dry_run`),
        and under "estimate" what it would take on AWS at its `concurrency`
        (wall time, Lambda GB-seconds, requests, dollars, the bottleneck).
        `function_ms_per_1k_rows`: a Python function's own time per 1,000
        rows, added to the estimate. `describe_estimate(plan)` prints it."""
        context = dict(fields.pop("context", None) or {})
        context["dry_run"] = True
        if function_ms_per_1k_rows is not None:
            context["function_ms_per_1k_rows"] = function_ms_per_1k_rows
        fields["context"] = context
        return self._backfill_request(table_id, column, fields, api_key, None)

    def _backfill_request(
        self,
        table_id: TableId,
        column: str,
        fields: Dict[str, Any],
        api_key: Optional[str],
        idempotency_key: Optional[str],
    ) -> Any:
        unknown = sorted(set(fields) - BACKFILL_FIELDS)
        if unknown:
            raise TypeError(
                f"unknown backfill field(s) {unknown}; known: {sorted(BACKFILL_FIELDS)}"
            )
        body: Dict[str, Any] = {"column": column}
        body.update({k: v for k, v in fields.items() if v is not None})
        if "context" in body:
            body["context"] = context_of(body["context"])
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self._request(
            "POST",
            self._table(table_id, "backfill_column"),
            body,
            api_key=api_key,
            headers=headers,
        )

    def describe(self, table_id: TableId, *, api_key: Optional[str] = None) -> Dict[str, Any]:
        """`POST /v1/table/{id}/describe`: the table's version, schema (each
        computed column with what fills it) and fragment counts."""
        return self._request("POST", self._table(table_id, "describe"), {}, api_key=api_key)

    def iter_jobs(
        self,
        table_id: Optional[TableId] = None,
        *,
        api_key: Optional[str] = None,
    ) -> Iterator[Dict[str, Any]]:
        """Every job of the table (newest first), page after page; without a
        table, every job the caller may read, each as its own page shows it."""
        token: Optional[str] = None
        while True:
            if table_id is not None:
                query = f"limit={JOBS_PAGE_SIZE}"
                if token:
                    query += "&page_token=" + urllib.parse.quote(token, safe="")
                path = self._table(table_id, "jobs")
                path += ("&" if "?" in path else "?") + query
                page = self._request("GET", path, api_key=api_key)
            else:
                body: Dict[str, Any] = {"limit": JOBS_PAGE_SIZE}
                if token:
                    body["page_token"] = token
                page = self._request("POST", "/v1/jobs/list", body, api_key=api_key)
            for listed in page.get("jobs") or []:
                yield listed if table_id is not None else self.job(listed["job_id"])
            token = page.get("page_token")
            if not token:
                return

    def list_jobs(
        self,
        table_id: Optional[TableId] = None,
        *,
        state: Optional[Union[str, Sequence[str]]] = None,
        limit: int = 50,
        api_key: Optional[str] = None,
    ) -> List[Dict[str, Any]]:
        """Up to `limit` of the newest jobs of the table (or of every table),
        only those in `state` (e.g. `"RUNNING"` or `["FAILED", "CANCELLED"]`)."""
        states = {state} if isinstance(state, str) else set(state) if state else None
        found: List[Dict[str, Any]] = []
        for job in self.iter_jobs(table_id, api_key=api_key):
            if states is None or job.get("state") in states:
                found.append(job)
                if len(found) >= limit:
                    break
        return found

    def errors(self, job_id: str, *, api_key: Optional[str] = None) -> Dict[str, Any]:
        """Why a job failed and the rows its function raised on (jobs with
        `on_error: skip`): `state`, `error`, `rows_failed` and the first
        `row_failures` (`fragment_id`, `row`, `error`)."""
        job = self.job(job_id, api_key=api_key)
        return {
            "job_id": job_id,
            "state": job.get("state"),
            "error": job.get("error"),
            "rows_failed": (job.get("metrics") or {}).get("rows_failed", 0),
            "row_failures": job.get("row_failures") or [],
        }

    def job(self, job_id: str, *, api_key: Optional[str] = None) -> Dict[str, Any]:
        """`GET /v1/job/{job_id}`: state, error, parameters, metrics, events."""
        return self._request(
            "GET", f"/v1/job/{urllib.parse.quote(job_id, safe='')}", api_key=api_key
        )

    def cancel(self, job_id: str, *, api_key: Optional[str] = None) -> Dict[str, Any]:
        """`POST /v1/job/{job_id}/cancel`: the job as it now is."""
        return self._control(job_id, "cancel", api_key)

    def pause(self, job_id: str, *, api_key: Optional[str] = None) -> Dict[str, Any]:
        """`POST /v1/job/{job_id}/pause`: the job hands out no more work and
        keeps what it computed (PAUSED) until `resume`."""
        return self._control(job_id, "pause", api_key)

    def resume(self, job_id: str, *, api_key: Optional[str] = None) -> Dict[str, Any]:
        """`POST /v1/job/{job_id}/resume`: a PAUSED job carries on from its
        checkpoints."""
        return self._control(job_id, "resume", api_key)

    def _control(self, job_id: str, action: str, api_key: Optional[str]) -> Dict[str, Any]:
        path = f"/v1/job/{urllib.parse.quote(job_id, safe='')}/{action}"
        return self._request("POST", path, {}, api_key=api_key)

    def wait(
        self,
        job_id: str,
        timeout: Optional[float] = None,
        *,
        poll_interval: float = 0.5,
        check: bool = True,
        on_progress: Optional[Callable[[Dict[str, Any]], None]] = None,
        progress: Optional[bool] = None,
        max_retries: int = 8,
        api_key: Optional[str] = None,
    ) -> Dict[str, Any]:
        """Poll the job until it is DONE, FAILED or CANCELLED; return it.

        With `check` (the default) a FAILED or CANCELLED job raises
        `JobFailedError`. Raises `TimeoutError` after `timeout` seconds.
        `on_progress` is called with each polled job. A poll answered 408,
        429 or 5xx, or lost to a reset connection, is asked again with
        exponential backoff, up to `max_retries` times in a row, so an
        hour-long wait survives a restart of the service. `progress` shows a
        bar of rows committed (tqdm); by default when stderr is a terminal.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = _ProgressBar(job_id) if _wants_bar(progress) else None
        failures = 0
        try:
            while True:
                try:
                    job = self.job(job_id, api_key=api_key)
                    failures = 0
                except (LanceBackfillError, OSError, http.client.HTTPException) as error:
                    failures += 1
                    if not _retryable(error) or failures > max_retries:
                        raise
                    _sleep_until(deadline, _backoff(failures), job_id, timeout, "unreachable")
                    continue
                if bar is not None:
                    bar.update(job)
                if on_progress is not None:
                    on_progress(job)
                state = job.get("state")
                if state in TERMINAL_STATES:
                    if check and state != "DONE":
                        raise JobFailedError(job)
                    return job
                _sleep_until(deadline, poll_interval, job_id, timeout, state)
        finally:
            if bar is not None:
                bar.close()

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


def _retryable(error: BaseException) -> bool:
    if isinstance(error, LanceBackfillError):
        return error.status in RETRYABLE_STATUSES
    # URLError, ConnectionResetError, timeouts, a truncated answer: the
    # service did not answer this time.
    return isinstance(error, (OSError, http.client.HTTPException))


def _backoff(failures: int) -> float:
    """Seconds before the next try: 0.25 s doubling to 8 s, with jitter."""
    base: float = min(8.0, 0.25 * 2 ** (failures - 1))
    return base * (0.5 + random.random() / 2)


def _sleep_until(
    deadline: Optional[float], seconds: float, job_id: str, timeout: Optional[float], state: Any
) -> None:
    if deadline is not None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"job {job_id} still {state} after {timeout} s")
        seconds = min(seconds, left)
    time.sleep(seconds)


def _wants_bar(progress: Optional[bool]) -> bool:
    if progress is None:
        progress = sys.stderr.isatty()
    if not progress:
        return False
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return False
    return True


class _ProgressBar:
    """Rows committed of the job's rows, as a tqdm bar on stderr."""

    def __init__(self, job_id: str) -> None:
        from tqdm import tqdm

        self._bar = tqdm(desc=f"job {job_id[:8]}", unit="rows", unit_scale=True, total=None)

    def update(self, job: Mapping[str, Any]) -> None:
        rows = (job.get("metrics") or {}).get("rows_committed") or {}
        total, done = rows.get("total"), rows.get("done", 0)
        if total and self._bar.total != total:
            self._bar.total = total
        self._bar.n = done
        self._bar.set_postfix_str(str(job.get("state", "")), refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        self._bar.close()


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


def describe_estimate(plan: Mapping[str, Any]) -> str:
    """A dry run's plan and estimate (`Client.dry_run`), for a person."""
    lines = [
        f"would fill {plan.get('rows')} rows of {plan.get('column')} in "
        f"{plan.get('fragments')} fragments: {plan.get('tasks')} tasks, "
        f"{plan.get('commits')} commits"
    ]
    estimate = plan.get("estimate")
    if isinstance(estimate, Mapping):
        cost = estimate.get("cost_usd") or {}
        parts = ", ".join(f"{name} ${cost.get(name, 0):.4g}" for name in COST_PARTS)
        lines.append(
            f"on AWS: about {_duration(estimate.get('wall_seconds', 0))} (bound by "
            f"{str(estimate.get('bottleneck', '?')).replace('_', ' ')}), "
            f"{estimate.get('lambda_gb_seconds', 0):,.0f} Lambda GB-s, "
            f"${cost.get('total', 0):.4g} in all ({parts})"
        )
        lines.extend(f"assumed: {said}" for said in estimate.get("assumptions", []))
    return "\n".join(lines)


COST_PARTS = ("lambda", "dynamodb", "sqs", "s3")


def _duration(seconds: float) -> str:
    if seconds >= 7200:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 120:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s"


def _as_dict(entry: Any) -> Dict[str, Any]:
    if isinstance(entry, Mapping):
        return dict(entry)
    if hasattr(entry, "to_dict"):
        return entry.to_dict()
    raise TypeError(f"expected an AddColumnsEntry dict or model, got {type(entry).__name__}")
