//! `POST /v1/table/{id}/describe`: the spec's DescribeTable, which
//! LanceDB's client sends to open a table. It answers the version, the
//! schema and basic stats, never the storage location, options or
//! credentials.

use arrow_schema::{Field, Schema as ArrowSchema};
use http::StatusCode;
use lance::Dataset;
use lance_namespace_reqwest_client::models::DescribeTableRequest;
use serde_json::{Value, json};

use super::caller::TableCall;
use super::{ApiError, ApiRequest, ApiResponse, Service};
use crate::model::binding::Binding;
use crate::model::error::{Error, Missing};
use crate::model::policy::Action;
use crate::model::table::TableId;
use crate::ports::udf::UDF_BINDING_KEY;

/// LanceDB's clients name themselves so in `user-agent`; they read schema
/// types in Lance's own JSON names ("float", "string"), which the spec's
/// names ("float32", "utf8") are not.
pub(super) const LANCEDB_AGENT_PREFIX: &str = "LanceDB-";

/// Which JSON names the schema's types get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SchemaDialect {
    /// The Lance Namespace spec's `JsonArrowSchema`.
    Spec,
    /// Lance's `JsonSchema`, which LanceDB's clients parse.
    Lance,
}

impl Service {
    pub(super) async fn describe_table(
        &self,
        http: &ApiRequest,
        call: TableCall,
    ) -> Result<ApiResponse, ApiError> {
        let table = &call.table;
        // LanceDB's client opens a table with no body at all.
        let request: DescribeTableRequest = http.json_or_default()?;
        if let Some(body_id) = &request.id
            && body_id != &table.0
        {
            return Err(ApiError::invalid_input(format!(
                "field 'id' ({body_id:?}) does not match the table in the path ({:?})",
                table.0
            )));
        }
        let dataset = self.open_described(table, &request).await?;
        check_min_version(http, dataset.manifest().version)?;
        let dialect = match http.header("user-agent") {
            Some(agent) if agent.starts_with(LANCEDB_AGENT_PREFIX) => SchemaDialect::Lance,
            _ => SchemaDialect::Spec,
        };
        // A function's payload is its code: shown only to who may run code.
        let payloads = self.may(&call, Action::Udf);
        Ok(ApiResponse::json(
            StatusCode::OK,
            &description(table, &dataset, dialect, payloads)?,
        ))
    }

    /// The table at the version the request names, or its latest.
    async fn open_described(
        &self,
        table: &TableId,
        request: &DescribeTableRequest,
    ) -> Result<Dataset, ApiError> {
        let uri = self.catalog.locate(table).await?;
        let branch = request.branch.as_deref();
        match request.version {
            Some(v) if v < 1 => Err(version_not_found(v)),
            Some(v) => match self.catalog.at_version(&uri, branch, v as u64).await {
                Ok(dataset) => Ok(dataset.as_ref().clone()),
                Err(_) => Err(version_not_found(v)),
            },
            None => self
                .catalog
                .latest(&uri, branch)
                .await
                .map_err(|err| Error::from_lance(err, "opening the table").into()),
        }
    }
}

fn version_not_found(version: i64) -> ApiError {
    Error::not_found(
        Missing::Version,
        format!("field 'version': version {version} of the table does not exist"),
    )
    .into()
}

/// The version LanceDB's client last saw (`x-lancedb-min-read-version`,
/// `x-lancedb-min-version`): what it reads must be at least that new.
pub(crate) fn min_read_version(http: &ApiRequest) -> Result<Option<u64>, ApiError> {
    let mut floor = None;
    for name in ["x-lancedb-min-read-version", "x-lancedb-min-version"] {
        let Some(text) = http.header(name) else {
            continue;
        };
        let version: u64 = text.trim().parse().map_err(|_| {
            ApiError::invalid_input(format!(
                "header '{name}' must be a table version number, got '{text}'"
            ))
        })?;
        floor = floor.max(Some(version));
    }
    Ok(floor)
}

fn check_min_version(http: &ApiRequest, version: u64) -> Result<(), ApiError> {
    match min_read_version(http)? {
        Some(floor) if version < floor => Err(ApiError::invalid_input(format!(
            "the table's version {version} is older than the version {floor} the client has seen \
             (x-lancedb-min-read-version)"
        ))),
        _ => Ok(()),
    }
}

fn description(
    table: &TableId,
    dataset: &Dataset,
    dialect: SchemaDialect,
    payloads: bool,
) -> Result<Value, ApiError> {
    let schema = ArrowSchema::from(dataset.schema());
    // The table's own metadata stays out: only what the client reads.
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .map(|field| match payloads {
            true => field.as_ref().clone(),
            false => without_payload(field),
        })
        .collect();
    let schema = ArrowSchema::new(fields);
    let schema = match dialect {
        SchemaDialect::Spec => serde_json::to_value(
            lance_namespace::schema::arrow_schema_to_json(&schema).map_err(schema_error)?,
        ),
        SchemaDialect::Lance => serde_json::to_value(
            lance::arrow::json::JsonSchema::try_from(&schema).map_err(schema_error)?,
        ),
    }
    .map_err(schema_error)?;
    let fragments = dataset.get_fragments();
    let deleted: usize = dataset
        .manifest()
        .fragments
        .iter()
        .filter_map(|f| f.deletion_file.as_ref().and_then(|d| d.num_deleted_rows))
        .sum();
    Ok(json!({
        "table": table.0.last(),
        "namespace": table.0[..table.0.len().saturating_sub(1)],
        "version": dataset.manifest().version,
        "schema": schema,
        "stats": {
            "num_deleted_rows": deleted,
            "num_fragments": fragments.len(),
        },
    }))
}

/// A field whose binding (if it has one) shows no payload and no manifest.
fn without_payload(field: &Field) -> Field {
    let mut metadata = field.metadata().clone();
    if let Some(json) = metadata.get_mut(UDF_BINDING_KEY)
        && let Ok(binding) = Binding::from_json(json)
    {
        *json = binding.redacted().to_json();
    }
    field.clone().with_metadata(metadata)
}

fn schema_error(err: impl std::fmt::Display) -> ApiError {
    ApiError::from(Error::Internal(format!(
        "the table's schema has a type JSON cannot name: {err}"
    )))
}
