#!/usr/bin/env python3
"""A local emulator of AWS Lambda's Invoke API, for tests.

AWS's own Lambda emulation needs Docker; this serves
``POST /2015-03-31/functions/{FunctionName}/invocations`` over plain HTTP and
runs a Python handler in-process (by default ``lance_backfill_udf_runtime.
lambda_handler`` from this directory), so boto3, the AWS SDK for Rust or a
plain HTTP client can be pointed at it with an endpoint URL.

What it reproduces of Lambda (RequestResponse invocations):

- 200 with the handler's JSON result (header ``X-Amz-Executed-Version``).
- A handler exception: 200, ``X-Amz-Function-Error: Unhandled`` and
  ``{"errorMessage", "errorType", "stackTrace"}``; a result that is not JSON:
  the same with ``Runtime.MarshalError``.
- A request payload over 6,291,456 bytes: 413 ``RequestTooLargeException``; a
  response over 6,291,456 bytes: 200, ``Unhandled``,
  ``Function.ResponseSizeTooLarge``.
- An unknown function: 404 ``ResourceNotFoundException``; a payload that is
  not JSON: 400 ``InvalidRequestContentException``.
- Throttling: ``--throttle-rate R`` answers that share of invocations (drawn
  from a ``--seed``ed generator, so a sequential test sees the same sequence
  every run) and ``--max-concurrency N`` those above N in flight with 429
  ``TooManyRequestsException``, ``Reason``
  ``ReservedFunctionConcurrentInvocationLimitExceeded``.
- ``X-Amz-Invocation-Type: Event`` runs the handler in the background (202);
  ``DryRun`` answers 204.

Not reproduced: timeouts (the handler is not killed; ``context.
get_remaining_time_in_millis()`` does count down), ``LogType: Tail``, cold
starts and per-container isolation (all invocations share one process, so the
handler must be thread-safe, as the UDF runtime is).

Control routes: ``GET /_stats`` (invocation counts), ``GET /_config`` and
``POST /_config`` with JSON ``{"throttle_rate", "seed", "max_concurrency",
"reset_stats"}`` (a given seed restarts the throttling sequence).

Start: ``python lambda_invoke_emulator.py --host 127.0.0.1 --port 0``; it prints
``listening on http://HOST:PORT`` when ready. Functions are named with
``--function NAME`` (the default handler) or ``--function NAME=FILE.py:HANDLER``;
without any, the single function ``lance-backfill-udf`` exists.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import re
import signal
import sys
import threading
import time
import traceback
import urllib.parse
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

MAX_PAYLOAD_BYTES = 6_291_456
DEFAULT_FUNCTION = "lance-backfill-udf"
DEFAULT_HANDLER = f"{Path(__file__).resolve().parent / 'lance_backfill_udf_runtime.py'}:lambda_handler"
INVOKE_PATH = re.compile(r"^/2015-03-31/functions/(?P<name>[^/]+)/invocations$")

Handler = Callable[[Any, Any], Any]


@dataclass
class Reply:
    """An HTTP answer: status, headers and body."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def json_reply(status: int, obj: Any, headers: Mapping[str, str] | None = None) -> Reply:
    return Reply(status, json.dumps(obj).encode("utf-8"), {"Content-Type": "application/json", **(headers or {})})


def aws_error(status: int, error_type: str, body: Mapping[str, Any]) -> Reply:
    """A service error as Lambda sends it: the type in ``x-amzn-ErrorType``."""
    return json_reply(status, body, {"x-amzn-ErrorType": error_type})


def function_error(error_message: str, error_type: str, stack_trace: list[str] | None = None) -> Reply:
    """An error of the function itself: still 200, flagged by ``X-Amz-Function-Error``."""
    body: dict[str, Any] = {"errorMessage": error_message, "errorType": error_type}
    if stack_trace is not None:
        body["stackTrace"] = stack_trace
    return json_reply(200, body, {"X-Amz-Function-Error": "Unhandled", "X-Amz-Executed-Version": "$LATEST"})


def load_handler(spec: str) -> Handler:
    """``path/to/file.py:function`` -> the function (its module is registered under its stem)."""
    path_text, _, attribute = spec.rpartition(":")
    if not path_text or not attribute:
        raise ValueError(f"a handler is FILE.py:FUNCTION, not {spec!r}")
    path = Path(path_text).resolve()
    module_name = path.stem
    module = sys.modules.get(module_name)
    if module is None or Path(getattr(module, "__file__", "")).resolve() != path:
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        if module_spec is None or module_spec.loader is None:
            raise ValueError(f"cannot import {path}")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        module_spec.loader.exec_module(module)
    return getattr(module, attribute)


