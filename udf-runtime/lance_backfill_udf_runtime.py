#!/usr/bin/env python3
"""The Python runtime of lance-backfill's user functions (UDFs).

The Rust worker never unpickles anything: it hands Arrow record batches to this
module and gets Arrow arrays back. One file serves three transports, so the
Rust binary can embed it (``include_str!``) and run ``python3 <file> pipe``.

What a UDF is
-------------
A cloudpickled Python callable ``f``, unpickled once per process and cached by
its id (the lowercase hex SHA-256 of the pickle bytes, verified on load). If
``f`` has a callable ``setup`` attribute it is called once after unpickling
(to load a model). Each batch is then ``f(batch)`` with a ``pyarrow.RecordBatch``
of the input columns. Before unpickling, ``workspace_zips`` (base64 zip files
of the user's code) are extracted once per content digest into a temporary
directory that is put on ``sys.path``.

The declared outputs are ``[{"column", "struct_field", "data_type", "nullable"}]``
where ``data_type`` is a Lance Namespace JsonArrowDataType (``{"type": "int64"}``,
``{"type": "fixed_size_list", "length": 64, "fields": [...]}``, ...). For one
output ``f`` returns a pyarrow Array or ChunkedArray, a numpy array (a 2-D float
array fills a declared ``fixed_size_list``) or a Python list; for several, a
StructArray whose fields are the ``struct_field`` names, or a RecordBatch, Table
or dict of such columns. Non-Arrow results are converted to the declared type;
Arrow results of another type are passed on unchanged (the Rust side casts or
fails naming both types). The result must have the batch's number of rows.

Every answer is a JSON object with a ``status``:

- ``{"status": "ok", ...}``
- ``{"status": "unknown_udf", "udf": "<id>"}``: the id is not loaded here and no
  payload came with the request; send it again with the payload.
- ``{"status": "error", "error_type", "message", "traceback"}``: ``error_type``
  is the exception's class name for errors raised by the user's code (``setup``
  or the call), or one of the runtime's own: ``BadRequest`` (malformed request),
  ``ChecksumMismatch``, ``ModuleNotFoundError`` (unpickling needs a module this
  environment lacks), ``NotCallable``, ``PayloadUnavailable`` (a ``payload_url``
  or a cached file that cannot be read), ``LengthMismatch``, ``BadResult`` (a
  value that cannot be converted to the declared type), ``NullViolation``
  (nulls in a non-nullable output), and on HTTP only ``Unauthorized`` (401),
  ``PayloadTooLarge`` (413) and ``NotFound`` (404). ``traceback`` holds the last
  4,000 characters of the formatted traceback ("" when there is none). The
  process stays alive.

Transport 1: pipe (``python3 lance_backfill_udf_runtime.py pipe``)
------------------------------------------------------------------
A frame is a 4-byte little-endian unsigned length and that many bytes. Every
request and every response is exactly two frames: a header (UTF-8 JSON object)
and a body (bytes, possibly empty). The process's stdout is the protocol
channel, so user output (``print``, C libraries writing to fd 1) is sent to
stderr, and stdin is replaced by /dev/null.

- unasked, at start: ``{"status": "ready", "protocol": 1, "python", "pyarrow",
  "cloudpickle", "pid"}`` + empty body.
- ``{"op": "load", "udf": id, "name", "outputs", "workspace_zips"?}`` + the
  pickle bytes -> ``{"status": "ok", "setup_ms": float}`` (0 when already
  loaded) + empty body.
- ``{"op": "call", "udf": id}`` + an Arrow IPC stream of one RecordBatch ->
  ``{"status": "ok", "rows": N}`` + an Arrow IPC stream of one RecordBatch with
  one column ``result`` (a StructArray for several outputs).
- ``{"op": "ping"}`` -> ``{"status": "ok"}``; ``{"op": "exit"}`` or EOF on
  stdin -> exit 0 (a frame cut short by EOF -> exit 1).

Transport 2: AWS Lambda (``lance_backfill_udf_runtime.lambda_handler``)
-----------------------------------------------------------------------
Event ``{"protocol": 1, "udf": {"id", "name", "outputs", "payload_b64"?,
"payload_url"?, "workspace_zips"?}, "input_b64": <base64 IPC stream>}``. A UDF
not yet loaded in this container is loaded from ``payload_b64``, else from
``payload_url``, else the answer is ``unknown_udf``. Answer ``{"status": "ok",
"rows": N, "output_b64": <base64 IPC stream>}`` or an error object; the handler
never raises.

``payload_url`` is an ``https://`` URL the function GETs the pickle from: the
service's worker presigns a GET of the pickle it keeps beside the table, so the
function needs no S3 permission. It is fetched with urllib: no redirect is
followed, the whole download has 60 s, the body is at most 512 MiB, and the
bytes must hash to the UDF's id (``ChecksumMismatch`` otherwise); a fetch that
fails is ``PayloadUnavailable``. An ``http://`` URL is refused (``BadRequest``)
unless the environment variable ``LANCE_BACKFILL_UDF_ALLOW_HTTP_URLS`` is ``1``,
which is meant only for tests against local emulators; any other scheme is
refused. There is no other way to name a payload: an event whose ``udf`` has a
``payload_uri`` is answered ``BadRequest`` (send ``payload_b64`` or
``payload_url``).

Transport 3: HTTP (``python3 lance_backfill_udf_runtime.py http --port 8000``)
------------------------------------------------------------------------------
Whoever may load a UDF may run code in this process, so the server listens on
127.0.0.1 unless ``--host`` says otherwise, and every request except ``GET
/health`` must be signed with a secret shared with the client. Expose the
server (``--host 0.0.0.0``) only on a network you trust, and only with the
signature on; the signature authenticates requests but does not encrypt them
(put TLS in front on a network you do not trust).

The secret is the environment variable ``LANCE_BACKFILL_UDF_HTTP_SECRET``
(removed from ``os.environ`` once read, so child processes do not inherit it;
code loaded into the server can still find it in the process's memory, so
whoever may load functions is trusted with it) or the contents of
``--secret-file PATH`` (leading and trailing whitespace stripped; the file wins
over the variable). Without a secret the server does not start (exit status 2,
a message on stderr) unless ``--insecure-no-auth`` is given: then nothing is
checked and a warning is logged at start.

Signature, version 1. A signed request carries two headers:

- ``x-lance-backfill-timestamp: T``, the Unix time in whole seconds, written as
  decimal digits only (``1718000000``);
- ``x-lance-backfill-signature: v1=S``, where ``S`` is the lowercase hex (64
  characters) of HMAC-SHA256 with key = the secret's UTF-8 bytes and message =
  the UTF-8 bytes of ``T + "\n" + METHOD + "\n" + PATH + "\n"`` followed by the
  body's bytes exactly as sent (nothing when there is no body). ``T`` is the
  header's value, ``METHOD`` the upper-case HTTP method (``PUT``, ``POST``,
  ``GET``) and ``PATH`` the request target exactly as sent on the request line
  (``/invoke``, ``/udf/<id>``, the query string included). In Python:
  ``hmac.new(secret.encode(), f"{T}\n{METHOD}\n{PATH}\n".encode() + body,
  hashlib.sha256).hexdigest()`` (``signed_headers`` in this module builds both
  headers).

The server answers 401 with the error object, ``error_type``
``Unauthorized``, when a header is missing or malformed, when ``T`` is more
than 300 s from its clock, or when the signature does not match (compared with
``hmac.compare_digest``). The headers and the timestamp are checked before the
body is read, the signature once it is read and before anything parses or
unpickles it. A body is at most ``--max-body-bytes`` (512 MiB by default):
over it, 413 and error type ``PayloadTooLarge``.

Routes:

- ``POST /`` or ``/invoke``, body an IPC stream of one RecordBatch: runs the UDF
  the server was started with (``--udf-file --outputs --name``) or the one named
  by header ``x-lance-backfill-udf: <id>`` (loaded earlier, or loadable from
  header ``x-lance-backfill-udf-uri``, with ``x-lance-backfill-outputs`` and
  ``x-lance-backfill-udf-name``). 200 + ``application/vnd.apache.arrow.stream``
  (one column ``result``; header ``x-lance-backfill-rows``); function error ->
  422 + error object; unknown UDF -> 404 ``unknown_udf``; bad request -> 400.
- ``x-lance-backfill-udf-uri`` names a file in the server's cache directory
  (``--cache-dir``; by default a new temporary directory made at start and
  removed at exit), by an absolute path or one relative to that directory. The
  path is resolved (symlinks, ``..``) and must then lie inside the directory;
  any other path, and any URI (``file://``, ``s3://``, ``https://``, ...), is
  refused with 400 ``BadRequest``. A file that cannot be read there is 422
  ``PayloadUnavailable``.
- ``PUT /udf/<id>``, body the pickle bytes, header ``x-lance-backfill-outputs``
  (JSON list) and optional ``x-lance-backfill-udf-name`` -> 200 ``{"status":
  "ok", "setup_ms"}``.
- ``PUT /workspace/<sha256>``, body a zip of user code: extracted and put on
  ``sys.path`` (the HTTP form of ``workspace_zips``) -> 200 ``{"status": "ok"}``.
- ``GET /health`` (never signed) -> 200 ``{"status": "ok", "udfs": [ids]}``.
- Anything else (signed) -> 404 ``NotFound``.
Calls run concurrently (threaded server) unless ``--serial``.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import dataclasses
import hashlib
import hmac
import http.client
import http.server
import importlib
import io
import json
import os
import pickle
import platform
import re
import shutil
import signal
import stat
import struct
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Callable, Union

import cloudpickle
import pyarrow as pa

try:  # numpy is optional: only needed to convert numpy results
    import numpy as np
except ImportError:  # pragma: no cover - numpy is installed wherever we test
    np = None  # type: ignore[assignment]

PROTOCOL_VERSION = 1
TRACEBACK_CHARS = 4000
RESULT_COLUMN = "result"
ARROW_STREAM_MIME = "application/vnd.apache.arrow.stream"

BytesLike = Union[bytes, bytearray, memoryview, pa.Buffer]


# --------------------------------------------------------------------------
# Errors: every failure becomes an answer, never a crash
# --------------------------------------------------------------------------


class UdfError(Exception):
    """A failure answered to the caller as ``{"status": "error", ...}``."""

    def __init__(self, error_type: str, message: str, tb: str = "") -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message
        self.traceback = tb

    def to_response(self) -> dict[str, Any]:
        return error_object(self.error_type, self.message, self.traceback)


def error_object(error_type: str, message: str, tb: str = "") -> dict[str, Any]:
    """The error answer of every transport."""
    return {
        "status": "error",
        "error_type": error_type,
        "message": message,
        "traceback": tb[-TRACEBACK_CHARS:],
    }


def error_from_exception(exc: BaseException, message: str | None = None) -> UdfError:
    """An exception raised by user code, reported with its class name and traceback."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return UdfError(type(exc).__name__, str(exc) if message is None else message, tb)


