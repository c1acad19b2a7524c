"""Tests of the UDF runtime through its three transports, and of the Lambda emulator.

Transports under test (the ``client`` fixture runs each shared test on all four):

- ``pipe``: ``python lance_backfill_udf_runtime.py pipe`` as a subprocess, framed IPC;
- ``http``: ``python lance_backfill_udf_runtime.py http --port 0`` as a subprocess, every
  request signed (HMAC-SHA256, computed here independently of the runtime's code);
- ``lambda``: ``lambda_handler(event, None)`` called in this process;
- ``emulator``: the same handler behind ``lambda_invoke_emulator.py`` (a subprocess),
  invoked over HTTP as the AWS SDK does.

UDFs defined in this module are pickled by value (``register_pickle_by_value``),
as a user's notebook functions are, so the subprocesses need not import this file.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import http.client
import http.server
import importlib
import io
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

import lance_backfill_udf_runtime as runtime

RUNTIME_DIR = Path(__file__).resolve().parents[1]
RUNTIME_FILE = RUNTIME_DIR / "lance_backfill_udf_runtime.py"
EMULATOR_FILE = RUNTIME_DIR / "lambda_invoke_emulator.py"
FUNCTION = "lance-backfill-udf"
TEST_FUNCTION = "test-fn"
MAX_PAYLOAD = 6_291_456
SECRET_ENV = "LANCE_BACKFILL_UDF_HTTP_SECRET"
ALLOW_HTTP_ENV = "LANCE_BACKFILL_UDF_ALLOW_HTTP_URLS"
SECRET = f"test-secret-{uuid.uuid4().hex}"
# Variables of the emulator's environment that its handlers must not see.
EMULATOR_SECRETS = {
    "LANCE_BACKFILL_API_KEYS": f"api-key-{uuid.uuid4().hex}",
    "AWS_SECRET_ACCESS_KEY": f"aws-secret-{uuid.uuid4().hex}",
    SECRET_ENV: f"http-secret-{uuid.uuid4().hex}",
}

cloudpickle.register_pickle_by_value(sys.modules[__name__])

INT64 = {"type": "int64"}
UTF8 = {"type": "utf8"}
FSL64 = {
    "type": "fixed_size_list",
    "length": 64,
    "fields": [{"name": "item", "type": {"type": "float32"}, "nullable": True}],
}


def output(column: str, data_type: dict[str, Any], struct_field: str | None = None, nullable: bool = True) -> dict:
    return {"column": column, "struct_field": struct_field or column, "data_type": data_type, "nullable": nullable}


# --------------------------------------------------------------------------
# UDFs (pickled by value)
# --------------------------------------------------------------------------


def times_two_plus_one(batch: pa.RecordBatch) -> pa.Array:
    return pc.add(pc.multiply(batch.column("x"), 2), 1)


def label_rows(batch: pa.RecordBatch) -> list:
    xs = batch.column("x").to_pylist()
    ss = batch.column("s").to_pylist()
    return [None if x is None else f"{s}:{x * x}" for x, s in zip(xs, ss)]


class CountingSetup:
    """Counts setup() calls in a process-wide place (the environment)."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.model: int | None = None

    def setup(self) -> None:
        os.environ[self.key] = str(int(os.environ.get(self.key, "0")) + 1)
        self.model = 1000

    def __call__(self, batch: pa.RecordBatch) -> pa.Array:
        if self.model is None:
            raise RuntimeError("called before setup()")
        return pa.array([int(os.environ[self.key])] * batch.num_rows, pa.int64())


def two_outputs_struct(batch: pa.RecordBatch) -> pa.StructArray:
    x = batch.column("x")
    return pa.StructArray.from_arrays([pc.multiply(x, 2), pc.cast(x, pa.utf8())], names=["double", "text"])


def two_outputs_dict(batch: pa.RecordBatch) -> dict:
    x = batch.column("x").to_numpy()
    return {"double": x * 2, "text": [str(v) for v in x]}


def embed(batch: pa.RecordBatch) -> np.ndarray:
    x = batch.column("x").to_numpy().astype(np.float64)
    return x[:, None] + np.arange(64, dtype=np.float64)[None, :] / 64.0


def fails_on_negative(batch: pa.RecordBatch) -> pa.Array:
    for value in batch.column("x").to_pylist():
        if value is not None and value < 0:
            raise ValueError(f"negative value {value}")
    return batch.column("x")


def drops_a_row(batch: pa.RecordBatch) -> pa.Array:
    return batch.column("x").slice(1)


def noisy(batch: pa.RecordBatch) -> pa.Array:
    print("hello from the udf " * 50)
    sys.stdout.write("more user output\n")
    sys.stdout.flush()
    os.write(1, b"raw write to fd 1\n")
    return batch.column("x")


def exits_process(batch: pa.RecordBatch) -> pa.Array:
    os._exit(3)


def identity(batch: pa.RecordBatch) -> pa.Array:
    return batch.column(0)


def sleepy(batch: pa.RecordBatch) -> pa.Array:
    time.sleep(0.3)
    return batch.column("x")


def huge_embedding(batch: pa.RecordBatch) -> np.ndarray:
    return np.ones((batch.num_rows, 2048), dtype=np.float32)


def environment_report(batch: pa.RecordBatch) -> list:
    """What the process the UDF runs in can see: its environment and its parent's."""
    parent = os.getppid()
    try:
        with open(f"/proc/{parent}/environ", "rb") as file:
            parent_environ = file.read().decode("utf-8", "replace")
    except OSError as exc:
        parent_environ = f"unreadable: {type(exc).__name__}"
    report = json.dumps({"env": dict(os.environ), "pid": os.getpid(), "ppid": parent, "parent": parent_environ})
    return [report] * batch.num_rows


def secret_variable(batch: pa.RecordBatch) -> list:
    return [os.environ.get("LANCE_BACKFILL_UDF_HTTP_SECRET")] * batch.num_rows


class KeepsBatches:
    """Holds on to every input batch and checks earlier ones were not overwritten."""

    def __init__(self) -> None:
        self.kept: list[tuple[pa.RecordBatch, int]] = []

    def __call__(self, batch: pa.RecordBatch) -> pa.Array:
        for old, total in self.kept:
            if pc.sum(old.column("x")).as_py() != total:
                raise AssertionError("a kept batch changed under the udf")
        self.kept.append((batch, pc.sum(batch.column("x")).as_py()))
        return batch.column("x")


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


@dataclass
class Udf:
    payload: bytes
    name: str
    outputs: list[dict[str, Any]]
    workspace_zips: list[str] | None = None

    @property
    def id(self) -> str:
        return hashlib.sha256(self.payload).hexdigest()


def make_udf(fn: Any, outputs: list[dict], name: str | None = None, zips: list[str] | None = None) -> Udf:
    return Udf(cloudpickle.dumps(fn), name or getattr(fn, "__name__", type(fn).__name__), outputs, zips)


@dataclass
class Outcome:
    response: dict[str, Any]
    result: pa.Array | None = None

    @property
    def status(self) -> str:
        return self.response["status"]


def make_batch(n: int = 100, start: int = 0, null_at: int | None = None) -> pa.RecordBatch:
    xs: list[int | None] = list(range(start, start + n))
    if null_at is not None:
        xs[null_at] = None
    return pa.record_batch({"x": pa.array(xs, pa.int64()), "s": pa.array([f"r{i}" for i in range(n)])})


def ipc_bytes(batch: pa.RecordBatch) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def read_result(data: bytes) -> pa.Array:
    table = pa.ipc.open_stream(data).read_all()
    assert table.schema.names == ["result"]
    return table.column(0).combine_chunks()


def wait_for_listening(proc: subprocess.Popen) -> str:
    line = proc.stdout.readline().decode()
    assert line.startswith("listening on http://"), line
    return line.strip().split("http://", 1)[1]


def sign(secret: str, method: str, path: str, body: bytes, timestamp: int | str | None = None) -> dict[str, str]:
    """The signature headers of the HTTP runtime's protocol, version 1."""
    timestamp = str(int(time.time()) if timestamp is None else timestamp)
    message = f"{timestamp}\n{method}\n{path}\n".encode() + body
    digest = hmac.new(secret.encode("utf-8"), message, hashlib.sha256).hexdigest()
    return {"x-lance-backfill-timestamp": timestamp, "x-lance-backfill-signature": f"v1={digest}"}


def environment_without(*names: str, **extra: str) -> dict[str, str]:
    environment = {k: v for k, v in os.environ.items() if k not in names}
    environment.update(extra)
    return environment


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------
# Transport clients: load(udf) -> response, call(id, batch) -> Outcome
# --------------------------------------------------------------------------