class LambdaContext:
    """The attributes of Lambda's Python context object that handlers use."""

    def __init__(self, function_name: str, arn: str, memory_mb: int, timeout_s: float) -> None:
        self.function_name = function_name
        self.function_version = "$LATEST"
        self.invoked_function_arn = arn
        self.memory_limit_in_mb = str(memory_mb)
        self.aws_request_id = str(uuid.uuid4())
        self.log_group_name = f"/aws/lambda/{function_name}"
        self.log_stream_name = time.strftime("%Y/%m/%d/[$LATEST]") + uuid.uuid4().hex
        self.identity = None
        self.client_context = None
        self._deadline = time.monotonic() + timeout_s

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


class Emulator:
    """Lambda's Invoke semantics, independent of HTTP."""

    def __init__(
        self,
        functions: Mapping[str, Handler],
        throttle_rate: float = 0.0,
        seed: int | None = None,
        max_concurrency: int = 0,
        timeout_s: float = 900.0,
        memory_mb: int = 1024,
        region: str = "us-east-1",
        account: str = "000000000000",
    ) -> None:
        self.functions = dict(functions)
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self.region = region
        self.account = account
        self._lock = threading.Lock()
        self._throttle_rate = throttle_rate
        self._seed = seed
        self._rng = random.Random(seed)
        self._max_concurrency = max_concurrency
        self._in_flight = 0
        self._max_in_flight = 0
        self._stats: Counter[str] = Counter()
        self._by_function: Counter[str] = Counter()

    # -- control ------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        with self._lock:
            return {
                "throttle_rate": self._throttle_rate,
                "seed": self._seed,
                "max_concurrency": self._max_concurrency,
                "functions": sorted(self.functions),
            }

    def configure(self, changes: Mapping[str, Any]) -> dict[str, Any]:
        with self._lock:
            if "throttle_rate" in changes:
                rate = float(changes["throttle_rate"])
                if not 0.0 <= rate <= 1.0:
                    raise ValueError("throttle_rate must be between 0 and 1")
                self._throttle_rate = rate
            if "seed" in changes:
                self._seed = None if changes["seed"] is None else int(changes["seed"])
                self._rng = random.Random(self._seed)
            if "max_concurrency" in changes:
                self._max_concurrency = int(changes["max_concurrency"] or 0)
            if changes.get("reset_stats"):
                self._stats.clear()
                self._by_function.clear()
                self._max_in_flight = self._in_flight
        return self.config()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "invocations": self._stats["invocations"],
                "succeeded": self._stats["succeeded"],
                "function_errors": self._stats["function_errors"],
                "throttled": self._stats["throttled"],
                "request_too_large": self._stats["request_too_large"],
                "response_too_large": self._stats["response_too_large"],
                "not_found": self._stats["not_found"],
                "bad_request": self._stats["bad_request"],
                "async": self._stats["async"],
                "in_flight": self._in_flight,
                "max_in_flight": self._max_in_flight,
                "by_function": dict(self._by_function),
            }

    def _count(self, key: str) -> None:
        with self._lock:
            self._stats[key] += 1

    # -- invoke -------------------------------------------------------------

    def arn(self, name: str) -> str:
        return f"arn:aws:lambda:{self.region}:{self.account}:function:{name}"

    def invoke(self, function_ref: str, payload: bytes, invocation_type: str = "RequestResponse") -> Reply:
        """One Invoke call, answered as Lambda answers it."""
        self._count("invocations")
        name = function_name(function_ref)
        handler = self.functions.get(name)
        if handler is None:
            self._count("not_found")
            message = f"Function not found: {self.arn(name)}"
            return aws_error(404, "ResourceNotFoundException", {"Type": "User", "message": message})
        with self._lock:
            self._by_function[name] += 1
        if len(payload) > MAX_PAYLOAD_BYTES:
            self._count("request_too_large")
            message = f"Request must be smaller than {MAX_PAYLOAD_BYTES} bytes for the InvokeFunction operation"
            return aws_error(413, "RequestTooLargeException", {"Type": "User", "message": message})
        try:
            event = json.loads(payload) if payload.strip() else {}
        except ValueError as exc:
            self._count("bad_request")
            message = f"Could not parse request body into json: {exc}"
            return aws_error(400, "InvalidRequestContentException", {"Type": "User", "message": message})
        if invocation_type == "DryRun":
            return Reply(204)
        if not self._admit():
            self._count("throttled")
            body = {
                "Reason": "ReservedFunctionConcurrentInvocationLimitExceeded",
                "Type": "User",
                "message": "Rate Exceeded.",
            }
            return aws_error(429, "TooManyRequestsException", body)
        if invocation_type == "Event":
            self._count("async")
            threading.Thread(target=self._run, args=(name, handler, event), daemon=True).start()
            return Reply(202, headers={"Content-Type": "application/json"})
        return self._run(name, handler, event)

    def _admit(self) -> bool:
        """Throttle by rate and by concurrency; take an in-flight slot when admitted."""
        with self._lock:
            if self._throttle_rate > 0.0 and self._rng.random() < self._throttle_rate:
                return False
            if self._max_concurrency and self._in_flight >= self._max_concurrency:
                return False
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
            return True

    def _run(self, name: str, handler: Handler, event: Any) -> Reply:
        """Run the handler in this thread (the in-flight slot is already taken)."""
        context = LambdaContext(name, self.arn(name), self.memory_mb, self.timeout_s)
        try:
            try:
                result = handler(event, context)
            except Exception as exc:
                self._count("function_errors")
                stack = traceback.format_list(traceback.extract_tb(exc.__traceback__))
                return function_error(str(exc), type(exc).__name__, stack)
            try:
                body = json.dumps(result).encode("utf-8")
            except (TypeError, ValueError) as exc:
                self._count("function_errors")
                return function_error(f"Unable to marshal response: {exc}", "Runtime.MarshalError")
            if len(body) > MAX_PAYLOAD_BYTES:
                self._count("response_too_large")
                return function_error(
                    f"Response payload size ({len(body)} bytes) exceeded maximum allowed payload size "
                    f"({MAX_PAYLOAD_BYTES} bytes).",
                    "Function.ResponseSizeTooLarge",
                )
            self._count("succeeded")
            headers = {"Content-Type": "application/json", "X-Amz-Executed-Version": "$LATEST"}
            return Reply(200, body, headers)
        finally:
            with self._lock:
                self._in_flight -= 1


