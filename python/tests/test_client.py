"""Tests of lance_backfill_client and of the embeddings example's parts."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import cloudpickle
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

PYTHON_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PYTHON_DIR))

import lance_backfill_client as lbc  # noqa: E402
from lance_backfill_client import (  # noqa: E402
    Client,
    JobFailedError,
    LanceBackfillError,
    apply_udf,
    arrow_type_to_json,
    json_to_arrow_type,
    load_udf,
    udf_column,
)


def _load_example() -> ModuleType:
    path = PYTHON_DIR / "examples" / "embeddings.py"
    spec = importlib.util.spec_from_file_location("lance_backfill_embeddings_example", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


example = _load_example()


def _run(args: List[str], **kwargs: Any) -> str:
    """Runs a Python subprocess; its stderr is in the failure message."""
    proc = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=60, **kwargs
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


# --- JSON Arrow types ----------------------------------------------------------

ROUND_TRIP_TYPES = [
    pa.null(),
    pa.bool_(),
    pa.int8(),
    pa.int16(),
    pa.int32(),
    pa.int64(),
    pa.uint8(),
    pa.uint16(),
    pa.uint32(),
    pa.uint64(),
    pa.float16(),
    pa.float32(),
    pa.float64(),
    pa.utf8(),
    pa.large_utf8(),
    pa.binary(),
    pa.large_binary(),
    pa.timestamp("us"),
    pa.date32(),
    pa.date64(),
    pa.duration("us"),
    pa.decimal128(10, 2),
    pa.decimal256(50, -3),
    pa.binary(16),
    pa.list_(pa.int64()),
    pa.list_(pa.field("item", pa.utf8(), nullable=False)),
    pa.large_list(pa.float64()),
    pa.list_(pa.float32(), 64),
    pa.list_(pa.list_(pa.int8(), 3)),
    pa.struct([("a", pa.int64()), pa.field("b", pa.utf8(), nullable=False)]),
    pa.struct([("v", pa.list_(pa.float32(), 4)), ("tags", pa.list_(pa.utf8()))]),
    pa.map_(pa.utf8(), pa.int32()),
]
if hasattr(pa, "decimal32"):
    ROUND_TRIP_TYPES += [pa.decimal32(7, 2), pa.decimal64(15, 4)]


@pytest.mark.parametrize("data_type", ROUND_TRIP_TYPES, ids=str)
def test_type_round_trip(data_type: pa.DataType) -> None:
    as_json = arrow_type_to_json(data_type)
    assert json.loads(json.dumps(as_json)) == as_json
    assert json_to_arrow_type(as_json) == data_type


@pytest.mark.parametrize(
    ("data_type", "expected"),
    [
        (pa.int64(), {"type": "int64"}),
        (pa.float32(), {"type": "float32"}),
        (pa.utf8(), {"type": "utf8"}),
        (pa.bool_(), {"type": "bool"}),
        (pa.binary(), {"type": "binary"}),
        (pa.timestamp("us"), {"type": "timestamp"}),
        (pa.date32(), {"type": "date32"}),
        (pa.large_utf8(), {"type": "large_utf8"}),
        (pa.decimal128(10, 2), {"type": "decimal128", "length": 10002}),
        (
            pa.list_(pa.utf8()),
            {
                "type": "list",
                "fields": [{"name": "item", "type": {"type": "utf8"}, "nullable": True}],
            },
        ),
        (
            pa.list_(pa.float32(), 64),
            {
                "type": "fixed_size_list",
                "length": 64,
                "fields": [{"name": "item", "type": {"type": "float32"}, "nullable": True}],
            },
        ),
        (
            pa.struct([("a", pa.int64()), pa.field("b", pa.utf8(), nullable=False)]),
            {
                "type": "struct",
                "fields": [
                    {"name": "a", "type": {"type": "int64"}, "nullable": True},
                    {"name": "b", "type": {"type": "utf8"}, "nullable": False},
                ],
            },
        ),
    ],
    ids=str,
)
def test_type_wire_form(data_type: pa.DataType, expected: Dict[str, Any]) -> None:
    assert arrow_type_to_json(data_type) == expected


def test_type_field_metadata_round_trip() -> None:
    data_type = pa.struct([pa.field("a", pa.int32(), metadata={"unit": "cm"})])
    as_json = arrow_type_to_json(data_type)
    assert as_json["fields"][0]["metadata"] == {"unit": "cm"}
    assert json_to_arrow_type(as_json).field(0).metadata == {b"unit": b"cm"}


def test_type_aliases_accepted_on_read() -> None:
    assert json_to_arrow_type({"type": "Boolean"}) == pa.bool_()
    assert json_to_arrow_type({"type": "FLOAT32"}) == pa.float32()


@pytest.mark.parametrize(
    "data_type",
    [
        pa.timestamp("ns"),
        pa.timestamp("us", tz="UTC"),
        pa.duration("ms"),
        pa.time64("us"),
        pa.time32("s"),
        pa.string_view(),
        pa.binary_view(),
        pa.dictionary(pa.int32(), pa.utf8()),
        pa.dense_union([pa.field("a", pa.int32())]),
        pa.list_view(pa.int32()),
        pa.month_day_nano_interval(),
        pa.list_(pa.timestamp("ns")),
        pa.struct([("t", pa.time32("ms"))]),
    ],
    ids=str,
)
def test_unsupported_types_raise_type_error(data_type: pa.DataType) -> None:
    with pytest.raises(TypeError, match="unsupported type"):
        arrow_type_to_json(data_type)


def test_non_types_raise_type_error() -> None:
    with pytest.raises(TypeError, match="pyarrow DataType"):
        arrow_type_to_json("int64")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="pyarrow DataType"):
        udf_column(_plus_one, input_columns=["x"], output=int, name="y")  # type: ignore[arg-type]


def test_bad_json_types_raise_value_error() -> None:
    for bad in ({"type": "nope"}, {"no": "type"}, {"type": "list"}, {"type": "struct"}):
        with pytest.raises(ValueError):
            json_to_arrow_type(bad)


# --- entries -------------------------------------------------------------------


def _plus_one(batch: pa.RecordBatch) -> pa.Array:
    return pc.add(batch.column("x"), 1)


def _split(batch: pa.RecordBatch) -> pa.StructArray:
    x = batch.column("x").to_numpy()
    s = batch.column("s")
    return pa.StructArray.from_arrays(
        [
            pa.array(x * 2.5),
            pc.utf8_upper(s),
            pa.array((x.reshape(-1, 1) * [1, 2, 3]).tolist()),
        ],
        names=["x_scaled", "s_upper", "x_vec"],
    )


class Counter:
    """An object UDF with setup(): counts how many times it was set up."""

    def __init__(self) -> None:
        self.setups = 0

    def setup(self) -> None:
        self.setups += 1

    def __call__(self, batch: pa.RecordBatch) -> np.ndarray:
        return np.full(batch.num_rows, self.setups, dtype=np.int64)


BATCH = pa.record_batch({"x": pa.array([1, 2, 3], pa.int64()), "s": ["a", "bc", None]})
BACKENDS = ["cloudpickle", "DockerUDFSpecV1"]


def _decode_pickle(vc: Dict[str, Any]) -> bytes:
    """Independent of the package: the pickle bytes of a virtual column."""
    payload = base64.b64decode(vc["udf"], validate=True)
    if vc["udf_backend"] == "cloudpickle":
        return payload
    spec = json.loads(payload)
    assert set(spec) == {"image", "tag", "udf_pickle", "udf_checksum", "workspace_checksum"}
    pickled = base64.b64decode(spec["udf_pickle"], validate=True)
    assert spec["udf_checksum"] == hashlib.sha256(pickled).hexdigest()
    assert (spec["image"], spec["tag"]) == lbc.split_image_reference(vc["image"])
    return pickled


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_output_entry(backend: str) -> None:
    entry = udf_column(
        _plus_one,
        input_columns=["x"],
        output=pa.int64(),
        name="y",
        backend=backend,
        image="registry.local:5000/udfs:1.2",
    )
    assert set(entry) == {"name", "virtual_column"}
    assert entry["name"] == "y"
    vc = entry["virtual_column"]
    assert vc["input_columns"] == ["x"]
    assert vc["outputs"] == [
        {"column": "y", "struct_field": "y", "data_type": {"type": "int64"}, "nullable": True}
    ]
    assert vc["udf_name"] == "_plus_one"
    assert vc["udf_version"] == "1"
    assert vc["udf_backend"] == backend
    assert vc["image"] == "registry.local:5000/udfs:1.2"
    for absent in ("auto_backfill", "manifest", "manifest_checksum", "field_metadata"):
        assert absent not in vc
    assert json.loads(json.dumps(entry)) == entry

    func = cloudpickle.loads(_decode_pickle(vc))
    assert func(BATCH).to_pylist() == [2, 3, 4]
    assert apply_udf(load_udf(entry), BATCH, entry)["y"].to_pylist() == [2, 3, 4]


@pytest.mark.parametrize("backend", BACKENDS)
def test_several_outputs_entry(backend: str) -> None:
    manifest = {"pip": ["numpy"], "python": "3.11"}
    entry = udf_column(
        _split,
        input_columns=["x", "s"],
        outputs={
            "x_scaled": pa.float64(),
            "s_upper": pa.utf8(),
            "x_vec": pa.list_(pa.int64(), 3),
        },
        udf_name="split",
        udf_version="7",
        backend=backend,
        auto_backfill=False,
        manifest=manifest,
        field_metadata={"owner": "tests"},
        nullable=False,
    )
    assert entry["name"] == "x_scaled"
    vc = entry["virtual_column"]
    assert [o["column"] for o in vc["outputs"]] == ["x_scaled", "s_upper", "x_vec"]
    assert [o["struct_field"] for o in vc["outputs"]] == ["x_scaled", "s_upper", "x_vec"]
    assert [o["nullable"] for o in vc["outputs"]] == [False, False, False]
    assert vc["outputs"][2]["data_type"]["type"] == "fixed_size_list"
    assert vc["auto_backfill"] is False
    assert vc["field_metadata"] == {"owner": "tests"}
    assert json.loads(vc["manifest"]) == manifest
    assert vc["manifest_checksum"] == hashlib.sha256(vc["manifest"].encode()).hexdigest()

    func = cloudpickle.loads(_decode_pickle(vc))
    result = func(BATCH)
    assert result.field("x_scaled").to_pylist() == [2.5, 5.0, 7.5]

    # s_upper is declared not nullable and the third row is null
    with pytest.raises(ValueError, match="not nullable"):
        apply_udf(func, BATCH, entry)
    arrays = apply_udf(func, BATCH.slice(0, 2), entry)
    assert arrays["s_upper"].to_pylist() == ["A", "BC"]
    assert arrays["x_vec"].type == pa.list_(pa.int64(), 3)
    assert arrays["x_vec"].to_pylist() == [[1, 2, 3], [2, 4, 6]]
    assert list(lbc.output_types(entry)) == ["x_scaled", "s_upper", "x_vec"]


def test_outputs_as_fields_keep_nullability_and_metadata() -> None:
    entry = udf_column(
        _split,
        input_columns=["x", "s"],
        outputs=[
            pa.field("x_scaled", pa.float64(), nullable=False, metadata={"unit": "m"}),
            pa.field("s_upper", pa.utf8()),
        ],
    )
    outs = entry["virtual_column"]["outputs"]
    assert outs[0]["nullable"] is False and outs[0]["metadata"] == {"unit": "m"}
    assert outs[1]["nullable"] is True and "metadata" not in outs[1]
    assert entry["virtual_column"]["udf_name"] == "_split"


def test_object_udf_setup_and_numpy_result() -> None:
    entry = udf_column(Counter(), input_columns="x", output=pa.int64(), name="n")
    assert entry["virtual_column"]["udf_name"] == "Counter"
    func = load_udf(entry, setup=True)
    assert apply_udf(func, BATCH, entry)["n"].to_pylist() == [1, 1, 1]


def test_docker_spec_image_and_tag() -> None:
    assert lbc.split_image_reference("local") == ("local", None)
    assert lbc.split_image_reference("repo/img:1.0") == ("repo/img", "1.0")
    assert lbc.split_image_reference("host:5000/img") == ("host:5000/img", None)
    assert lbc.split_image_reference("host:5000/img:v2") == ("host:5000/img", "v2")
    entry = udf_column(
        _plus_one, input_columns=["x"], output=pa.int64(), name="y", backend="DockerUDFSpecV1"
    )
    spec = json.loads(base64.b64decode(entry["virtual_column"]["udf"]))
    assert spec["image"] == "local" and spec["tag"] is None
    assert spec["workspace_checksum"] is None and "workspace_zips" not in spec


def test_manifest_string_kept_verbatim() -> None:
    entry = udf_column(
        _plus_one, input_columns=["x"], output=pa.int64(), name="y", manifest='{"b": 1}'
    )
    vc = entry["virtual_column"]
    assert vc["manifest"] == '{"b": 1}'
    assert vc["manifest_checksum"] == hashlib.sha256(b'{"b": 1}').hexdigest()


def test_checksum_mismatches_are_refused() -> None:
    entry = udf_column(_plus_one, input_columns=["x"], output=pa.int64(), name="y", manifest="{}")
    bad = json.loads(json.dumps(entry))
    bad["virtual_column"]["manifest_checksum"] = "0" * 64
    with pytest.raises(ValueError, match="manifest_checksum"):
        load_udf(bad)

    entry = udf_column(
        _plus_one, input_columns=["x"], output=pa.int64(), name="y", backend="DockerUDFSpecV1"
    )
    spec = json.loads(base64.b64decode(entry["virtual_column"]["udf"]))
    spec["udf_checksum"] = "f" * 64
    entry["virtual_column"]["udf"] = base64.b64encode(json.dumps(spec).encode()).decode()
    with pytest.raises(ValueError, match="udf_checksum"):
        load_udf(entry)

    entry["virtual_column"]["udf_backend"] = "Mystery"
    with pytest.raises(ValueError, match="unsupported udf_backend"):
        load_udf(entry)


def test_absent_or_null_backend_means_cloudpickle() -> None:
    entry = udf_column(_plus_one, input_columns=["x"], output=pa.int64(), name="y")
    del entry["virtual_column"]["udf_backend"]
    assert load_udf(entry)(BATCH).to_pylist() == [2, 3, 4]
    entry["virtual_column"]["udf_backend"] = None
    assert load_udf(entry["virtual_column"])(BATCH).to_pylist() == [2, 3, 4]


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"input_columns": ["x"]}, ValueError),  # neither output nor outputs
        ({"input_columns": ["x"], "output": pa.int64()}, ValueError),  # no name
        ({"input_columns": ["x"], "output": pa.int64(), "outputs": {"a": pa.int64()}}, ValueError),
        ({"input_columns": [], "output": pa.int64(), "name": "y"}, ValueError),
        ({"input_columns": [""], "output": pa.int64(), "name": "y"}, ValueError),
        ({"input_columns": ["x"], "outputs": {}}, ValueError),
        ({"input_columns": ["x"], "outputs": {"a": pa.int64()}, "name": "b"}, ValueError),
        (
            {"input_columns": ["x"], "output": pa.int64(), "name": "y", "backend": "pickle"},
            ValueError,
        ),
        (
            {"input_columns": ["x"], "output": pa.int64(), "name": "y", "field_metadata": {"k": 1}},
            TypeError,
        ),
        ({"input_columns": ["x"], "output": pa.timestamp("ns"), "name": "y"}, TypeError),
    ],
)
def test_udf_column_rejects_bad_arguments(kwargs: Dict[str, Any], error: type) -> None:
    with pytest.raises(error):
        udf_column(_plus_one, **kwargs)


def test_apply_udf_checks_length_and_fields() -> None:
    entry = udf_column(lambda b: pa.array([1]), input_columns=["x"], output=pa.int64(), name="y")
    with pytest.raises(ValueError, match="1 values for a batch of 3"):
        apply_udf(load_udf(entry), BATCH, entry)
    entry = udf_column(
        _split, input_columns=["x", "s"], outputs={"nope": pa.int64(), "x_scaled": pa.float64()}
    )
    with pytest.raises(ValueError, match="no field 'nope'"):
        apply_udf(_split, BATCH, entry)


def test_main_functions_pickle_by_value_and_modules_on_request(tmp_path: Path) -> None:
    """A worker that cannot import the defining script or module still runs the UDF."""
    script = tmp_path / "declare.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import json, sys
            sys.path.insert(0, {str(PYTHON_DIR)!r})
            import pyarrow as pa
            import pyarrow.compute as pc
            from lance_backfill_client import udf_column

            OFFSET = 40

            def add_offset(batch):
                return pc.add(batch.column("x"), OFFSET)

            print(json.dumps(udf_column(add_offset, input_columns=["x"],
                                        output=pa.int64(), name="y")))
            """
        )
    )
    main_entry = json.loads(_run([str(script)]))
    texts = ["hello world", "", "ünïcödé ☃", None, "hello world"]
    example_entry = udf_column(
        example.HashedTrigramEmbedder(),
        input_columns=["text"],
        output=example.EMBEDDING_TYPE,
        name="embedding",
        pickle_by_value=[example],
    )
    (tmp_path / "entries.json").write_text(json.dumps([main_entry, example_entry]))
    worker = textwrap.dedent(
        f"""
        import json, sys
        sys.path.insert(0, {str(PYTHON_DIR)!r})
        import pyarrow as pa
        from lance_backfill_client import apply_udf, load_udf
        entries = json.load(open("entries.json"))
        batch = pa.record_batch({{"x": pa.array([1, 2], pa.int64())}})
        func = load_udf(entries[0], setup=True)
        out = {{"y": apply_udf(func, batch, entries[0])["y"].to_pylist()}}
        batch = pa.record_batch({{"text": pa.array({texts!r}, pa.utf8())}})
        func = load_udf(entries[1], setup=True)
        out["embedding"] = apply_udf(func, batch, entries[1])["embedding"].to_pylist()
        out["module"] = type(func).__module__
        print(json.dumps(out))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = json.loads(_run(["-c", worker], cwd=tmp_path, env=env))
    assert result["y"] == [41, 42]
    assert result["module"] == example.__name__  # not importable there: came by value
    assert example.__name__ not in cloudpickle.cloudpickle._PICKLE_BY_VALUE_MODULES
    got = pa.array(result["embedding"], example.EMBEDDING_TYPE)
    want = _embed(texts)
    assert example.check_embeddings(got, want) is None  # same values in another process


# --- official client models ----------------------------------------------------


def _models() -> Any:
    return pytest.importorskip("lance_namespace_urllib3_client.models")


@pytest.mark.parametrize("backend", BACKENDS)
def test_official_model_conversion(backend: str) -> None:
    m = _models()
    entry = udf_column(
        _split,
        input_columns=["x", "s"],
        outputs=[
            pa.field("x_scaled", pa.float64(), metadata={"k": "v"}),
            pa.field("s_upper", pa.utf8()),
        ],
        backend=backend,
        auto_backfill=True,
        manifest={"a": 1},
        field_metadata={"team": "ml"},
    )
    model = lbc.to_model(entry)
    assert isinstance(model, m.AddColumnsEntry)
    assert isinstance(model.virtual_column, m.AddVirtualColumnEntry)
    assert isinstance(model.virtual_column.outputs[0], m.AddVirtualColumnOutputEntry)
    assert model.virtual_column.outputs[1].struct_field == "s_upper"
    assert json.loads(model.to_json()) == entry
    request = m.AlterTableAddColumnsRequest(new_columns=[model])
    assert json.loads(request.to_json()) == {"new_columns": [entry]}
    # a JSON Arrow type parses as the spec's JsonArrowDataType too
    for out in entry["virtual_column"]["outputs"]:
        assert m.JsonArrowDataType.from_dict(out["data_type"]).to_dict() == out["data_type"]
    # the Client sends models as it sends dicts
    assert lbc._client._as_dict(model) == entry


def test_backfill_fields_match_the_spec() -> None:
    m = _models()
    spec_fields = set(m.AlterTableBackfillColumnsRequest.model_fields) - {"column"}
    assert spec_fields == set(lbc.BACKFILL_FIELDS)


# --- Client against a stub server ----------------------------------------------

Reply = Tuple[int, Any]


class Stub:
    """Records requests and answers them with scripted replies (or a function)."""

    def __init__(self) -> None:
        self.requests: List[Dict[str, Any]] = []
        self.replies: List[Reply] = []
        self.handler: Optional[Callable[[Dict[str, Any]], Reply]] = None
        self.url = ""


@pytest.fixture
def stub() -> Iterator[Stub]:
    state = Stub()

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            request = {
                "method": self.command,
                "path": self.path,
                "headers": {k.lower(): v for k, v in self.headers.items()},
                "body": json.loads(raw) if raw else None,
            }
            state.requests.append(request)
            if state.handler is not None:
                status, body = state.handler(request)
            else:
                status, body = state.replies.pop(0)
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _serve

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_client_add_columns(stub: Stub) -> None:
    entry = udf_column(_plus_one, input_columns=["x"], output=pa.int64(), name="y")
    stub.replies = [(200, {"version": 3}), (200, {"version": 4}), (200, {})]
    client = Client(stub.url, api_key="k1")
    assert client.add_columns("items", [entry]) == {"version": 3}
    req = stub.requests[0]
    assert req["method"] == "POST"
    assert req["path"] == "/v1/table/items/add_columns"
    assert req["headers"]["x-api-key"] == "k1"
    assert req["headers"]["content-type"] == "application/json"
    assert req["body"] == {"new_columns": [entry]}

    client.add_columns(["ns", "sub", "my items"], [entry], api_key="k2", branch="dev")
    req = stub.requests[1]
    assert req["path"] == "/v1/table/ns%24sub%24my%20items/add_columns"
    assert urllib.parse.unquote(req["path"].split("/")[3]) == "ns$sub$my items"
    assert req["headers"]["x-api-key"] == "k2"
    assert req["body"]["branch"] == "dev"

    Client(stub.url, token="jwt").add_columns("a/b", [{"name": "z", "computed": "x * 2"}])
    req = stub.requests[2]
    assert req["path"] == "/v1/table/a%2Fb/add_columns"
    assert req["headers"]["authorization"] == "Bearer jwt"
    assert "x-api-key" not in req["headers"]


def test_client_backfill_job_and_cancel(stub: Stub) -> None:
    stub.replies = [
        (202, {"job_id": "job-1"}),
        (200, {"job_id": "job-1", "state": "RUNNING"}),
        (200, {"job_id": "job-1", "state": "CANCELLED"}),
    ]
    client = Client(stub.url, api_key="k")
    job_id = client.backfill(
        ["ns", "items"], "y", concurrency=4, where="x > 1", cluster=None, idempotency_key="fill-1"
    )
    assert job_id == "job-1"
    req = stub.requests[0]
    assert req["path"] == "/v1/table/ns%24items/backfill_column"
    assert req["body"] == {"column": "y", "concurrency": 4, "where": "x > 1"}
    assert req["headers"]["idempotency-key"] == "fill-1"
    assert client.job("job-1")["state"] == "RUNNING"
    assert stub.requests[1]["method"] == "GET" and stub.requests[1]["path"] == "/v1/job/job-1"
    assert client.cancel("job-1")["state"] == "CANCELLED"
    assert stub.requests[2]["path"] == "/v1/job/job-1/cancel"

    with pytest.raises(TypeError, match="concurency"):
        client.backfill("items", "y", concurency=4)
    assert len(stub.requests) == 3


def test_client_custom_delimiter(stub: Stub) -> None:
    stub.replies = [(202, {"job_id": "j"})]
    Client(stub.url, delimiter=".").backfill(["ns", "t"], "y")
    assert stub.requests[0]["path"] == "/v1/table/ns.t/backfill_column?delimiter=."
    with pytest.raises(ValueError, match="delimiter"):
        lbc.table_path(["a$b", "c"])
    with pytest.raises(ValueError):
        lbc.table_path([])


def test_client_wait(stub: Stub) -> None:
    metrics = {"rows_committed": {"done": 5, "total": 10}}
    stub.replies = [
        (200, {"job_id": "j", "state": "PENDING"}),
        (200, {"job_id": "j", "state": "RUNNING", "metrics": metrics}),
        (200, {"job_id": "j", "state": "DONE", "metrics": metrics}),
    ]
    seen: List[str] = []
    job = Client(stub.url).wait(
        "j", 10, poll_interval=0.01, on_progress=lambda j: seen.append(j["state"])
    )
    assert job["state"] == "DONE" and seen == ["PENDING", "RUNNING", "DONE"]

    stub.replies = [(200, {"job_id": "j", "state": "FAILED", "error": "boom"})] * 2
    with pytest.raises(JobFailedError, match="FAILED: boom") as info:
        Client(stub.url).wait("j", 10)
    assert info.value.state == "FAILED" and info.value.job["error"] == "boom"
    assert Client(stub.url).wait("j", 10, check=False)["state"] == "FAILED"

    stub.handler = lambda req: (200, {"job_id": "j", "state": "RUNNING"})
    with pytest.raises(TimeoutError):
        Client(stub.url).wait("j", 0.1, poll_interval=0.02)


def test_client_wait_retries_what_the_service_could_not_answer(stub: Stub) -> None:
    answers: List[Reply] = [
        (503, {"error": "store unavailable", "code": 18}),
        (429, {"error": "slow down"}),
        (502, b"<html>bad gateway</html>"),
        (200, {"job_id": "j", "state": "RUNNING"}),
        (500, {"error": "internal"}),
        (200, {"job_id": "j", "state": "DONE"}),
    ]
    stub.handler = lambda req: answers.pop(0)
    job = Client(stub.url).wait("j", 60, poll_interval=0.01, progress=False)
    assert job["state"] == "DONE" and not answers
    assert len(stub.requests) == 6

    # The client's mistake is not retried; nor is a service that keeps failing.
    stub.handler = lambda req: (404, {"error": "job j does not exist", "code": 10})
    before = len(stub.requests)
    with pytest.raises(LanceBackfillError) as info:
        Client(stub.url).wait("j", 60, poll_interval=0.01)
    assert info.value.status == 404 and len(stub.requests) == before + 1
    stub.handler = lambda req: (503, {"error": "down"})
    before = len(stub.requests)
    with pytest.raises(LanceBackfillError):
        Client(stub.url).wait("j", 60, max_retries=2)
    assert len(stub.requests) == before + 3


def test_client_wait_survives_a_connection_reset(tmp_path: Path) -> None:
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]

    def serve() -> None:
        # The first two connections are dropped without an answer.
        for n in range(3):
            conn, _ = listener.accept()
            conn.recv(65536)
            if n < 2:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                conn.close()
                continue
            body = json.dumps({"job_id": "j", "state": "DONE"}).encode()
            head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            conn.sendall(head + body)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        assert Client(f"http://127.0.0.1:{port}").wait("j", 60)["state"] == "DONE"
    finally:
        thread.join(5)
        listener.close()


def test_client_wait_shows_a_progress_bar(stub: Stub, capsys: Any) -> None:
    rows = [{"done": 0, "total": 1000}, {"done": 400, "total": 1000}, {"done": 1000, "total": 1000}]
    answers = [
        {"job_id": "job-1234567890", "state": s, "metrics": {"rows_committed": r}}
        for s, r in zip(["RUNNING", "RUNNING", "DONE"], rows)
    ]
    stub.handler = lambda req: (200, answers.pop(0))
    Client(stub.url).wait("job-1234567890", 10, poll_interval=0.01, progress=True)
    err = capsys.readouterr().err
    assert "job job-1234" in err and "1.00k/1.00k" in err and "DONE" in err


def test_client_lists_describes_and_explains_jobs(stub: Stub) -> None:
    pages = {
        None: {
            "jobs": [{"job_id": "a", "state": "DONE"}, {"job_id": "b", "state": "FAILED"}],
            "page_token": "t1",
        },
        "t1": {"jobs": [{"job_id": "c", "state": "DONE"}], "page_token": None},
    }

    def answer(req: Dict[str, Any]) -> Reply:
        url = urllib.parse.urlparse(req["path"])
        if url.path == "/v1/table/items/jobs":
            token = urllib.parse.parse_qs(url.query).get("page_token", [None])[0]
            return 200, pages[token]
        if url.path == "/v1/jobs/list":
            return 200, pages[req["body"].get("page_token")]
        if url.path.startswith("/v1/job/"):
            job_id = url.path.rsplit("/", 1)[1]
            failures = [{"fragment_id": 1, "row": 7, "error": "ZeroDivisionError"}]
            return 200, {
                "job_id": job_id,
                "state": "DONE",
                "error": None,
                "metrics": {"rows_failed": 1},
                "row_failures": failures,
            }
        if url.path == "/v1/table/items/describe":
            return 200, {"version": 3, "schema": {"fields": []}}
        return 404, {"error": "no route", "code": 13}

    stub.handler = answer
    client = Client(stub.url, api_key="k")
    assert [j["job_id"] for j in client.list_jobs("items")] == ["a", "b", "c"]
    assert "limit=100" in stub.requests[0]["path"]
    assert "page_token=t1" in stub.requests[1]["path"]
    assert [j["job_id"] for j in client.list_jobs("items", state="DONE")] == ["a", "c"]
    assert [j["job_id"] for j in client.list_jobs("items", limit=1)] == ["a"]
    assert len(client.list_jobs("items", state=["FAILED", "CANCELLED"])) == 1
    # Every table's jobs: the list names them, each job's page shows it.
    everything = client.list_jobs()
    assert [j["job_id"] for j in everything] == ["a", "b", "c"]
    assert everything[0]["row_failures"][0]["row"] == 7
    assert client.describe("items")["version"] == 3
    explained = client.errors("b")
    assert explained["rows_failed"] == 1 and explained["row_failures"][0]["fragment_id"] == 1


def test_client_context_dry_run_and_computed(stub: Stub) -> None:
    plan = {"dry_run": True, "fragments": 4, "tasks": 4, "rows": 2000, "commits": 1}
    stub.replies = [
        (200, {"version": 2, "context": {"job_id": "m"}}),
        (202, {"job_id": "j"}),
        (200, plan),
    ]
    client = Client(stub.url)
    client.add_columns("items", [lbc.computed("y", "x * 2 + 1")], context={"auto_backfill": True})
    assert stub.requests[0]["body"] == {
        "new_columns": [{"name": "y", "computed": "x * 2 + 1"}],
        "context": {"auto_backfill": "true"},
    }
    client.backfill("items", "y", context={"on_error": "skip", "max_skip_fraction": 0.5})
    assert stub.requests[1]["body"]["context"] == {"on_error": "skip", "max_skip_fraction": "0.5"}
    assert client.dry_run("items", "y", where="x > 3", context={"on_error": "skip"}) == plan
    assert stub.requests[2]["body"] == {
        "column": "y",
        "where": "x > 3",
        "context": {"on_error": "skip", "dry_run": "true"},
    }
    with pytest.raises(ValueError, match="expression"):
        lbc.computed("y", " ")
    with pytest.raises(TypeError, match="context"):
        client.backfill("items", "y", context={"on_error": ["skip"]})
    assert len(stub.requests) == 3


def test_dry_run_estimate_is_asked_for_and_described(stub: Stub) -> None:
    estimate = {
        "wall_seconds": 5400.0,
        "bottleneck": "hot_key",
        "lambda_gb_seconds": 12345.6,
        "cost_usd": {"lambda": 0.16, "dynamodb": 0.02, "sqs": 0.001, "s3": 0.003, "total": 0.184},
        "assumptions": ["not counted: planning"],
    }
    plan = {"dry_run": True, "column": "y", "fragments": 4, "tasks": 4, "rows": 2000}
    stub.replies = [(200, {**plan, "commits": 1, "estimate": estimate})]
    client = Client(stub.url)
    answered = client.dry_run("items", "y", function_ms_per_1k_rows=10)
    assert stub.requests[0]["body"]["context"] == {
        "dry_run": "true",
        "function_ms_per_1k_rows": "10",
    }
    assert lbc.describe_estimate(answered).splitlines() == [
        "would fill 2000 rows of y in 4 fragments: 4 tasks, 1 commits",
        "on AWS: about 90.0 min (bound by hot key), 12,346 Lambda GB-s, $0.184 in all "
        "(lambda $0.16, dynamodb $0.02, sqs $0.001, s3 $0.003)",
        "assumed: not counted: planning",
    ]


def test_client_error_mapping(stub: Stub) -> None:
    conflict = {
        "error": "job abc is already filling y",
        "code": 14,
        "detail": "submit again when it ends",
        "instance": "/v1/table/items/backfill_column",
    }
    stub.replies = [
        (409, conflict),
        (404, {"error": "job nope not found", "code": 10}),
        (401, {"error": "missing credentials", "code": 16}),
        (502, b"<html>bad gateway</html>"),
        (200, {"unexpected": True}),
    ]
    client = Client(stub.url)
    with pytest.raises(LanceBackfillError) as info:
        client.backfill("items", "y")
    e = info.value
    assert (e.status, e.code, e.error) == (409, 14, conflict["error"])
    assert e.detail == conflict["detail"] and e.instance == conflict["instance"]
    assert e.body == conflict
    assert "HTTP 409, code 14" in str(e)

    with pytest.raises(LanceBackfillError) as info:
        client.job("nope")
    assert (info.value.status, info.value.code) == (404, 10)
    with pytest.raises(LanceBackfillError) as info:
        client.add_columns("items", [])
    assert (info.value.status, info.value.code) == (401, 16)
    with pytest.raises(LanceBackfillError) as info:
        client.job("x")
    assert (info.value.status, info.value.code) == (502, None)
    assert "bad gateway" in info.value.error
    with pytest.raises(LanceBackfillError, match="no job_id"):
        client.backfill("items", "y")


# --- the embeddings example ----------------------------------------------------


def _embed(texts: List[Optional[str]]) -> pa.Array:
    func = example.HashedTrigramEmbedder()
    func.setup()
    return func(pa.record_batch({"text": pa.array(texts, pa.utf8())}))


def test_embedding_shape_dtype_and_norm() -> None:
    texts = [*example.sample_texts(3000).to_pylist(), "", "a", "ab", "日本語のテキスト"]
    out = _embed(texts)
    assert out.type == pa.list_(pa.float32(), 64) == example.EMBEDDING_TYPE
    assert len(out) == len(texts)
    nulls = np.array([t is None for t in texts])
    assert nulls.any()
    assert (out.is_null().to_numpy(zero_copy_only=False) == nulls).all()
    matrix = example._matrix(out)
    assert matrix.shape == (len(texts), 64) and matrix.dtype == np.float32
    assert np.allclose(np.linalg.norm(matrix[~nulls], axis=1), 1.0, atol=1e-5)


def test_embedding_is_deterministic_and_row_independent() -> None:
    texts = example.sample_texts(2500).to_pylist()
    first = _embed(texts)
    again = example.HashedTrigramEmbedder()  # no setup(): it sets itself up
    assert (
        example.check_embeddings(again(pa.record_batch({"text": pa.array(texts)})), first) is None
    )
    # a row's embedding does not depend on its batch
    for i in (0, 1023, 1024, 2499):
        assert example.check_embeddings(_embed([texts[i]]), first.slice(i, 1)) is None
    # large_utf8 input, chunked columns and sliced arrays give the same values
    big = pa.record_batch({"text": pa.array(texts, pa.large_utf8())})
    assert example.check_embeddings(again(big), first) is None
    sliced = pa.array(texts).slice(100, 50)
    assert (
        example.check_embeddings(again(pa.record_batch({"text": sliced})), first.slice(100, 50))
        is None
    )


def test_embedding_separates_texts() -> None:
    out = example._matrix(
        _embed(["the quick brown fox", "the quick brown fox", "lance rust worker"])
    )
    assert np.array_equal(out[0], out[1])
    assert out[0] @ out[2] < 0.9
    near = example._matrix(_embed(["the quick brown fox", "the quick brown foxes"]))
    assert near[0] @ near[1] > out[0] @ out[2]


def test_embedding_pickle_is_small_and_empty_batches_work() -> None:
    func = example.HashedTrigramEmbedder()
    func.setup()
    assert len(cloudpickle.dumps(func)) < 20_000  # the projection is rebuilt by setup()
    assert len(func(pa.record_batch({"text": pa.array([], pa.utf8())}))) == 0
    all_null = func(pa.record_batch({"text": pa.array([None, None], pa.utf8())}))
    assert all_null.null_count == 2


def test_check_embeddings_finds_differences() -> None:
    want = _embed(["a", "b", None])
    assert example.check_embeddings(want, want) is None
    got = example._matrix(want).copy()
    got[1, 3] += 0.01
    changed = pa.FixedSizeListArray.from_arrays(
        pa.array(got.reshape(-1)), type=want.type, mask=want.is_null()
    )
    assert example.check_embeddings(changed, want) == 1
    assert example.check_embeddings(_embed(["a", "b", "c"]), want) == 2


def test_example_end_to_end_against_a_fake_service(stub: Stub, tmp_path: Path, capsys: Any) -> None:
    """main() against a stand-in for `lance-backfill serve` that runs the UDF with pylance."""
    lance = pytest.importorskip("lance")
    root = tmp_path / "tables"
    entries: Dict[str, Dict[str, Any]] = {}
    polls = [0]

    def serve(req: Dict[str, Any]) -> Reply:
        if req["headers"].get("x-api-key") != "secret":
            return 401, {"error": "bad key", "code": 16}
        parts = req["path"].split("?")[0].strip("/").split("/")
        if parts[:2] == ["v1", "table"]:
            uri = str(root / f"{urllib.parse.unquote(parts[2])}.lance")
            ds = lance.dataset(uri)
            if parts[3] == "add_columns":
                for entry in req["body"]["new_columns"]:
                    fields = lbc.output_types(entry)
                    entries.update({name: entry for name in fields})
                    ds.add_columns(list(fields.values()))  # all-null, as the service does
                return 200, {"version": lance.dataset(uri).version}
            entry = entries[req["body"]["column"]]
            fields = lbc.output_types(entry)
            func = load_udf(entry, setup=True)
            ds.drop_columns(list(fields))

            @lance.batch_udf(output_schema=pa.schema(list(fields.values())))
            def fill(batch: pa.RecordBatch) -> pa.RecordBatch:
                arrays = apply_udf(func, batch, entry)
                return pa.RecordBatch.from_arrays(list(arrays.values()), names=list(arrays))

            ds.add_columns(fill, read_columns=entry["virtual_column"]["input_columns"])
            return 202, {"job_id": "job-e2e"}
        polls[0] += 1
        done = {"rows_committed": {"done": 3000 if polls[0] > 1 else 0, "total": 3000}}
        return 200, {
            "job_id": "job-e2e",
            "state": "DONE" if polls[0] > 1 else "RUNNING",
            "metrics": done,
        }

    stub.handler = serve
    args = ["--url", stub.url, "--api-key", "secret", "--root", str(root), "--table", "docs"]
    assert example.main([*args, "--rows", "3000"]) == 0
    out = capsys.readouterr().out
    assert "verified all 3000 rows" in out and "rows/s" in out
    assert entries["embedding"]["virtual_column"]["udf_name"] == "hashed_trigram_embedding"
    # a second run finds the table and the column and refills it
    assert example.main(args) == 0
    assert "already has 'embedding'" in capsys.readouterr().out
