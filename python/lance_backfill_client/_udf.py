"""Python functions as virtual columns: the `AddColumnsEntry` wire format.

`udf_column` turns a function (or an object with `__call__` and an optional
`setup()`) into the JSON body of one `new_columns` entry of
`POST /v1/table/{id}/add_columns`. `load_udf` and `apply_udf` are the other
side: what a worker does with such an entry (decode, verify, call, check).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import sys
from contextlib import contextmanager
from types import ModuleType
from typing import (
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import cloudpickle
import pyarrow as pa

from ._types import _str_metadata, arrow_type_to_json, json_to_arrow_type

CLOUDPICKLE = "cloudpickle"
DOCKER_UDF_SPEC_V1 = "DockerUDFSpecV1"
BACKENDS = (CLOUDPICKLE, DOCKER_UDF_SPEC_V1)

OutputsSpec = Union[Mapping[str, pa.DataType], Sequence[pa.Field]]


def sha256_hex(data: Union[bytes, str]) -> str:
    """Hex SHA-256 of bytes, or of a string's UTF-8 encoding."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def udf_column(
    func: Callable[[pa.RecordBatch], Any],
    *,
    input_columns: Union[str, Sequence[str]],
    output: Optional[pa.DataType] = None,
    outputs: Optional[OutputsSpec] = None,
    name: Optional[str] = None,
    udf_name: Optional[str] = None,
    udf_version: str = "1",
    image: str = "local",
    backend: str = CLOUDPICKLE,
    auto_backfill: Optional[bool] = None,
    manifest: Union[str, Mapping[str, Any], None] = None,
    field_metadata: Optional[Mapping[str, str]] = None,
    nullable: bool = True,
    pickle_by_value: Sequence[Union[ModuleType, str]] = (),
) -> Dict[str, Any]:
    """An `AddColumnsEntry` declaring `func` as a virtual column, as a JSON-ready dict.

    - `func` is called with a `pyarrow.RecordBatch` of `input_columns` and
      returns the outputs for the batch's rows (see the package README).
    - `output`: the pyarrow type of the single output column `name`.
    - `outputs`: several output columns, `{column: pyarrow type}` or a list
      of pyarrow Fields (their nullability and metadata are kept); the
      function returns a StructArray whose fields are the column names. The
      entry's `name` is the first output's column.
    - `backend`: `"cloudpickle"` (the `udf` field is the base64 of the
      pickle) or `"DockerUDFSpecV1"` (the base64 of a JSON spec holding the
      pickle, its checksum and `image` split into image and tag).
    - `manifest`: a runtime environment description (a JSON string, or a
      mapping serialised as canonical JSON); its SHA-256 is sent with it.
    - `pickle_by_value`: modules (or their names) whose functions and
      classes are pickled by value rather than by reference, for code the
      workers cannot import. Functions defined in `__main__` always are.
    """
    if not callable(func):
        raise TypeError(f"func must be callable, got {type(func).__name__}")
    inputs = _input_columns(input_columns)
    output_entries = _output_entries(output, outputs, name, nullable)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(image, str) or not image:
        raise ValueError("image must be a non-empty string")
    if udf_name is None:
        udf_name = getattr(func, "__name__", None) or type(func).__name__
    if not isinstance(udf_name, str) or not udf_name:
        raise ValueError("udf_name must be a non-empty string")
    if isinstance(udf_version, int) and not isinstance(udf_version, bool):
        udf_version = str(udf_version)
    if not isinstance(udf_version, str) or not udf_version:
        raise ValueError("udf_version must be a non-empty string")

    with _by_value(pickle_by_value):
        pickled = cloudpickle.dumps(func)

    if backend == CLOUDPICKLE:
        udf_payload = pickled
    else:
        image_name, tag = split_image_reference(image)
        spec = {
            "image": image_name,
            "tag": tag,
            "workspace_checksum": None,
            "udf_pickle": _b64(pickled),
            "udf_checksum": sha256_hex(pickled),
        }
        udf_payload = json.dumps(spec).encode("utf-8")

    virtual: Dict[str, Any] = {
        "input_columns": inputs,
        "outputs": output_entries,
        "image": image,
        "udf": _b64(udf_payload),
        "udf_name": udf_name,
        "udf_version": udf_version,
        "udf_backend": backend,
    }
    if auto_backfill is not None:
        virtual["auto_backfill"] = bool(auto_backfill)
    if manifest is not None:
        if not isinstance(manifest, str):
            manifest = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
        virtual["manifest"] = manifest
        virtual["manifest_checksum"] = sha256_hex(manifest)
    if field_metadata:
        virtual["field_metadata"] = _metadata(field_metadata, "field_metadata")
    return {"name": output_entries[0]["column"], "virtual_column": virtual}


