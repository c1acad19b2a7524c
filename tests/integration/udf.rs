//! User functions as columns, end to end: declared through the official
//! client (`virtual_column`), filled by jobs whose batches run in real
//! Python processes (the local pool), an AWS Lambda function (its Invoke
//! API emulated by running the same handler) or an HTTP endpoint (the
//! handler's own server). The functions are in tests/udfs.py.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use lance_backfill::job::{Counter, JobState};
use lance_backfill::runner::RunnerConfig;
use lance_backfill::udf::http::HttpRuntime;
use lance_backfill::udf::lambda::LambdaRuntime;
use lance_backfill::udf::registry::UdfRuntimes;
use lance_backfill_tests::{
    API_KEY, Stack, StackOptions, fast_engine, read_i64, write_sample_table,
};
use lance_namespace_reqwest_client::apis::table_api;
use lance_namespace_reqwest_client::models::{
    AddColumnsEntry, AddVirtualColumnEntry, AddVirtualColumnOutputEntry,
    AlterTableAddColumnsRequest, AlterTableBackfillColumnsRequest,
};
use serde_json::{Value, json};

const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

fn python() -> String {
    std::env::var("LANCE_BACKFILL_UDF_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Base64 cloudpickles of tests/udfs.py's functions.
pub(crate) fn payloads(state: &std::path::Path) -> HashMap<String, String> {
    let output = Command::new(python())
        .arg(format!("{REPO}/tests/udfs.py"))
        .arg("payloads")
        .arg(state)
        .output()
        .expect("run tests/udfs.py");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("payloads json")
}

pub(crate) fn int64() -> Value {
    json!({"type": "int64"})
}

pub(crate) fn output(column: &str, data_type: Value) -> AddVirtualColumnOutputEntry {
    AddVirtualColumnOutputEntry::new(column.into(), column.into(), data_type, true)
}

pub(crate) fn virtual_column(
    name: &str,
    inputs: &[&str],
    outputs: Vec<AddVirtualColumnOutputEntry>,
    udf: &str,
) -> AddColumnsEntry {
    let mut entry = AddColumnsEntry::new(name.into());
    entry.virtual_column = Some(Some(Box::new(AddVirtualColumnEntry::new(
        inputs.iter().map(|c| c.to_string()).collect(),
        outputs,
        "local".into(),
        udf.into(),
        name.into(),
        "1".into(),
    ))));
    entry
}

async fn declare(stack: &Stack, table: &str, entry: AddColumnsEntry) {
    table_api::alter_table_add_columns(
        &stack.client(),
        table,
        AlterTableAddColumnsRequest::new(vec![entry]),
        None,
    )
    .await
    .expect("add_columns through the official client");
}

async fn backfill(stack: &Stack, table: &str, request: AlterTableBackfillColumnsRequest) -> String {
    table_api::alter_table_backfill_columns(&stack.client(), table, request, None)
        .await
        .expect("backfill_column through the official client")
        .job_id
}

/// A stack with a sample table of `rows` rows in 4 fragments and a worker.
async fn stack_with_table(rows: u64) -> Stack {
    let mut stack = Stack::embedded(StackOptions::default()).await;
    write_sample_table(&stack.table_uri("items"), rows, 4)
        .await
        .unwrap();
    stack.start_worker(
        fast_engine(),
        RunnerConfig::default(),
        Duration::from_secs(60),
    );
    stack
}

async fn column(stack: &Stack, name: &str) -> Vec<Option<i64>> {
    read_i64(&stack.table_uri("items"), name, &HashMap::new())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_udf_column_is_declared_and_filled_through_the_official_client() {
    let state = tempfile::tempdir().unwrap();
    let udfs = payloads(state.path());
    let stack = stack_with_table(20_000).await;
    let entry = virtual_column(
        "y",
        &["x"],
        vec![output("y", int64())],
        &udfs["double_plus_one"],
    );
    declare(&stack, "items", entry).await;
    let job = backfill(
        &stack,
        "items",
        AlterTableBackfillColumnsRequest::new("y".into()),
    )
    .await;
    let done = stack.wait_done(&job, Duration::from_secs(120)).await;
    let x = column(&stack, "x").await;
    let y = column(&stack, "y").await;
    assert_eq!(
        y,
        x.iter().map(|v| v.map(|x| x * 2 + 1)).collect::<Vec<_>>()
    );
    assert_eq!(done.metrics.get(Counter::RowsCommitted), 20_000);
    let (_, job) = stack.get(&format!("/v1/job/{job}")).await;
    assert_eq!(job["udf"]["name"], "y");
    assert_eq!(job["columns"], json!(["y"]));
    // A re-run finds nothing missing and makes no version.
    let before = lance_backfill_tests::latest_version(&stack.table_uri("items")).await;
    let again = backfill(
        &stack,
        "items",
        AlterTableBackfillColumnsRequest::new("y".into()),
    )
    .await;
    stack.wait_done(&again, Duration::from_secs(60)).await;
    assert_eq!(
        lance_backfill_tests::latest_version(&stack.table_uri("items")).await,
        before
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_outputs_from_one_struct_and_a_class_set_up_once() {
    let state = tempfile::tempdir().unwrap();
    let udfs = payloads(state.path());
    let stack = stack_with_table(8_000).await;
    let outputs = vec![
        output("a", int64()),
        output("b", json!({"type": "float32"})),
    ];
    declare(
        &stack,
        "items",
        virtual_column("a", &["x", "s"], outputs, &udfs["two_outputs"]),
    )
    .await;
    declare(
        &stack,
        "items",
        virtual_column("z", &["x"], vec![output("z", int64())], &udfs["scaled"]),
    )
    .await;
    // Backfilling either output fills both.
    let pair = backfill(
        &stack,
        "items",
        AlterTableBackfillColumnsRequest::new("b".into()),
    )
    .await;
    let scaled = backfill(
        &stack,
        "items",
        AlterTableBackfillColumnsRequest::new("z".into()),
    )
    .await;
    stack.wait_done(&pair, Duration::from_secs(120)).await;
    stack.wait_done(&scaled, Duration::from_secs(120)).await;
    let x = column(&stack, "x").await;
    assert_eq!(
        column(&stack, "a").await,
        x.iter().map(|v| v.map(|x| x + 1)).collect::<Vec<_>>()
    );
    assert_eq!(
        column(&stack, "z").await,
        x.iter().map(|v| v.map(|x| x * 3)).collect::<Vec<_>>()
    );
    let dataset = lance::Dataset::open(&stack.table_uri("items"))
        .await
        .unwrap();
    let mut scanner = dataset.scan();
    scanner.project(&["s", "b"]).unwrap();
    let batch = scanner.try_into_batch().await.unwrap();
    let s = batch
        .column(0)
        .as_any()
        .downcast_ref::<arrow_array::StringArray>()
        .unwrap();
    let b = batch
        .column(1)
        .as_any()
        .downcast_ref::<arrow_array::Float32Array>()
        .unwrap();
    for row in 0..batch.num_rows() {
        assert_eq!(
            b.value(row),
            s.value(row).chars().count() as f32,
            "row {row}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn docker_spec_payloads_and_bad_declarations() {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let state = tempfile::tempdir().unwrap();
    let udfs = payloads(state.path());
    let stack = stack_with_table(4_000).await;
    let pickle = b64.decode(&udfs["double_plus_one"]).unwrap();
    let checksum = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&pickle));
    let spec = |checksum: &str| {
        let doc = json!({"image": "lance-udf", "tag": "1", "udf_pickle": udfs["double_plus_one"],
            "udf_checksum": checksum, "workspace_checksum": null});
        b64.encode(doc.to_string())
    };
    let mut entry = virtual_column("y", &["x"], vec![output("y", int64())], &spec(&checksum));
    if let Some(Some(column)) = entry.virtual_column.as_mut() {
        column.udf_backend = Some(Some("DockerUDFSpecV1".into()));
    }
    let body = |entry: &AddColumnsEntry| json!({"new_columns": [entry]});
    let (status, response) = stack
        .post("/v1/table/items/add_columns", body(&entry))
        .await;
    assert_eq!(status, 200, "{response}");
    let job = backfill(
        &stack,
        "items",
        AlterTableBackfillColumnsRequest::new("y".into()),
    )
    .await;
    stack.wait_done(&job, Duration::from_secs(120)).await;
    let x = column(&stack, "x").await;
    assert_eq!(
        column(&stack, "y").await,
        x.iter().map(|v| v.map(|x| x * 2 + 1)).collect::<Vec<_>>()
    );

    let refused =
        |mut entry: AddColumnsEntry, change: &dyn Fn(&mut AddVirtualColumnEntry), name: &str| {
            entry.name = name.into();
            if let Some(Some(column)) = entry.virtual_column.as_mut() {
                change(column);
                column.outputs[0].column = name.into();
                column.outputs[0].struct_field = name.into();
            }
            entry
        };
    let base = virtual_column(
        "w",
        &["x"],
        vec![output("w", int64())],
        &udfs["double_plus_one"],
    );
    let cases: Vec<(AddColumnsEntry, &str)> = vec![
        (
            refused(entry.clone(), &|c| c.udf = spec("00"), "c1"),
            "udf_checksum",
        ),
        (
            refused(
                base.clone(),
                &|c| c.udf_backend = Some(Some("onnx".into())),
                "c2",
            ),
            "DockerUDFSpecV1",
        ),
        (
            refused(
                base.clone(),
                &|c| c.input_columns = vec!["nope".into()],
                "c3",
            ),
            "input_columns[0]",
        ),
        (
            refused(
                base.clone(),
                &|c| c.outputs[0].data_type = json!({"type": "decimal9"}),
                "c4",
            ),
            "data_type",
        ),
        (
            refused(base.clone(), &|c| c.udf = "not base64!".into(), "c5"),
            "udf",
        ),
        (refused(base.clone(), &|_| {}, "y"), "already exists"),
    ];
    for (entry, mentions) in cases {
        let (status, response) = stack
            .post("/v1/table/items/add_columns", body(&entry))
            .await;
        assert_eq!(
            (status, response["code"].clone()),
            (400, json!(13)),
            "{mentions}: {response}"
        );
        let message = response["error"].as_str().unwrap_or_default();
        assert!(
            message.contains(mentions),
            "'{message}' should mention '{mentions}'"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rows_a_function_raises_on_fail_the_job_or_are_skipped() {
    let state = tempfile::tempdir().unwrap();
    let udfs = payloads(state.path());
    let stack = stack_with_table(12_000).await;
    let entry = virtual_column(
        "r",
        &["x"],
        vec![output("r", int64())],
        &udfs["raises_on_sevens"],
    );
    declare(&stack, "items", entry).await;
    // By default the first failing batch fails the job with the exception.
    let failing = backfill(
        &stack,
        "items",
        AlterTableBackfillColumnsRequest::new("r".into()),
    )
    .await;
    let job = stack.wait(&failing, Duration::from_secs(120)).await;
    assert_eq!(job.state, JobState::Failed);
    let error = job.error.unwrap_or_default();
    assert!(
        error.contains("ValueError") && error.contains("cannot handle x ="),
        "{error}"
    );
    // Skipping: only the failing rows stay null, counted and listed.
    let mut request = AlterTableBackfillColumnsRequest::new("r".into());
    request.context = Some(HashMap::from([("on_error".into(), "skip".into())]));
    let skipping = backfill(&stack, "items", request).await;
    let job = stack.wait_done(&skipping, Duration::from_secs(120)).await;
    let x = column(&stack, "x").await;
    let expected: Vec<Option<i64>> = x
        .iter()
        .map(|v| v.and_then(|x| (x % 1000 != 7).then_some(x + 10)))
        .collect();
    assert_eq!(column(&stack, "r").await, expected);
    assert_eq!(job.metrics.get(Counter::RowsFailed), 12);
    let (_, page) = stack.get(&format!("/v1/job/{skipping}")).await;
    assert_eq!(page["metrics"]["rows_failed"], 12);
    let listed = page["row_failures"].as_array().unwrap();
    assert_eq!(listed.len(), 12);
    assert!(listed[0]["error"].as_str().unwrap().contains("ValueError"));
    // Past max_skip_fraction the job fails.
    let mut request = AlterTableBackfillColumnsRequest::new("r".into());
    request.context = Some(HashMap::from([
        ("on_error".into(), "skip".into()),
        ("max_skip_fraction".into(), "0.0001".into()),
    ]));
    request.r#where = Some(Some("x % 1000 = 7 OR x < 100".into()));
    let strict = backfill(&stack, "items", request).await;
    let job = stack.wait(&strict, Duration::from_secs(120)).await;
    assert_eq!(job.state, JobState::Failed);
    assert!(job.error.unwrap_or_default().contains("max_skip_fraction"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_python_process_that_dies_is_replaced_or_named() {
    let state = tempfile::tempdir().unwrap();
    let udfs = payloads(state.path());
    let stack = stack_with_table(8_000).await;
    declare(
        &stack,
        "items",
        virtual_column("d", &["x"], vec![output("d", int64())], &udfs["dies_once"]),
    )
    .await;
    declare(
        &stack,
        "items",
        virtual_column(
            "e",
            &["x"],
            vec![output("e", int64())],
            &udfs["always_dies"],
        ),
    )
    .await;
    // Killed once mid-batch: the batch is retried on a new process.
    let once = backfill(
        &stack,
        "items",
        AlterTableBackfillColumnsRequest::new("d".into()),
    )
    .await;
    stack.wait_done(&once, Duration::from_secs(120)).await;
    assert!(
        state.path().join("died-once").exists(),
        "the process did die"
    );
    let x = column(&stack, "x").await;
    assert_eq!(
        column(&stack, "d").await,
        x.iter().map(|v| v.map(|x| x + 5)).collect::<Vec<_>>()
    );
    // Killed every time: the job fails with the tail of the process's stderr.
    let always = backfill(
        &stack,
        "items",
        AlterTableBackfillColumnsRequest::new("e".into()),
    )
    .await;
    let job = stack.wait(&always, Duration::from_secs(120)).await;
    assert_eq!(job.state, JobState::Failed);
    let error = job.error.unwrap_or_default();
    assert!(error.contains("dying on x = 4242 again"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wrong_length_or_type_fails_the_job_clearly() {
    let state = tempfile::tempdir().unwrap();
    let udfs = payloads(state.path());
    let stack = stack_with_table(4_000).await;
    declare(
        &stack,
        "items",
        virtual_column(
            "l",
            &["x"],
            vec![output("l", int64())],
            &udfs["wrong_length"],
        ),
    )
    .await;
    declare(
        &stack,
        "items",
        virtual_column("t", &["x"], vec![output("t", int64())], &udfs["wrong_type"]),
    )
    .await;
    let length = backfill(
        &stack,
        "items",
        AlterTableBackfillColumnsRequest::new("l".into()),
    )
    .await;
    let kind = backfill(
        &stack,
        "items",
        AlterTableBackfillColumnsRequest::new("t".into()),
    )
    .await;
    let job = stack.wait(&length, Duration::from_secs(120)).await;
    assert_eq!(job.state, JobState::Failed);
    let error = job.error.unwrap_or_default();
    assert!(error.contains("rows for a batch of"), "{error}");
    let job = stack.wait(&kind, Duration::from_secs(120)).await;
    assert_eq!(job.state, JobState::Failed);
    let error = job.error.unwrap_or_default();
    assert!(
        error.contains("Utf8") && error.contains("Int64") && error.contains("'t'"),
        "{error}"
    );
}

/// A Python server the test starts (`listening on http://host:port`).
struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn start(args: &[&str]) -> Self {
        let mut child = Command::new(python())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start a Python server");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let url = loop {
            let line = lines.next().expect("the server's first lines").unwrap();
            if let Some(url) = line.trim().strip_prefix("listening on ") {
                break url.to_string();
            }
        };
        Self { child, url }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn fill_with(runtimes: UdfRuntimes, udf: &str) -> Stack {
    let mut stack = Stack::embedded(StackOptions::default()).await;
    write_sample_table(&stack.table_uri("items"), 12_000, 4)
        .await
        .unwrap();
    stack.components.udf = Some(Arc::new(runtimes));
    stack.start_worker(
        fast_engine(),
        RunnerConfig::default(),
        Duration::from_secs(60),
    );
    declare(
        &stack,
        "items",
        virtual_column("y", &["x"], vec![output("y", int64())], udf),
    )
    .await;
    let mut request = AlterTableBackfillColumnsRequest::new("y".into());
    request.checkpoint_size = Some(Some(1000));
    let job = backfill(&stack, "items", request).await;
    stack.wait_done(&job, Duration::from_secs(180)).await;
    let x = column(&stack, "x").await;
    assert_eq!(
        column(&stack, "y").await,
        x.iter().map(|v| v.map(|x| x * 2 + 1)).collect::<Vec<_>>()
    );
    stack
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_lambda_runtime_through_the_invoke_api_with_throttling() {
    let state = tempfile::tempdir().unwrap();
    let udfs = payloads(state.path());
    let emulator = Server::start(&[
        &format!("{REPO}/udf-runtime/lambda_invoke_emulator.py"),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--throttle-rate",
        "0.3",
        "--seed",
        "7",
    ]);
    let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(&emulator.url)
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_dynamodb::config::Credentials::new(
            "testing", "testing", None, None, "test",
        ))
        .load()
        .await;
    let runtime = LambdaRuntime::new(aws_sdk_lambda::Client::new(&sdk), "lance-backfill-udf");
    fill_with(
        UdfRuntimes::only(Arc::new(runtime)),
        &udfs["double_plus_one"],
    )
    .await;
    let stats: Value = reqwest::get(format!("{}/_stats", emulator.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    println!("FIGURES lambda runtime: {stats}");
    assert!(stats["throttled"].as_u64().unwrap_or(0) > 0, "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_http_runtime_against_the_handlers_server() {
    let state = tempfile::tempdir().unwrap();
    let udfs = payloads(state.path());
    let server = Server::start(&[
        &format!("{REPO}/udf-runtime/lance_backfill_udf_runtime.py"),
        "http",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
    ]);
    let runtime = HttpRuntime::new(&server.url, Duration::from_secs(60)).unwrap();
    fill_with(
        UdfRuntimes::only(Arc::new(runtime)),
        &udfs["double_plus_one"],
    )
    .await;
}

/// python/examples/embeddings.py, end to end against the service.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_embedding_example_runs_against_the_service() {
    let mut stack = Stack::embedded(StackOptions::default()).await;
    stack.start_worker(
        fast_engine(),
        RunnerConfig::default(),
        Duration::from_secs(60),
    );
    let output = tokio::process::Command::new(python())
        .arg(format!("{REPO}/python/examples/embeddings.py"))
        .args(["--url", &stack.base_url(), "--api-key", API_KEY])
        .args(["--root", &stack.root, "--table", "docs", "--rows", "20000"])
        .env("PYTHONPATH", format!("{REPO}/python"))
        .output()
        .await
        .expect("run the example");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    println!("FIGURES embedding example: {}", stdout.trim());
}
