//! A user function's binding: what a `virtual_column` declaration says
//! (inputs, outputs with their types, the payload and where it is kept),
//! checked when it is declared and kept once, in its first output field's
//! metadata (the other outputs name that one). Everything a declaration
//! puts into the table's schema is bounded: the schema is copied into
//! every later manifest. Nothing here unpickles or runs the function.

use std::collections::{BTreeMap, HashMap};

use arrow_schema::{DataType, Field as ArrowField, Schema as ArrowSchema};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use lance_namespace_reqwest_client::models::{AddVirtualColumnEntry, JsonArrowDataType};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::model::error::Error;

/// Field metadata key holding a user function's binding (JSON), on its
/// first output.
pub const UDF_BINDING_KEY: &str = "lance-backfill:udf";
/// Field metadata key of a function's other outputs: the first output's
/// name, whose metadata holds the binding.
pub const UDF_OUTPUT_OF_KEY: &str = "lance-backfill:udf-output-of";
/// Field metadata keys starting so are the service's: a declaration's own
/// metadata may not set them.
pub const RESERVED_METADATA_PREFIX: &str = "lance-backfill:";
/// Payload formats this service reads (`udf_backend`).
pub const SUPPORTED_BACKENDS: [&str; 2] = ["cloudpickle", "DockerUDFSpecV1"];
/// Outputs one function may fill.
const MAX_OUTPUTS: usize = 64;
/// Inputs one function may read.
const MAX_INPUTS: usize = 256;
/// Payloads up to this size are kept in the binding itself; larger ones
/// beside the table, content-addressed.
pub const MAX_INLINE_PAYLOAD_BYTES: usize = 2 * 1024;
/// Manifests up to this size are kept in the binding itself; larger ones
/// beside the table, content-addressed.
pub const MAX_INLINE_MANIFEST_BYTES: usize = 1024;
/// The largest manifest a declaration may carry.
pub const MAX_MANIFEST_BYTES: usize = 1 << 20;
/// The largest binding (inputs, outputs, types, names) kept in the schema.
pub const MAX_BINDING_BYTES: usize = 64 * 1024;
/// The user's own field metadata of all of a declaration's outputs together.
pub const MAX_USER_METADATA_BYTES: usize = 64 * 1024;
/// The longest output column name.
const MAX_COLUMN_NAME_BYTES: usize = 256;
/// How deep an output's type may nest (lists of structs of lists...).
const MAX_TYPE_DEPTH: usize = 32;
/// Fields an output's type may hold, all levels together.
const MAX_TYPE_FIELDS: usize = 1_024;

/// One output column of a function.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Output {
    pub column: String,
    /// The field of the function's struct result that fills this column.
    pub struct_field: String,
    /// The spec's JSON Arrow type, as declared.
    pub data_type: serde_json::Value,
    pub nullable: bool,
}

impl Output {
    pub fn arrow_type(&self) -> Result<DataType, Error> {
        parse_type(&self.data_type, &self.column)
    }
}

/// Where a function's pickle is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Payload {
    /// Base64 of the pickle.
    Inline(String),
    /// Relative to the table's root: `_backfill/udfs/<sha256>.pkl`.
    Path(String),
}

/// What a backfill needs to run a user function.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Binding {
    /// Lowercase hex SHA-256 of the pickle: the function's identity.
    pub udf_id: String,
    pub udf_name: String,
    pub udf_version: String,
    pub udf_backend: String,
    pub image: String,
    /// The manifest, when small; a larger one is beside the table.
    pub manifest: Option<String>,
    /// Relative to the table's root: `_backfill/manifests/<sha256>.json`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_path: Option<String>,
    pub manifest_checksum: Option<String>,
    pub input_columns: Vec<String>,
    pub outputs: Vec<Output>,
    pub payload: Payload,
    /// Content digests of the user's code archives, kept beside the table.
    #[serde(default)]
    pub workspace_zips: Vec<String>,
}

impl Binding {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_json(text: &str) -> Result<Self, Error> {
        serde_json::from_str(text).map_err(|err| {
            Error::invalid_input(format!("a user-function binding is unreadable: {err}"))
        })
    }

    /// The output columns, in declaration order.
    pub fn columns(&self) -> Vec<String> {
        self.outputs.iter().map(|o| o.column.clone()).collect()
    }

    /// The first output: the column that names the function's jobs.
    pub fn primary_column(&self) -> &str {
        self.outputs
            .first()
            .map(|o| o.column.as_str())
            .unwrap_or_default()
    }