def unknown_udf(udf_id: Any) -> dict[str, Any]:
    return {"status": "unknown_udf", "udf": udf_id}


def bad_request(message: str) -> UdfError:
    return UdfError("BadRequest", message)


# --------------------------------------------------------------------------
# Declared outputs: Lance Namespace JsonArrowDataType -> pyarrow
# --------------------------------------------------------------------------

_PRIMITIVE_TYPES: dict[str, Callable[[], pa.DataType]] = {
    "null": pa.null,
    "bool": pa.bool_,
    "boolean": pa.bool_,
    "int8": pa.int8,
    "int16": pa.int16,
    "int32": pa.int32,
    "int64": pa.int64,
    "uint8": pa.uint8,
    "uint16": pa.uint16,
    "uint32": pa.uint32,
    "uint64": pa.uint64,
    "float16": pa.float16,
    "float32": pa.float32,
    "float64": pa.float64,
    "date32": pa.date32,
    "date64": pa.date64,
    "utf8": pa.utf8,
    "large_utf8": pa.large_utf8,
    "binary": pa.binary,
    "large_binary": pa.large_binary,
    # Lance maps these to microseconds, without a time zone.
    "timestamp": lambda: pa.timestamp("us"),
    "duration": lambda: pa.duration("us"),
}

_DECIMAL_TYPES = ("decimal32", "decimal64", "decimal128", "decimal256")


def arrow_type_from_json(spec: Any) -> pa.DataType:
    """Convert a JsonArrowDataType (``{"type": ..., "fields"?, "length"?}``) the way
    Lance's ``convert_json_arrow_type`` does."""
    if isinstance(spec, str):
        spec = {"type": spec}
    if not isinstance(spec, Mapping) or not isinstance(spec.get("type"), str):
        raise bad_request(f"an Arrow data type must be an object with a string 'type', not {spec!r}")
    name = spec["type"].lower()
    if name in _PRIMITIVE_TYPES:
        return _PRIMITIVE_TYPES[name]()
    length = spec.get("length")
    if name in _DECIMAL_TYPES:
        # Lance encodes precision * 1000 + scale in `length`.
        encoded = int(length or 0)
        precision = (encoded + 128) // 1000
        factory = getattr(pa, name, None)
        if factory is None:
            raise bad_request(f"Arrow type {name!r} needs a newer pyarrow than {pa.__version__}")
        return factory(precision, encoded - precision * 1000)
    if name == "fixed_size_binary":
        return pa.binary(int(length or 0))
    if name in ("list", "large_list", "fixed_size_list"):
        item = arrow_field_from_json(_first_field(spec, name))
        if name == "list":
            return pa.list_(item)
        if name == "large_list":
            return pa.large_list(item)
        return pa.list_(item, int(length or 0))
    if name == "struct":
        fields = spec.get("fields")
        if not isinstance(fields, list):
            raise bad_request("Arrow type 'struct' needs 'fields'")
        return pa.struct([arrow_field_from_json(f) for f in fields])
    if name == "map":
        entries = arrow_field_from_json(_first_field(spec, name))
        if not pa.types.is_struct(entries.type) or entries.type.num_fields != 2:
            raise bad_request("Arrow type 'map' needs one 'entries' struct field of key and value")
        return pa.map_(entries.type.field(0), entries.type.field(1))
    raise bad_request(f"unsupported Arrow data type {spec['type']!r}")


def _first_field(spec: Mapping[str, Any], name: str) -> Any:
    fields = spec.get("fields")
    if not isinstance(fields, list) or not fields:
        raise bad_request(f"Arrow type {name!r} needs its inner field in 'fields'")
    return fields[0]


def arrow_field_from_json(spec: Any) -> pa.Field:
    """Convert a JsonArrowField ``{"name", "type", "nullable", "metadata"?}``."""
    if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
        raise bad_request(f"an Arrow field must be an object with a string 'name', not {spec!r}")
    return pa.field(
        spec["name"],
        arrow_type_from_json(spec.get("type")),
        nullable=bool(spec.get("nullable", True)),
        metadata=spec.get("metadata") or None,
    )


@dataclasses.dataclass(frozen=True)
class OutputSpec:
    """One declared output column of a UDF."""

    column: str
    struct_field: str
    data_type: pa.DataType
    nullable: bool


