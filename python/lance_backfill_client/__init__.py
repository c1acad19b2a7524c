"""Python functions as computed columns of Lance tables, filled by lance-backfill.

>>> entry = udf_column(fn, input_columns=["text"], output=pa.float32(), name="score")
>>> client = Client("http://127.0.0.1:8080", api_key="...")
>>> client.add_columns("items", [entry])
>>> client.wait(client.backfill("items", "score"))
"""

from ._client import (
    BACKFILL_FIELDS,
    TERMINAL_STATES,
    Client,
    JobFailedError,
    LanceBackfillError,
    computed,
    describe_estimate,
    table_path,
)
from ._types import arrow_type_to_json, field_to_json, json_to_arrow_type, json_to_field
from ._udf import (
    BACKENDS,
    CLOUDPICKLE,
    DOCKER_UDF_SPEC_V1,
    apply_udf,
    load_udf,
    output_types,
    sha256_hex,
    split_image_reference,
    to_arrow,
    to_model,
    udf_column,
    udf_pickle_of,
    virtual_column_of,
)

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BACKFILL_FIELDS",
    "CLOUDPICKLE",
    "DOCKER_UDF_SPEC_V1",
    "TERMINAL_STATES",
    "Client",
    "JobFailedError",
    "LanceBackfillError",
    "__version__",
    "apply_udf",
    "arrow_type_to_json",
    "computed",
    "describe_estimate",
    "field_to_json",
    "json_to_arrow_type",
    "json_to_field",
    "load_udf",
    "output_types",
    "sha256_hex",
    "split_image_reference",
    "table_path",
    "to_arrow",
    "to_model",
    "udf_column",
    "udf_pickle_of",
    "virtual_column_of",
]