class PipeWorker:
    """A driver of ``runtime.py pipe``, framing like the Rust process pool."""

    def __init__(self, stderr_path: Path) -> None:
        self.stderr_path = stderr_path
        self._stderr = open(stderr_path, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, str(RUNTIME_FILE), "pipe"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        self.ready, _ = self.read()

    def send(self, header: dict[str, Any] | bytes, body: bytes = b"") -> None:
        head = header if isinstance(header, bytes) else json.dumps(header).encode()
        self.proc.stdin.write(struct.pack("<I", len(head)) + head + struct.pack("<I", len(body)))
        self.proc.stdin.write(body)
        self.proc.stdin.flush()

    def _frame(self) -> bytes:
        size = self.proc.stdout.read(4)
        if len(size) < 4:
            raise EOFError("the worker closed its stdout")
        return self.proc.stdout.read(struct.unpack("<I", size)[0])

    def read(self) -> tuple[dict[str, Any], bytes]:
        header = json.loads(self._frame())
        return header, self._frame()

    def request(self, header: dict[str, Any] | bytes, body: bytes = b"") -> tuple[dict[str, Any], bytes]:
        self.send(header, body)
        return self.read()

    def load(self, udf: Udf, udf_id: str | None = None) -> dict[str, Any]:
        header = {"op": "load", "udf": udf_id or udf.id, "name": udf.name, "outputs": udf.outputs}
        if udf.workspace_zips:
            header["workspace_zips"] = udf.workspace_zips
        return self.request(header, udf.payload)[0]

    def call(self, udf_id: str, batch: pa.RecordBatch) -> Outcome:
        header, body = self.request({"op": "call", "udf": udf_id}, ipc_bytes(batch))
        return Outcome(header, read_result(body) if header["status"] == "ok" else None)

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(BrokenPipeError):
                self.send({"op": "exit"})
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._stderr.close()


class HttpRuntime:
    """A client of ``runtime.py http``; requests are signed with ``secret`` unless told otherwise."""

    def __init__(self, *args: str, secret: str | None = SECRET, host: str | None = "127.0.0.1") -> None:
        self.secret = secret
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        host_args = ["--host", host] if host else []
        self.proc = subprocess.Popen(
            [sys.executable, str(RUNTIME_FILE), "http", *host_args, "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=environment_without(SECRET_ENV, **({SECRET_ENV: secret} if secret else {})),
        )
        self.address = wait_for_listening(self.proc)

    def stderr(self) -> str:
        if self._stderr.closed:
            return self._stderr_text
        self._stderr.seek(0)
        return self._stderr.read().decode("utf-8", "replace")

    def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        signed: bool = True,
    ) -> tuple[int, dict[str, str], bytes]:
        headers = dict(headers or {})
        if signed and self.secret:
            headers.update(sign(self.secret, method, path, body))
        conn = http.client.HTTPConnection(self.address, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            conn.close()

    def load(self, udf: Udf, udf_id: str | None = None) -> dict[str, Any]:
        for encoded in udf.workspace_zips or []:
            data = base64.b64decode(encoded)
            status, _, body = self.request("PUT", f"/workspace/{hashlib.sha256(data).hexdigest()}", data)
            assert status == 200, body
        headers = {"x-lance-backfill-outputs": json.dumps(udf.outputs), "x-lance-backfill-udf-name": udf.name}
        _, _, body = self.request("PUT", f"/udf/{udf_id or udf.id}", udf.payload, headers)
        return json.loads(body)

    def post(
        self, batch_bytes: bytes, headers: dict[str, str] | None = None, signed: bool = True
    ) -> tuple[int, dict[str, str], bytes]:
        return self.request(
            "POST",
            "/",
            batch_bytes,
            {"Content-Type": "application/vnd.apache.arrow.stream", **(headers or {})},
            signed=signed,
        )

    def call(self, udf_id: str, batch: pa.RecordBatch) -> Outcome:
        status, headers, body = self.post(ipc_bytes(batch), {"x-lance-backfill-udf": udf_id})
        if status == 200:
            assert headers["content-type"] == "application/vnd.apache.arrow.stream"
            return Outcome({"status": "ok", "rows": int(headers["x-lance-backfill-rows"])}, read_result(body))
        response = json.loads(body)
        expected = {"ok": 200, "unknown_udf": 404}.get(response["status"], 422)
        assert status == expected or (status == 400 and response["error_type"] == "BadRequest"), (status, response)
        return Outcome(response)

    def close(self) -> None:
        stop(self.proc)
        self._stderr_text = self.stderr()
        self._stderr.close()


class LambdaClient:
    """Builds Invoke events the way the Rust Lambda adapter does."""

    def __init__(self) -> None:
        self.udfs: dict[str, Udf] = {}

    def load(self, udf: Udf, udf_id: str | None = None) -> dict[str, Any]:
        self.udfs[udf_id or udf.id] = udf  # sent with each call; the handler loads it once
        return {"status": "ok"}

    def event(self, udf_id: str, batch: pa.RecordBatch, with_payload: bool = True) -> dict[str, Any]:
        udf_event: dict[str, Any] = {"id": udf_id}
        udf = self.udfs.get(udf_id)
        if udf is not None:
            udf_event.update(name=udf.name, outputs=udf.outputs)
            if with_payload:
                udf_event["payload_b64"] = base64.b64encode(udf.payload).decode()
            if udf.workspace_zips:
                udf_event["workspace_zips"] = udf.workspace_zips
        return {"protocol": 1, "udf": udf_event, "input_b64": base64.b64encode(ipc_bytes(batch)).decode()}

    def invoke(self, event: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def call(self, udf_id: str, batch: pa.RecordBatch) -> Outcome:
        response = self.invoke(self.event(udf_id, batch))
        if response["status"] == "ok":
            return Outcome(response, read_result(base64.b64decode(response["output_b64"])))
        return Outcome(response)

    def close(self) -> None:
        pass


class LambdaDirect(LambdaClient):
    def invoke(self, event: dict[str, Any]) -> dict[str, Any]:
        return json.loads(json.dumps(runtime.lambda_handler(event, None)))  # as Lambda serialises it


class EmulatorProcess:
    """``lambda_invoke_emulator.py`` as a subprocess, with the runtime and a test function."""

    def __init__(self, tmp: Path, *args: str, env: dict[str, str] | None = None) -> None:
        handler = tmp / "emulator_test_handler.py"
        handler.write_text(TEST_HANDLER)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(EMULATOR_FILE),
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--function",
                FUNCTION,
                "--function",
                f"{TEST_FUNCTION}={handler}:handler",
                *args,
            ],
            stdout=subprocess.PIPE,
            env=environment_without(**(env or {})),
        )
        self.address = wait_for_listening(self.proc)
        self.url = f"http://{self.address}"

    def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection(self.address, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            conn.close()

    def invoke_raw(self, function: str, payload: bytes) -> tuple[int, dict[str, str], bytes]:
        return self.request("POST", f"/2015-03-31/functions/{function}/invocations", payload)

    def configure(self, **changes: Any) -> dict[str, Any]:
        status, _, body = self.request("POST", "/_config", json.dumps(changes).encode())
        assert status == 200, body
        return json.loads(body)

    def stats(self) -> dict[str, Any]:
        return json.loads(self.request("GET", "/_stats")[2])

    def close(self) -> None:
        stop(self.proc)


TEST_HANDLER = """
import os
import time


def handler(event, context):
    action = event.get("action")
    if action == "raise":
        raise RuntimeError("boom: " + str(event.get("detail")))
    if action == "big":
        return "x" * int(event["size"])
    if action == "sleep":
        time.sleep(float(event["seconds"]))
    if action == "unjsonable":
        return {1, 2}
    if action == "exit":
        os._exit(int(event["code"]))
    if action == "pid":
        return {"pid": os.getpid(), "ppid": os.getppid()}
    remaining_ms = context.get_remaining_time_in_millis()
    return {"echo": event, "function_name": context.function_name, "remaining_ms": remaining_ms}
"""


class LambdaViaEmulator(LambdaClient):
    def __init__(self, emulator: EmulatorProcess) -> None:
        super().__init__()
        self.emulator = emulator

    def invoke(self, event: dict[str, Any]) -> dict[str, Any]:
        status, headers, body = self.emulator.invoke_raw(FUNCTION, json.dumps(event).encode())
        assert status == 200 and "x-amz-function-error" not in headers, (status, body[:500])
        return json.loads(body)


# --------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatorProcess]:
    process = EmulatorProcess(tmp_path_factory.mktemp("emulator"), env=EMULATOR_SECRETS)
    yield process
    process.close()


@pytest.fixture(scope="module")
def http_runtime() -> Iterator[HttpRuntime]:
    server = HttpRuntime()
    yield server
    server.close()


@pytest.fixture(scope="module", params=["pipe", "http", "lambda", "emulator"])
def client(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if request.param == "pipe":
        worker = PipeWorker(tmp_path_factory.mktemp("pipe") / "stderr.txt")
        yield worker
        worker.close()
    elif request.param == "http":
        yield request.getfixturevalue("http_runtime")
    elif request.param == "lambda":
        yield LambdaDirect()
    else:
        yield LambdaViaEmulator(request.getfixturevalue("emulator"))


@pytest.fixture
def pipe_worker(tmp_path: Path) -> Iterator[PipeWorker]:
    worker = PipeWorker(tmp_path / "stderr.txt")
    yield worker
    worker.close()


def write_module(directory: Path, name: str, source: str) -> Path:
    path = directory / f"{name}.py"
    path.write_text(source)
    return path


def pickle_from_temporary_module(directory: Path, name: str, source: str, attribute: str) -> bytes:
    """Pickle a function by reference to a module that then disappears."""
    write_module(directory, name, source)
    sys.path.insert(0, str(directory))
    importlib.invalidate_caches()
    try:
        return cloudpickle.dumps(getattr(importlib.import_module(name), attribute))
    finally:
        sys.path.remove(str(directory))
        sys.modules.pop(name, None)
        shutil.rmtree(directory)
        importlib.invalidate_caches()


@pytest.fixture(scope="session")
def missing_module_udf(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Udf]:
    name = f"lb_gone_{uuid.uuid4().hex[:8]}"
    source = "def passthrough(batch):\n    return batch.column('x')\n"
    payload = pickle_from_temporary_module(tmp_path_factory.mktemp("gone"), name, source, "passthrough")
    return name, Udf(payload, "passthrough", [output("y", INT64)])


@pytest.fixture(scope="session")
def workspace_udf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Udf, str]:
    name = f"lb_workspace_{uuid.uuid4().hex[:8]}"
    source = "import pyarrow.compute as pc\n\n\ndef triple(batch):\n    return pc.multiply(batch.column('x'), 3)\n"
    payload = pickle_from_temporary_module(tmp_path_factory.mktemp("ws"), name, source, "triple")
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(f"{name}.py", source)
    return Udf(payload, "triple", [output("y", INT64)]), base64.b64encode(archive.getvalue()).decode()


def load_and_call(client: Any, udf: Udf, batch: pa.RecordBatch, udf_id: str | None = None) -> Outcome:
    loaded = client.load(udf, udf_id)
    if loaded["status"] != "ok":
        return Outcome(loaded)
    return client.call(udf_id or udf.id, batch)


def assert_error(outcome: Outcome, error_type: str, *fragments: str) -> None:
    assert outcome.status == "error", outcome.response
    assert outcome.response["error_type"] == error_type, outcome.response
    for fragment in fragments:
        assert fragment in outcome.response["message"], outcome.response


# --------------------------------------------------------------------------
# The same behaviour through every transport
# --------------------------------------------------------------------------


def test_vectorised_function(client: Any) -> None:
    batch = make_batch(1000, start=-500, null_at=7)
    outcome = load_and_call(client, make_udf(times_two_plus_one, [output("y", INT64)]), batch)
    assert outcome.status == "ok" and outcome.response["rows"] == 1000
    expected = [None if x is None else 2 * x + 1 for x in batch.column("x").to_pylist()]
    assert outcome.result.to_pylist() == expected


def test_row_by_row_function(client: Any) -> None:
    batch = make_batch(50, null_at=3)
    outcome = load_and_call(client, make_udf(label_rows, [output("label", UTF8)]), batch)
    assert outcome.status == "ok"
    assert outcome.result.type == pa.utf8()
    assert outcome.result.to_pylist()[:5] == ["r0:0", "r1:1", "r2:4", None, "r4:16"]


def test_setup_runs_once_per_process(client: Any) -> None:
    udf = make_udf(CountingSetup(f"LB_TEST_SETUPS_{uuid.uuid4().hex}"), [output("n", INT64)], "counting")
    assert client.load(udf)["status"] == "ok"
    assert client.load(udf)["status"] == "ok"  # a second load of the same id is a cache hit
    for start in range(3):
        outcome = client.call(udf.id, make_batch(10, start=start))
        assert outcome.status == "ok", outcome.response
        assert outcome.result.to_pylist() == [1] * 10


def test_two_outputs_from_struct_array(client: Any) -> None:
    outputs = [output("y_double", INT64, "double"), output("y_text", UTF8, "text")]
    outcome = load_and_call(client, make_udf(two_outputs_struct, outputs), make_batch(5))
    assert outcome.status == "ok"
    assert outcome.result.type == pa.struct([("double", pa.int64()), ("text", pa.utf8())])
    assert outcome.result.to_pylist()[2] == {"double": 4, "text": "2"}


def test_two_outputs_from_dict(client: Any) -> None:
    outputs = [output("y_double", INT64, "double", nullable=False), output("y_text", UTF8, "text")]
    outcome = load_and_call(client, make_udf(two_outputs_dict, outputs), make_batch(5))
    assert outcome.status == "ok", outcome.response
    assert outcome.result.type == pa.struct(
        [pa.field("double", pa.int64(), nullable=False), pa.field("text", pa.utf8())]
    )
    assert outcome.result.field("double").to_pylist() == [0, 2, 4, 6, 8]
    assert outcome.result.field("text").to_pylist() == ["0", "1", "2", "3", "4"]


def test_numpy_2d_fills_fixed_size_list(client: Any) -> None:
    outcome = load_and_call(client, make_udf(embed, [output("vec", FSL64)]), make_batch(20))
    assert outcome.status == "ok", outcome.response
    assert outcome.result.type == pa.list_(pa.field("item", pa.float32()), 64)
    values = outcome.result.values.to_numpy().reshape(20, 64)
    np.testing.assert_allclose(values[3], 3 + np.arange(64) / 64.0, rtol=1e-6)


def test_function_error_is_reported_and_the_runtime_keeps_serving(client: Any) -> None:
    udf = make_udf(fails_on_negative, [output("y", INT64)])
    outcome = load_and_call(client, udf, make_batch(10, start=-3))
    assert_error(outcome, "ValueError", "negative value -3")
    assert "fails_on_negative" in outcome.response["traceback"]
    assert len(outcome.response["traceback"]) <= 4000
    again = client.call(udf.id, make_batch(10, start=0))
    assert again.status == "ok" and again.result.to_pylist() == list(range(10))


def test_wrong_length_is_a_length_mismatch(client: Any) -> None:
    outcome = load_and_call(client, make_udf(drops_a_row, [output("y", INT64)], "short"), make_batch(100))
    assert_error(outcome, "LengthMismatch")
    assert outcome.response["message"] == "udf 'short' returned 99 rows for a batch of 100 rows"


def test_checksum_mismatch(client: Any) -> None:
    outcome = load_and_call(client, make_udf(identity, [output("y", INT64)]), make_batch(3), udf_id="0" * 64)
    assert_error(outcome, "ChecksumMismatch", "0" * 64)


def test_unknown_udf(client: Any) -> None:
    outcome = client.call("ab" * 32, make_batch(3))
    assert outcome.response == {"status": "unknown_udf", "udf": "ab" * 32}


def test_missing_module_on_unpickle(client: Any, missing_module_udf: tuple[str, Udf]) -> None:
    module, udf = missing_module_udf
    outcome = load_and_call(client, udf, make_batch(3))
    assert_error(outcome, "ModuleNotFoundError", repr(module), "not installed in the runtime environment")


def test_workspace_zips_make_a_module_importable(client: Any, workspace_udf: tuple[Udf, str]) -> None:
    udf, zip_b64 = workspace_udf
    assert_error(load_and_call(client, udf, make_batch(3)), "ModuleNotFoundError")
    with_zip = Udf(udf.payload, udf.name, udf.outputs, [zip_b64])
    outcome = load_and_call(client, with_zip, make_batch(4))
    assert outcome.status == "ok", outcome.response
    assert outcome.result.to_pylist() == [0, 3, 6, 9]


def test_user_output_does_not_disturb_the_protocol(client: Any) -> None:
    outcome = load_and_call(client, make_udf(noisy, [output("y", INT64)]), make_batch(8))
    assert outcome.status == "ok" and outcome.result.to_pylist() == list(range(8))


# --------------------------------------------------------------------------
# Pipe
# --------------------------------------------------------------------------


def test_pipe_ready_message(pipe_worker: PipeWorker) -> None:
    ready = pipe_worker.ready
    assert ready["status"] == "ready" and ready["protocol"] == 1
    assert ready["pid"] == pipe_worker.proc.pid
    assert ready["pyarrow"] == pa.__version__
    assert ready["python"].count(".") == 2


def test_pipe_ping_bad_requests_and_exit(pipe_worker: PipeWorker) -> None:
    assert pipe_worker.request({"op": "ping"}) == ({"status": "ok"}, b"")
    header, _ = pipe_worker.request(b"{not json")
    assert header["error_type"] == "BadRequest"
    header, _ = pipe_worker.request({"op": "dance"})
    assert header["error_type"] == "BadRequest" and "dance" in header["message"]
    udf = make_udf(identity, [output("y", INT64)])
    assert pipe_worker.load(udf)["status"] == "ok"
    header, body = pipe_worker.request({"op": "call", "udf": udf.id}, b"not arrow")
    assert header["error_type"] == "BadRequest" and body == b""
    bad_outputs = {"op": "load", "udf": udf.id, "name": "x", "outputs": [output("y", {"type": "tensor"})]}
    header, _ = pipe_worker.request(bad_outputs, udf.payload)
    assert header["error_type"] == "BadRequest" and "tensor" in header["message"]
    assert pipe_worker.request({"op": "ping"})[0] == {"status": "ok"}
    pipe_worker.send({"op": "exit"})
    assert pipe_worker.proc.wait(timeout=5) == 0


def test_pipe_eof_exits_cleanly(pipe_worker: PipeWorker) -> None:
    pipe_worker.proc.stdin.close()
    assert pipe_worker.proc.wait(timeout=5) == 0


def test_pipe_user_output_goes_to_stderr(pipe_worker: PipeWorker) -> None:
    udf = make_udf(noisy, [output("y", INT64)])
    assert pipe_worker.load(udf)["status"] == "ok"
    for _ in range(3):
        assert pipe_worker.call(udf.id, make_batch(4)).status == "ok"
    pipe_worker.close()
    stderr = pipe_worker.stderr_path.read_text()
    assert stderr.count("hello from the udf") >= 150
    assert stderr.count("raw write to fd 1") == 3


def test_pipe_udf_that_exits_closes_the_pipe(pipe_worker: PipeWorker) -> None:
    udf = make_udf(exits_process, [output("y", INT64)])
    assert pipe_worker.load(udf)["status"] == "ok"
    pipe_worker.send({"op": "call", "udf": udf.id}, ipc_bytes(make_batch(3)))
    with pytest.raises(EOFError):
        pipe_worker.read()
    assert pipe_worker.proc.wait(timeout=5) == 3


def test_pipe_batches_kept_by_a_udf_stay_intact(pipe_worker: PipeWorker) -> None:
    udf = make_udf(KeepsBatches(), [output("y", INT64)])
    assert pipe_worker.load(udf)["status"] == "ok"
    for i in range(5):
        outcome = pipe_worker.call(udf.id, make_batch(1000, start=i * 1000))
        assert outcome.status == "ok", outcome.response


def test_pipe_overhead_per_batch(pipe_worker: PipeWorker, capsys: pytest.CaptureFixture[str]) -> None:
    """Round trip of an identity UDF on 10,240 int64 rows: IPC both ways + dispatch."""
    udf = make_udf(identity, [output("y", INT64)])
    assert pipe_worker.load(udf)["status"] == "ok"
    batch = pa.record_batch({"x": pa.array(np.arange(10_240, dtype=np.int64))})
    head = json.dumps({"op": "call", "udf": udf.id}).encode()
    body = ipc_bytes(batch)
    request = struct.pack("<I", len(head)) + head + struct.pack("<I", len(body)) + body
    ping_head = json.dumps({"op": "ping"}).encode()
    ping = struct.pack("<I", len(ping_head)) + ping_head + struct.pack("<I", 0)
    stdin, stdout = pipe_worker.proc.stdin, pipe_worker.proc.stdout

    def round_trips(frames: bytes, count: int, parse: bool) -> list[float]:
        times = []
        for _ in range(count):
            start = time.perf_counter()
            stdin.write(frames)
            stdin.flush()
            stdout.read(struct.unpack("<I", stdout.read(4))[0])
            result = stdout.read(struct.unpack("<I", stdout.read(4))[0])
            if parse:
                pa.ipc.open_stream(result).read_next_batch()
            times.append(time.perf_counter() - start)
        return times

    round_trips(request, 200, True)  # warm up
    calls = sorted(round_trips(request, 3000, True))
    pings = sorted(round_trips(ping, 1000, False))
    in_process = runtime_cost_in_process(udf, body)
    mean_us = sum(calls) / len(calls) * 1e6
    ping_us = sum(pings) / len(pings) * 1e6
    p50_us, p99_us = calls[len(calls) // 2] * 1e6, calls[int(len(calls) * 0.99)] * 1e6
    with capsys.disabled():
        print(
            f"\npipe round trip, identity on 10,240 int64 rows: mean {mean_us:.0f} us, "
            f"p50 {p50_us:.0f} us, p99 {p99_us:.0f} us (empty ping: {ping_us:.0f} us; "
            f"the runtime's own work per batch, in process: {in_process:.0f} us)"
        )
    assert result_ok(pipe_worker, udf.id, batch)
    assert p50_us < 1000, f"median round trip {p50_us:.0f} us"


def runtime_cost_in_process(udf: Udf, body: bytes, count: int = 2000) -> float:
    """Microseconds of ``handle_pipe_request`` per call (IPC in and out, dispatch, the UDF)."""
    runtime.REGISTRY.load(udf.id, udf.name, udf.outputs, udf.payload)
    header = {"op": "call", "udf": udf.id}
    view = memoryview(bytearray(body))
    start = time.perf_counter()
    for _ in range(count):
        response, _ = runtime.handle_pipe_request(header, view)
    assert response["status"] == "ok"
    return (time.perf_counter() - start) / count * 1e6


def result_ok(worker: PipeWorker, udf_id: str, batch: pa.RecordBatch) -> bool:
    outcome = worker.call(udf_id, batch)
    return outcome.status == "ok" and outcome.result.equals(batch.column(0))


# --------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------


def test_http_server_started_with_a_udf_file(tmp_path: Path) -> None:
    udf = make_udf(times_two_plus_one, [output("y", INT64)])
    (tmp_path / "payload.pkl").write_bytes(udf.payload)
    server = HttpRuntime(
        "--udf-file", str(tmp_path / "payload.pkl"), "--outputs", json.dumps(udf.outputs), "--name", "tw"
    )
    try:
        status, _, body = server.request("GET", "/health")
        assert status == 200 and json.loads(body) == {"status": "ok", "udfs": [udf.id]}
        for path in ("/", "/invoke"):
            status, headers, body = server.request(
                "POST", path, ipc_bytes(make_batch(4)), {"Content-Type": "application/vnd.apache.arrow.stream"}
            )
            assert status == 200 and headers["x-lance-backfill-rows"] == "4"
            assert read_result(body).to_pylist() == [1, 3, 5, 7]
    finally:
        server.close()


def test_http_error_statuses(http_runtime: HttpRuntime) -> None:
    udf = make_udf(identity, [output("y", INT64)])
    assert http_runtime.load(udf)["status"] == "ok"
    status, _, body = http_runtime.post(b"definitely not arrow", {"x-lance-backfill-udf": udf.id})
    assert status == 400 and json.loads(body)["error_type"] == "BadRequest"
    status, _, body = http_runtime.post(ipc_bytes(make_batch(2)))
    assert status == 400 and "--udf-file" in json.loads(body)["message"]
    status, _, body = http_runtime.post(ipc_bytes(make_batch(2)), {"x-lance-backfill-udf": "cd" * 32})
    assert status == 404 and json.loads(body) == {"status": "unknown_udf", "udf": "cd" * 32}
    status, _, body = http_runtime.request("PUT", f"/udf/{udf.id}", udf.payload, {"x-lance-backfill-outputs": "[{"})
    assert status == 400 and json.loads(body)["error_type"] == "BadRequest"
    status, _, body = http_runtime.request("PUT", f"/udf/{'0' * 64}", udf.payload, {"x-lance-backfill-outputs": "[]"})
    assert status == 400
    status, _, _ = http_runtime.request("GET", "/nowhere")
    assert status == 404
    failing = make_udf(fails_on_negative, [output("y", INT64)])
    assert http_runtime.load(failing)["status"] == "ok"
    status, _, body = http_runtime.post(ipc_bytes(make_batch(3, start=-1)), {"x-lance-backfill-udf": failing.id})
    assert status == 422 and json.loads(body)["error_type"] == "ValueError"


def post_headers(udf_id: str) -> dict[str, str]:
    return {"Content-Type": "application/vnd.apache.arrow.stream", "x-lance-backfill-udf": udf_id}


def assert_refused(status: int, body: bytes, expected_status: int, error_type: str, *fragments: str) -> None:
    answer = json.loads(body)
    assert status == expected_status, (status, answer)
    assert answer["status"] == "error" and answer["error_type"] == error_type, answer
    for fragment in fragments:
        assert fragment in answer["message"], answer


def health_ids(server: HttpRuntime) -> list[str]:
    status, _, body = server.request("GET", "/health", signed=False)
    assert status == 200
    return json.loads(body)["udfs"]


def test_http_unsigned_requests_are_unauthorized(http_runtime: HttpRuntime) -> None:
    udf = make_udf(times_two_plus_one, [output("y", INT64)], "unsigned")
    udf.payload += b"u"
    headers = {"x-lance-backfill-outputs": json.dumps(udf.outputs)}
    status, response_headers, body = http_runtime.request("PUT", f"/udf/{udf.id}", udf.payload, headers, signed=False)
    assert_refused(status, body, 401, "Unauthorized", "x-lance-backfill-timestamp")
    assert response_headers["www-authenticate"]
    assert udf.id not in health_ids(http_runtime)  # nothing was unpickled
    status, _, body = http_runtime.request("POST", "/", ipc_bytes(make_batch(2)), post_headers(udf.id), signed=False)
    assert_refused(status, body, 401, "Unauthorized")
    status, _, body = http_runtime.request("GET", "/nowhere", signed=False)
    assert_refused(status, body, 401, "Unauthorized")
    # One header without the other, or headers that are not of the protocol's form.
    good = sign(SECRET, "PUT", f"/udf/{udf.id}", udf.payload)
    for broken in (
        {"x-lance-backfill-timestamp": good["x-lance-backfill-timestamp"]},
        {"x-lance-backfill-signature": good["x-lance-backfill-signature"]},
        {**good, "x-lance-backfill-signature": good["x-lance-backfill-signature"].upper()},
        {**good, "x-lance-backfill-signature": good["x-lance-backfill-signature"][3:]},
        {**good, "x-lance-backfill-signature": "v2=" + good["x-lance-backfill-signature"][3:]},
        {**good, "x-lance-backfill-timestamp": good["x-lance-backfill-timestamp"] + ".0"},
    ):
        status, _, body = http_runtime.request(
            "PUT", f"/udf/{udf.id}", udf.payload, {**headers, **broken}, signed=False
        )
        assert_refused(status, body, 401, "Unauthorized")
    assert udf.id not in health_ids(http_runtime)
    # A client that waits for "100 Continue" is refused before it sends the body.
    host, port = http_runtime.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        raw.sendall(
            f"PUT /udf/{udf.id} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(udf.payload)}\r\n"
            "Expect: 100-continue\r\n\r\n".encode()
        )
        answer = b""
        while chunk := raw.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 401 ") and b"100 Continue" not in answer, answer[:200]


def test_http_wrong_signatures_are_unauthorized(http_runtime: HttpRuntime) -> None:
    udf = make_udf(times_two_plus_one, [output("y", INT64)], "wrongly-signed")
    udf.payload += b"w"
    headers = {"x-lance-backfill-outputs": json.dumps(udf.outputs)}
    path = f"/udf/{udf.id}"
    for signature in (
        sign("another secret", "PUT", path, udf.payload),  # the wrong key
        sign(SECRET, "PUT", path, udf.payload + b"tampered"),  # another body
        sign(SECRET, "POST", path, udf.payload),  # another method
        sign(SECRET, "PUT", f"/udf/{'0' * 64}", udf.payload),  # another path
    ):
        status, _, body = http_runtime.request("PUT", path, udf.payload, {**headers, **signature}, signed=False)
        assert_refused(status, body, 401, "Unauthorized", "does not match")
    assert udf.id not in health_ids(http_runtime)


def test_http_stale_or_future_timestamps_are_unauthorized(http_runtime: HttpRuntime) -> None:
    udf = make_udf(times_two_plus_one, [output("y", INT64)], "stale")
    udf.payload += b"s"
    headers = {"x-lance-backfill-outputs": json.dumps(udf.outputs)}
    path = f"/udf/{udf.id}"
    now = int(time.time())
    for timestamp, fragment in ((now - 600, "behind"), (now + 600, "ahead of")):
        signature = sign(SECRET, "PUT", path, udf.payload, timestamp)  # correctly signed, but 10 minutes off
        status, _, body = http_runtime.request("PUT", path, udf.payload, {**headers, **signature}, signed=False)
        assert_refused(status, body, 401, "Unauthorized", fragment, "300 s")
    assert udf.id not in health_ids(http_runtime)
    signature = sign(SECRET, "PUT", path, udf.payload, now - 200)  # within the 300 s allowed
    status, _, body = http_runtime.request("PUT", path, udf.payload, {**headers, **signature}, signed=False)
    assert status == 200, body


def test_http_signed_requests_load_and_call_a_udf(http_runtime: HttpRuntime) -> None:
    udf = make_udf(times_two_plus_one, [output("y", INT64)], "signed")
    udf.payload += b"ok"
    headers = {"x-lance-backfill-outputs": json.dumps(udf.outputs), "x-lance-backfill-udf-name": udf.name}
    path = f"/udf/{udf.id}"
    signature = sign(SECRET, "PUT", path, udf.payload)
    status, _, body = http_runtime.request("PUT", path, udf.payload, {**headers, **signature}, signed=False)
    assert status == 200 and json.loads(body)["status"] == "ok", body
    batch = ipc_bytes(make_batch(5, start=10))
    for target in ("/", "/invoke", "/invoke?trace=1"):  # the query string is part of the signed path
        signature = sign(SECRET, "POST", target, batch)
        status, response_headers, body = http_runtime.request(
            "POST", target, batch, {**post_headers(udf.id), **signature}, signed=False
        )
        assert status == 200, body
        assert response_headers["x-lance-backfill-rows"] == "5"
        assert read_result(body).to_pylist() == [21, 23, 25, 27, 29]
    signature = sign(SECRET, "POST", "/invoke", batch)  # signed without the query it is sent with
    status, _, body = http_runtime.request(
        "POST", "/invoke?trace=1", batch, {**post_headers(udf.id), **signature}, signed=False
    )
    assert_refused(status, body, 401, "Unauthorized")


def test_http_health_needs_no_signature(http_runtime: HttpRuntime) -> None:
    status, _, body = http_runtime.request("GET", "/health", signed=False)
    assert status == 200 and json.loads(body)["status"] == "ok"


def non_loopback_address() -> str | None:
    """An address of this machine other than 127.0.0.0/8, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def test_http_listens_on_loopback_by_default() -> None:
    server = HttpRuntime(host=None)  # no --host
    try:
        host, port = server.address.rsplit(":", 1)
        assert host == "127.0.0.1"
        assert health_ids(server) == []
        other = non_loopback_address()
        if other is not None:
            with pytest.raises(OSError), socket.create_connection((other, int(port)), timeout=5):
                pass
    finally:
        server.close()


def run_http_server(*args: str, env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(RUNTIME_FILE), "http", "--port", "0", *args],
        capture_output=True,
        env=env,
        timeout=timeout,
    )


def test_http_refuses_to_start_without_a_secret(tmp_path: Path) -> None:
    finished = run_http_server(env=environment_without(SECRET_ENV))
    assert finished.returncode == 2
    assert b"listening" not in finished.stdout
    assert SECRET_ENV.encode() in finished.stderr and b"--secret-file" in finished.stderr
    assert b"--insecure-no-auth" in finished.stderr
    finished = run_http_server(env=environment_without(SECRET_ENV, **{SECRET_ENV: ""}))
    assert finished.returncode == 2
    (tmp_path / "empty").write_text(" \n")
    finished = run_http_server("--secret-file", str(tmp_path / "empty"), env=environment_without(SECRET_ENV))
    assert finished.returncode == 2 and b"empty" in finished.stderr
    finished = run_http_server("--secret-file", str(tmp_path / "missing"), env=environment_without(SECRET_ENV))
    assert finished.returncode == 2 and b"missing" in finished.stderr


def test_http_starts_with_insecure_no_auth_and_warns() -> None:
    server = HttpRuntime("--insecure-no-auth", secret=None)
    try:
        udf = make_udf(times_two_plus_one, [output("y", INT64)], "insecure")
        assert server.load(udf)["status"] == "ok"  # unsigned
        outcome = server.call(udf.id, make_batch(3))
        assert outcome.status == "ok" and outcome.result.to_pylist() == [1, 3, 5]
    finally:
        server.close()
    assert "WARNING" in server.stderr() and "--insecure-no-auth" in server.stderr()


def test_http_secret_file_and_the_secret_out_of_os_environ(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text(f"  {SECRET}-from-file\n")
    server = HttpRuntime("--secret-file", str(tmp_path / "secret"), secret=f"{SECRET}-from-file")
    try:
        udf = make_udf(secret_variable, [output("s", UTF8)])
        outcome = load_and_call(server, udf, make_batch(2))
        assert outcome.status == "ok", outcome.response
        assert outcome.result.to_pylist() == [None, None]  # the file's secret never was in the environment
    finally:
        server.close()
    server = HttpRuntime()  # the secret from LANCE_BACKFILL_UDF_HTTP_SECRET
    try:
        outcome = load_and_call(server, make_udf(secret_variable, [output("s", UTF8)]), make_batch(2))
        assert outcome.status == "ok", outcome.response
        assert outcome.result.to_pylist() == [None, None]  # removed from the environment once read
    finally:
        server.close()


@pytest.fixture
def cached_server(tmp_path: Path) -> Iterator[tuple[HttpRuntime, Path]]:
    cache = tmp_path / "cache"
    cache.mkdir()
    server = HttpRuntime("--cache-dir", str(cache))
    yield server, cache
    server.close()


def uri_headers(udf: Udf, reference: str) -> dict[str, str]:
    return {
        **post_headers(udf.id),
        "x-lance-backfill-udf-uri": reference,
        "x-lance-backfill-outputs": json.dumps(udf.outputs),
    }


def test_http_udf_uri_header_refuses_uris_and_paths_outside_the_cache(
    cached_server: tuple[HttpRuntime, Path], tmp_path: Path
) -> None:
    server, cache = cached_server
    udf = make_udf(times_two_plus_one, [output("y", INT64)], "outside")
    udf.payload += b"o"
    (tmp_path / "x").write_bytes(udf.payload)  # a valid pickle, next to the cache
    (cache / "link.pkl").symlink_to(tmp_path / "x")  # a symlink out of the cache
    (cache / "sub").mkdir()
    for reference in (
        (tmp_path / "x").as_uri(),
        (cache / "sub" / "x").as_uri(),  # file:// even inside the cache
        "/etc/passwd",
        "../x",
        "sub/../../x",
        str(tmp_path / "x"),
        str(cache / "link.pkl"),
        "link.pkl",
        str(cache),
        "s3://b/k",
        "https://example.com/x.pkl",
    ):
        status, _, body = server.post(ipc_bytes(make_batch(3)), uri_headers(udf, reference))
        assert_refused(status, body, 400, "BadRequest")
    assert udf.id not in health_ids(server)


def test_http_udf_uri_header_loads_from_the_cache_dir(cached_server: tuple[HttpRuntime, Path]) -> None:
    server, cache = cached_server
    for i, reference in enumerate(["sub/udf.pkl", "ABSOLUTE"]):
        udf = make_udf(times_two_plus_one, [output("y", INT64)], f"cached-{i}")
        udf.payload += b"c" * (i + 1)  # a distinct id (pickle ignores bytes after STOP)
        (cache / "sub").mkdir(exist_ok=True)
        (cache / "sub" / "udf.pkl").write_bytes(udf.payload)
        if reference == "ABSOLUTE":
            reference = str(cache / "sub" / ".." / "sub" / "udf.pkl")
        status, _, body = server.post(ipc_bytes(make_batch(3)), uri_headers(udf, reference))
        assert status == 200, body
        assert read_result(body).to_pylist() == [1, 3, 5]
    missing = make_udf(identity, [output("y", INT64)], "missing")
    status, _, body = server.post(ipc_bytes(make_batch(3)), uri_headers(missing, "nothing-here.pkl"))
    assert_refused(status, body, 422, "PayloadUnavailable")


def test_http_body_over_max_body_bytes_is_refused() -> None:
    server = HttpRuntime("--max-body-bytes", "4096")
    try:
        udf = make_udf(identity, [output("y", INT64)])
        assert server.load(udf)["status"] == "ok"  # a pickle under 4 KiB
        big = ipc_bytes(make_batch(2000))
        assert len(big) > 4096
        status, headers, body = server.post(big, post_headers(udf.id))
        assert_refused(status, body, 413, "PayloadTooLarge", "4096")
        status, _, body = server.post(big, post_headers(udf.id), signed=False)  # not signed: 401 first
        assert_refused(status, body, 401, "Unauthorized")
        small = ipc_bytes(make_batch(10))
        status, _, body = server.post(small, post_headers(udf.id))
        assert status == 200 and read_result(body).to_pylist() == list(range(10))
    finally:
        server.close()


def concurrent_seconds(server: HttpRuntime, udf_id: str, calls: int) -> float:
    statuses: list[int] = []

    def one() -> None:
        statuses.append(server.post(ipc_bytes(make_batch(2)), {"x-lance-backfill-udf": udf_id})[0])

    threads = [threading.Thread(target=one) for _ in range(calls)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == [200] * calls
    return time.perf_counter() - start


def test_http_calls_run_concurrently_unless_serial(http_runtime: HttpRuntime) -> None:
    udf = make_udf(sleepy, [output("y", INT64)])
    assert http_runtime.load(udf)["status"] == "ok"
    assert concurrent_seconds(http_runtime, udf.id, 4) < 1.0  # 4 x 0.3 s in parallel
    serial = HttpRuntime("--serial")
    try:
        assert serial.load(udf)["status"] == "ok"
        assert concurrent_seconds(serial, udf.id, 4) >= 1.2  # one at a time
    finally:
        serial.close()


# --------------------------------------------------------------------------
# Lambda handler, called directly
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "event",
    [
        None,
        [],
        {"protocol": 1},
        {"protocol": 2, "udf": {"id": "x"}, "input_b64": ""},
        {"protocol": 1, "udf": {"id": "x"}},
        {"protocol": 1, "udf": {"id": "x", "outputs": "nope"}, "input_b64": ""},
    ],
)
def test_lambda_malformed_event_is_a_bad_request(event: Any) -> None:
    response = runtime.lambda_handler(event, None)
    assert response["status"] == "error" and response["error_type"] == "BadRequest", response


def test_lambda_bad_input_is_a_bad_request() -> None:
    client = LambdaDirect()
    udf = make_udf(identity, [output("y", INT64)], "bad-input")
    udf.payload += b".."
    client.load(udf)
    event = client.event(udf.id, make_batch(2))
    event["input_b64"] = "***"
    assert runtime.lambda_handler(event, None)["error_type"] == "BadRequest"


def test_lambda_payload_uri_is_refused(tmp_path: Path) -> None:
    client = LambdaDirect()
    udf = make_udf(times_two_plus_one, [output("y", INT64)], "payload-uri")
    udf.payload += b"..."
    path = tmp_path / "udf.pkl"
    path.write_bytes(udf.payload)  # readable, and still never read
    client.load(udf)
    for uri in (str(path), path.as_uri(), f"s3://udfs/udf/{udf.id}.pkl"):
        for with_payload in (False, True):
            event = client.event(udf.id, make_batch(2), with_payload=with_payload)
            event["udf"]["payload_uri"] = uri
            response = client.invoke(event)
            assert response["status"] == "error" and response["error_type"] == "BadRequest", response
            assert "payload_uri is no longer accepted" in response["message"]
            assert "payload_b64" in response["message"] and "payload_url" in response["message"]
    assert client.invoke(client.event(udf.id, make_batch(2), with_payload=False))["status"] == "unknown_udf"


class PayloadServer:
    """A local HTTP server of pickles (as a presigned S3 URL would serve them), on a thread."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, dict[str, str], bytes]] = {}
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                server.requests.append(self.path)
                status, headers, body = server.routes.get(self.path.split("?")[0], (404, {}, b"no such key"))
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def serve(self, path: str, body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> str:
        self.routes[path] = (status, headers or {}, body)
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def payload_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[PayloadServer]:
    monkeypatch.setenv(ALLOW_HTTP_ENV, "1")
    server = PayloadServer()
    yield server
    server.close()


def url_event(client: LambdaClient, udf: Udf, url: str, rows: int = 2) -> dict[str, Any]:
    event = client.event(udf.id, make_batch(rows), with_payload=False)
    event["udf"]["payload_url"] = url
    return event


def test_lambda_loads_from_a_payload_url_and_caches_it(payload_server: PayloadServer) -> None:
    client = LambdaDirect()
    udf = make_udf(times_two_plus_one, [output("y", INT64)], "from-url")
    udf.payload += b"...."
    client.load(udf)
    assert client.invoke(client.event(udf.id, make_batch(2), with_payload=False))["status"] == "unknown_udf"
    url = payload_server.serve(f"/udf/{udf.id}.pkl", udf.payload) + "?X-Amz-Signature=abc"
    response = client.invoke(url_event(client, udf, url, rows=4))
    assert response["status"] == "ok", response
    assert read_result(base64.b64decode(response["output_b64"])).to_pylist() == [1, 3, 5, 7]
    assert payload_server.requests == [f"/udf/{udf.id}.pkl?X-Amz-Signature=abc"]
    assert client.invoke(url_event(client, udf, url))["status"] == "ok"  # cached: not fetched again
    assert len(payload_server.requests) == 1


def test_lambda_payload_url_with_other_bytes_is_refused(payload_server: PayloadServer) -> None:
    client = LambdaDirect()
    udf = make_udf(times_two_plus_one, [output("y", INT64)], "swapped")
    udf.payload += b"....."
    client.load(udf)
    other = make_udf(identity, [output("y", INT64)]).payload
    response = client.invoke(url_event(client, udf, payload_server.serve("/swapped.pkl", other)))
    assert response["status"] == "error" and response["error_type"] == "ChecksumMismatch", response
    assert udf.id in response["message"]
    assert client.invoke(client.event(udf.id, make_batch(2), with_payload=False))["status"] == "unknown_udf"


def test_lambda_http_payload_url_needs_the_test_variable(
    payload_server: PayloadServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = LambdaDirect()
    udf = make_udf(times_two_plus_one, [output("y", INT64)], "plain-http")
    udf.payload += b"......"
    client.load(udf)
    url = payload_server.serve("/plain.pkl", udf.payload)
    for value in (None, "0", "true", ""):
        if value is None:
            monkeypatch.delenv(ALLOW_HTTP_ENV, raising=False)
        else:
            monkeypatch.setenv(ALLOW_HTTP_ENV, value)
        response = client.invoke(url_event(client, udf, url))
        assert response["status"] == "error" and response["error_type"] == "BadRequest", response
        assert "https://" in response["message"] and ALLOW_HTTP_ENV in response["message"]
    assert payload_server.requests == []  # refused before any request


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "s3://udfs/udf.pkl", "ftp://example.com/udf.pkl", "/etc/passwd", "https://", 7]
)
def test_lambda_payload_url_must_be_https(url: Any) -> None:
    client = LambdaDirect()
    udf = make_udf(times_two_plus_one, [output("y", INT64)], "scheme")
    udf.payload += b"......."
    client.load(udf)
    response = client.invoke(url_event(client, udf, url))
    assert response["status"] == "error" and response["error_type"] == "BadRequest", response


def test_lambda_payload_url_failures_are_payload_unavailable(
    payload_server: PayloadServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = LambdaDirect()
    udf = make_udf(times_two_plus_one, [output("y", INT64)], "unavailable")
    udf.payload += b"........"
    client.load(udf)
    response = client.invoke(url_event(client, udf, payload_server.serve("/gone", b"", 404) + "?X-Amz-Signature=s3cr"))
    assert response["error_type"] == "PayloadUnavailable" and "404" in response["message"], response
    assert "s3cr" not in response["message"]  # a presigned URL's query is not repeated
    target = payload_server.serve("/real.pkl", udf.payload)
    moved = payload_server.serve("/moved", b"", 302, {"Location": target})
    response = client.invoke(url_event(client, udf, moved))
    assert response["error_type"] == "PayloadUnavailable" and "redirects are not followed" in response["message"]
    monkeypatch.setattr(runtime, "MAX_PAYLOAD_BYTES", len(udf.payload) - 1)
    response = client.invoke(url_event(client, udf, target))
    assert response["error_type"] == "PayloadUnavailable" and "allowed" in response["message"], response
    monkeypatch.undo()
    monkeypatch.setenv(ALLOW_HTTP_ENV, "1")
    assert client.invoke(url_event(client, udf, target))["status"] == "ok"


# --------------------------------------------------------------------------
# Conversions, in process
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"type": "int8"}, pa.int8()),
        ({"type": "uint64"}, pa.uint64()),
        ({"type": "float16"}, pa.float16()),
        ({"type": "float64"}, pa.float64()),
        ({"type": "bool"}, pa.bool_()),
        ({"type": "Boolean"}, pa.bool_()),
        ({"type": "utf8"}, pa.utf8()),
        ({"type": "large_utf8"}, pa.large_utf8()),
        ({"type": "binary"}, pa.binary()),
        ({"type": "large_binary"}, pa.large_binary()),
        ({"type": "fixed_size_binary", "length": 16}, pa.binary(16)),
        ({"type": "date32"}, pa.date32()),
        ({"type": "timestamp"}, pa.timestamp("us")),
        ({"type": "decimal128", "length": 38002}, pa.decimal128(38, 2)),
        (
            {"type": "list", "fields": [{"name": "item", "type": {"type": "float32"}, "nullable": True}]},
            pa.list_(pa.float32()),
        ),
        (FSL64, pa.list_(pa.field("item", pa.float32()), 64)),
        (
            {
                "type": "struct",
                "fields": [
                    {"name": "a", "type": {"type": "int32"}, "nullable": False},
                    {"name": "b", "type": {"type": "utf8"}, "nullable": True},
                ],
            },
            pa.struct([pa.field("a", pa.int32(), nullable=False), ("b", pa.utf8())]),
        ),
        (
            {
                "type": "map",
                "fields": [
                    {
                        "name": "entries",
                        "type": {
                            "type": "struct",
                            "fields": [
                                {"name": "key", "type": {"type": "utf8"}, "nullable": False},
                                {"name": "value", "type": {"type": "int64"}, "nullable": True},
                            ],
                        },
                        "nullable": False,
                    }
                ],
            },
            pa.map_(pa.utf8(), pa.int64()),
        ),
    ],
)
def test_json_arrow_types(spec: dict[str, Any], expected: pa.DataType) -> None:
    assert runtime.arrow_type_from_json(spec) == expected