def parse_outputs(raw: Any) -> tuple[OutputSpec, ...]:
    """Parse the ``outputs`` list of a request (or its JSON text)."""
    if isinstance(raw, (str, bytes)):
        try:
            raw = json.loads(raw)
        except ValueError as exc:
            raise bad_request(f"outputs are not valid JSON: {exc}") from None
    if not isinstance(raw, list) or not raw:
        raise bad_request("outputs must be a non-empty list of {column, struct_field, data_type, nullable}")
    specs = []
    for item in raw:
        if not isinstance(item, Mapping) or not isinstance(item.get("column"), str):
            raise bad_request(f"an output must be an object with a string 'column', not {item!r}")
        specs.append(
            OutputSpec(
                column=item["column"],
                struct_field=str(item.get("struct_field") or item["column"]),
                data_type=arrow_type_from_json(item.get("data_type")),
                nullable=bool(item.get("nullable", True)),
            )
        )
    return tuple(specs)


# --------------------------------------------------------------------------
# Loading: checksum, workspace zips, unpickle, setup()
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LoadedUdf:
    """A UDF ready to call. ``lock`` serialises calls when the server asks for it."""

    udf_id: str
    name: str
    fn: Callable[[pa.RecordBatch], Any]
    outputs: tuple[OutputSpec, ...]
    setup_ms: float
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, compare=False)

    def declared(self, name: str | None, outputs: tuple[OutputSpec, ...] | None) -> LoadedUdf:
        """This UDF with the name and outputs a request declares (they may differ per call)."""
        name = name or self.name
        outputs = outputs or self.outputs
        if name == self.name and outputs == self.outputs:
            return self
        return dataclasses.replace(self, name=name, outputs=outputs)


def sha256_hex(data: BytesLike) -> str:
    return hashlib.sha256(data).hexdigest()


def verify_checksum(udf_id: Any, payload: BytesLike) -> None:
    actual = sha256_hex(payload)
    if not isinstance(udf_id, str) or actual != udf_id.lower():
        raise UdfError(
            "ChecksumMismatch",
            f"the udf payload's SHA-256 is {actual}, not its declared id {udf_id!r}",
        )


_WORKSPACES: dict[str, str] = {}
_WORKSPACES_LOCK = threading.Lock()


def install_workspace_zip(data: bytes, digest: str | None = None) -> str:
    """Extract a zip of user code once per content digest and put it on ``sys.path``."""
    actual = sha256_hex(data)
    if digest is not None and digest.lower() != actual:
        raise UdfError("ChecksumMismatch", f"the workspace zip's SHA-256 is {actual}, not {digest!r}")
    with _WORKSPACES_LOCK:
        if actual in _WORKSPACES:
            return _WORKSPACES[actual]
        target = tempfile.mkdtemp(prefix=f"lance-backfill-ws-{actual[:16]}-")
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                archive.extractall(target)  # extractall drops absolute and '..' paths
        except zipfile.BadZipFile as exc:
            raise bad_request(f"a workspace zip is not a zip file: {exc}") from None
        sys.path.insert(0, target)
        importlib.invalidate_caches()
        _WORKSPACES[actual] = target
        return target


def install_workspace_zips(encoded: Any) -> None:
    """Install the base64 ``workspace_zips`` of a load request."""
    if not encoded:
        return
    if not isinstance(encoded, list) or not all(isinstance(z, str) for z in encoded):
        raise bad_request("workspace_zips must be a list of base64 strings")
    for item in encoded:
        install_workspace_zip(decode_base64(item, "a workspace zip"))


def missing_module_message(name: str, module: str | None) -> str:
    top = (module or "?").split(".")[0]
    message = (
        f"unpickling udf {name!r} needs the Python module {module!r}, which is not installed "
        f"in the runtime environment; install package {top!r} in the runtime environment "
        "(udf-runtime/requirements.txt or an image built FROM the runtime image) "
        "or ship the code with workspace_zips"
    )
    if top == "geneva":
        message += (
            "; the payload was pickled by LanceDB Geneva and references its classes, "
            "which lance-backfill does not provide"
        )
    return message


def unpickle_udf(payload: BytesLike, name: str) -> Callable[[pa.RecordBatch], Any]:
    try:
        fn = pickle.loads(payload)
    except ModuleNotFoundError as exc:
        raise error_from_exception(exc, missing_module_message(name, exc.name)) from None
    except Exception as exc:
        raise error_from_exception(
            exc,
            f"cannot unpickle udf {name!r}: {exc} (this runtime is Python "
            f"{platform.python_version()} with cloudpickle {cloudpickle.__version__}; functions "
            "pickled by value need the same Python minor version)",
        ) from None
    if not callable(fn):
        raise UdfError("NotCallable", f"udf {name!r} unpickled to a {type(fn).__name__}, which is not callable")
    return fn


def run_setup(fn: Any, name: str) -> float:
    """Call ``fn.setup()`` if it exists; return how long it took in milliseconds."""
    start = time.perf_counter()
    setup = getattr(fn, "setup", None)
    if callable(setup):
        try:
            setup()
        except Exception as exc:
            raise error_from_exception(exc, f"setup() of udf {name!r} failed: {exc}") from None
    return (time.perf_counter() - start) * 1000.0


class UdfRegistry:
    """The UDFs loaded in this process, by id. Thread-safe; each is set up once."""

    def __init__(self) -> None:
        self._udfs: dict[str, LoadedUdf] = {}
        self._lock = threading.Lock()

    def get(self, udf_id: Any) -> LoadedUdf | None:
        return self._udfs.get(udf_id) if isinstance(udf_id, str) else None

    def ids(self) -> list[str]:
        return list(self._udfs)

    def load(
        self,
        udf_id: Any,
        name: Any,
        outputs: Any,
        payload: BytesLike,
        workspace_zips: Any = None,
    ) -> tuple[LoadedUdf, bool]:
        """Load (or find) a UDF; return it and whether this call loaded it."""
        specs = parse_outputs(outputs)
        name = name if isinstance(name, str) and name else str(udf_id)[:12]
        verify_checksum(udf_id, payload)
        with self._lock:
            existing = self._udfs.get(udf_id)
            if existing is not None:  # the last declaration of the outputs wins
                self._udfs[udf_id] = existing.declared(name, specs)
                return self._udfs[udf_id], False
            install_workspace_zips(workspace_zips)
            fn = unpickle_udf(payload, name)
            setup_ms = run_setup(fn, name)
            udf = LoadedUdf(udf_id=udf_id, name=name, fn=fn, outputs=specs, setup_ms=setup_ms)
            self._udfs[udf_id] = udf
            return udf, True


REGISTRY = UdfRegistry()


