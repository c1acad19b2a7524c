//! A function's result as the output columns: the right length, one array
//! per output (fields of a struct for several), each of its declared type
//! (cast only when the values survive the cast both ways).

use arrow_array::{Array, ArrayRef, StructArray};
use arrow_cast::{CastOptions, cast_with_options};
use arrow_schema::DataType;

use crate::model::binding::Binding;
use crate::model::error::Error;

/// The output arrays, in the binding's output order.
pub fn outputs(result: &ArrayRef, binding: &Binding, rows: usize) -> Result<Vec<ArrayRef>, Error> {
    if result.len() != rows {
        return Err(Error::Permanent(format!(
            "user function '{}' returned {} rows for a batch of {rows} rows",
            binding.udf_name,
            result.len()
        )));
    }
    binding
        .outputs
        .iter()
        .map(|output| {
            let declared = output.arrow_type()?;
            let values = pick(result, binding, &output.struct_field, &declared)?;
            let values = conform(&values, &declared, &output.column, &binding.udf_name)?;
            if !output.nullable && values.null_count() > 0 {
                return Err(Error::Permanent(format!(
                    "user function '{}' returned {} nulls for column '{}', declared not nullable",
                    binding.udf_name,
                    values.null_count(),
                    output.column
                )));
            }
            Ok(values)
        })
        .collect()
}