def split_image_reference(reference: str) -> Tuple[str, Optional[str]]:
    """`"repo/img:tag"` -> `("repo/img", "tag")`; no tag -> `(reference, None)`.

    A `:` followed by a `/` belongs to a registry port, not a tag.
    """
    image, sep, tag = reference.rpartition(":")
    if not sep or "/" in tag or not image:
        return reference, None
    return image, tag or None


def virtual_column_of(entry: Any) -> Dict[str, Any]:
    """The `AddVirtualColumnEntry` dict of an entry (a dict, or a client model)."""
    if hasattr(entry, "to_dict") and not isinstance(entry, Mapping):
        entry = entry.to_dict()
    if not isinstance(entry, Mapping):
        raise TypeError(f"expected an AddColumnsEntry dict, got {type(entry).__name__}")
    if "virtual_column" in entry:
        vc = entry["virtual_column"]
        if not isinstance(vc, Mapping):
            raise ValueError(f"column '{entry.get('name')}' has no virtual_column")
        return dict(vc)
    if "udf" in entry and "outputs" in entry:
        return dict(entry)
    raise ValueError("expected an AddColumnsEntry with a virtual_column")


def udf_pickle_of(entry: Any) -> bytes:
    """The verified cloudpickle bytes of a virtual column entry.

    Checks `manifest_checksum` against `manifest` and, for
    `DockerUDFSpecV1`, `udf_checksum` against the pickle.
    """
    vc = virtual_column_of(entry)
    manifest, checksum = vc.get("manifest"), vc.get("manifest_checksum")
    if checksum is not None:
        if manifest is None:
            raise ValueError("manifest_checksum is set without a manifest")
        if sha256_hex(manifest) != checksum.lower():
            raise ValueError("manifest_checksum does not match the manifest's SHA-256")
    payload = _unb64(vc.get("udf"), "udf")
    backend = vc.get("udf_backend") or CLOUDPICKLE
    if backend == CLOUDPICKLE:
        return payload
    if backend == DOCKER_UDF_SPEC_V1:
        try:
            spec = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"udf is not a DockerUDFSpecV1 JSON document: {e}") from None
        if not isinstance(spec, dict):
            raise ValueError("udf is not a DockerUDFSpecV1 JSON object")
        pickled = _unb64(spec.get("udf_pickle"), "udf_pickle")
        expected = spec.get("udf_checksum")
        if not isinstance(expected, str) or sha256_hex(pickled) != expected.lower():
            raise ValueError("udf_checksum does not match the udf_pickle's SHA-256")
        return pickled
    raise ValueError(f"unsupported udf_backend {backend!r}; expected one of {BACKENDS}")


def load_udf(entry: Any, *, setup: bool = False) -> Any:
    """Decode, verify and unpickle the function of a virtual column entry.

    Only load entries from a trusted source: unpickling runs code. With
    `setup=True`, the object's `setup()` is called (as a worker does once).
    """
    func = cloudpickle.loads(udf_pickle_of(entry))
    if setup and callable(getattr(func, "setup", None)):
        func.setup()
    return func


def output_types(entry: Any) -> Dict[str, pa.Field]:
    """The output columns of a virtual column entry as pyarrow Fields."""
    fields: Dict[str, pa.Field] = {}
    for out in virtual_column_of(entry)["outputs"]:
        fields[out["column"]] = pa.field(
            out["column"],
            json_to_arrow_type(out["data_type"]),
            nullable=bool(out.get("nullable", True)),
            metadata=out.get("metadata") or None,
        )
    return fields