@pytest.mark.parametrize("spec", [{"type": "tensor"}, {"type": "list"}, {"nope": 1}, 3])
def test_unsupported_json_arrow_types_are_bad_requests(spec: Any) -> None:
    with pytest.raises(runtime.UdfError) as raised:
        runtime.arrow_type_from_json(spec)
    assert raised.value.error_type == "BadRequest"


def loaded(outputs: list[dict[str, Any]], name: str = "n") -> runtime.LoadedUdf:
    return runtime.LoadedUdf("id", name, identity, runtime.parse_outputs(outputs), 0.0)


TWO = [output("a_col", INT64, "a"), output("b_col", UTF8, "b")]


@pytest.mark.parametrize(
    "result",
    [
        pa.record_batch({"a": [1, 2], "b": ["x", "y"]}),
        pa.table({"b": ["x", "y"], "a": pa.chunked_array([[1], [2]])}),
        {"a_col": np.array([1, 2]), "b_col": ("x", "y")},
    ],
)
def test_several_outputs_from_columns(result: Any) -> None:
    array = runtime.normalise_result(result, loaded(TWO), 2)
    assert array.to_pylist() == [{"a": 1, "b": "x"}, {"a": 2, "b": "y"}]


def test_single_output_conversions() -> None:
    udf = loaded([output("y", {"type": "float32"})])
    chunked = pa.chunked_array([[1.0], [2.0, 3.0]], pa.float32())
    assert runtime.normalise_result(chunked, udf, 3).to_pylist() == [1.0, 2.0, 3.0]
    assert runtime.normalise_result(np.array([1.5, 2.5]), udf, 2).type == pa.float32()
    assert runtime.normalise_result([1, None], udf, 2).type == pa.float32()
    other = pa.array([1, 2], pa.int16())  # Arrow of another type is passed on as is
    assert runtime.normalise_result(other, udf, 2).type == pa.int16()
    listed = loaded([output("v", {"type": "list", "fields": [{"name": "item", "type": {"type": "float32"}}]})])
    assert runtime.normalise_result(np.ones((2, 3)), listed, 2).to_pylist() == [[1.0] * 3] * 2