/// The array that fills one output: the whole result for a single output
/// (unless it is a struct holding the output's field), else the field.
fn pick(
    result: &ArrayRef,
    binding: &Binding,
    struct_field: &str,
    declared: &DataType,
) -> Result<ArrayRef, Error> {
    let single = binding.outputs.len() == 1;
    let as_struct = result.as_any().downcast_ref::<StructArray>();
    match (single, as_struct) {
        (true, Some(fields)) if !matches!(declared, DataType::Struct(_)) => fields
            .column_by_name(struct_field)
            .cloned()
            .ok_or_else(|| missing(binding, struct_field)),
        (true, _) => Ok(result.clone()),
        (false, Some(fields)) => fields
            .column_by_name(struct_field)
            .cloned()
            .ok_or_else(|| missing(binding, struct_field)),
        (false, None) => Err(Error::Permanent(format!(
            "user function '{}' has {} outputs but returned {}, not a struct with fields {}",
            binding.udf_name,
            binding.outputs.len(),
            result.data_type(),
            binding
                .outputs
                .iter()
                .map(|o| o.struct_field.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

fn missing(binding: &Binding, struct_field: &str) -> Error {
    Error::Permanent(format!(
        "user function '{}' returned a struct without the field '{struct_field}'",
        binding.udf_name
    ))
}

/// Text (and bytes) on one side and not the other: a cast would parse or
/// print values, not convert them, so it is refused even where it would
/// round-trip (`"12"` is not the int64 12).
fn text_meets_non_text(from: &DataType, to: &DataType) -> bool {
    use DataType::*;
    let element = |t: &DataType| match t {
        List(f) | LargeList(f) | FixedSizeList(f, _) | ListView(f) | LargeListView(f) => {
            Some(f.data_type().clone())
        }
        _ => None,
    };
    if let (Some(a), Some(b)) = (element(from), element(to)) {
        return text_meets_non_text(&a, &b);
    }
    let textual = |t: &DataType| {
        matches!(
            t,
            Utf8 | LargeUtf8 | Utf8View | Binary | LargeBinary | BinaryView | FixedSizeBinary(_)
        )
    };
    textual(from) != textual(to)
}

/// The values as the declared type: unchanged when the types agree; cast
/// when every value survives the cast and the cast back (and neither side
/// is text where the other is not); otherwise an error naming the column
/// and both types.
fn conform(
    values: &ArrayRef,
    declared: &DataType,
    column: &str,
    udf: &str,
) -> Result<ArrayRef, Error> {
    if values.data_type() == declared {
        return Ok(values.clone());
    }
    let lossy = || {
        Error::Permanent(format!(
            "user function '{udf}' returned {} for column '{column}', declared {declared}, and \
             the values do not convert without loss",
            values.data_type()
        ))
    };
    if values.data_type() == &DataType::Null {
        return Ok(arrow_array::new_null_array(declared, values.len()));
    }
    if text_meets_non_text(values.data_type(), declared) {
        return Err(lossy());
    }
    let strict = CastOptions {
        safe: false,
        ..Default::default()
    };
    let cast = cast_with_options(values, declared, &strict).map_err(|_| lossy())?;
    let back = cast_with_options(&cast, values.data_type(), &strict).map_err(|_| lossy())?;
    if back.to_data() != values.to_data() {
        return Err(lossy());
    }
    Ok(cast)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::{Float32Array, Float64Array, Int32Array, Int64Array};
    use arrow_schema::Field;

    use super::*;
    use crate::model::binding::{Output, Payload};

    fn binding(outputs: &[(&str, serde_json::Value)]) -> Binding {
        Binding {
            udf_id: "id".into(),
            udf_name: "f".into(),
            udf_version: "1".into(),
            udf_backend: "cloudpickle".into(),
            image: "local".into(),
            manifest: None,
            manifest_path: None,
            manifest_checksum: None,
            input_columns: vec!["x".into()],
            outputs: outputs
                .iter()
                .map(|(name, data_type)| Output {
                    column: name.to_string(),
                    struct_field: name.to_string(),
                    data_type: data_type.clone(),
                    nullable: true,
                })
                .collect(),
            payload: Payload::Inline(String::new()),
            workspace_zips: Vec::new(),
        }
    }

    #[test]
    fn lossless_casts_pass_and_lossy_ones_name_both_types() {
        let one = binding(&[("y", serde_json::json!({"type": "int64"}))]);
        let narrow: ArrayRef = Arc::new(Int32Array::from(vec![1, 2, 3]));
        let widened = outputs(&narrow, &one, 3).unwrap();
        assert_eq!(widened[0].data_type(), &DataType::Int64);
        let float = binding(&[("y", serde_json::json!({"type": "float32"}))]);
        let exact: ArrayRef = Arc::new(Float64Array::from(vec![0.5, 2.0]));
        assert!(outputs(&exact, &float, 2).is_ok());
        let inexact: ArrayRef = Arc::new(Float64Array::from(vec![0.1, 2.0]));
        let err = outputs(&inexact, &float, 2).unwrap_err().to_string();
        assert!(
            err.contains("Float64") && err.contains("Float32") && err.contains("'y'"),
            "{err}"
        );
        let err = outputs(&narrow, &one, 4).unwrap_err().to_string();
        assert!(err.contains("3 rows for a batch of 4"), "{err}");
        let digits: ArrayRef = Arc::new(arrow_array::StringArray::from(vec!["1", "2", "3"]));
        let err = outputs(&digits, &one, 3).unwrap_err().to_string();
        assert!(err.contains("Utf8") && err.contains("Int64"), "{err}");
    }

    #[test]
    fn several_outputs_come_from_a_struct() {
        let two = binding(&[
            ("a", serde_json::json!({"type": "int64"})),
            ("b", serde_json::json!({"type": "float32"})),
        ]);
        let result: ArrayRef = Arc::new(StructArray::from(vec![
            (
                Arc::new(Field::new("b", DataType::Float32, true)),
                Arc::new(Float32Array::from(vec![1.5, 2.5])) as ArrayRef,
            ),
            (
                Arc::new(Field::new("a", DataType::Int64, true)),
                Arc::new(Int64Array::from(vec![7, 8])) as ArrayRef,
            ),
        ]));
        let arrays = outputs(&result, &two, 2).unwrap();
        assert_eq!(arrays[0].data_type(), &DataType::Int64);
        assert_eq!(arrays[1].data_type(), &DataType::Float32);
        let not_struct: ArrayRef = Arc::new(Int64Array::from(vec![1, 2]));
        assert!(outputs(&not_struct, &two, 2).is_err());
    }
}