    /// What a job records of its function: who it is and what it fills,
    /// never its payload, manifest or types (the worker reads those from
    /// the table, and checks they are still this function's).
    pub fn reference(&self) -> FunctionRef {
        FunctionRef {
            udf_id: self.udf_id.clone(),
            udf_name: self.udf_name.clone(),
            udf_version: self.udf_version.clone(),
            image: self.image.clone(),
            input_columns: self.input_columns.clone(),
            columns: self.columns(),
            outputs: Vec::new(),
        }
    }

    /// The binding as principals who may not run functions see it: no
    /// payload, no manifest.
    pub fn redacted(&self) -> Self {
        Self {
            payload: Payload::Inline(String::new()),
            manifest: None,
            manifest_path: None,
            ..self.clone()
        }
    }
}

/// A job's record of the user function that fills its columns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionRef {
    pub udf_id: String,
    pub udf_name: String,
    pub udf_version: String,
    pub image: String,
    #[serde(default)]
    pub input_columns: Vec<String>,
    /// The outputs' columns, in declaration order.
    #[serde(default)]
    pub columns: Vec<String>,
    /// Job items recorded with the whole binding name their columns here.
    #[serde(default, skip_serializing)]
    outputs: Vec<OutputName>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
struct OutputName {
    column: String,
}

impl FunctionRef {
    /// The columns the function fills.
    pub fn columns(&self) -> Vec<String> {
        match self.columns.is_empty() {
            false => self.columns.clone(),
            true => self.outputs.iter().map(|o| o.column.clone()).collect(),
        }
    }
}

/// A declaration read and checked: the binding (payload still in hand) and
/// the fields to add.
pub struct Declared {
    pub binding: Binding,
    /// The pickle, when it is to be kept beside the table.
    pub pickle: Vec<u8>,
    /// The manifest, when it is to be kept beside the table.
    pub manifest: Option<String>,
    pub workspace_zips: Vec<Vec<u8>>,
    pub fields: Vec<ArrowField>,
}

fn parse_type(value: &serde_json::Value, column: &str) -> Result<DataType, Error> {
    let json: JsonArrowDataType = serde_json::from_value(value.clone()).map_err(|err| {
        Error::invalid_input(format!(
            "output '{column}': data_type is not a JSON Arrow type: {err}"
        ))
    })?;
    let mut fields = 0;
    check_type_shape(&json, 0, &mut fields).map_err(|problem| {
        Error::invalid_input(format!("output '{column}': data_type {problem}"))
    })?;
    lance_namespace::schema::convert_json_arrow_type(&json).map_err(|err| {
        Error::invalid_input(format!(
            "output '{column}': data_type {value} is not supported: {}",
            crate::model::error::first_line(&err)
        ))
    })
}

