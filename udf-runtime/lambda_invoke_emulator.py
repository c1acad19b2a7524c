#!/usr/bin/env python3
"""A local emulator of AWS Lambda's Invoke API, for tests.

AWS's own Lambda emulation needs Docker; this serves
``POST /2015-03-31/functions/{FunctionName}/invocations`` over plain HTTP and
runs each function's Python handler (by default ``lance_backfill_udf_runtime.
lambda_handler`` from this directory) in a subprocess of its own, so boto3, the
AWS SDK for Rust or a plain HTTP client can be pointed at it with an endpoint
URL.

What it reproduces of Lambda (RequestResponse invocations):

- 200 with the handler's JSON result (header ``X-Amz-Executed-Version``).
- A handler exception: 200, ``X-Amz-Function-Error: Unhandled`` and
  ``{"errorMessage", "errorType", "stackTrace"}``; a result that is not JSON:
  the same with ``Runtime.MarshalError``; a handler process that exits
  (``os._exit``, a crash, a kill) during an invocation: the same with
  ``Runtime.ExitError`` for each invocation it was running, and a new process
  for the next one (a handler that cannot be imported then:
  ``Runtime.ImportModuleError``).
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
- The environment: a handler process gets none of the emulator's environment
  variables except ``PATH``, ``HOME``, ``LANG``, ``LC_ALL``, ``TZ``, ``TMPDIR``,
  ``PYTHONPATH`` and ``LANCE_BACKFILL_UDF_ALLOW_HTTP_URLS`` (when set), plus the
  variables Lambda sets (``AWS_LAMBDA_FUNCTION_NAME``,
  ``AWS_LAMBDA_FUNCTION_VERSION``, ``AWS_LAMBDA_FUNCTION_MEMORY_SIZE``,
  ``AWS_LAMBDA_LOG_GROUP_NAME``, ``AWS_LAMBDA_LOG_STREAM_NAME``,
  ``AWS_EXECUTION_ENV``, ``AWS_REGION``, ``AWS_DEFAULT_REGION``, ``_HANDLER``,
  ``LAMBDA_TASK_ROOT``), so user code cannot read the secrets of whatever
  started the emulator (API keys, AWS credentials). On Linux the emulator also
  makes itself non-dumpable, so a handler process running as the same
  (non-root) user cannot read ``/proc/<emulator>/environ`` or its memory
  either; a root handler, or the environment of the emulator's own parent, is
  beyond what a process boundary can hide.

Not reproduced: timeouts (the handler is not killed; ``context.
get_remaining_time_in_millis()`` does count down), ``LogType: Tail``, cold
starts and per-container isolation (all invocations of a function share its one
handler process, on threads, so the handler must be thread-safe, as the UDF
runtime is). The handler's output (stdout and stderr) goes to the emulator's
stderr, as Lambda sends it to the function's log.

Control routes: ``GET /_stats`` (invocation counts), ``GET /_config`` and
``POST /_config`` with JSON ``{"throttle_rate", "seed", "max_concurrency",
"reset_stats"}`` (a given seed restarts the throttling sequence).

Start: ``python lambda_invoke_emulator.py --host 127.0.0.1 --port 0``; it prints
``listening on http://HOST:PORT`` once every function's handler process has
imported its handler. Functions are named with ``--function NAME`` (the default
handler) or ``--function NAME=FILE.py:HANDLER``; without any, the single
function ``lance-backfill-udf`` exists.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import itertools
import json
import os
import random
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import traceback
import urllib.parse
import uuid
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, BinaryIO, Callable

MAX_PAYLOAD_BYTES = 6_291_456
DEFAULT_FUNCTION = "lance-backfill-udf"
DEFAULT_HANDLER = f"{Path(__file__).resolve().parent / 'lance_backfill_udf_runtime.py'}:lambda_handler"
INVOKE_PATH = re.compile(r"^/2015-03-31/functions/(?P<name>[^/]+)/invocations$")
WORKER_COMMAND = "_handler-process"
# The only variables of the emulator's environment a handler process sees.
PASSED_ENVIRONMENT = (
    "PATH",
    "HOME",
    "LANG",
    "LC_ALL",
    "TZ",
    "TMPDIR",
    "PYTHONPATH",
    "LANCE_BACKFILL_UDF_ALLOW_HTTP_URLS",
)

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


def split_handler_spec(spec: str) -> tuple[Path, str]:
    """``path/to/file.py:function`` -> (the file, resolved; the function's name)."""
    path_text, _, attribute = spec.rpartition(":")
    if not path_text or not attribute:
        raise ValueError(f"a handler is FILE.py:FUNCTION, not {spec!r}")
    return Path(path_text).resolve(), attribute


def load_handler(spec: str) -> Handler:
    """``path/to/file.py:function`` -> the function (its module is registered under its stem)."""
    path, attribute = split_handler_spec(spec)
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

    def __init__(
        self, function_name: str, arn: str, memory_mb: int, timeout_s: float, request_id: str | None = None
    ) -> None:
        self.function_name = function_name
        self.function_version = "$LATEST"
        self.invoked_function_arn = arn
        self.memory_limit_in_mb = str(memory_mb)
        self.aws_request_id = request_id or str(uuid.uuid4())
        self.log_group_name = f"/aws/lambda/{function_name}"
        self.log_stream_name = time.strftime("%Y/%m/%d/[$LATEST]") + uuid.uuid4().hex
        self.identity = None
        self.client_context = None
        self._deadline = time.monotonic() + timeout_s

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


# --------------------------------------------------------------------------
# Handler processes: each function's handler runs in a subprocess with an
# allow-listed environment; the emulator talks to it over its stdin/stdout in
# frames (a 4-byte little-endian length, then that many bytes): a JSON header
# frame and a body frame per message.
# --------------------------------------------------------------------------

_U32 = struct.Struct("<I")


def write_message(stream: BinaryIO, header: Mapping[str, Any], body: bytes = b"") -> None:
    head = json.dumps(header).encode("utf-8")
    stream.write(_U32.pack(len(head)) + head + _U32.pack(len(body)))
    if body:
        stream.write(body)
    stream.flush()


def _read_exactly(stream: BinaryIO, size: int) -> bytes | None:
    data = stream.read(size)
    return data if len(data) == size else None


def read_message(stream: BinaryIO) -> tuple[dict[str, Any], bytes] | None:
    """(header, body), or None at the end of the stream (or a message cut short)."""
    parts = []
    for _ in range(2):
        size = _read_exactly(stream, 4)
        if size is None:
            return None
        data = _read_exactly(stream, _U32.unpack(size)[0])
        if data is None:
            return None
        parts.append(data)
    return json.loads(parts[0]), parts[1]


def handler_environment(
    name: str,
    spec: str,
    memory_mb: int,
    region: str,
    source: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """A handler process's whole environment: the allow-listed variables of
    ``source`` (the emulator's) and those Lambda sets; nothing else."""
    source = os.environ if source is None else source
    path, attribute = split_handler_spec(spec)
    environment = {key: source[key] for key in PASSED_ENVIRONMENT if key in source}
    environment.update(
        {
            "AWS_LAMBDA_FUNCTION_NAME": name,
            "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(memory_mb),
            "AWS_LAMBDA_LOG_GROUP_NAME": f"/aws/lambda/{name}",
            "AWS_LAMBDA_LOG_STREAM_NAME": time.strftime("%Y/%m/%d/[$LATEST]") + uuid.uuid4().hex,
            "AWS_LAMBDA_INITIALIZATION_TYPE": "on-demand",
            "AWS_EXECUTION_ENV": f"AWS_Lambda_python{sys.version_info[0]}.{sys.version_info[1]}",
            "AWS_REGION": region,
            "AWS_DEFAULT_REGION": region,
            "LAMBDA_TASK_ROOT": str(path.parent),
            "_HANDLER": f"{path.stem}.{attribute}",
        }
    )
    return environment


class HandlerStartError(Exception):
    """A handler process that could not import its handler."""


@dataclass
class Outcome:
    """What a handler process answered for one invocation."""

    kind: str  # "ok", "error" (the handler raised, or its result is not JSON) or "exit"
    body: bytes = b""
    error: dict[str, Any] = field(default_factory=dict)


class _Container:
    """One running handler process and the invocations it has not answered."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self._pending: dict[int, Future] = {}
        self._pending_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self.dead = False
        threading.Thread(target=self._read_answers, name=f"handler-{proc.pid}", daemon=True).start()

    def submit(self, request_id: int, header: Mapping[str, Any], body: bytes) -> Future:
        future: Future = Future()
        with self._pending_lock:
            if self.dead:
                future.set_result(self._exit_outcome())
                return future
            self._pending[request_id] = future
        try:
            with self._write_lock:
                write_message(self.proc.stdin, header, body)
        except (BrokenPipeError, OSError, ValueError):
            pass  # the process is gone: the reader answers every pending invocation
        return future

    def _read_answers(self) -> None:
        try:
            while True:
                message = read_message(self.proc.stdout)
                if message is None:
                    break
                header, body = message
                with self._pending_lock:
                    future = self._pending.pop(header.get("id"), None)
                if future is not None:
                    future.set_result(Outcome(header.get("outcome", "error"), body, header))
        except (OSError, ValueError):
            pass
        finally:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            self.proc.wait()
            with self._pending_lock:
                self.dead = True
                pending = list(self._pending.values())
                self._pending.clear()
            for future in pending:
                future.set_result(self._exit_outcome())

    def _exit_outcome(self) -> Outcome:
        code = self.proc.returncode
        how = f"signal: {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit status {code}"
        return Outcome("exit", error={"reason": f"Runtime exited with error: {how}"})

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class HandlerProcess:
    """A function's handler, run in a Python subprocess (the function's
    "container") that gets only ``environment``. Invocations run there on
    threads; a process that died is replaced at the next invocation."""

    def __init__(self, name: str, spec: str, environment: Mapping[str, str]) -> None:
        split_handler_spec(spec)  # a malformed spec fails here, at start
        self.name = name
        self.spec = spec
        self.environment = dict(environment)
        self._lock = threading.Lock()
        self._container: _Container | None = None
        self._ids = itertools.count(1)

    @property
    def pid(self) -> int | None:
        container = self._container
        return None if container is None else container.proc.pid

    def start(self) -> _Container:
        """The running process, started (and its handler imported) if need be."""
        with self._lock:
            if self._container is not None and not self._container.dead:
                return self._container
            proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), WORKER_COMMAND, self.spec],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=self.environment,
                close_fds=True,
            )
            try:
                ready = read_message(proc.stdout)
            except (OSError, ValueError):
                ready = None
            if ready is None or ready[0].get("status") != "ready":
                message = ready[0].get("message") if ready else f"the handler process exited ({proc.wait()})"
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
                raise HandlerStartError(f"function {self.name}: {message}")
            self._container = _Container(proc)
            return self._container

    def invoke(self, payload: bytes, context: Mapping[str, Any]) -> Outcome:
        """Run the handler on one event (JSON bytes) and wait for its outcome."""
        try:
            container = self.start()
        except HandlerStartError as exc:
            return Outcome("error", error={"errorMessage": str(exc), "errorType": "Runtime.ImportModuleError"})
        request_id = next(self._ids)
        return container.submit(request_id, {"id": request_id, "context": dict(context)}, payload).result()

    def close(self) -> None:
        with self._lock:
            if self._container is not None:
                self._container.stop()


def run_invocation(handler: Handler, header: Mapping[str, Any], body: bytes, send: Callable[..., None]) -> None:
    """In a handler process: one invocation, answered as Lambda's runtime would."""
    reply = {"id": header["id"]}
    given = header.get("context") or {}
    context = LambdaContext(
        given.get("function_name", ""),
        given.get("arn", ""),
        int(given.get("memory_mb", 1024)),
        float(given.get("timeout_s", 900.0)),
        given.get("request_id"),
    )
    try:
        event = json.loads(body) if body.strip() else {}
        result = handler(event, context)
    except BaseException as exc:  # SystemExit too: the invocation fails, the process lives on
        stack = traceback.format_list(traceback.extract_tb(exc.__traceback__))
        send(
            {
                **reply,
                "outcome": "error",
                "errorMessage": str(exc),
                "errorType": type(exc).__name__,
                "stackTrace": stack,
            }
        )
        return
    try:
        data = json.dumps(result).encode("utf-8")
    except (TypeError, ValueError) as exc:
        send(
            {
                **reply,
                "outcome": "error",
                "errorMessage": f"Unable to marshal response: {exc}",
                "errorType": "Runtime.MarshalError",
            }
        )
        return
    send({**reply, "outcome": "ok"}, data)


def serve_handler(spec: str) -> int:
    """The handler process: import the handler, say ready, then run each
    invocation on a thread until stdin closes."""
    # The runtime's own way of keeping the protocol's pipes from the
    # handler's prints (this script's folder is on sys.path).
    from lance_backfill_udf_runtime import claim_stdio

    protocol_in, protocol_out = claim_stdio()
    write_lock = threading.Lock()

    def send(header: Mapping[str, Any], body: bytes = b"") -> None:
        with write_lock:
            write_message(protocol_out, header, body)

    try:
        handler = load_handler(spec)
    except BaseException as exc:
        send({"status": "failed", "message": f"cannot load handler {spec}: {type(exc).__name__}: {exc}"})
        return 1
    send({"status": "ready", "pid": os.getpid()})
    while True:
        try:
            message = read_message(protocol_in)
        except (OSError, ValueError):
            message = None
        if message is None:
            return 0
        header, body = message
        threading.Thread(target=run_invocation, args=(handler, header, body, send), daemon=True).start()


class Emulator:
    """Lambda's Invoke semantics, independent of HTTP; the handlers run in
    their own processes (``HandlerProcess``)."""

    def __init__(
        self,
        functions: Mapping[str, HandlerProcess],
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
            if payload.strip():
                json.loads(payload)
            else:
                payload = b"{}"
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
            threading.Thread(target=self._run, args=(name, handler, payload), daemon=True).start()
            return Reply(202, headers={"Content-Type": "application/json"})
        return self._run(name, handler, payload)

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

    def _run(self, name: str, handler: HandlerProcess, payload: bytes) -> Reply:
        """Run the handler on the event and wait (the in-flight slot is already taken)."""
        request_id = str(uuid.uuid4())
        context = {
            "function_name": name,
            "arn": self.arn(name),
            "memory_mb": self.memory_mb,
            "timeout_s": self.timeout_s,
            "request_id": request_id,
        }
        try:
            outcome = handler.invoke(payload, context)
            if outcome.kind == "exit":
                self._count("function_errors")
                return function_error(f"RequestId: {request_id} Error: {outcome.error['reason']}", "Runtime.ExitError")
            if outcome.kind != "ok":
                self._count("function_errors")
                error = outcome.error
                return function_error(
                    str(error.get("errorMessage", "")), str(error.get("errorType", "")), error.get("stackTrace")
                )
            body = outcome.body
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

    def close(self) -> None:
        """Stop the handler processes."""
        for handler in self.functions.values():
            handler.close()


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


def parse_functions(
    specs: list[str], default_handler: str, memory_mb: int = 1024, region: str = "us-east-1"
) -> dict[str, HandlerProcess]:
    """``NAME`` or ``NAME=FILE.py:HANDLER`` -> handler processes by name (not started)."""
    functions: dict[str, HandlerProcess] = {}
    for spec in specs or [DEFAULT_FUNCTION]:
        name, _, handler = spec.partition("=")
        handler = handler or default_handler
        functions[name] = HandlerProcess(name, handler, handler_environment(name, handler, memory_mb, region))
    return functions


def start_all(functions: Mapping[str, HandlerProcess]) -> list[str]:
    """Start every handler process at once; the errors of those that failed."""
    errors: list[str] = []

    def start(handler: HandlerProcess) -> None:
        try:
            handler.start()
        except (HandlerStartError, OSError) as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=start, args=(handler,)) for handler in functions.values()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [WORKER_COMMAND] and len(argv) == 2:
        return serve_handler(argv[1])
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
    # Keep other processes of this user (handler processes included) out
    # of this one's memory, as the runtime does (this script's folder is
    # on sys.path).
    from lance_backfill_udf_runtime import make_undumpable

    make_undumpable()
    try:
        functions = parse_functions(args.function, args.handler, args.memory, args.region)
    except ValueError as exc:
        parser.error(str(exc))
    emulator = Emulator(
        functions,
        throttle_rate=args.throttle_rate,
        seed=args.seed,
        max_concurrency=args.max_concurrency,
        timeout_s=args.timeout,
        memory_mb=args.memory,
        region=args.region,
    )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        errors = start_all(functions)
        if errors:
            for error in errors:
                print(f"lambda emulator: {error}", file=sys.stderr)
            return 2
        server = EmulatorServer((args.host, args.port), emulator, args.log_requests)
        print(f"listening on http://{args.host}:{server.server_address[1]}", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
    finally:
        emulator.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
