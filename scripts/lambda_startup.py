"""Start-up of the Lambda functions under a local Lambda Runtime API.

    lambda_startup.py --bin-dir DIR --endpoint MOTO [--runs N] [--json OUT]

DIR holds the `api`, `worker` and `trigger` executables (one build profile).
Each run starts a fresh process of each function, as Lambda does for a cold
start, against a minimal stand-in of the Runtime API
(https://docs.aws.amazon.com/lambda/latest/dg/runtimes-api.html) and moto:
- init: from the process's spawn to its first `GET .../invocation/next`
  (what Lambda reports as Init Duration);
- first request: from handing it the event to its response.
The API's first request declares a column (add_columns), its second submits
the column's backfill; the worker's first request runs the queued task; the
trigger's first request is a maintainer pass after a job ended. Every
response is checked. Medians and maxima over the runs are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PREFIX = "/2018-06-01/runtime"


class RuntimeApi:
    """Hands queued events to one function process and records the times."""

    def __init__(self) -> None:
        self.events: queue.Queue[dict] = queue.Queue()
        self.responses: queue.Queue[tuple[float, str, object]] = queue.Queue()
        self.first_next: float | None = None
        self.handed_at: dict[str, float] = {}
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args: object) -> None:
                pass

            def do_GET(self) -> None:
                if self.path != f"{PREFIX}/invocation/next":
                    self.send_error(404)
                    return
                if api.first_next is None:
                    api.first_next = time.perf_counter()
                try:
                    event = api.events.get(timeout=600)
                except queue.Empty:
                    self.send_error(504)
                    return
                request_id = str(uuid.uuid4())
                body = json.dumps(event).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Lambda-Runtime-Aws-Request-Id", request_id)
                self.send_header(
                    "Lambda-Runtime-Deadline-Ms", str(int(time.time() * 1000) + 900_000)
                )
                self.send_header(
                    "Lambda-Runtime-Invoked-Function-Arn",
                    "arn:aws:lambda:us-east-1:123456789012:function:startup",
                )
                self.send_header(
                    "Lambda-Runtime-Trace-Id", "Root=1-00000000-000000000000000000000000"
                )
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                api.handed_at[request_id] = time.perf_counter()
                self.wfile.write(body)

            def do_POST(self) -> None:
                body = self._body()
                now = time.perf_counter()
                self.send_response(202)
                self.send_header("Content-Length", "0")
                self.end_headers()
                parts = self.path[len(PREFIX) :].strip("/").split("/")
                if parts[:2] == ["init", "error"]:
                    api.responses.put((now, "init-error", body.decode(errors="replace")))
                elif len(parts) == 3 and parts[0] == "invocation":
                    started = api.handed_at.get(parts[1], now)
                    kind = "response" if parts[2] == "response" else "error"
                    api.responses.put((now - started, kind, body.decode(errors="replace")))

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length", "0")))

        return Handler


def function_env(api: RuntimeApi, name: str, shared: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LANCE_BACKFILL_")}
    env.update(shared)
    env.update(
        {
            "AWS_LAMBDA_RUNTIME_API": api.address,
            "AWS_LAMBDA_FUNCTION_NAME": name,
            "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "1769",
            "AWS_LAMBDA_LOG_GROUP_NAME": f"/aws/lambda/{name}",
            "AWS_LAMBDA_LOG_STREAM_NAME": "startup",
            "_HANDLER": "bootstrap",
        }
    )
    return env


def cold_start(binary: Path, env_of, events: list[dict], log) -> dict:
    """Runs one fresh process over `events`; init and each request's latency in ms."""
    api = RuntimeApi()
    for event in events:
        api.events.put(event)
    spawned = time.perf_counter()
    process = subprocess.Popen([str(binary)], env=env_of(api), stdout=log, stderr=log)
    try:
        latencies, bodies = [], []
        for _ in events:
            latency, kind, body = api.responses.get(timeout=300)
            if kind != "response":
                raise SystemExit(f"{binary.name}: {kind}: {body}")
            latencies.append(latency * 1000)
            bodies.append(json.loads(body))
        assert api.first_next is not None
        return {
            "init_ms": (api.first_next - spawned) * 1000,
            "latencies_ms": latencies,
            "bodies": bodies,
        }
    finally:
        process.kill()
        process.wait()
        api.close()