/// Bounds what the conversion of a JSON Arrow type does arithmetic on or
/// recurses through: its depth, its fields, and each `length` (a decimal's
/// precision and scale, a fixed size), which must fit Arrow's own ranges.
fn check_type_shape(
    json: &JsonArrowDataType,
    depth: usize,
    fields: &mut usize,
) -> Result<(), String> {
    if depth > MAX_TYPE_DEPTH {
        return Err(format!("nests deeper than {MAX_TYPE_DEPTH} levels"));
    }
    if let Some(length) = json.length {
        let fits = match json.r#type.to_ascii_lowercase().as_str() {
            // precision * 1000 + scale: precision to 76, scale an i8.
            name if name.starts_with("decimal") => (-128..=76_127).contains(&length),
            name if name.starts_with("fixed_size") => (1..=i64::from(i32::MAX)).contains(&length),
            _ => (0..=i64::from(i32::MAX)).contains(&length),
        };
        if !fits {
            return Err(format!(
                "'{}' has a length out of range: {length}",
                json.r#type
            ));
        }
    }
    for field in json.fields.iter().flatten() {
        *fields += 1;
        if *fields > MAX_TYPE_FIELDS {
            return Err(format!("holds more than {MAX_TYPE_FIELDS} fields"));
        }
        check_type_shape(&field.r#type, depth + 1, fields)?;
    }
    Ok(())
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn decode_base64(text: &str, field: &str) -> Result<Vec<u8>, Error> {
    BASE64
        .decode(text.trim())
        .map_err(|err| Error::invalid_input(format!("field '{field}' is not base64: {err}")))
}

/// What a declaration's payload holds.
struct Decoded {
    backend: String,
    pickle: Vec<u8>,
    workspace_zips: Vec<Vec<u8>>,
}

/// The pickle (and code archives) a declaration carries, by `udf_backend`.
fn decode_payload(entry: &AddVirtualColumnEntry, at: &str) -> Result<Decoded, Error> {
    let backend = entry
        .udf_backend
        .clone()
        .flatten()
        .unwrap_or_else(|| "cloudpickle".to_string());
    let raw = decode_base64(&entry.udf, &format!("{at}.udf"))?;
    match backend.as_str() {
        "cloudpickle" => Ok(Decoded {
            backend,
            pickle: raw,
            workspace_zips: Vec::new(),
        }),
        "DockerUDFSpecV1" => {
            let (pickle, workspace_zips) = docker_spec(&raw, at)?;
            Ok(Decoded {
                backend,
                pickle,
                workspace_zips,
            })
        }
        other => Err(Error::invalid_input(format!(
            "field '{at}.udf_backend': '{other}' is not supported (supported: {})",
            SUPPORTED_BACKENDS.join(", ")
        ))),
    }
}

/// `DockerUDFSpecV1`: a JSON document carrying the pickle and its checksum.
fn docker_spec(raw: &[u8], at: &str) -> Result<(Vec<u8>, Vec<Vec<u8>>), Error> {
    #[derive(Deserialize)]
    struct Spec {
        udf_pickle: String,
        udf_checksum: String,
        #[serde(default)]
        workspace_zips: Option<Vec<String>>,
    }
    let spec: Spec = serde_json::from_slice(raw).map_err(|err| {
        Error::invalid_input(format!(
            "field '{at}.udf': not a DockerUDFSpecV1 document: {err}"
        ))
    })?;
    let pickle = decode_base64(&spec.udf_pickle, &format!("{at}.udf (udf_pickle)"))?;
    let actual = sha256_hex(&pickle);
    if !actual.eq_ignore_ascii_case(spec.udf_checksum.trim()) {
        return Err(Error::invalid_input(format!(
            "field '{at}.udf': udf_checksum {} does not match the pickle's SHA-256 {actual}",
            spec.udf_checksum
        )));
    }
    let zips = spec
        .workspace_zips
        .unwrap_or_default()
        .iter()
        .enumerate()
        .map(|(i, zip)| decode_base64(zip, &format!("{at}.udf (workspace_zips[{i}])")))
        .collect::<Result<_, _>>()?;
    Ok((pickle, zips))
}

/// The manifest: bounded, matching its checksum, and, when it is shaped
/// as what a function asks of its sandbox, asking for what may be given.
fn check_manifest(entry: &AddVirtualColumnEntry, at: &str) -> Result<(), Error> {
    if let Some(manifest) = entry.manifest.clone().flatten() {
        if manifest.len() > MAX_MANIFEST_BYTES {
            return Err(Error::invalid_input(format!(
                "field '{at}.manifest' is {} bytes; at most {MAX_MANIFEST_BYTES}",
                manifest.len()
            )));
        }
        if let Ok(wants) = serde_json::from_str::<Wants>(&manifest) {
            wants.check().map_err(|problem| {
                Error::invalid_input(format!("field '{at}.manifest': {problem}"))
            })?;
        }
    }
    let Some(checksum) = entry.manifest_checksum.clone().flatten() else {
        return Ok(());
    };
    let manifest = entry.manifest.clone().flatten().ok_or_else(|| {
        Error::invalid_input(format!(
            "field '{at}.manifest_checksum' is set but '{at}.manifest' is not"
        ))
    })?;
    let actual = sha256_hex(manifest.as_bytes());
    if !actual.eq_ignore_ascii_case(checksum.trim()) {
        return Err(Error::invalid_input(format!(
            "field '{at}.manifest_checksum' ({checksum}) is not the SHA-256 of the manifest ({actual})"
        )));
    }
    Ok(())
}

fn check_inputs(
    entry: &AddVirtualColumnEntry,
    schema: &ArrowSchema,
    at: &str,
) -> Result<(), Error> {
    if entry.input_columns.is_empty() || entry.input_columns.len() > MAX_INPUTS {
        return Err(Error::invalid_input(format!(
            "field '{at}.input_columns' must list from 1 to {MAX_INPUTS} columns"
        )));
    }
    for (i, column) in entry.input_columns.iter().enumerate() {
        if schema.field_with_name(column).is_err() {
            return Err(Error::invalid_input(format!(
                "field '{at}.input_columns[{i}]': column '{column}' does not exist in the table"
            )));
        }
    }
    Ok(())
}

/// The outputs as fields to add: names new and distinct, types parsed, the
/// binding and the user's metadata in each field's metadata.
fn check_outputs(entry: &AddVirtualColumnEntry, at: &str) -> Result<Vec<Output>, Error> {
    if entry.outputs.is_empty() || entry.outputs.len() > MAX_OUTPUTS {
        return Err(Error::invalid_input(format!(
            "field '{at}.outputs' must list from 1 to {MAX_OUTPUTS} outputs"
        )));
    }
    let mut outputs = Vec::with_capacity(entry.outputs.len());
    for (i, output) in entry.outputs.iter().enumerate() {
        let column = output.column.trim().to_string();
        if column.is_empty() || column.len() > MAX_COLUMN_NAME_BYTES {
            return Err(Error::invalid_input(format!(
                "field '{at}.outputs[{i}].column' must be from 1 to {MAX_COLUMN_NAME_BYTES} bytes"
            )));
        }
        let struct_field = match output.struct_field.trim() {
            "" => column.clone(),
            named => named.to_string(),
        };
        let checked = Output {
            column,
            struct_field,
            data_type: output.data_type.clone(),
            nullable: output.nullable,
        };
        checked.arrow_type().map_err(|err| {
            Error::invalid_input(format!("field '{at}.outputs[{i}].data_type': {err}"))
        })?;
        outputs.push(checked);
    }
    Ok(outputs)
}

/// Reads and checks a `virtual_column` declaration (`at` names it in
/// errors, e.g. `new_columns[0].virtual_column`).
pub fn declare(
    entry: &AddVirtualColumnEntry,
    schema: &ArrowSchema,
    at: &str,
) -> Result<Declared, Error> {
    check_inputs(entry, schema, at)?;
    let outputs = check_outputs(entry, at)?;
    check_manifest(entry, at)?;
    let Decoded {
        backend: udf_backend,
        pickle,
        workspace_zips,
    } = decode_payload(entry, at)?;
    let udf_id = sha256_hex(&pickle);
    let payload = if pickle.len() <= MAX_INLINE_PAYLOAD_BYTES {
        Payload::Inline(BASE64.encode(&pickle))
    } else {
        Payload::Path(format!("_backfill/udfs/{udf_id}.pkl"))
    };
    let manifest = entry.manifest.clone().flatten();
    let manifest_path = manifest
        .as_ref()
        .filter(|m| m.len() > MAX_INLINE_MANIFEST_BYTES)
        .map(|m| format!("_backfill/manifests/{}.json", sha256_hex(m.as_bytes())));
    let binding = Binding {
        udf_id,
        udf_name: entry.udf_name.clone(),
        udf_version: entry.udf_version.clone(),
        udf_backend,
        image: entry.image.clone(),
        manifest: manifest.clone().filter(|_| manifest_path.is_none()),
        manifest_path,
        manifest_checksum: entry.manifest_checksum.clone().flatten(),
        input_columns: entry.input_columns.clone(),
        outputs,
        payload,
        workspace_zips: workspace_zips.iter().map(|z| sha256_hex(z)).collect(),
    };
    check_binding_size(&binding, at)?;
    let fields = output_fields(entry, &binding, at)?;
    Ok(Declared {
        manifest: manifest.filter(|_| binding.manifest_path.is_some()),
        binding,
        pickle,
        workspace_zips,
        fields,
    })
}

fn check_binding_size(binding: &Binding, at: &str) -> Result<(), Error> {
    let bytes = binding.to_json().len();
    if bytes > MAX_BINDING_BYTES {
        return Err(Error::invalid_input(format!(
            "field '{at}': the function's binding (names, inputs, outputs and their types) \
             takes {bytes} bytes; at most {MAX_BINDING_BYTES}"
        )));
    }
    Ok(())
}

/// The user's own metadata of each output (`field_metadata`, then the
/// output's `metadata`), checked: none of the service's keys, bounded.
fn user_metadata(
    entry: &AddVirtualColumnEntry,
    at: &str,
) -> Result<Vec<HashMap<String, String>>, Error> {
    let mut total = 0;
    let mut all = Vec::with_capacity(entry.outputs.len());
    for declared in &entry.outputs {
        let mut metadata = entry.field_metadata.clone().unwrap_or_default();
        metadata.extend(declared.metadata.clone().unwrap_or_default());
        if let Some(key) = metadata
            .keys()
            .find(|k| k.starts_with(RESERVED_METADATA_PREFIX))
        {
            return Err(Error::invalid_input(format!(
                "field '{at}': metadata key '{key}' is reserved (keys starting \
                 '{RESERVED_METADATA_PREFIX}' are the service's)"
            )));
        }
        total += metadata
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>();
        all.push(metadata);
    }
    if total > MAX_USER_METADATA_BYTES {
        return Err(Error::invalid_input(format!(
            "field '{at}': the outputs' field_metadata and metadata take {total} bytes \
             together (field_metadata is copied to every output); at most \
             {MAX_USER_METADATA_BYTES}"
        )));
    }
    Ok(all)
}

/// The outputs as fields: the binding in the first one's metadata, the
/// first one's name in the others'.
fn output_fields(
    entry: &AddVirtualColumnEntry,
    binding: &Binding,
    at: &str,
) -> Result<Vec<ArrowField>, Error> {
    let json = binding.to_json();
    let primary = binding.primary_column().to_string();
    binding
        .outputs
        .iter()
        .zip(user_metadata(entry, at)?)
        .enumerate()
        .map(|(i, (output, mut metadata))| {
            match i {
                0 => metadata.insert(UDF_BINDING_KEY.to_string(), json.clone()),
                _ => metadata.insert(UDF_OUTPUT_OF_KEY.to_string(), primary.clone()),
            };
            // Added all-null: the column must accept nulls until filled.
            Ok(ArrowField::new(&output.column, output.arrow_type()?, true).with_metadata(metadata))
        })
        .collect()
}

/// What to do with rows the function raised on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// The task (and the job) fails with the error.
    #[default]
    Fail,
    /// The rows are left null, counted and listed.
    Skip,
}