def apply_udf(
    func: Callable[[pa.RecordBatch], Any], batch: pa.RecordBatch, entry: Any
) -> Dict[str, pa.Array]:
    """Call `func` on `batch` and return `{output column: array}` checked
    against the entry's declared outputs (length, type, nullability).

    Accepts what the function contract allows: a pyarrow Array or
    ChunkedArray, a numpy array (2-D for a fixed_size_list output) or a
    Python sequence for one output; a StructArray (or a RecordBatch, or a
    mapping) keyed by `struct_field` for several outputs.
    """
    vc = virtual_column_of(entry)
    outs: List[Mapping[str, Any]] = list(vc["outputs"])
    fields = output_types(vc)
    result = func(batch)
    n = batch.num_rows
    values: Dict[str, Any] = {}
    if len(outs) == 1 and not _is_keyed(result, outs[0]):
        values[outs[0]["column"]] = result
    else:
        keyed = _by_struct_field(result)
        for out in outs:
            if out["struct_field"] not in keyed:
                raise ValueError(
                    f"the function's result has no field '{out['struct_field']}' "
                    f"(output column '{out['column']}'); it has {sorted(keyed)}"
                )
            values[out["column"]] = keyed[out["struct_field"]]
    arrays: Dict[str, pa.Array] = {}
    for column, value in values.items():
        field = fields[column]
        array = to_arrow(value, field.type)
        if len(array) != n:
            raise ValueError(
                f"output column '{column}' has {len(array)} values for a batch of {n} rows"
            )
        if not field.nullable and array.null_count:
            raise ValueError(f"output column '{column}' is not nullable but has nulls")
        arrays[column] = array
    return arrays


def to_arrow(value: Any, data_type: pa.DataType) -> pa.Array:
    """One output's values as a pyarrow Array of `data_type`."""
    if isinstance(value, pa.ChunkedArray):
        value = value.combine_chunks()
    if isinstance(value, pa.Array):
        return value if value.type == data_type else value.cast(data_type)
    np = sys.modules.get("numpy")
    if np is not None and isinstance(value, np.ndarray):
        if pa.types.is_fixed_size_list(data_type) and value.ndim == 2:
            if value.shape[1] != data_type.list_size:
                raise ValueError(
                    f"a {value.shape} array does not fit {data_type} "
                    f"({data_type.list_size} values a row)"
                )
            flat = pa.array(np.ascontiguousarray(value).reshape(-1)).cast(data_type.value_type)
            return pa.FixedSizeListArray.from_arrays(flat, type=data_type)
        if value.ndim != 1 and not pa.types.is_list(data_type):
            raise ValueError(f"a {value.ndim}-D array does not fit {data_type}")
        return pa.array(list(value) if value.ndim != 1 else value).cast(data_type)
    return pa.array(value, type=data_type)


def to_model(entry: Mapping[str, Any]) -> Any:
    """The entry as the official client's `AddColumnsEntry` model.

    Needs `lance-namespace-urllib3-client` (0.13 or later has the virtual
    column models).
    """
    try:
        from lance_namespace_urllib3_client.models import AddColumnsEntry
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "to_model needs the official client: pip install 'lance-namespace-urllib3-client>=0.13'"
        ) from e
    # model_validate (not from_dict) marks only the given fields as set, so the
    # model serialises back to exactly this entry (no `"expression": null`).
    model = AddColumnsEntry.model_validate(dict(entry))
    if entry.get("virtual_column") is not None and getattr(model, "virtual_column", None) is None:
        raise ImportError(  # pragma: no cover - an old client drops the field
            "the installed lance-namespace-urllib3-client has no virtual_column; "
            "upgrade it to >= 0.13"
        )
    return model


# --- helpers -----------------------------------------------------------------


def _input_columns(input_columns: Union[str, Sequence[str]]) -> List[str]:
    if isinstance(input_columns, str):
        input_columns = [input_columns]
    inputs = list(input_columns)
    if not inputs:
        raise ValueError("input_columns must name at least one column")
    for col in inputs:
        if not isinstance(col, str) or not col:
            raise ValueError(f"input_columns must be non-empty strings, got {col!r}")
    return inputs


