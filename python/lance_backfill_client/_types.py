"""Arrow types <-> the Lance Namespace JSON Arrow type (`JsonArrowDataType`).

The JSON form is the one the Rust `lance-namespace` crate reads
(`convert_json_arrow_type`): `{"type": name}` for primitive types, `fields`
(a list of `{"name", "type", "nullable", "metadata"?}`) for nested types and
`length` for fixed sizes and decimals (`precision * 1000 + scale`).

Only types that survive the round trip unchanged are accepted: the JSON form
has no time unit or time zone, so `timestamp` and `duration` are microseconds
without a time zone, and `time32`/`time64`/`interval`/unions/views/dictionaries
are refused with a `TypeError` naming what to use instead.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional

import pyarrow as pa

JsonType = Dict[str, Any]

_PRIMITIVES: Dict[str, pa.DataType] = {
    "null": pa.null(),
    "bool": pa.bool_(),
    "int8": pa.int8(),
    "int16": pa.int16(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "uint8": pa.uint8(),
    "uint16": pa.uint16(),
    "uint32": pa.uint32(),
    "uint64": pa.uint64(),
    "float16": pa.float16(),
    "float32": pa.float32(),
    "float64": pa.float64(),
    "utf8": pa.utf8(),
    "large_utf8": pa.large_utf8(),
    "binary": pa.binary(),
    "large_binary": pa.large_binary(),
    "date32": pa.date32(),
    "date64": pa.date64(),
    "timestamp": pa.timestamp("us"),
    "duration": pa.duration("us"),
}
_PRIMITIVE_NAMES: Dict[pa.DataType, str] = {t: n for n, t in _PRIMITIVES.items()}

_DECIMALS: Dict[str, Any] = {"decimal128": pa.decimal128, "decimal256": pa.decimal256}
if hasattr(pa, "decimal32"):  # pyarrow >= 18
    _DECIMALS["decimal32"] = pa.decimal32
    _DECIMALS["decimal64"] = pa.decimal64


def field_to_json(field: pa.Field) -> JsonType:
    """A pyarrow Field as a `JsonArrowField` dict."""
    out: JsonType = {
        "name": field.name,
        "type": arrow_type_to_json(field.type),
        "nullable": field.nullable,
    }
    if field.metadata:
        out["metadata"] = _str_metadata(field.metadata)
    return out


def arrow_type_to_json(data_type: pa.DataType) -> JsonType:
    """A pyarrow DataType as a JSON Arrow type dict (`JsonArrowDataType`).

    Raises `TypeError` for types the service cannot represent exactly.
    """
    if not isinstance(data_type, pa.DataType):
        raise TypeError(
            f"expected a pyarrow DataType, got {type(data_type).__name__}: {data_type!r}"
        )
    t = pa.types
    name = _PRIMITIVE_NAMES.get(data_type)
    if name is not None:
        return {"type": name}
    if t.is_timestamp(data_type):
        raise TypeError(
            f"unsupported type {data_type}: a JSON Arrow 'timestamp' is microseconds "
            "without a time zone; declare pa.timestamp('us') and cast in the function"
        )
    if t.is_duration(data_type):
        raise TypeError(
            f"unsupported type {data_type}: a JSON Arrow 'duration' is microseconds; "
            "declare pa.duration('us')"
        )
    if t.is_decimal(data_type):
        dec_name = f"decimal{data_type.bit_width}"
        if dec_name in _DECIMALS:
            return {
                "type": dec_name,
                "length": data_type.precision * 1000 + data_type.scale,
            }
    if t.is_fixed_size_binary(data_type):
        return {"type": "fixed_size_binary", "length": data_type.byte_width}
    if t.is_fixed_size_list(data_type):
        return {
            "type": "fixed_size_list",
            "length": data_type.list_size,
            "fields": [field_to_json(data_type.value_field)],
        }
    if t.is_map(data_type):
        if data_type.keys_sorted:
            raise TypeError(f"unsupported type {data_type}: sorted map keys")
        entries = {
            "type": "struct",
            "fields": [
                field_to_json(data_type.key_field),
                field_to_json(data_type.item_field),
            ],
        }
        return {
            "type": "map",
            "fields": [{"name": "entries", "type": entries, "nullable": False}],
        }
    if t.is_large_list(data_type):
        return {"type": "large_list", "fields": [field_to_json(data_type.value_field)]}
    if t.is_list(data_type):
        return {"type": "list", "fields": [field_to_json(data_type.value_field)]}
    if t.is_struct(data_type):
        return {
            "type": "struct",
            "fields": [field_to_json(data_type.field(i)) for i in range(data_type.num_fields)],
        }

    def is_(kind: str) -> bool:  # view types are newer than some supported pyarrows
        return bool(getattr(t, f"is_{kind}", lambda _: False)(data_type))

    hint = ""
    if is_("dictionary"):
        hint = f"; declare the value type {data_type.value_type} instead"
    elif is_("string_view"):
        hint = "; use pa.utf8() or pa.large_utf8()"
    elif is_("binary_view"):
        hint = "; use pa.binary() or pa.large_binary()"
    elif is_("list_view") or is_("large_list_view"):
        hint = "; use pa.list_() or pa.large_list()"
    elif is_("time"):
        hint = "; use pa.int64() (microseconds) or pa.timestamp('us')"
    raise TypeError(
        f"unsupported type {data_type}: it has no JSON Arrow representation the "
        f"service reads back unchanged{hint}"
    )


def json_to_field(obj: Mapping[str, Any]) -> pa.Field:
    """A `JsonArrowField` dict as a pyarrow Field."""
    try:
        name = obj["name"]
        type_obj = obj["type"]
    except (KeyError, TypeError):
        raise ValueError(f"not a JSON Arrow field: {obj!r}") from None
    return pa.field(
        name,
        json_to_arrow_type(type_obj),
        nullable=bool(obj.get("nullable", True)),
        metadata=obj.get("metadata") or None,
    )


def json_to_arrow_type(obj: Mapping[str, Any]) -> pa.DataType:
    """A JSON Arrow type dict as a pyarrow DataType (inverse of `arrow_type_to_json`)."""
    if not isinstance(obj, Mapping) or not isinstance(obj.get("type"), str):
        raise ValueError(f"not a JSON Arrow type: {obj!r}")
    name = obj["type"].lower()
    if name == "boolean":
        name = "bool"
    if name in _PRIMITIVES:
        return _PRIMITIVES[name]
    length: Optional[int] = obj.get("length")
    fields: List[Mapping[str, Any]] = list(obj.get("fields") or [])
    if name in _DECIMALS:
        encoded = int(length or 0)
        precision = (encoded + 128) // 1000
        return _DECIMALS[name](precision, encoded - precision * 1000)
    if name == "fixed_size_binary":
        return pa.binary(int(length or 0))
    if name in ("list", "large_list", "fixed_size_list", "map", "struct"):
        if not fields:
            raise ValueError(f"JSON Arrow type '{name}' has no fields: {obj!r}")
        if name == "struct":
            return pa.struct([json_to_field(f) for f in fields])
        inner = json_to_field(fields[0])
        if name == "list":
            return pa.list_(inner)
        if name == "large_list":
            return pa.large_list(inner)
        if name == "fixed_size_list":
            return pa.list_(inner, int(length or 0))
        entries = inner.type
        if not pa.types.is_struct(entries) or entries.num_fields != 2:
            raise ValueError(f"map entries must be a struct of key and value: {obj!r}")
        return pa.map_(entries.field(0), entries.field(1))
    raise ValueError(f"unsupported JSON Arrow type '{obj['type']}'")


def _str_metadata(metadata: Mapping[Any, Any]) -> Dict[str, str]:
    def text(v: Any) -> str:
        return v.decode("utf-8") if isinstance(v, bytes) else str(v)

    return {text(k): text(v) for k, v in metadata.items()}