/// Variables of the service's environment a function process keeps: none
/// holds a secret.
pub const ALLOWED_ENV: [&str; 4] = ["PATH", "LANG", "LC_ALL", "TZ"];

/// What one function asks for in its declaration's `manifest`, a JSON
/// object: `env` (variables set for it, never the service's) and
/// `network` (true: it may reach the network; default false).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Wants {
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub network: bool,
}

/// Variables a declaration may set, at most.
pub const MAX_ENV_VARS: usize = 64;
/// Longest value of one.
pub const MAX_ENV_VALUE_BYTES: usize = 4096;
/// Prefixes of variables a declaration may not set: the service's own.
const RESERVED_PREFIXES: [&str; 4] = ["LANCE_BACKFILL_", "AWS_", "LD_", "PYTHON"];

impl Wants {
    /// What a declaration's manifest asks for: nothing when it is not a
    /// JSON object of this shape (a manifest may describe the function in
    /// the caller's own terms), and never more than [`Wants::check`] allows.
    pub fn of(manifest: Option<&str>) -> Self {
        manifest
            .and_then(|text| serde_json::from_str::<Self>(text).ok())
            .filter(|wants| wants.check().is_ok())
            .unwrap_or_default()
    }

    /// Why the variables cannot be set, if they cannot.
    pub fn check(&self) -> Result<(), String> {
        if self.env.len() > MAX_ENV_VARS {
            return Err(format!("at most {MAX_ENV_VARS} variables may be set"));
        }
        for (name, value) in &self.env {
            let well_formed = !name.is_empty()
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !name.starts_with(|c: char| c.is_ascii_digit());
            if !well_formed {
                return Err(format!("variable name '{name}' is not NAME_LIKE_THIS"));
            }
            if let Some(prefix) = RESERVED_PREFIXES.iter().find(|p| name.starts_with(*p)) {
                return Err(format!(
                    "variable '{name}': names starting {prefix} are the service's"
                ));
            }
            if ALLOWED_ENV.contains(&name.as_str()) || ["HOME", "TMPDIR"].contains(&name.as_str()) {
                return Err(format!("variable '{name}' is set by the service"));
            }
            if value.len() > MAX_ENV_VALUE_BYTES || value.contains('\0') {
                return Err(format!(
                    "variable '{name}': a value of at most {MAX_ENV_VALUE_BYTES} bytes, without NUL"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use lance_namespace_reqwest_client::models::AddVirtualColumnOutputEntry;
    use serde_json::json;

    use super::*;

    fn schema() -> ArrowSchema {
        ArrowSchema::new(vec![ArrowField::new("text", DataType::Utf8, true)])
    }

    #[test]
    fn types_that_would_overflow_or_recurse_are_refused_before_conversion() {
        for (value, problem) in [
            (
                json!({"type": "decimal128", "length": i64::MAX}),
                "out of range",
            ),
            (
                json!({"type": "fixed_size_binary", "length": 0}),
                "out of range",
            ),
            (
                json!({"type": "fixed_size_binary", "length": -1}),
                "out of range",
            ),
        ] {
            let err = parse_type(&value, "o").unwrap_err().to_string();
            assert!(err.contains(problem), "{value}: {err}");
        }
        let mut deep = json!({"type": "int64"});
        for _ in 0..=MAX_TYPE_DEPTH {
            deep = json!({"type": "list", "fields": [{"name": "item", "nullable": true, "type": deep}]});
        }
        let err = parse_type(&deep, "o").unwrap_err().to_string();
        assert!(err.contains("deeper"), "{err}");
        let fine = json!({"type": "decimal128", "length": 38_002});
        assert_eq!(parse_type(&fine, "o").unwrap(), DataType::Decimal128(38, 2));
    }

    fn entry(udf: &[u8]) -> AddVirtualColumnEntry {
        let output = AddVirtualColumnOutputEntry::new(
            "emb".into(),
            "emb".into(),
            serde_json::json!({"type": "fixed_size_list", "length": 4,
                "fields": [{"name": "item", "type": {"type": "float32"}, "nullable": true}]}),
            true,
        );
        AddVirtualColumnEntry::new(
            vec!["text".into()],
            vec![output],
            "local".into(),
            BASE64.encode(udf),
            "embed".into(),
            "1".into(),
        )
    }

    #[test]
    fn a_cloudpickle_declaration_binds_its_outputs() {
        let declared = declare(&entry(b"pickle"), &schema(), "v").unwrap();
        assert_eq!(declared.binding.udf_id, sha256_hex(b"pickle"));
        assert_eq!(declared.fields.len(), 1);
        assert_eq!(
            declared.fields[0].data_type(),
            &DataType::new_fixed_size_list(DataType::Float32, 4, true)
        );
        let kept = Binding::from_json(&declared.fields[0].metadata()[UDF_BINDING_KEY]).unwrap();
        assert_eq!(kept, declared.binding);
        assert!(matches!(kept.payload, Payload::Inline(_)));
    }

    #[test]
    fn docker_specs_are_checked() {
        let pickle = b"the pickle".to_vec();
        let spec = |checksum: &str| {
            let doc = serde_json::json!({"image": "i", "tag": "t", "udf_pickle": BASE64.encode(&pickle),
                "udf_checksum": checksum, "workspace_checksum": null});
            let mut e = entry(&serde_json::to_vec(&doc).unwrap());
            e.udf_backend = Some(Some("DockerUDFSpecV1".into()));
            e
        };
        let good = declare(&spec(&sha256_hex(&pickle)), &schema(), "v").unwrap();
        assert_eq!(good.pickle, pickle);
        let bad = declare(&spec("00"), &schema(), "v").err().unwrap();
        assert!(bad.to_string().contains("udf_checksum"), "{bad}");
    }

    #[test]
    fn bad_declarations_name_the_field() {
        type Change = Box<dyn Fn(&mut AddVirtualColumnEntry)>;
        let cases: Vec<(Change, &str)> = vec![
            (
                Box::new(|e| e.input_columns = vec!["nope".into()]),
                "input_columns[0]",
            ),
            (Box::new(|e| e.udf = "***".into()), "v.udf"),
            (
                Box::new(|e| e.udf_backend = Some(Some("torchscript".into()))),
                "cloudpickle",
            ),
            (
                Box::new(|e| e.outputs[0].data_type = serde_json::json!({"type": "quaternion"})),
                "data_type",
            ),
            (Box::new(|e| e.outputs.clear()), "outputs"),
            (
                Box::new(|e| {
                    e.manifest = Some(Some("m".into()));
                    e.manifest_checksum = Some(Some("00".into()));
                }),
                "manifest_checksum",
            ),
        ];
        for (change, mentions) in cases {
            let mut e = entry(b"p");
            change(&mut e);
            let err = declare(&e, &schema(), "v").err().expect(mentions);
            assert!(err.to_string().contains(mentions), "{mentions}: {err}");
        }
    }
}
