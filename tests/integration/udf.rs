//! User functions as columns, end to end: declared through the official
//! client (`virtual_column`), filled by jobs whose batches run in real
//! Python processes (the local pool), an AWS Lambda function (its Invoke
//! API emulated by running the same handler) or an HTTP endpoint (the
//! handler's own server). The functions are in tests/udfs.py.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use lance_backfill::adapters::aws::lambda::LambdaRuntime;
use lance_backfill::adapters::endpoint::HttpRuntime;
use lance_backfill::app::runner::RunnerConfig;
use lance_backfill::model::job::{Counter, JobState};
use lance_backfill::ports::udf::runtimes::UdfRuntimes;
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

pub(crate) fn python() -> String {
    std::env::var("LANCE_BACKFILL_UDF_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Base64 cloudpickles of tests/udfs.py's functions.
pub(crate) fn payloads(state: &std::path::Path) -> HashMap<String, String> {
    // Functions leave their marks here, whichever user they run as.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(state, std::fs::Permissions::from_mode(0o777)).unwrap();
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

/// What tests/udfs.py's `function` returns for these `x`, computed by
/// Python (the function itself, not a re-statement of it); `skip`: row by
/// row, null where it raises. `state` is where functions that die once
/// found their mark.
fn expect(
    state: &std::path::Path,
    function: &str,
    x: &[Option<i64>],
    skip: bool,
) -> Vec<Option<i64>> {
    let mut command = Command::new(python());
    command
        .arg(format!("{REPO}/tests/udfs.py"))
        .args(["expect", function, "-"])
        .env("UDF_TEST_STATE", state)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if skip {
        command.arg("--skip");
    }
    let mut child = command.spawn().expect("run tests/udfs.py expect");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&serde_json::to_vec(x).unwrap())
        .expect("x to tests/udfs.py");
    let output = child.wait_with_output().expect("tests/udfs.py expect");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("expected values json")
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

pub(crate) async fn declare(stack: &Stack, table: &str, entry: AddColumnsEntry) {
    table_api::alter_table_add_columns(
        &stack.client(),
        table,
        AlterTableAddColumnsRequest::new(vec![entry]),
        None,
    )
    .await
    .expect("add_columns through the official client");
}

pub(crate) async fn backfill(
    stack: &Stack,
    table: &str,
    request: AlterTableBackfillColumnsRequest,
) -> String {
    table_api::alter_table_backfill_columns(&stack.client(), table, request, None)
        .await
        .expect("backfill_column through the official client")
        .job_id
}

/// A stack whose table `items` (`rows` rows in 4 fragments, a worker)
/// has the column `r` filled by tests/udfs.py's `function` of `x`; the
/// directory the functions leave their marks in comes with it.
pub(crate) async fn function_column(rows: u64, function: &str) -> (tempfile::TempDir, Stack) {
    let state = tempfile::tempdir().unwrap();
    let udfs = payloads(state.path());
    let stack = stack_with_table(rows).await;
    let entry = virtual_column("r", &["x"], vec![output("r", int64())], &udfs[function]);
    declare(&stack, "items", entry).await;
    (state, stack)
}

/// Checkpoints written by a task are those the job's clean-up and its
/// live-table moves look for: the key of a job's fragment, read at the
/// job's version or at a later one with every row chosen again, is the key
/// of the program the engine compiles for it, for a function column with a
/// `where` (its type from the declaration) and for a SQL column.
#[tokio::test(flavor = "multi_thread")]
async fn a_fragments_checkpoint_key_is_its_programs() {
    use lance_backfill::model::plan::ReadAt;
    use lance_backfill::run::checkpoint::Key;
    use lance_backfill::run::computed::{Program, TargetColumn};
    let (_state, stack) = function_column(4_000, "double_plus_one").await;
    stack.declare("items", &[("y", "x * 3")]).await;
    let mut request = AlterTableBackfillColumnsRequest::new("r".into());
    request.r#where = Some(Some("x < 3000".into()));
    let function_job = backfill(&stack, "items", request).await;
    let sql_job = backfill(
        &stack,
        "items",
        AlterTableBackfillColumnsRequest::new("y".into()),
    )
    .await;
    for job_id in [function_job, sql_job] {
        let job = stack.wait_done(&job_id, Duration::from_secs(120)).await;
        let dataset = lance::dataset::builder::DatasetBuilder::from_uri(stack.table_uri("items"))
            .with_version(job.spec.read_version)
            .load()
            .await
            .unwrap();
        let target = TargetColumn::of_job(&job.spec, dataset.schema()).unwrap();
        for at in [
            ReadAt::default(),
            ReadAt {
                version: Some(job.spec.read_version),
                refill: true,
            },
        ] {
            let program = Program::for_job(dataset.schema(), &target, &job.spec, &at).unwrap();
            let (key, fields) = Key::for_fragment(&job.spec, &dataset, &at).unwrap();
            assert_eq!(
                program.checkpoint_key(),
                key,
                "{} at {at:?}",
                job.spec.column
            );
            assert_eq!(program.output_fields.len(), fields.len());
        }
    }
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

/// The number right after `prefix` in `text` (a job's error).
fn number_after(text: &str, prefix: &str) -> u64 {
    let at = text
        .find(prefix)
        .unwrap_or_else(|| panic!("'{prefix}' in '{text}'"))
        + prefix.len();
    let digits: String = text[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("a number after '{prefix}' in '{text}'"))
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
    assert_eq!(
        column(&stack, "y").await,
        expect(state.path(), "double_plus_one", &x, false)
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
        expect(state.path(), "scaled", &x, false)
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
        expect(state.path(), "double_plus_one", &x, false)
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
async fn a_large_payload_is_kept_beside_the_table_and_filled() {
    use base64::Engine as _;
    let state = tempfile::tempdir().unwrap();
    let udfs = payloads(state.path());
    let pickle = base64::engine::general_purpose::STANDARD
        .decode(&udfs["large_payload"])
        .unwrap();
    assert!(
        pickle.len() > lance_backfill::model::binding::MAX_INLINE_PAYLOAD_BYTES,
        "tests/udfs.py's large_payload pickles to only {} bytes",
        pickle.len()
    );
    let stack = stack_with_table(8_000).await;
    declare(
        &stack,
        "items",
        virtual_column(
            "p",
            &["x"],
            vec![output("p", int64())],
            &udfs["large_payload"],
        ),
    )
    .await;
    // Too large for the binding: kept beside the table, named by its SHA-256.
    let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&pickle));
    let kept = std::path::Path::new(&stack.table_uri("items"))
        .join("_backfill")
        .join("udfs")
        .join(format!("{digest}.pkl"));
    assert_eq!(
        std::fs::read(&kept).expect("the pickle beside the table"),
        pickle
    );
    let job = backfill(
        &stack,
        "items",
        AlterTableBackfillColumnsRequest::new("p".into()),
    )
    .await;
    let done = stack.wait_done(&job, Duration::from_secs(120)).await;
    assert_eq!(done.metrics.get(Counter::RowsCommitted), 8_000);
    let x = column(&stack, "x").await;
    assert_eq!(
        column(&stack, "p").await,
        expect(state.path(), "large_payload", &x, false)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn auto_backfill_submits_the_job_and_answers_its_id() {
    let state = tempfile::tempdir().unwrap();
    let udfs = payloads(state.path());
    let stack = stack_with_table(8_000).await;
    let mut entry = virtual_column(
        "y",
        &["x"],
        vec![output("y", int64())],
        &udfs["double_plus_one"],
    );
    if let Some(Some(column)) = entry.virtual_column.as_mut() {
        column.auto_backfill = Some(Some(true));
    }
    let response = table_api::alter_table_add_columns(
        &stack.client(),
        "items",
        AlterTableAddColumnsRequest::new(vec![entry]),
        None,
    )
    .await
    .expect("add_columns through the official client");
    let context = response.context.unwrap_or_default();
    let job = context
        .get("job_id")
        .unwrap_or_else(|| panic!("no job_id in the answer's context: {context:?}"));
    let done = stack.wait_done(job, Duration::from_secs(120)).await;
    assert_eq!(done.metrics.get(Counter::RowsCommitted), 8_000);
    let (_, page) = stack.get(&format!("/v1/job/{job}")).await;
    assert_eq!(page["columns"], json!(["y"]));
    let x = column(&stack, "x").await;
    assert_eq!(
        column(&stack, "y").await,
        expect(state.path(), "double_plus_one", &x, false)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rows_a_function_raises_on_fail_the_job_or_are_skipped() {
    let (state, stack) = function_column(12_000, "raises_on_sevens").await;
    // By default the first failing batch fails the job with the exception,
    // the fragment and the rows. Tasks of 1,000 rows: the fragments (3,000
    // rows each) are not packed, and a task names its fragment's row range.
    let mut request = AlterTableBackfillColumnsRequest::new("r".into());
    request.task_size = Some(Some(1_000));
    let failing = backfill(&stack, "items", request).await;
    let job = stack.wait(&failing, Duration::from_secs(120)).await;
    assert_eq!(job.state, JobState::Failed);
    let error = job.error.unwrap_or_default();
    assert!(
        error.contains("ValueError") && error.contains("cannot handle x ="),
        "{error}"
    );
    let fragment = number_after(&error, "fragment ");
    let start = number_after(&error, "rows ");
    let end = number_after(&error, &format!("rows {start}.."));
    // x is the row's position in the table, 3,000 rows a fragment.
    let rows = fragment * 3_000 + start..fragment * 3_000 + end;
    assert!(
        rows.contains(&number_after(&error, "cannot handle x = ")),
        "the failing x should be in the rows named: {error}"
    );
    // Skipping: only the failing rows stay null, counted and listed.
    let mut request = AlterTableBackfillColumnsRequest::new("r".into());
    request.context = Some(HashMap::from([("on_error".into(), "skip".into())]));
    let skipping = backfill(&stack, "items", request).await;
    let job = stack.wait_done(&skipping, Duration::from_secs(120)).await;
    let x = column(&stack, "x").await;
    assert_eq!(
        column(&stack, "r").await,
        expect(state.path(), "raises_on_sevens", &x, true)
    );
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
        expect(state.path(), "dies_once", &x, false)
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
        Self::start_with(args, &[])
    }

    /// [`Server::start`] with these environment variables.
    fn start_with(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(python())
            .args(args)
            .envs(env.iter().copied())
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

async fn fill_with(runtimes: UdfRuntimes, state: &std::path::Path, udf: &str) -> Stack {
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
        expect(state, "double_plus_one", &x, false)
    );
    stack
}

/// The Invoke API emulator, started with `options` (throttling...), and a
/// Lambda runtime that calls it.
async fn lambda_emulator(options: &[&str]) -> (Server, LambdaRuntime) {
    let script = format!("{REPO}/udf-runtime/lambda_invoke_emulator.py");
    let mut args = vec![script.as_str(), "--host", "127.0.0.1", "--port", "0"];
    args.extend_from_slice(options);
    let emulator = Server::start(&args);
    let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(&emulator.url)
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_dynamodb::config::Credentials::new(
            "testing", "testing", None, None, "test",
        ))
        .load()
        .await;
    let runtime = LambdaRuntime::new(aws_sdk_lambda::Client::new(&sdk), "lance-backfill-udf");
    (emulator, runtime)
}

/// The emulator's invocation counts (`GET /_stats`).
async fn emulator_stats(emulator: &Server) -> Value {
    reqwest::get(format!("{}/_stats", emulator.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_lambda_runtime_through_the_invoke_api_with_throttling() {
    let state = tempfile::tempdir().unwrap();
    let udfs = payloads(state.path());
    let (emulator, runtime) = lambda_emulator(&["--throttle-rate", "0.3", "--seed", "7"]).await;
    fill_with(
        UdfRuntimes::only(Arc::new(runtime)),
        state.path(),
        &udfs["double_plus_one"],
    )
    .await;
    let stats = emulator_stats(&emulator).await;
    println!("FIGURES lambda runtime: {stats}");
    assert!(stats["throttled"].as_u64().unwrap_or(0) > 0, "{stats}");
}

/// Rows of each fragment of [`write_padded_table`]'s tables, and bytes of
/// `pad` per row: a fragment's `x` and `pad` are 8.2 MB as Arrow IPC, 11 MB
/// as the base64 of a Lambda event; half of them fit under 6 MB.
const PADDED_ROWS: u64 = 2_000;
const PAD_BYTES: usize = 4_096;

/// A table of `fragments` fragments of [`PADDED_ROWS`] rows: `id`, `x` (the
/// row's position) and `pad` ([`PAD_BYTES`] characters).
async fn write_padded_table(uri: &str, fragments: u64) {
    use arrow_schema::{DataType, Field, Schema};
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("x", DataType::Int64, true),
        Field::new("pad", DataType::Utf8, true),
    ]));
    let batches: Vec<arrow_array::RecordBatch> = (0..fragments)
        .map(|fragment| {
            let ids: Vec<i64> = (fragment * PADDED_ROWS..(fragment + 1) * PADDED_ROWS)
                .map(|i| i as i64)
                .collect();
            let pad: Vec<String> = ids
                .iter()
                .map(|i| format!("{i:0>width$}", width = PAD_BYTES))
                .collect();
            arrow_array::RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(arrow_array::Int64Array::from(ids.clone())),
                    Arc::new(arrow_array::Int64Array::from(ids)),
                    Arc::new(arrow_array::StringArray::from(pad)),
                ],
            )
            .unwrap()
        })
        .collect();
    let params = lance::dataset::WriteParams {
        max_rows_per_file: PADDED_ROWS as usize,
        ..Default::default()
    };
    lance::Dataset::write(
        arrow_array::RecordBatchIterator::new(batches.into_iter().map(Ok), schema),
        uri,
        Some(params),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batches_over_lambdas_6_mb_are_split_and_filled_exactly() {
    let state = tempfile::tempdir().unwrap();
    let udfs = payloads(state.path());
    let (emulator, runtime) = lambda_emulator(&[]).await;
    let mut stack = Stack::embedded(StackOptions::default()).await;
    let fragments = 2;
    write_padded_table(&stack.table_uri("items"), fragments).await;
    stack.components.udf = Some(Arc::new(UdfRuntimes::only(Arc::new(runtime))));
    stack.start_worker(
        fast_engine(),
        RunnerConfig::default(),
        Duration::from_secs(60),
    );
    // y = x * 2 + 1 and n = the rows of the call that computed it; `pad` is
    // an input only to make the requests large.
    let outputs = vec![output("y", int64()), output("n", int64())];
    declare(
        &stack,
        "items",
        virtual_column("y", &["x", "pad"], outputs, &udfs["with_call_rows"]),
    )
    .await;
    // One batch a fragment: 11 MB of request, over Lambda's 6 MB.
    let mut request = AlterTableBackfillColumnsRequest::new("y".into());
    request.checkpoint_size = Some(Some(PADDED_ROWS as i32));
    let job = backfill(&stack, "items", request).await;
    let done = stack.wait_done(&job, Duration::from_secs(180)).await;
    assert_eq!(
        done.metrics.get(Counter::RowsCommitted),
        fragments * PADDED_ROWS
    );
    let x = column(&stack, "x").await;
    assert_eq!(x.len() as u64, fragments * PADDED_ROWS);
    assert_eq!(
        column(&stack, "y").await,
        expect(state.path(), "double_plus_one", &x, false)
    );
    // Each batch was split in halves, and each half went in one call.
    let halves = (PADDED_ROWS / 2) as i64;
    assert_eq!(column(&stack, "n").await, vec![Some(halves); x.len()]);
    let stats = emulator_stats(&emulator).await;
    println!("FIGURES lambda runtime, batches over 6 MB: {stats}");
    // The runtime split before sending: Lambda never refused a request.
    assert_eq!(stats["request_too_large"], 0, "{stats}");
    assert_eq!(stats["function_errors"], 0, "{stats}");
    assert!(
        stats["succeeded"].as_u64().unwrap_or(0) >= 2 * fragments,
        "two calls a batch: {stats}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_http_runtime_against_the_handlers_server() {
    let state = tempfile::tempdir().unwrap();
    let udfs = payloads(state.path());
    let secret = "http-runtime-secret";
    let server = Server::start_with(
        &[
            &format!("{REPO}/udf-runtime/lance_backfill_udf_runtime.py"),
            "http",
            "--port",
            "0",
        ],
        &[("LANCE_BACKFILL_UDF_HTTP_SECRET", secret)],
    );
    assert!(
        server.url.starts_with("http://127.0.0.1:"),
        "the runtime listens on loopback by default: {}",
        server.url
    );
    let runtime = HttpRuntime::new(&server.url, Duration::from_secs(60), Some(secret)).unwrap();
    fill_with(
        UdfRuntimes::only(Arc::new(runtime)),
        state.path(),
        &udfs["double_plus_one"],
    )
    .await;
    // Without the secret (or with another) the server refuses every call,
    // and the job fails at once naming the signature, not after retries.
    let unsigned = HttpRuntime::new(&server.url, Duration::from_secs(60), Some("wrong")).unwrap();
    let udf = lance_backfill::ports::udf::UdfRef {
        id: "0".repeat(64),
        name: "f".into(),
        outputs: json!([]),
        pickle: Arc::new(Vec::new()),
        workspace_zips: Vec::new(),
        principal: "p".into(),
        wants: Default::default(),
    };
    let batch = arrow_array::RecordBatch::try_from_iter([(
        "x",
        Arc::new(arrow_array::Int64Array::from(vec![1])) as arrow_array::ArrayRef,
    )])
    .unwrap();
    let began = std::time::Instant::now();
    let refused = lance_backfill::ports::udf::UdfRuntime::call(&unsigned, &udf, &batch)
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("signature"), "{refused}");
    assert!(began.elapsed() < Duration::from_secs(5), "not retried");
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

/// A UDF Lambda that dies on a batch (Lambda answers `Runtime.ExitError`,
/// as for a timeout or running out of memory) is invoked again: once, and
/// the job finishes with the right values; every time, and after
/// `DEATH_ATTEMPTS` tries the job fails naming the death.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_udf_lambda_that_dies_is_invoked_again_then_fails_the_job() {
    use lance_backfill::adapters::aws::lambda::DEATH_ATTEMPTS;
    let state = tempfile::tempdir().unwrap();
    let udfs = payloads(state.path());
    let (emulator, runtime) = lambda_emulator(&[]).await;
    let mut stack = Stack::embedded(StackOptions::default()).await;
    write_sample_table(&stack.table_uri("items"), 8_000, 4)
        .await
        .unwrap();
    stack.components.udf = Some(Arc::new(UdfRuntimes::only(Arc::new(runtime))));
    stack.start_worker(
        fast_engine(),
        RunnerConfig::default(),
        Duration::from_secs(60),
    );
    for (column, function) in [("d", "dies_once"), ("e", "always_dies")] {
        let entry = virtual_column(
            column,
            &["x"],
            vec![output(column, int64())],
            &udfs[function],
        );
        declare(&stack, "items", entry).await;
    }
    let once = backfill(
        &stack,
        "items",
        AlterTableBackfillColumnsRequest::new("d".into()),
    )
    .await;
    stack.wait_done(&once, Duration::from_secs(120)).await;
    let x = column(&stack, "x").await;
    assert_eq!(
        column(&stack, "d").await,
        expect(state.path(), "dies_once", &x, false)
    );
    let died_once = emulator_stats(&emulator).await["function_errors"].as_u64();
    assert_eq!(died_once, Some(1), "one death, then the batch went through");

    let always = backfill(
        &stack,
        "items",
        AlterTableBackfillColumnsRequest::new("e".into()),
    )
    .await;
    let job = stack.wait(&always, Duration::from_secs(120)).await;
    assert_eq!(job.state, JobState::Failed);
    let error = job.error.unwrap_or_default();
    assert!(
        error.contains(&format!("died on this batch {DEATH_ATTEMPTS} times")),
        "{error}"
    );
    assert!(error.contains("Runtime.ExitError"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_computes_again_only_the_rows_another_skipped() {
    let (state, stack) = function_column(12_000, "raises_on_sevens_until_fixed").await;
    // Fragment 0 (x < 3000) only: rows 7, 1007 and 2007 are skipped.
    let mut request = AlterTableBackfillColumnsRequest::new("r".into());
    request.context = Some(HashMap::from([("on_error".into(), "skip".into())]));
    request.r#where = Some(Some("x < 3000".into()));
    let skipping = backfill(&stack, "items", request).await;
    let job = stack.wait_done(&skipping, Duration::from_secs(120)).await;
    assert_eq!(job.metrics.get(Counter::RowsFailed), 3);
    // An unknown job has nothing to retry: a 400.
    let (status, refused) = stack
        .post(
            "/v1/table/items/backfill_column",
            json!({"column": "r", "context": {"retry_failed_of": "0123456789abcdef"}}),
        )
        .await;
    assert_eq!(
        (status, refused["code"].as_i64()),
        (400, Some(13)),
        "{refused}"
    );
    // The function is fixed; the retry plans the skipped rows' fragment only
    // and fills them, leaving every other row as it was.
    std::fs::write(state.path().join("fixed"), "").unwrap();
    let mut request = AlterTableBackfillColumnsRequest::new("r".into());
    request.context = Some(HashMap::from([(
        "retry_failed_of".into(),
        skipping.clone(),
    )]));
    let retry = backfill(&stack, "items", request).await;
    let job = stack.wait_done(&retry, Duration::from_secs(120)).await;
    assert_eq!(job.spec.only_fragments, vec![0]);
    assert_eq!(job.spec.plan.fragments, 1);
    assert_eq!(job.metrics.get(Counter::RowsFailed), 0);
    let x = column(&stack, "x").await;
    let expected: Vec<Option<i64>> = x
        .iter()
        .map(|v| v.and_then(|x| (x < 3000).then_some(x + 10)))
        .collect();
    assert_eq!(column(&stack, "r").await, expected);
    let (_, page) = stack.get(&format!("/v1/job/{retry}")).await;
    assert_eq!(page["parameters"]["context"]["retry_failed_of"], skipping);
}

/// The job's state and rows computed, as its page shows them.
async fn state_and_computed(stack: &Stack, job_id: &str) -> (String, u64) {
    let (status, page) = stack.get(&format!("/v1/job/{job_id}")).await;
    assert_eq!(status, 200, "{page}");
    let state = page["state"].as_str().unwrap().to_string();
    (
        state,
        page["metrics"]["rows_computed"]["done"].as_u64().unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_job_hands_out_no_work_until_resumed_even_across_a_restart() {
    let state = tempfile::tempdir().unwrap();
    let udfs = payloads(state.path());
    let mut stack = Stack::embedded(StackOptions::default()).await;
    let uri = stack.table_uri("items");
    write_sample_table(&uri, 20_000, 20).await.unwrap();
    let entry = virtual_column(
        "d",
        &["x"],
        vec![output("d", int64())],
        &udfs["slow_double_plus_one"],
    );
    declare(&stack, "items", entry).await;
    // The first task is held inside the function until the job is paused.
    let hold = state.path().join("hold");
    std::fs::write(&hold, "").unwrap();
    let mut request = AlterTableBackfillColumnsRequest::new("d".into());
    request.concurrency = Some(Some(1));
    request.task_size = Some(Some(250));
    let job_id = backfill(&stack, "items", request).await;
    let visibility = Duration::from_secs(30);
    stack.start_worker(fast_engine(), RunnerConfig::default(), visibility);
    let started = std::time::Instant::now();
    while state_and_computed(&stack, &job_id).await.0 != "RUNNING" {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the job never started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (status, paused) = stack
        .post(&format!("/v1/job/{job_id}/pause"), json!({}))
        .await;
    assert_eq!(
        (status, paused["state"].as_str()),
        (200, Some("PAUSED")),
        "{paused}"
    );
    let (status, again) = stack
        .post(&format!("/v1/job/{job_id}/pause"), json!({}))
        .await;
    assert_eq!(status, 200, "pausing a paused job: {again}");
    // Released, the task under way stops at its next look at the job and
    // the others wait in the queue: nothing more is computed.
    std::fs::remove_file(&hold).unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (state_now, before) = state_and_computed(&stack, &job_id).await;
    assert_eq!(state_now, "PAUSED", "{:?}", stack.events(&job_id).await);
    assert!(before < 20_000, "the job finished though paused");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(state_and_computed(&stack, &job_id).await.1, before);
    // The worker restarts: the pause holds (it is the job's state, and
    // the tasks wait in the queue).
    stack.stop_workers().await;
    stack.start_worker(fast_engine(), RunnerConfig::default(), visibility);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        state_and_computed(&stack, &job_id).await,
        ("PAUSED".to_string(), before)
    );
    let (status, resumed) = stack
        .post(&format!("/v1/job/{job_id}/resume"), json!({}))
        .await;
    // PENDING until its next task starts.
    assert_eq!(
        (status, resumed["state"].as_str()),
        (200, Some("PENDING")),
        "{resumed}"
    );
    let job = stack.wait_done(&job_id, Duration::from_secs(180)).await;
    let x = column(&stack, "x").await;
    let expected: Vec<Option<i64>> = x.iter().map(|v| v.map(|x| x * 2 + 1)).collect();
    assert_eq!(column(&stack, "d").await, expected);
    assert!(job.started_at.is_some());
    let events = stack.events(&job_id).await;
    assert!(
        events.iter().any(|e| e.starts_with("paused by")),
        "{events:?}"
    );
    assert!(
        events.iter().any(|e| e.starts_with("resumed by")),
        "{events:?}"
    );
    // A job that ended is neither paused nor resumed.
    assert_eq!(job.state, JobState::Done);
    for action in ["pause", "resume"] {
        let (status, refused) = stack
            .post(&format!("/v1/job/{job_id}/{action}"), json!({}))
            .await;
        assert_eq!(
            (status, refused["code"].as_i64()),
            (409, Some(19)),
            "{refused}"
        );
    }
}