def apigw(template: str, method_path: str, body: dict | None, table: str = "items") -> dict:
    event = json.loads((REPO / "events" / template).read_text())
    event["rawPath"] = method_path
    event["requestContext"]["http"]["path"] = method_path
    event["pathParameters"] = {"id": table}
    event["body"] = json.dumps(body) if body is not None else None
    return event


def sqs_event(sqs, queue_url: str) -> dict:
    messages = sqs.receive_message(
        QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=2
    ).get("Messages", [])
    if not messages:
        raise SystemExit("no task was queued")
    event = json.loads((REPO / "events" / "sqs-task.json").read_text())
    template = event["Records"][0]
    event["Records"] = [
        dict(template, messageId=m["MessageId"], receiptHandle=m["ReceiptHandle"], body=m["Body"])
        for m in messages
    ]
    return event


def expect_status(body: dict, status: int, what: str) -> None:
    if body.get("statusCode") != status:
        raise SystemExit(f"{what}: expected {status}, got {body}")


def one_run(run: int, bins: Path, shared: dict[str, str], sqs, queue_url: str, log) -> dict:
    column = f"c{run}"
    api = cold_start(
        bins / "api",
        lambda a: function_env(a, "api", shared),
        [
            apigw(
                "apigw-add-columns.json",
                "/v1/table/items/add_columns",
                {"new_columns": [{"name": column, "computed": "x * 2 + 1"}]},
            ),
            apigw(
                "apigw-backfill-column.json", "/v1/table/items/backfill_column", {"column": column}
            ),
        ],
        log,
    )
    expect_status(api["bodies"][0], 200, "add_columns")
    expect_status(api["bodies"][1], 202, "backfill_column")
    worker = cold_start(
        bins / "worker",
        lambda a: function_env(a, "worker", shared),
        [sqs_event(sqs, queue_url)],
        log,
    )
    if worker["bodies"][0] != {"batchItemFailures": []}:
        raise SystemExit(f"worker: {worker['bodies'][0]}")
    ended = json.loads((REPO / "events" / "eventbridge-job-ended.json").read_text())
    trigger = cold_start(
        bins / "trigger", lambda a: function_env(a, "trigger", shared), [ended], log
    )
    return {"api": api, "worker": worker, "trigger": trigger}


def summary(runs: list[dict]) -> dict:
    out = {}
    for name in ("api", "worker", "trigger"):
        inits = [r[name]["init_ms"] for r in runs]
        firsts = [r[name]["latencies_ms"][0] for r in runs]
        out[name] = {
            "init_ms_median": statistics.median(inits),
            "init_ms_max": max(inits),
            "first_request_ms_median": statistics.median(firsts),
            "first_request_ms_max": max(firsts),
        }
        if name == "api":
            seconds = [r[name]["latencies_ms"][1] for r in runs]
            out[name]["second_request_ms_median"] = statistics.median(seconds)
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin-dir", type=Path, required=True)
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "scripts"))
    import lambda_check

    work = Path(tempfile.mkdtemp(prefix="lambda-startup-"))
    suffix = uuid.uuid4().hex[:8]
    table, queue_name = f"startup-jobs-{suffix}", f"startup-tasks-{suffix}"
    setup = argparse.Namespace(
        endpoint=args.endpoint, root=str(work), table=table, queue=queue_name
    )
    lambda_check.setup(setup)
    _, sqs = lambda_check.clients(args.endpoint)
    queue_url = sqs.get_queue_url(QueueName=queue_name)["QueueUrl"]
    shared = {
        "LANCE_BACKFILL_ROOT": str(work),
        "LANCE_BACKFILL_JOBS_TABLE": table,
        "LANCE_BACKFILL_QUEUE_URL": queue_url,
        "LANCE_BACKFILL_API_KEYS": "local-key",
        "LANCE_BACKFILL_VISIBILITY_SECONDS": "60",
        "AWS_ENDPOINT_URL": args.endpoint,
        "AWS_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "RUST_LOG": "warn",
    }
    runs = []
    with open(work / "functions.log", "wb") as log:
        for run in range(args.runs):
            runs.append(one_run(run, args.bin_dir, shared, sqs, queue_url, log))
            print(f"run {run + 1}/{args.runs}", file=sys.stderr)
    result = summary(runs)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps({"summary": result, "runs": runs}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