@pytest.mark.parametrize(
    ("outputs", "result", "error_type"),
    [
        ([output("y", INT64)], 5, "BadResult"),
        ([output("y", INT64)], ["a", "b"], "BadResult"),
        ([output("y", FSL64)], np.ones((2, 3)), "BadResult"),
        ([output("y", INT64, nullable=False)], [1, None], "NullViolation"),
        ([output("y", INT64)], [1, 2, 3], "LengthMismatch"),
        (TWO, {"a": [1, 2]}, "BadResult"),
        (TWO, [1, 2], "BadResult"),
        (TWO, {"a": [1, 2], "b": ["x"]}, "LengthMismatch"),
    ],
)
def test_bad_results(outputs: list[dict[str, Any]], result: Any, error_type: str) -> None:
    with pytest.raises(runtime.UdfError) as raised:
        runtime.normalise_result(result, loaded(outputs), 2)
    assert raised.value.error_type == error_type, raised.value.message


def test_geneva_payload_names_the_missing_module() -> None:
    message = runtime.missing_module_message("embed", "geneva.transformer")
    assert "'geneva.transformer'" in message and "Geneva" in message and "install" in message


# --------------------------------------------------------------------------
# Lambda emulator
# --------------------------------------------------------------------------


@pytest.fixture
def clean_emulator(emulator: EmulatorProcess) -> Iterator[EmulatorProcess]:
    emulator.configure(throttle_rate=0.0, seed=None, max_concurrency=0, reset_stats=True)
    yield emulator
    emulator.configure(throttle_rate=0.0, seed=None, max_concurrency=0)