def decode_base64(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise bad_request(f"{what} must be a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise bad_request(f"{what} is not valid base64: {exc}") from None


# --------------------------------------------------------------------------
# Payloads fetched by the runtime: a presigned URL (Lambda), the cache (HTTP)
# --------------------------------------------------------------------------

MAX_PAYLOAD_BYTES = 512 * 1024 * 1024
PAYLOAD_URL_TIMEOUT_SECONDS = 60.0
ALLOW_HTTP_URLS_ENV = "LANCE_BACKFILL_UDF_ALLOW_HTTP_URLS"
_READ_CHUNK = 1 << 20
_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect becomes an HTTP error: a presigned URL answers itself."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def shown_url(url: str) -> str:
    """A URL for messages, without its query (a presigned URL's signature)."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def fetch_payload_url(
    url: Any,
    udf_id: Any,
    max_bytes: int | None = None,
    timeout: float | None = None,
) -> bytes:
    """GET a pickle from an ``https://`` URL (``http://`` only when
    ``LANCE_BACKFILL_UDF_ALLOW_HTTP_URLS=1``) and check it hashes to ``udf_id``."""
    max_bytes = MAX_PAYLOAD_BYTES if max_bytes is None else max_bytes
    timeout = PAYLOAD_URL_TIMEOUT_SECONDS if timeout is None else timeout
    if not isinstance(url, str) or not url:
        raise bad_request("payload_url must be an https:// URL string")
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname
    except ValueError as exc:
        raise bad_request(f"payload_url is not a URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme == "http" and os.environ.get(ALLOW_HTTP_URLS_ENV) != "1":
        raise bad_request(
            f"payload_url must be an https:// URL, not {shown_url(url)} (http:// is accepted only with "
            f"{ALLOW_HTTP_URLS_ENV}=1, for tests against local emulators)"
        )
    if scheme not in ("https", "http") or not host:
        raise bad_request(f"payload_url must be an https:// URL, not {shown_url(url)!r}")
    shown = shown_url(url)
    deadline = time.monotonic() + timeout
    opener = urllib.request.build_opener(_RefuseRedirects)
    chunks: list[bytes] = []
    size = 0
    try:
        with opener.open(urllib.request.Request(url, method="GET"), timeout=timeout) as response:
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise UdfError(
                    "PayloadUnavailable", f"udf payload {shown} is {declared} bytes, over the {max_bytes} allowed"
                )
            while True:
                chunk = response.read(_READ_CHUNK)
                if not chunk:
                    break
                size += len(chunk)
                if size > max_bytes:
                    raise UdfError("PayloadUnavailable", f"udf payload {shown} is over the {max_bytes} bytes allowed")
                if time.monotonic() > deadline:
                    raise UdfError("PayloadUnavailable", f"udf payload {shown} took over {timeout:g} s to download")
                chunks.append(chunk)
    except UdfError:
        raise
    except urllib.error.HTTPError as exc:
        followed = " (redirects are not followed)" if 300 <= exc.code < 400 else ""
        raise UdfError(
            "PayloadUnavailable", f"cannot read udf payload {shown}: HTTP {exc.code} {exc.reason}{followed}"
        ) from None
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        raise UdfError("PayloadUnavailable", f"cannot read udf payload {shown}: {reason}") from None
    data = b"".join(chunks)
    verify_checksum(udf_id, data)
    return data


def is_inside(path: Path, directory: Path) -> bool:
    """Whether ``path`` is strictly below ``directory`` (both already resolved)."""
    return path != directory and directory in path.parents


def read_cached_payload(cache_dir: Path, reference: str, max_bytes: int | None = None) -> bytes:
    """A pickle named by ``x-lance-backfill-udf-uri``: a file of the cache
    directory (an absolute path or one relative to it), never a URI."""
    max_bytes = MAX_PAYLOAD_BYTES if max_bytes is None else max_bytes
    if _URI_SCHEME.match(reference):
        raise bad_request(
            f"{UDF_URI_HEADER} {reference!r} is a URI; it must be a path inside the server's cache "
            f"directory {cache_dir} (file://, s3:// and other schemes are not accepted)"
        )
    if "\x00" in reference:
        raise bad_request(f"{UDF_URI_HEADER} holds a NUL character")
    root = cache_dir.resolve()
    try:
        path = (root / reference).resolve()
    except (OSError, RuntimeError, ValueError) as exc:
        raise bad_request(f"{UDF_URI_HEADER} {reference!r} cannot be resolved: {exc}") from None
    if not is_inside(path, root):
        raise bad_request(
            f"{UDF_URI_HEADER} {reference!r} is not inside the server's cache directory {root} "
            "(after resolving symlinks and '..')"
        )
    try:
        # No symlink in the last step (swapped in since resolve()); a FIFO must not block.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        with open(fd, "rb") as file:
            if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
                raise UdfError("PayloadUnavailable", f"udf payload {reference!r} is not a regular file")
            data = file.read(max_bytes + 1)
    except OSError as exc:
        raise UdfError("PayloadUnavailable", f"cannot read udf payload {reference!r}: {exc.strerror}") from None
    if len(data) > max_bytes:
        raise UdfError("PayloadUnavailable", f"udf payload {reference!r} is over the {max_bytes} bytes allowed")
    return data


# --------------------------------------------------------------------------
# Calling: IPC in, f(batch), normalise the result, IPC out
# --------------------------------------------------------------------------


def read_ipc_batch(data: BytesLike) -> pa.RecordBatch:
    """The one RecordBatch of an Arrow IPC stream (several are concatenated)."""
    try:
        reader = pa.ipc.open_stream(data)
        batches = list(reader)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise bad_request(f"the input is not an Arrow IPC stream: {exc}") from None
    if len(batches) == 1:
        return batches[0]
    table = pa.Table.from_batches(batches, schema=reader.schema).combine_chunks()
    combined = table.to_batches()
    if combined:
        return combined[0]
    schema = reader.schema
    return pa.RecordBatch.from_arrays([pa.array([], type=f.type) for f in schema], schema=schema)


def write_ipc_result(array: pa.Array) -> pa.Buffer:
    """An Arrow IPC stream of one RecordBatch with the single column ``result``."""
    schema = pa.schema([pa.field(RESULT_COLUMN, array.type)])
    batch = pa.RecordBatch.from_arrays([array], schema=schema)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue()


def run_udf(udf: LoadedUdf, batch: pa.RecordBatch, serial: bool = False) -> pa.Array:
    """Call the UDF on a batch and return its normalised result."""
    try:
        if serial:
            with udf.lock:
                result = udf.fn(batch)
        else:
            result = udf.fn(batch)
    except Exception as exc:
        raise error_from_exception(exc) from None
    return normalise_result(result, udf, batch.num_rows)


def call_udf(udf: LoadedUdf, ipc_input: BytesLike, serial: bool = False) -> tuple[int, pa.Buffer]:
    """IPC stream in, IPC stream out: the work of one call on every transport."""
    batch = read_ipc_batch(ipc_input)
    array = run_udf(udf, batch, serial)
    return batch.num_rows, write_ipc_result(array)


def normalise_result(result: Any, udf: LoadedUdf, num_rows: int) -> pa.Array:
    """One Arrow array with one row per input row: the output's values, or a
    StructArray of the outputs' ``struct_field``s when there are several."""
    if len(udf.outputs) == 1:
        output = udf.outputs[0]
        array = to_arrow_array(result, output.data_type, udf.name, output.column)
        check_output(array, output, udf.name, num_rows)
        return array
    if isinstance(result, pa.ChunkedArray):
        result = combine_chunks(result)
    if isinstance(result, pa.Array):  # a StructArray, checked by the Rust side
        check_length(len(result), udf.name, num_rows)
        return result
    columns = columns_of(result)
    if columns is None:
        names = ", ".join(o.struct_field for o in udf.outputs)
        raise UdfError(
            "BadResult",
            f"udf {udf.name!r} declares {len(udf.outputs)} outputs ({names}) and must return a "
            f"pyarrow StructArray, RecordBatch, Table or dict of columns, not {type(result).__name__}",
        )
    arrays = []
    fields = []
    for output in udf.outputs:
        key = output.struct_field if output.struct_field in columns else output.column
        if key not in columns:
            raise UdfError(
                "BadResult",
                f"udf {udf.name!r} returned no column {output.struct_field!r} "
                f"(it returned {', '.join(map(str, columns)) or 'none'})",
            )
        array = to_arrow_array(columns[key], output.data_type, udf.name, output.column)
        check_output(array, output, udf.name, num_rows)
        arrays.append(array)
        fields.append(pa.field(output.struct_field, array.type, nullable=output.nullable))
    return pa.StructArray.from_arrays(arrays, fields=fields)


def check_length(length: int, name: str, num_rows: int) -> None:
    if length != num_rows:
        raise UdfError("LengthMismatch", f"udf {name!r} returned {length} rows for a batch of {num_rows} rows")


def check_output(array: pa.Array, output: OutputSpec, name: str, num_rows: int) -> None:
    check_length(len(array), name, num_rows)
    if not output.nullable and array.null_count:
        raise UdfError(
            "NullViolation",
            f"udf {name!r} returned {array.null_count} nulls for the non-nullable column {output.column!r}",
        )


def combine_chunks(chunked: pa.ChunkedArray) -> pa.Array:
    if chunked.num_chunks == 1:
        return chunked.chunk(0)
    return chunked.combine_chunks()


def columns_of(value: Any) -> dict[str, Any] | None:
    """The named columns of a RecordBatch, Table, dict or data frame; None otherwise."""
    if isinstance(value, (pa.RecordBatch, pa.Table)):
        return {name: value.column(i) for i, name in enumerate(value.schema.names)}
    if isinstance(value, Mapping):
        return dict(value)
    if hasattr(value, "columns") and hasattr(value, "__getitem__") and not isinstance(value, pa.Array):
        try:  # pandas / polars data frames
            return {str(c): value[c] for c in value.columns}
        except Exception:
            return None
    return None


def to_arrow_array(value: Any, declared: pa.DataType, name: str, column: str) -> pa.Array:
    """Convert one output's value; Arrow arrays are kept whatever their type."""
    if isinstance(value, pa.Array):
        return value
    if isinstance(value, pa.ChunkedArray):
        return combine_chunks(value)
    if isinstance(value, (str, bytes, int, float, bool, pa.Scalar)) or value is None:
        raise UdfError(
            "BadResult",
            f"udf {name!r} returned a single {type(value).__name__} for column {column!r}; "
            "it must return one value per row (a pyarrow Array, numpy array or list)",
        )
    try:
        if np is not None and isinstance(value, np.ndarray):
            return numpy_to_array(value, declared)
        columns = columns_of(value)
        if columns is not None and pa.types.is_struct(declared):
            return columns_to_struct(columns, declared, name, column)
        return pa.array(value, type=declared)  # lists, pandas Series, __arrow_array__ objects
    except UdfError:
        raise
    except Exception as exc:
        raise UdfError(
            "BadResult",
            f"udf {name!r} returned a {type(value).__name__} for column {column!r} that cannot be "
            f"converted to {declared}: {type(exc).__name__}: {exc}",
        ) from None


def numpy_to_array(value: Any, declared: pa.DataType) -> pa.Array:
    """1-D -> the declared type; 2-D -> a (fixed size) list of the declared item type."""
    if value.ndim == 1:
        return pa.array(value, type=declared)
    is_list = pa.types.is_list(declared) or pa.types.is_large_list(declared)
    if value.ndim == 2 and (pa.types.is_fixed_size_list(declared) or is_list):
        rows, width = value.shape
        if pa.types.is_fixed_size_list(declared) and width != declared.list_size:
            raise ValueError(f"a numpy array of shape {value.shape} does not fit lists of size {declared.list_size}")
        values = pa.array(np.ascontiguousarray(value).reshape(-1), type=declared.value_type)
        if pa.types.is_fixed_size_list(declared):
            return pa.FixedSizeListArray.from_arrays(values, type=declared)
        offsets = pa.array(
            np.arange(0, rows * width + 1, width), type=pa.int64() if pa.types.is_large_list(declared) else pa.int32()
        )
        cls = pa.LargeListArray if pa.types.is_large_list(declared) else pa.ListArray
        return cls.from_arrays(offsets, values, type=declared)
    raise ValueError(f"a numpy array of shape {value.shape} does not fit {declared}")


def columns_to_struct(columns: dict[str, Any], declared: pa.StructType, name: str, column: str) -> pa.Array:
    arrays = []
    for field in declared:
        if field.name not in columns:
            raise UdfError("BadResult", f"udf {name!r} returned no field {field.name!r} for column {column!r}")
        arrays.append(to_arrow_array(columns[field.name], field.type, name, f"{column}.{field.name}"))
    return pa.StructArray.from_arrays(arrays, fields=list(declared))


# --------------------------------------------------------------------------
# Transport 1: pipe
# --------------------------------------------------------------------------

_U32 = struct.Struct("<I")


class FrameReader:
    """Reads requests (two length-prefixed frames) into reused buffers.

    The body buffer is handed to Arrow without a copy; it is reused for the
    next request only if nothing (e.g. a UDF keeping the batch) still holds it.
    """

    def __init__(self, stream: BinaryIO, capacity: int = 1 << 20) -> None:
        self._stream = stream
        self._length = bytearray(4)
        self._length_view = memoryview(self._length)
        self._header = bytearray(4096)
        self._body = bytearray(capacity)
        self._body_view = memoryview(self._body)

    def read_request(self) -> tuple[Any, memoryview] | None:
        """(parsed header, body view), or None at EOF before a request."""
        header_size = self._read_length(at_start=True)
        if header_size is None:
            return None
        if header_size > len(self._header):
            self._header = bytearray(header_size)
        header_view = memoryview(self._header)[:header_size]
        self._fill(header_view)
        header_bytes = bytes(header_view)
        header_view.release()
        body_size = self._read_length(at_start=False)
        assert body_size is not None
        if body_size > len(self._body):
            self._body = bytearray(max(body_size, 2 * len(self._body)))
            self._body_view = memoryview(self._body)
        body = self._body_view[:body_size]
        self._fill(body)
        try:
            header = json.loads(header_bytes)
        except ValueError as exc:
            header = bad_request(f"the request header is not JSON: {exc}")
        return header, body

    def reclaim(self, body: memoryview) -> None:
        """Reuse the body buffer unless Arrow data read from it is still alive."""
        try:
            body.release()
        except BufferError:
            self._body = bytearray(len(self._body))
            self._body_view = memoryview(self._body)

    def _read_length(self, at_start: bool) -> int | None:
        if not self._fill(self._length_view, eof_ok=at_start):
            return None
        return _U32.unpack(self._length)[0]

    def _fill(self, view: memoryview, eof_ok: bool = False) -> bool:
        got = 0
        size = len(view)
        while got < size:
            n = self._stream.readinto(view[got:])
            if not n:
                if got == 0 and eof_ok:
                    return False
                raise EOFError("stdin closed in the middle of a frame")
            got += n
        return True


class FrameWriter:
    """Writes responses (two length-prefixed frames), one flush each."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream

    def write_response(self, header: Mapping[str, Any], body: BytesLike = b"") -> None:
        head = json.dumps(header, separators=(",", ":")).encode("utf-8")
        size = body.size if isinstance(body, pa.Buffer) else len(body)
        self._stream.write(_U32.pack(len(head)) + head + _U32.pack(size))
        if size:
            self._stream.write(body)
        self._stream.flush()


def claim_stdio() -> tuple[BinaryIO, BinaryIO]:
    """Keep the real stdin/stdout for the protocol; user output goes to stderr.

    fd 1 is pointed at stderr too, so C extensions and child processes that
    write to stdout cannot corrupt the frames; fd 0 becomes /dev/null.
    """
    sys.stdout.flush()
    protocol_in = os.dup(0)
    protocol_out = os.dup(1)
    os.dup2(2, 1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    sys.stdout = sys.stderr
    sys.stdin = open(os.devnull, encoding="utf-8")  # noqa: SIM115 - lives as long as the process
    return (
        os.fdopen(protocol_in, "rb", buffering=1 << 16),
        os.fdopen(protocol_out, "wb", buffering=1 << 16),
    )


def ready_message() -> dict[str, Any]:
    return {
        "status": "ready",
        "protocol": PROTOCOL_VERSION,
        "python": platform.python_version(),
        "pyarrow": pa.__version__,
        "cloudpickle": cloudpickle.__version__,
        "pid": os.getpid(),
    }


def handle_pipe_request(header: Any, body: memoryview) -> tuple[dict[str, Any], BytesLike]:
    """Answer one pipe request (except ``exit``, which the loop handles)."""
    try:
        if isinstance(header, UdfError):
            raise header
        if not isinstance(header, dict):
            raise bad_request("the request header must be a JSON object")
        op = header.get("op")
        if op == "call":
            udf = REGISTRY.get(header.get("udf"))
            if udf is None:
                return unknown_udf(header.get("udf")), b""
            rows, output = call_udf(udf, pa.py_buffer(body))
            return {"status": "ok", "rows": rows}, output
        if op == "load":
            udf, loaded = REGISTRY.load(
                header.get("udf"),
                header.get("name"),
                header.get("outputs"),
                body,
                header.get("workspace_zips"),
            )
            return {"status": "ok", "setup_ms": udf.setup_ms if loaded else 0.0}, b""
        if op == "ping":
            return {"status": "ok"}, b""
        raise bad_request(f"unknown op {op!r}")
    except UdfError as exc:
        return exc.to_response(), b""
    except Exception as exc:  # a bug here must not kill the worker
        return error_from_exception(exc).to_response(), b""


def make_undumpable() -> None:
    """Linux: stop other processes of the same user (other principals'
    function processes included) from reading this one's memory, batches
    and /proc/<pid>/environ. A function may undo it for its own process
    only."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE, 0
    except (OSError, AttributeError):
        pass


def serve_pipe() -> int:
    """The pipe loop: ready, then one response per request until exit or EOF."""
    make_undumpable()
    protocol_in, protocol_out = claim_stdio()
    reader = FrameReader(protocol_in)
    writer = FrameWriter(protocol_out)
    try:
        writer.write_response(ready_message())
        while True:
            request = reader.read_request()
            if request is None:
                return 0
            header, body = request
            if isinstance(header, dict) and header.get("op") == "exit":
                return 0
            response, output = handle_pipe_request(header, body)
            writer.write_response(response, output)
            del header, output
            reader.reclaim(body)
    except EOFError as exc:
        print(f"lance-backfill udf runtime: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0


# --------------------------------------------------------------------------
# Transport 2: AWS Lambda
# --------------------------------------------------------------------------


def lambda_handler(event: Any, context: Any = None) -> dict[str, Any]:
    """Run one batch. Never raises: failures are answered as error objects."""
    try:
        udf_event, input_b64 = parse_lambda_event(event)
        udf_id = udf_event.get("id")
        outputs = parse_outputs(udf_event.get("outputs")) if udf_event.get("outputs") else None
        ipc_input = decode_base64(input_b64, "input_b64")
        udf = REGISTRY.get(udf_id)
        if udf is None:
            payload = lambda_payload(udf_event)
            if payload is None:
                return unknown_udf(udf_id)
            udf, _ = REGISTRY.load(
                udf_id, udf_event.get("name"), udf_event.get("outputs"), payload, udf_event.get("workspace_zips")
            )
        udf = udf.declared(udf_event.get("name"), outputs)
        rows, output = call_udf(udf, ipc_input)
        return {"status": "ok", "rows": rows, "output_b64": base64.b64encode(output).decode("ascii")}
    except UdfError as exc:
        return exc.to_response()
    except Exception as exc:
        return error_from_exception(exc).to_response()


def parse_lambda_event(event: Any) -> tuple[Mapping[str, Any], Any]:
    if not isinstance(event, Mapping):
        raise bad_request(f"the event must be a JSON object, not {type(event).__name__}")
    protocol = event.get("protocol", PROTOCOL_VERSION)
    if protocol != PROTOCOL_VERSION:
        raise bad_request(f"protocol {protocol!r} is not supported (this runtime speaks {PROTOCOL_VERSION})")
    udf_event = event.get("udf")
    if not isinstance(udf_event, Mapping) or not isinstance(udf_event.get("id"), str):
        raise bad_request("the event needs 'udf': {'id', 'name', 'outputs', 'payload_b64' or 'payload_url'}")
    if udf_event.get("payload_uri") is not None:
        raise bad_request(
            "udf.payload_uri is no longer accepted (the runtime reads no s3://, file:// or local path); "
            "send the pickle as payload_b64 or an https:// URL to GET it from as payload_url"
        )
    if "input_b64" not in event:
        raise bad_request("the event needs 'input_b64' (a base64 Arrow IPC stream)")
    return udf_event, event["input_b64"]


def lambda_payload(udf_event: Mapping[str, Any]) -> bytes | None:
    if udf_event.get("payload_b64"):
        return decode_base64(udf_event["payload_b64"], "payload_b64")
    if udf_event.get("payload_url"):
        return fetch_payload_url(udf_event["payload_url"], udf_event.get("id"))
    return None


# --------------------------------------------------------------------------
# Transport 3: HTTP
# --------------------------------------------------------------------------

UDF_HEADER = "x-lance-backfill-udf"
UDF_URI_HEADER = "x-lance-backfill-udf-uri"
UDF_NAME_HEADER = "x-lance-backfill-udf-name"
OUTPUTS_HEADER = "x-lance-backfill-outputs"
ROWS_HEADER = "x-lance-backfill-rows"
TIMESTAMP_HEADER = "x-lance-backfill-timestamp"
SIGNATURE_HEADER = "x-lance-backfill-signature"
SECRET_ENV = "LANCE_BACKFILL_UDF_HTTP_SECRET"
SIGNATURE_VERSION = "v1"
MAX_CLOCK_SKEW_SECONDS = 300
DEFAULT_MAX_BODY_BYTES = 512 * 1024 * 1024
# A refused request's unread body is read and dropped up to this size so the
# client sees the answer; past it the connection is closed instead.
DISCARD_BODY_BYTES = 64 * 1024 * 1024
CLIENT_ERRORS = {"BadRequest", "ChecksumMismatch"}
REFUSAL_STATUS = {"Unauthorized": 401, "PayloadTooLarge": 413, "BadRequest": 400}
_TIMESTAMP = re.compile(r"[0-9]{1,15}")
_SIGNATURE = re.compile(r"v1=([0-9a-f]{64})")


def signature_message(timestamp: str, method: str, path: str, body: BytesLike) -> bytes:
    """What a version 1 signature signs: ``f"{timestamp}\\n{METHOD}\\n{path}\\n"`` + the body."""
    return f"{timestamp}\n{method.upper()}\n{path}\n".encode() + bytes(body)


def request_signature(secret: str | bytes, timestamp: str, method: str, path: str, body: BytesLike) -> str:
    """The ``x-lance-backfill-signature`` value: ``v1=`` + lowercase hex HMAC-SHA256."""
    key = secret.encode("utf-8") if isinstance(secret, str) else secret
    digest = hmac.new(key, signature_message(timestamp, method, path, body), hashlib.sha256).hexdigest()
    return f"{SIGNATURE_VERSION}={digest}"


def signed_headers(
    secret: str | bytes, method: str, path: str, body: BytesLike = b"", now: float | None = None
) -> dict[str, str]:
    """The two headers that sign a request to ``http`` (for Python clients)."""
    timestamp = str(int(time.time() if now is None else now))
    return {
        TIMESTAMP_HEADER: timestamp,
        SIGNATURE_HEADER: request_signature(secret, timestamp, method, path, body),
    }


def unauthorized(message: str) -> UdfError:
    return UdfError("Unauthorized", message)


def check_signature_headers(timestamp: str | None, signature: str | None, now: float) -> tuple[str, str]:
    """The timestamp and hex signature of a request, checked for form and age (before its body is read)."""
    if timestamp is None:
        raise unauthorized(f"the request is not signed: header {TIMESTAMP_HEADER} is missing")
    if signature is None:
        raise unauthorized(f"the request is not signed: header {SIGNATURE_HEADER} is missing")
    timestamp = timestamp.strip()
    if not _TIMESTAMP.fullmatch(timestamp):
        raise unauthorized(f"header {TIMESTAMP_HEADER} must be the Unix time in whole seconds (decimal digits)")
    match = _SIGNATURE.fullmatch(signature.strip())
    if match is None:
        raise unauthorized(f"header {SIGNATURE_HEADER} must be 'v1=' and 64 lowercase hex digits")
    skew = int(timestamp) - now
    if abs(skew) > MAX_CLOCK_SKEW_SECONDS:
        raise unauthorized(
            f"header {TIMESTAMP_HEADER} is {abs(skew):.0f} s {'ahead of' if skew > 0 else 'behind'} the "
            f"server's clock (at most {MAX_CLOCK_SKEW_SECONDS} s are accepted)"
        )
    return timestamp, match.group(1)


def verify_signature(secret: bytes, timestamp: str, digest: str, method: str, path: str, body: BytesLike) -> None:
    expected = request_signature(secret, timestamp, method, path, body)
    if not hmac.compare_digest(f"{SIGNATURE_VERSION}={digest}", expected):
        raise unauthorized("the request's signature does not match (wrong secret, or a signed part changed)")


class RuntimeHttpServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        default_udf: str | None,
        serial: bool,
        log: bool,
        secret: bytes | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        cache_dir: Path | None = None,
    ) -> None:
        super().__init__(address, RuntimeRequestHandler)
        self.default_udf = default_udf
        self.serial = serial
        self.log = log
        self.secret = secret
        self.max_body_bytes = max_body_bytes
        self.cache_dir = None if cache_dir is None else cache_dir.resolve()  # None: no file may be named


class RuntimeRequestHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: RuntimeHttpServer

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self._path() == "/health":  # the one route that needs no signature
            self._send_json(200, {"status": "ok", "udfs": REGISTRY.ids()})
            return
        if self._receive() is None:
            return
        self._send_json(404, error_object("NotFound", f"no route GET {self._path()}"))

    def do_PUT(self) -> None:  # noqa: N802
        body = self._receive()
        if body is None:
            return
        path = self._path()
        try:
            if path.startswith("/udf/"):
                udf, loaded = REGISTRY.load(
                    path[len("/udf/") :],
                    self.headers.get(UDF_NAME_HEADER),
                    self.headers.get(OUTPUTS_HEADER),
                    body,
                )
                self._send_json(200, {"status": "ok", "setup_ms": udf.setup_ms if loaded else 0.0})
            elif path.startswith("/workspace/"):
                install_workspace_zip(body, path[len("/workspace/") :])
                self._send_json(200, {"status": "ok"})
            else:
                self._send_json(404, error_object("NotFound", f"no route PUT {path}"))
        except UdfError as exc:
            self._send_error(exc)

    def do_POST(self) -> None:  # noqa: N802
        body = self._receive()
        if body is None:
            return
        if self._path() not in ("/", "/invoke"):
            self._send_json(404, error_object("NotFound", f"no route POST {self._path()}"))
            return
        try:
            udf = self._resolve_udf()
            if udf is None:
                return
            batch = read_ipc_batch(body)
        except UdfError as exc:
            self._send_error(exc)
            return
        try:
            array = run_udf(udf, batch, serial=self.server.serial)
            output = write_ipc_result(array)
        except UdfError as exc:
            self._send_json(422, exc.to_response())
            return
        except Exception as exc:
            self._send_json(422, error_from_exception(exc).to_response())
            return
        self._send(200, output, ARROW_STREAM_MIME, {ROWS_HEADER: str(batch.num_rows)})

    def _receive(self) -> bytes | None:
        """The body of a request whose signature holds; None once a refusal
        (401, 413, 400) is answered. Nothing parses the body before this."""
        secret = self.server.secret
        body_read = False
        try:
            signed = None
            if secret is not None:
                signed = check_signature_headers(
                    self.headers.get(TIMESTAMP_HEADER), self.headers.get(SIGNATURE_HEADER), time.time()
                )
            body = self._read_body()
            body_read = True
            if signed is not None:
                verify_signature(secret, signed[0], signed[1], self.command, self.path, body)
            return body
        except UdfError as exc:
            keep_alive = body_read or self._discard_body()
            self._send_json(REFUSAL_STATUS.get(exc.error_type, 400), exc.to_response(), close=not keep_alive)
            return None

    def handle_expect_100(self) -> bool:
        """``Expect: 100-continue``: refuse (401, 413) before the client sends the body."""
        try:
            if self.server.secret is not None and not (self.command == "GET" and self._path() == "/health"):
                check_signature_headers(
                    self.headers.get(TIMESTAMP_HEADER), self.headers.get(SIGNATURE_HEADER), time.time()
                )
            if not self._is_chunked() and self._content_length() > self.server.max_body_bytes:
                raise self._too_large(f"{self._content_length()} bytes")
        except UdfError as exc:
            self._send_json(REFUSAL_STATUS.get(exc.error_type, 400), exc.to_response(), close=True)
            return False
        return super().handle_expect_100()

    def _resolve_udf(self) -> LoadedUdf | None:
        """The UDF a call names (or the server's); answers 400/404 itself when there is none."""
        udf_id = self.headers.get(UDF_HEADER) or self.server.default_udf
        if not udf_id:
            raise bad_request(f"no udf: send header {UDF_HEADER} or start the server with --udf-file")
        outputs_header = self.headers.get(OUTPUTS_HEADER)
        name = self.headers.get(UDF_NAME_HEADER)
        udf = REGISTRY.get(udf_id)
        if udf is None:
            reference = self.headers.get(UDF_URI_HEADER)
            if not reference:
                self._send_json(404, unknown_udf(udf_id))
                return None
            if self.server.cache_dir is None:
                raise bad_request(f"{UDF_URI_HEADER} is not accepted: this server has no cache directory")
            payload = read_cached_payload(self.server.cache_dir, reference, self.server.max_body_bytes)
            udf, _ = REGISTRY.load(udf_id, name, outputs_header, payload)
        return udf.declared(name, parse_outputs(outputs_header) if outputs_header else None)

    def _path(self) -> str:
        return urllib.parse.urlsplit(self.path).path

    def _is_chunked(self) -> bool:
        return "chunked" in self.headers.get("Transfer-Encoding", "").lower()

    def _content_length(self) -> int:
        text = (self.headers.get("Content-Length") or "0").strip()
        if not text.isdigit():
            raise bad_request(f"Content-Length {text!r} is not a byte count")
        return int(text)

    def _too_large(self, size: str) -> UdfError:
        limit = self.server.max_body_bytes
        return UdfError("PayloadTooLarge", f"the request body is {size}, over the {limit} bytes allowed")

    def _read_body(self) -> bytes:
        """The body, refused (413) past ``--max-body-bytes`` before more than that is read."""
        limit = self.server.max_body_bytes
        if self._is_chunked():
            chunks = []
            total = 0
            while True:
                line = self.rfile.readline(1024)
                try:
                    size = int(line.split(b";")[0].strip() or b"0", 16)
                except ValueError:
                    raise bad_request("the chunked request body is malformed") from None
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                total += size
                if total > limit:
                    raise self._too_large(f"over {limit} bytes")
                chunks.append(self.rfile.read(size))
                self.rfile.readline(1024)
        length = self._content_length()
        if length > limit:
            raise self._too_large(f"{length} bytes")
        return self.rfile.read(length)

    def _discard_body(self) -> bool:
        """Read and drop the body of a refused request when it is small enough,
        so the connection stays usable; False when it must be closed."""
        if self._is_chunked():
            return False
        try:
            remaining = self._content_length()
        except UdfError:
            return False
        if remaining > DISCARD_BODY_BYTES:
            return False
        while remaining:
            chunk = self.rfile.read(min(remaining, 1 << 16))
            if not chunk:
                return False
            remaining -= len(chunk)
        return True

    def _send_error(self, exc: UdfError) -> None:
        self._send_json(400 if exc.error_type in CLIENT_ERRORS else 422, exc.to_response())

    def _send_json(self, status: int, obj: Mapping[str, Any], close: bool = False) -> None:
        headers = {"WWW-Authenticate": "LanceBackfill-HMAC-SHA256"} if status == 401 else {}
        self._send(status, json.dumps(obj).encode("utf-8"), "application/json", headers, close)

    def _send(
        self,
        status: int,
        body: BytesLike,
        content_type: str,
        headers: Mapping[str, str] | None = None,
        close: bool = False,
    ) -> None:
        size = body.size if isinstance(body, pa.Buffer) else len(body)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(size))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        if self.server.log:
            super().log_message(format, *args)


