//! The client commands: submit, jobs, cancel, pause, resume, describe and errors, each a
//! call or two of the HTTP API printed as a table for a person or as JSON
//! (`--json`) for a script. `watch` is in `watch.rs`.

use anyhow::Context;
use serde_json::{Value, json};

use lance_backfill::model::binding::{UDF_BINDING_KEY, UDF_OUTPUT_OF_KEY};
use lance_backfill::run::computed::{BINDING_KEY, MAINTAINED_KEY};

use crate::client::Api;
use crate::{estimate, watch};

/// States a job can be in, as `--state` takes them.
pub const STATES: [&str; 6] = [
    "PENDING",
    "RUNNING",
    "PAUSED",
    "DONE",
    "FAILED",
    "CANCELLED",
];
/// Pages of a table's jobs read at most while looking for `--state` ones.
const MAX_PAGES: usize = 50;

pub struct Submit {
    pub table: String,
    pub column: String,
    pub filter: Option<String>,
    pub wait: bool,
    /// A job whose skipped rows this one computes again.
    pub retry_failed: Option<String>,
    /// Only plan, and print the plan and its estimate.
    pub dry_run: bool,
    pub function_ms_per_1k_rows: Option<f64>,
}

/// `submit`: the job's id; with `--wait`, followed as `watch` does (the
/// exit code is the job's).
pub async fn submit(api: &Api, request: Submit, as_json: bool) -> anyhow::Result<i32> {
    let answer = api
        .post(
            &["v1", "table", &request.table, "backfill_column"],
            &submit_body(&request),
        )
        .await?;
    if request.dry_run {
        print_dry_run(&answer, as_json);
        return Ok(0);
    }
    let job_id = answer["job_id"]
        .as_str()
        .context("the service answered without a job_id")?
        .to_string();
    if request.wait {
        if !as_json {
            eprintln!("job {job_id}: {}.{}", request.table, request.column);
        }
        return watch::watch(api, &job_id, as_json).await;
    }
    match as_json {
        true => println!("{answer}"),
        false => println!("{job_id}"),
    }
    Ok(0)
}

fn submit_body(request: &Submit) -> Value {
    let mut body = json!({ "column": request.column });
    if let Some(filter) = &request.filter {
        body["where"] = json!(filter);
    }
    let mut context = serde_json::Map::new();
    if let Some(job) = &request.retry_failed {
        context.insert("retry_failed_of".into(), json!(job));
    }
    if request.dry_run {
        context.insert("dry_run".into(), json!("true"));
    }
    if let Some(ms) = request.function_ms_per_1k_rows {
        context.insert("function_ms_per_1k_rows".into(), json!(ms.to_string()));
    }
    if !context.is_empty() {
        body["context"] = Value::Object(context);
    }
    body
}

/// A dry run's plan and estimate.
fn print_dry_run(answer: &Value, as_json: bool) {
    if as_json {
        println!("{answer}");
        return;
    }
    println!(
        "would fill {} rows of {} in {} fragments at version {}: {} tasks, {} commits",
        answer["rows"],
        text(&answer["column"]),
        answer["fragments"],
        answer["read_version"],
        answer["tasks"],
        answer["commits"]
    );
    for line in estimate::describe(&answer["estimate"]) {
        println!("{line}");
    }
}

pub struct Listing {
    pub table: Option<String>,
    pub state: Option<String>,
    pub limit: usize,
}

/// `jobs`: the newest jobs of a table (or of every table the caller may
/// read), optionally only those in one state.
pub async fn jobs(api: &Api, listing: Listing, as_json: bool) -> anyhow::Result<i32> {
    let state = listing.state.as_deref().map(str::to_ascii_uppercase);
    if let Some(state) = &state
        && !STATES.contains(&state.as_str())
    {
        anyhow::bail!("--state must be one of {}", STATES.join(", "));
    }
    let wanted = |job: &Value| state.as_deref().is_none_or(|s| job["state"] == s);
    let jobs = listed_jobs(api, listing.table.as_deref(), listing.limit, &wanted).await?;
    if as_json {
        println!("{}", json!({ "jobs": jobs }));
        return Ok(0);
    }
    println!(
        "{:<32}  {:<24} {:<10} {:>23}  {:<19}",
        "JOB", "TABLE.COLUMN", "STATE", "ROWS COMMITTED", "CREATED"
    );
    for job in &jobs {
        let rows = &job["metrics"]["rows_committed"];
        println!(
            "{:<32}  {:<24} {:<10} {:>23}  {:<19}",
            text(&job["job_id"]),
            format!("{}.{}", table_name(&job["table_id"]), text(&job["column"])),
            text(&job["state"]),
            format!("{}/{}", rows["done"], rows["total"]),
            text(&job["created_at"])
                .chars()
                .take(19)
                .collect::<String>(),
        );
    }
    Ok(0)
}

/// One page of a table's jobs (`GET /v1/table/{id}/jobs`) or of every
/// table's (`POST /v1/jobs/list`), and the token of the next.
async fn jobs_page(
    api: &Api,
    table: Option<&str>,
    token: Option<&str>,
) -> anyhow::Result<(Vec<Value>, Option<String>)> {
    let page = match table {
        Some(table) => {
            let mut query = vec![("limit", "100".to_string())];
            query.extend(token.map(|t| ("page_token", t.to_string())));
            api.get(&["v1", "table", table, "jobs"], &query).await?
        }
        None => {
            let mut body = json!({ "limit": 100 });
            if let Some(token) = token {
                body["page_token"] = json!(token);
            }
            api.post(&["v1", "jobs", "list"], &body).await?
        }
    };
    let jobs = page["jobs"].as_array().cloned().unwrap_or_default();
    Ok((jobs, page["page_token"].as_str().map(str::to_string)))
}