def test_emulator_invoke_with_boto3(clean_emulator: EmulatorProcess) -> None:
    boto3 = pytest.importorskip("boto3")
    from botocore.config import Config

    lam = boto3.client(
        "lambda",
        endpoint_url=clean_emulator.url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=Config(retries={"max_attempts": 1, "mode": "standard"}),
    )
    client = LambdaClient()
    udf = make_udf(times_two_plus_one, [output("y", INT64)])
    client.load(udf)
    response = lam.invoke(FunctionName=FUNCTION, Payload=json.dumps(client.event(udf.id, make_batch(3))).encode())
    assert response["StatusCode"] == 200 and "FunctionError" not in response
    result = json.loads(response["Payload"].read())
    assert read_result(base64.b64decode(result["output_b64"])).to_pylist() == [1, 3, 5]

    arn = f"arn:aws:lambda:us-east-1:000000000000:function:{TEST_FUNCTION}:$LATEST"
    response = lam.invoke(FunctionName=arn, Payload=b'{"action": "raise", "detail": 7}')
    assert response["FunctionError"] == "Unhandled"
    assert json.loads(response["Payload"].read())["errorMessage"] == "boom: 7"

    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.invoke(FunctionName="nobody", Payload=b"{}")
    with pytest.raises(lam.exceptions.RequestTooLargeException):
        lam.invoke(FunctionName=FUNCTION, Payload=b" " * (MAX_PAYLOAD + 1))
    clean_emulator.configure(throttle_rate=1.0)
    with pytest.raises(lam.exceptions.TooManyRequestsException) as raised:
        lam.invoke(FunctionName=FUNCTION, Payload=b"{}")
    assert raised.value.response["Reason"] == "ReservedFunctionConcurrentInvocationLimitExceeded"