class ConfigError(Exception):
    """A server option that does not allow starting (exit status 2)."""


def http_secret(secret_file: str | None) -> str | None:
    """The signing secret: ``--secret-file``'s contents (stripped), else
    ``LANCE_BACKFILL_UDF_HTTP_SECRET``. The variable is removed from
    ``os.environ`` either way, so child processes do not inherit it."""
    from_env = os.environ.pop(SECRET_ENV, None)
    if secret_file:
        try:
            secret = Path(secret_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read --secret-file {secret_file}: {exc}") from None
        if not secret:
            raise ConfigError(f"--secret-file {secret_file} is empty")
        return secret
    return from_env or None


def serve_http(
    host: str,
    port: int,
    udf_file: str | None,
    outputs: str | None,
    name: str | None,
    serial: bool,
    log: bool,
    secret_file: str | None = None,
    insecure_no_auth: bool = False,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    cache_dir: str | None = None,
) -> int:
    try:
        secret = http_secret(secret_file)
    except ConfigError as exc:
        print(f"lance-backfill udf runtime: {exc}", file=sys.stderr)
        return 2
    if secret is None and not insecure_no_auth:
        print(
            "lance-backfill udf runtime: the http server needs a secret to check request signatures: set "
            f"{SECRET_ENV} or pass --secret-file PATH (or --insecure-no-auth to accept unsigned requests, "
            "which lets anyone who can reach the port run code here)",
            file=sys.stderr,
        )
        return 2
    if max_body_bytes <= 0:
        print("lance-backfill udf runtime: --max-body-bytes must be positive", file=sys.stderr)
        return 2
    default_udf = None
    if udf_file:
        if not outputs:
            print("--udf-file needs --outputs '<json list>'", file=sys.stderr)
            return 2
        try:
            payload = Path(udf_file).read_bytes()
        except OSError as exc:
            print(f"cannot read --udf-file: {exc}", file=sys.stderr)
            return 1
        default_udf = sha256_hex(payload)
        try:
            REGISTRY.load(default_udf, name or Path(udf_file).stem, outputs, payload)
        except UdfError as exc:
            print(json.dumps(exc.to_response()), file=sys.stderr)
            return 1
    if cache_dir:
        cache = Path(cache_dir)
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            print(f"lance-backfill udf runtime: cannot use --cache-dir {cache_dir}: {exc}", file=sys.stderr)
            return 2
        made_cache = None
    else:
        cache = made_cache = Path(tempfile.mkdtemp(prefix="lance-backfill-udf-cache-"))
    try:
        server = RuntimeHttpServer(
            (host, port),
            default_udf,
            serial,
            log,
            secret=None if secret is None else secret.encode("utf-8"),
            max_body_bytes=max_body_bytes,
            cache_dir=cache,
        )
    except BaseException:
        if made_cache is not None:
            shutil.rmtree(made_cache, ignore_errors=True)
        raise
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    bound_host, bound_port = server.server_address[:2]
    if secret is None:
        if insecure_no_auth:
            print(
                f"WARNING: --insecure-no-auth: requests to http://{bound_host}:{bound_port} are not "
                "authenticated; anyone who can reach it can run code in this process",
                file=sys.stderr,
                flush=True,
            )
    elif insecure_no_auth:
        print("note: a secret is set, so --insecure-no-auth is ignored: requests must be signed", file=sys.stderr)
    print(f"listening on http://{bound_host}:{bound_port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        if made_cache is not None:
            shutil.rmtree(made_cache, ignore_errors=True)
    return 0


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="lance-backfill's Python UDF runtime")
    transports = parser.add_subparsers(dest="transport", required=True)
    transports.add_parser("pipe", help="serve framed requests on stdin/stdout (the local process pool)")
    http_parser = transports.add_parser(
        "http",
        help="serve Arrow IPC over HTTP (model servers)",
        description=(
            "Serve Arrow IPC over HTTP. Every request but GET /health must be signed (HMAC-SHA256, see the "
            f"module docstring) with the secret of {SECRET_ENV} or --secret-file."
        ),
    )
    http_parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; expose it only on a network you trust, with a secret)",
    )
    http_parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    http_parser.add_argument(
        "--secret-file", help=f"a file holding the signing secret (stripped; instead of {SECRET_ENV})"
    )
    http_parser.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="start without a secret and accept unsigned requests (anyone who can connect can run code)",
    )
    http_parser.add_argument(
        "--max-body-bytes",
        type=positive_int,
        default=DEFAULT_MAX_BODY_BYTES,
        help=f"largest request body accepted, 413 past it (default {DEFAULT_MAX_BODY_BYTES})",
    )
    http_parser.add_argument(
        "--cache-dir",
        help=f"the only directory {UDF_URI_HEADER} may name files in (default: a new temporary directory)",
    )
    http_parser.add_argument("--udf-file", help="a cloudpickled UDF to serve by default")
    http_parser.add_argument(
        "--outputs", help="its outputs, a JSON list of {column, struct_field, data_type, nullable}"
    )
    http_parser.add_argument("--name", help="its name in messages (default: the file's stem)")
    http_parser.add_argument("--serial", action="store_true", help="run calls of one UDF one at a time")
    http_parser.add_argument("--log-requests", action="store_true", help="log each request to stderr")
    args = parser.parse_args(argv)
    if args.transport == "pipe":
        return serve_pipe()
    return serve_http(
        args.host,
        args.port,
        args.udf_file,
        args.outputs,
        args.name,
        args.serial,
        args.log_requests,
        secret_file=args.secret_file,
        insecure_no_auth=args.insecure_no_auth,
        max_body_bytes=args.max_body_bytes,
        cache_dir=args.cache_dir,
    )


if __name__ == "__main__":
    sys.exit(main())