def _output_entries(
    output: Optional[pa.DataType],
    outputs: Optional[OutputsSpec],
    name: Optional[str],
    nullable: bool,
) -> List[Dict[str, Any]]:
    if (output is None) == (outputs is None):
        raise ValueError("give exactly one of output= (one column) or outputs= (several)")
    fields: List[pa.Field] = []
    if output is not None:
        if not name:
            raise ValueError("name= is required with output=: the new column's name")
        if isinstance(output, pa.Field):
            fields.append(output.with_name(name))
        else:
            fields.append(pa.field(name, _check_type(output, name), nullable=nullable))
    else:
        assert outputs is not None
        if isinstance(outputs, Mapping):
            for col, data_type in outputs.items():
                if isinstance(data_type, pa.Field):
                    fields.append(data_type.with_name(col))
                else:
                    fields.append(pa.field(col, _check_type(data_type, col), nullable=nullable))
        else:
            for f in outputs:
                if not isinstance(f, pa.Field):
                    raise TypeError(f"outputs= must hold pyarrow Fields, got {type(f).__name__}")
                fields.append(f)
        if not fields:
            raise ValueError("outputs= must declare at least one column")
        if name is not None and name != fields[0].name:
            raise ValueError(
                f"name={name!r} differs from the first output column {fields[0].name!r}; "
                "with outputs= the entry is named after the first output"
            )
    seen = set()
    entries = []
    for f in fields:
        if not isinstance(f.name, str) or not f.name:
            raise ValueError("output column names must be non-empty strings")
        if f.name in seen:
            raise ValueError(f"output column '{f.name}' is declared twice")
        seen.add(f.name)
        out: Dict[str, Any] = {
            "column": f.name,
            "struct_field": f.name,
            "data_type": arrow_type_to_json(f.type),
            "nullable": f.nullable,
        }
        if f.metadata:
            out["metadata"] = _str_metadata(f.metadata)
        entries.append(out)
    return entries


def _check_type(data_type: Any, column: str) -> pa.DataType:
    if not isinstance(data_type, pa.DataType):
        raise TypeError(
            f"output column '{column}': expected a pyarrow DataType, got "
            f"{type(data_type).__name__} ({data_type!r})"
        )
    return data_type


def _metadata(metadata: Mapping[str, str], what: str) -> Dict[str, str]:
    out = {}
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"{what} must map strings to strings, got {k!r}: {v!r}")
        out[k] = v
    return out


def _is_keyed(result: Any, out: Mapping[str, Any]) -> bool:
    """A single output given inside a struct/batch/mapping keyed by its struct_field."""
    declared = json_to_arrow_type(out["data_type"])
    if isinstance(result, pa.StructArray) and not pa.types.is_struct(declared):
        return True
    return isinstance(result, (pa.RecordBatch, Mapping))


def _by_struct_field(result: Any) -> Dict[str, Any]:
    if isinstance(result, pa.ChunkedArray) and pa.types.is_struct(result.type):
        result = result.combine_chunks()
    if isinstance(result, pa.StructArray):
        # flatten() folds the struct's own nulls into each field
        return {result.type.field(i).name: a for i, a in enumerate(result.flatten())}
    if isinstance(result, pa.RecordBatch):
        return {result.schema.field(i).name: result.column(i) for i in range(result.num_columns)}
    if isinstance(result, Mapping):
        return dict(result)
    raise TypeError(
        "a function with several outputs must return a pyarrow StructArray whose "
        f"fields are the outputs' struct_field names, got {type(result).__name__}"
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: Any, what: str) -> bytes:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{what} is not valid base64") from None


@contextmanager
def _by_value(modules: Sequence[Union[ModuleType, str]]) -> Iterator[None]:
    registered: List[ModuleType] = []
    try:
        for m in modules:
            module = sys.modules.get(m) if isinstance(m, str) else m
            if not isinstance(module, ModuleType):
                raise ValueError(f"pickle_by_value: module {m!r} is not imported")
            if module.__name__ in getattr(cloudpickle.cloudpickle, "_PICKLE_BY_VALUE_MODULES", ()):
                continue
            cloudpickle.register_pickle_by_value(module)
            registered.append(module)
        yield
    finally:
        for module in registered:
            cloudpickle.unregister_pickle_by_value(module)