def test_emulator_request_and_response_size_limits(clean_emulator: EmulatorProcess) -> None:
    status, headers, body = clean_emulator.invoke_raw(TEST_FUNCTION, b" " * MAX_PAYLOAD + b"{}")
    assert status == 413 and headers["x-amzn-errortype"] == "RequestTooLargeException"
    assert json.loads(body) == {
        "Type": "User",
        "message": "Request must be smaller than 6291456 bytes for the InvokeFunction operation",
    }
    status, _, _ = clean_emulator.invoke_raw(TEST_FUNCTION, b" " * (MAX_PAYLOAD - 2) + b"{}")
    assert status == 200  # exactly at the limit

    client = LambdaViaEmulator(clean_emulator)
    udf = make_udf(huge_embedding, [output("v", {**FSL64, "length": 2048})])
    client.load(udf)  # 1,000 rows x 2,048 float32 = 8 MB, over 10 MB in base64
    status, headers, body = clean_emulator.invoke_raw(
        FUNCTION, json.dumps(client.event(udf.id, make_batch(1000))).encode()
    )
    assert status == 200 and headers["x-amz-function-error"] == "Unhandled"
    assert json.loads(body)["errorType"] == "Function.ResponseSizeTooLarge"
    status, headers, body = clean_emulator.invoke_raw(
        TEST_FUNCTION, json.dumps({"action": "big", "size": MAX_PAYLOAD}).encode()
    )
    assert headers["x-amz-function-error"] == "Unhandled"  # the JSON string's quotes make it 2 bytes over
    stats = clean_emulator.stats()
    assert stats["request_too_large"] == 1 and stats["response_too_large"] == 2


