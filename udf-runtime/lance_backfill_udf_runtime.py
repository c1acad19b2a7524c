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
  environment lacks), ``NotCallable``, ``PayloadUnavailable`` (payload_uri
  unreadable), ``LengthMismatch``, ``BadResult`` (a value that cannot be
  converted to the declared type), ``NullViolation`` (nulls in a non-nullable
  output). ``traceback`` holds the last 4,000 characters of the formatted
  traceback ("" when there is none). The process stays alive.

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
"payload_uri"?, "workspace_zips"?}, "input_b64": <base64 IPC stream>}``. A UDF
not yet loaded in this container is loaded from ``payload_b64``, else from
``payload_uri`` (``s3://bucket/key`` through boto3, ``file:///path`` or a plain
path), else the answer is ``unknown_udf``. Answer ``{"status": "ok", "rows": N,
"output_b64": <base64 IPC stream>}`` or an error object; the handler never
raises.

Transport 3: HTTP (``python3 lance_backfill_udf_runtime.py http --port 8000``)
------------------------------------------------------------------------------
- ``POST /`` or ``/invoke``, body an IPC stream of one RecordBatch: runs the UDF
  the server was started with (``--udf-file --outputs --name``) or the one named
  by header ``x-lance-backfill-udf: <id>`` (loaded earlier, or loadable from
  header ``x-lance-backfill-udf-uri``, with ``x-lance-backfill-outputs`` and
  ``x-lance-backfill-udf-name``). 200 + ``application/vnd.apache.arrow.stream``
  (one column ``result``; header ``x-lance-backfill-rows``); function error ->
  422 + error object; unknown UDF -> 404 ``unknown_udf``; bad request -> 400.
- ``PUT /udf/<id>``, body the pickle bytes, header ``x-lance-backfill-outputs``
  (JSON list) and optional ``x-lance-backfill-udf-name`` -> 200 ``{"status":
  "ok", "setup_ms"}``.
- ``PUT /workspace/<sha256>``, body a zip of user code: extracted and put on
  ``sys.path`` (the HTTP form of ``workspace_zips``) -> 200 ``{"status": "ok"}``.
- ``GET /health`` -> 200 ``{"status": "ok", "udfs": [ids]}``.
Calls run concurrently (threaded server) unless ``--serial``.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import dataclasses
import hashlib
import http.server
import importlib
import io
import json
import os
import pickle
import platform
import signal
import struct
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse
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


def read_payload_uri(uri: str) -> bytes:
    """Fetch a pickle from ``s3://bucket/key`` (boto3), ``file:///path`` or a plain path."""
    if uri.startswith("s3://"):
        bucket, _, key = uri[len("s3://") :].partition("/")
        try:
            import boto3  # present in Lambda's Python images
        except ImportError:
            raise UdfError("PayloadUnavailable", f"reading {uri} needs boto3, which is not installed") from None
        try:
            return boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as exc:
            raise UdfError("PayloadUnavailable", f"cannot read udf payload {uri}: {exc}") from None
    path = urllib.parse.unquote(urllib.parse.urlsplit(uri).path) if uri.startswith("file://") else uri
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UdfError("PayloadUnavailable", f"cannot read udf payload {uri}: {exc}") from None


def decode_base64(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise bad_request(f"{what} must be a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise bad_request(f"{what} is not valid base64: {exc}") from None


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


def serve_pipe() -> int:
    """The pipe loop: ready, then one response per request until exit or EOF."""
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
        raise bad_request("the event needs 'udf': {'id', 'name', 'outputs', 'payload_b64' or 'payload_uri'}")
    if "input_b64" not in event:
        raise bad_request("the event needs 'input_b64' (a base64 Arrow IPC stream)")
    return udf_event, event["input_b64"]


def lambda_payload(udf_event: Mapping[str, Any]) -> bytes | None:
    if udf_event.get("payload_b64"):
        return decode_base64(udf_event["payload_b64"], "payload_b64")
    if udf_event.get("payload_uri"):
        return read_payload_uri(str(udf_event["payload_uri"]))
    return None


# --------------------------------------------------------------------------
# Transport 3: HTTP
# --------------------------------------------------------------------------

UDF_HEADER = "x-lance-backfill-udf"
UDF_URI_HEADER = "x-lance-backfill-udf-uri"
UDF_NAME_HEADER = "x-lance-backfill-udf-name"
OUTPUTS_HEADER = "x-lance-backfill-outputs"
ROWS_HEADER = "x-lance-backfill-rows"
CLIENT_ERRORS = {"BadRequest", "ChecksumMismatch"}


class RuntimeHttpServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], default_udf: str | None, serial: bool, log: bool) -> None:
        super().__init__(address, RuntimeRequestHandler)
        self.default_udf = default_udf
        self.serial = serial
        self.log = log


class RuntimeRequestHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: RuntimeHttpServer

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self._path() == "/health":
            self._send_json(200, {"status": "ok", "udfs": REGISTRY.ids()})
        else:
            self._send_json(404, error_object("NotFound", f"no route GET {self._path()}"))

    def do_PUT(self) -> None:  # noqa: N802
        body = self._read_body()
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
        body = self._read_body()
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

    def _resolve_udf(self) -> LoadedUdf | None:
        """The UDF a call names (or the server's); answers 400/404 itself when there is none."""
        udf_id = self.headers.get(UDF_HEADER) or self.server.default_udf
        if not udf_id:
            raise bad_request(f"no udf: send header {UDF_HEADER} or start the server with --udf-file")
        outputs_header = self.headers.get(OUTPUTS_HEADER)
        name = self.headers.get(UDF_NAME_HEADER)
        udf = REGISTRY.get(udf_id)
        if udf is None:
            uri = self.headers.get(UDF_URI_HEADER)
            if not uri:
                self._send_json(404, unknown_udf(udf_id))
                return None
            udf, _ = REGISTRY.load(udf_id, name, outputs_header, read_payload_uri(uri))
        return udf.declared(name, parse_outputs(outputs_header) if outputs_header else None)

    def _path(self) -> str:
        return urllib.parse.urlsplit(self.path).path

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send_error(self, exc: UdfError) -> None:
        self._send_json(400 if exc.error_type in CLIENT_ERRORS else 422, exc.to_response())

    def _send_json(self, status: int, obj: Mapping[str, Any]) -> None:
        self._send(status, json.dumps(obj).encode("utf-8"), "application/json")

    def _send(self, status: int, body: BytesLike, content_type: str, headers: Mapping[str, str] | None = None) -> None:
        size = body.size if isinstance(body, pa.Buffer) else len(body)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(size))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        if self.server.log:
            super().log_message(format, *args)


def serve_http(
    host: str,
    port: int,
    udf_file: str | None,
    outputs: str | None,
    name: str | None,
    serial: bool,
    log: bool,
) -> int:
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
    server = RuntimeHttpServer((host, port), default_udf, serial, log)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"listening on http://{host}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="lance-backfill's Python UDF runtime")
    transports = parser.add_subparsers(dest="transport", required=True)
    transports.add_parser("pipe", help="serve framed requests on stdin/stdout (the local process pool)")
    http_parser = transports.add_parser("http", help="serve Arrow IPC over HTTP (model servers)")
    http_parser.add_argument("--host", default="127.0.0.1")
    http_parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
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
    return serve_http(args.host, args.port, args.udf_file, args.outputs, args.name, args.serial, args.log_requests)


if __name__ == "__main__":
    sys.exit(main())