/// Up to `limit` of the newest jobs `wanted` keeps, page after page.
async fn listed_jobs(
    api: &Api,
    table: Option<&str>,
    limit: usize,
    wanted: &dyn Fn(&Value) -> bool,
) -> anyhow::Result<Vec<Value>> {
    let mut found = Vec::new();
    let mut token: Option<String> = None;
    for _ in 0..MAX_PAGES {
        let (jobs, next) = jobs_page(api, table, token.as_deref()).await?;
        for listed in jobs {
            // The listing of every table names its jobs; each job's own
            // page gives its column and progress.
            let job = match table {
                Some(_) => listed,
                None => {
                    api.get(&["v1", "job", text(&listed["job_id"])], &[])
                        .await?
                }
            };
            if wanted(&job) {
                found.push(job);
                if found.len() >= limit {
                    return Ok(found);
                }
            }
        }
        token = next;
        if token.is_none() {
            break;
        }
    }
    Ok(found)
}

/// `cancel`, `pause`, `resume`: the job's state after it.
pub async fn control(api: &Api, job_id: &str, action: &str, as_json: bool) -> anyhow::Result<i32> {
    let job = api.post(&["v1", "job", job_id, action], &json!({})).await?;
    match as_json {
        true => println!("{job}"),
        false => println!("{job_id}: {}", text(&job["state"])),
    }
    Ok(0)
}

/// `describe`: the table's version and columns, with each computed
/// column's expression or function.
pub async fn describe(api: &Api, table: &str, as_json: bool) -> anyhow::Result<i32> {
    let described = api
        .post(&["v1", "table", table, "describe"], &json!({}))
        .await?;
    if as_json {
        println!("{described}");
        return Ok(0);
    }
    println!(
        "{table}: version {}, {} fragments",
        described["version"], described["stats"]["num_fragments"]
    );
    for field in described["schema"]["fields"]
        .as_array()
        .into_iter()
        .flatten()
    {
        println!(
            "  {:<24} {:<16} {}",
            text(&field["name"]),
            type_name(&field["type"]),
            computed_by(&field["metadata"]),
        );
    }
    Ok(0)
}

fn type_name(data_type: &Value) -> String {
    match data_type {
        Value::String(name) => name.clone(),
        other => other["type"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| other.to_string()),
    }
}

/// What fills a column, from its field metadata (the keys the service
/// declares columns with): a SQL expression, a user function (by name, or
/// as an output of the column holding its binding), and whether the column
/// is maintained.
fn computed_by(metadata: &Value) -> String {
    let get = |key: &str| metadata[key].as_str();
    let filled = if let Some(sql) = get(BINDING_KEY) {
        format!("= {sql}")
    } else if let Some(binding) = get(UDF_BINDING_KEY) {
        let binding: Value = serde_json::from_str(binding).unwrap_or_default();
        format!("= {}(...)", text(&binding["udf_name"]))
    } else if let Some(primary) = get(UDF_OUTPUT_OF_KEY) {
        format!("= an output of {primary}'s function")
    } else {
        return String::new();
    };
    match get(MAINTAINED_KEY) {
        Some("true") => format!("{filled} (maintained)"),
        _ => filled,
    }
}

/// `errors`: the rows a user function raised on (jobs with
/// `on_error: skip`) and the job's error, if it failed.
pub async fn errors(api: &Api, job_id: &str, as_json: bool) -> anyhow::Result<i32> {
    let job = api.get(&["v1", "job", job_id], &[]).await?;
    let failures = job["row_failures"].as_array().cloned().unwrap_or_default();
    if as_json {
        println!(
            "{}",
            json!({ "job_id": job_id, "state": job["state"], "error": job["error"],
                    "rows_failed": job["metrics"]["rows_failed"], "row_failures": failures })
        );
        return Ok(0);
    }
    if let Some(error) = job["error"].as_str() {
        println!("{job_id} {}: {error}", text(&job["state"]));
    }
    println!(
        "{} rows failed; the first {}:",
        job["metrics"]["rows_failed"],
        failures.len()
    );
    for failure in &failures {
        println!(
            "  fragment {} row {}: {}",
            failure["fragment_id"],
            failure["row"],
            text(&failure["error"])
        );
    }
    Ok(0)
}

/// A table id as the API writes it (its path in the namespace) in a word.
fn table_name(id: &Value) -> String {
    match id {
        Value::Array(parts) => parts.iter().map(text).collect::<Vec<_>>().join("/"),
        other => text(other).to_string(),
    }
}

fn text(value: &Value) -> &str {
    value.as_str().unwrap_or("-")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_column_shows_what_fills_it() {
        let sql = json!({"lance-backfill:expression": "x * 2 + 1"});
        assert_eq!(computed_by(&sql), "= x * 2 + 1");
        let udf = json!({"lance-backfill:udf": "{\"udf_name\": \"embed\"}",
                         "lance-backfill:maintained": "true"});
        assert_eq!(computed_by(&udf), "= embed(...) (maintained)");
        assert_eq!(computed_by(&json!({})), "");
        assert_eq!(computed_by(&Value::Null), "");
        assert_eq!(type_name(&json!("int64")), "int64");
        assert_eq!(type_name(&json!({"type": "list"})), "list");
        assert_eq!(table_name(&json!(["ns", "items"])), "ns/items");
        assert_eq!(table_name(&json!("items")), "items");
    }
}