def function_name(ref: str) -> str:
    """A name, a full or partial ARN, with or without a qualifier -> the function's name."""
    ref = urllib.parse.unquote(ref)
    if ":function:" in ref:
        ref = ref.split(":function:", 1)[1]
    return ref.split(":", 1)[0]


class EmulatorServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], emulator: Emulator, log: bool) -> None:
        super().__init__(address, EmulatorRequestHandler)
        self.emulator = emulator
        self.log = log


class EmulatorRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: EmulatorServer

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._read_body()
        path = urllib.parse.urlsplit(self.path).path
        if path == "/_stats":
            self._reply(json_reply(200, self.server.emulator.stats()))
        elif path == "/_config":
            self._reply(json_reply(200, self.server.emulator.config()))
        else:
            self._reply(json_reply(404, {"message": f"no route GET {path}"}))

    def do_POST(self) -> None:  # noqa: N802
        body = self._read_body()
        path = urllib.parse.urlsplit(self.path).path
        match = INVOKE_PATH.match(path)
        if match:
            invocation_type = self.headers.get("X-Amz-Invocation-Type", "RequestResponse")
            self._reply(self.server.emulator.invoke(match.group("name"), body, invocation_type))
        elif path == "/_config":
            try:
                changes = json.loads(body or b"{}")
                if not isinstance(changes, dict):
                    raise ValueError("the config must be a JSON object")
                self._reply(json_reply(200, self.server.emulator.configure(changes)))
            except (ValueError, TypeError) as exc:
                self._reply(json_reply(400, {"message": str(exc)}))
        else:
            self._reply(json_reply(404, {"message": f"no route POST {path}"}))

    def _read_body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _reply(self, reply: Reply) -> None:
        self.send_response(reply.status)
        headers = {"x-amzn-RequestId": str(uuid.uuid4()), **reply.headers}
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        if reply.body:
            self.wfile.write(reply.body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        if self.server.log:
            super().log_message(format, *args)


def parse_functions(specs: list[str], default_handler: str) -> dict[str, Handler]:
    """``NAME`` or ``NAME=FILE.py:HANDLER`` -> handlers by name."""
    functions: dict[str, Handler] = {}
    for spec in specs or [DEFAULT_FUNCTION]:
        name, _, handler = spec.partition("=")
        functions[name] = load_handler(handler or default_handler)
    return functions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Local emulator of AWS Lambda's Invoke API")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9001, help="0 picks a free port")
    parser.add_argument(
        "--function",
        action="append",
        default=[],
        metavar="NAME[=FILE.py:HANDLER]",
        help=f"a function to serve (repeatable; default: {DEFAULT_FUNCTION})",
    )
    parser.add_argument("--handler", default=DEFAULT_HANDLER, help="the handler of functions named without one")
    parser.add_argument("--throttle-rate", type=float, default=0.0, help="share of invocations answered 429")
    parser.add_argument("--seed", type=int, default=None, help="seed of the throttling draws")
    parser.add_argument("--max-concurrency", type=int, default=0, help="429 above this many in flight (0: no limit)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds the context reports")
    parser.add_argument("--memory", type=int, default=1024, help="MB the context reports")
    parser.add_argument("--region", default="us-east-1")
    parser.add_argument("--log-requests", action="store_true")
    args = parser.parse_args(argv)
    emulator = Emulator(
        parse_functions(args.function, args.handler),
        throttle_rate=args.throttle_rate,
        seed=args.seed,
        max_concurrency=args.max_concurrency,
        timeout_s=args.timeout,
        memory_mb=args.memory,
        region=args.region,
    )
    server = EmulatorServer((args.host, args.port), emulator, args.log_requests)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"listening on http://{args.host}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