def test_emulator_function_errors(clean_emulator: EmulatorProcess) -> None:
    status, headers, body = clean_emulator.invoke_raw(TEST_FUNCTION, b'{"action": "raise", "detail": "x"}')
    assert status == 200 and headers["x-amz-function-error"] == "Unhandled"
    error = json.loads(body)
    assert error["errorType"] == "RuntimeError" and error["errorMessage"] == "boom: x"
    assert isinstance(error["stackTrace"], list) and "handler" in "".join(error["stackTrace"])
    status, headers, body = clean_emulator.invoke_raw(TEST_FUNCTION, b'{"action": "unjsonable"}')
    assert headers["x-amz-function-error"] == "Unhandled" and json.loads(body)["errorType"] == "Runtime.MarshalError"
    status, headers, body = clean_emulator.invoke_raw(TEST_FUNCTION, b"{oops")
    assert status == 400 and headers["x-amzn-errortype"] == "InvalidRequestContentException"
    status, headers, body = clean_emulator.invoke_raw("nobody", b"{}")
    assert status == 404 and headers["x-amzn-errortype"] == "ResourceNotFoundException"
    status, _, body = clean_emulator.invoke_raw(TEST_FUNCTION, b'{"hello": 1}')
    answer = json.loads(body)
    assert answer["echo"] == {"hello": 1} and answer["function_name"] == TEST_FUNCTION and answer["remaining_ms"] > 0


def throttle_sequence(emulator: EmulatorProcess, count: int) -> list[int]:
    return [emulator.invoke_raw(TEST_FUNCTION, b"{}")[0] for _ in range(count)]


def test_emulator_throttles_at_the_configured_rate_deterministically(
    clean_emulator: EmulatorProcess, tmp_path: Path
) -> None:
    clean_emulator.configure(throttle_rate=0.3, seed=7, reset_stats=True)
    first = throttle_sequence(clean_emulator, 300)
    assert set(first) == {200, 429}
    assert 60 <= first.count(429) <= 120  # 90 expected
    stats = clean_emulator.stats()
    assert stats["throttled"] == first.count(429) and stats["succeeded"] == first.count(200)

    clean_emulator.configure(seed=7)  # the same seed replays the same decisions
    assert throttle_sequence(clean_emulator, 300) == first

    status, headers, body = 200, {}, b""
    while status != 429:
        status, headers, body = clean_emulator.invoke_raw(TEST_FUNCTION, b"{}")
    assert headers["x-amzn-errortype"] == "TooManyRequestsException"
    assert json.loads(body) == {
        "Reason": "ReservedFunctionConcurrentInvocationLimitExceeded",
        "Type": "User",
        "message": "Rate Exceeded.",
    }

    flagged = EmulatorProcess(tmp_path, "--throttle-rate", "0.3", "--seed", "7")
    try:
        assert throttle_sequence(flagged, 100) == first[:100]
    finally:
        flagged.close()


def test_emulator_max_concurrency(clean_emulator: EmulatorProcess) -> None:
    clean_emulator.configure(max_concurrency=1)
    statuses: list[int] = []
    slow = threading.Thread(
        target=lambda: statuses.append(
            clean_emulator.invoke_raw(TEST_FUNCTION, b'{"action": "sleep", "seconds": 0.5}')[0]
        )
    )
    slow.start()
    time.sleep(0.2)
    assert clean_emulator.invoke_raw(TEST_FUNCTION, b"{}")[0] == 429
    slow.join()
    assert statuses == [200]
    assert clean_emulator.stats()["max_in_flight"] == 1


ALLOWED_HANDLER_VARIABLES = {
    "PATH",
    "HOME",
    "LANG",
    "LC_ALL",
    "TZ",
    "TMPDIR",
    "PYTHONPATH",
    ALLOW_HTTP_ENV,
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_EXECUTION_ENV",
    "_HANDLER",
    "LAMBDA_TASK_ROOT",
}


def test_emulator_handlers_do_not_see_the_emulators_environment(emulator: EmulatorProcess) -> None:
    """The emulator was started with API keys and secrets in its environment;
    a UDF run through it sees only the allow-listed variables and Lambda's own."""
    client = LambdaViaEmulator(emulator)
    outcome = load_and_call(client, make_udf(environment_report, [output("env", UTF8)]), make_batch(2))
    assert outcome.status == "ok", outcome.response
    report = json.loads(outcome.result[0].as_py())
    env = report["env"]
    for name, value in EMULATOR_SECRETS.items():
        assert name not in env
        assert not any(value in text for text in env.values())
    # CPython may add LC_CTYPE when it coerces the C locale, and test_setup_runs_once_per_process's
    # UDF sets LB_TEST_SETUPS_* in the handler process; nothing else may appear.
    unexpected = {
        k for k in env if k not in ALLOWED_HANDLER_VARIABLES and not k.startswith(("AWS_LAMBDA_", "LB_TEST_SETUPS_"))
    }
    assert unexpected <= {"LC_CTYPE"}, unexpected
    assert (
        env["AWS_LAMBDA_FUNCTION_NAME"] == FUNCTION and env["_HANDLER"] == "lance_backfill_udf_runtime.lambda_handler"
    )
    assert env["PATH"] == os.environ["PATH"]
    assert report["pid"] != emulator.proc.pid and report["ppid"] == emulator.proc.pid  # a process of its own
    if os.geteuid() != 0:  # root may read any process's environ; others not the emulator's (non-dumpable)
        assert report["parent"].startswith("unreadable"), report["parent"][:200]


def test_emulator_replaces_a_handler_process_that_exited(clean_emulator: EmulatorProcess) -> None:
    status, _, body = clean_emulator.invoke_raw(TEST_FUNCTION, b'{"action": "pid"}')
    first = json.loads(body)
    assert status == 200 and first["ppid"] == clean_emulator.proc.pid
    status, headers, body = clean_emulator.invoke_raw(TEST_FUNCTION, b'{"action": "exit", "code": 3}')
    assert status == 200 and headers["x-amz-function-error"] == "Unhandled"
    error = json.loads(body)
    assert error["errorType"] == "Runtime.ExitError" and "exit status 3" in error["errorMessage"], error
    status, _, body = clean_emulator.invoke_raw(TEST_FUNCTION, b'{"action": "pid"}')
    assert status == 200 and json.loads(body)["pid"] != first["pid"]  # a new process
    assert clean_emulator.stats()["function_errors"] == 1
    assert clean_emulator.proc.poll() is None  # the emulator itself lives on
