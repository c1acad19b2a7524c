//! Isolation, through `serve` as a user runs it with secrets in its
//! environment and two tenants: user code sees none of the service's
//! variables nor its files nor other tables; two principals' functions
//! never share a process; SQL that would take all the memory there is gets
//! a 400 or a FAILED job and the server answers on, the same process.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_array::{Array, Int64Array, RecordBatch, StringArray};
use futures::TryStreamExt;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::crash::{binary, free_port, ready};

const ALICE: &str = "alice-isolation-key";
const BOB: &str = "bob-isolation-key";

/// Variables of the service's environment, with values no function may see.
const SECRETS: [(&str, &str); 4] = [
    ("LANCE_BACKFILL_JWT_SECRET", "jwt-secret-isolation-value"),
    ("AWS_SECRET_ACCESS_KEY", "aws-secret-isolation-value"),
    (
        "LANCE_BACKFILL_TOKEN_SECRET",
        "token-secret-isolation-value",
    ),
    ("ISOLATION_SERVICE_MARKER", "service-marker-isolation-value"),
];

/// A `serve` over a root of its own, with two principals' keys, a policy
/// and the secrets above in its environment.
struct Served {
    _dir: tempfile::TempDir,
    root: PathBuf,
    child: Child,
    url: String,
    client: reqwest::Client,
    log: PathBuf,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn key_hashes() -> String {
    [("alice", ALICE), ("bob", BOB)]
        .iter()
        .map(|(name, key)| format!("{name}:{}", hex::encode(Sha256::digest(key.as_bytes()))))
        .collect::<Vec<_>>()
        .join(",")
}

impl Served {
    /// Starts `serve` once `tables` (called with the root) wrote the tables.
    async fn start<F, Fut>(tables: F) -> Self
    where
        F: FnOnce(PathBuf) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        tables(root.clone()).await;
        let port = free_port();
        let log = root.join("serve.log");
        let every = ["read", "submit", "declare", "udf", "cancel"];
        let policy = json!({"alice": {"tables": ["*"], "actions": every},
                            "bob": {"tables": ["*"], "actions": every}});
        let mut command = Command::new(binary());
        command
            .args(["serve", "--root", root.to_str().unwrap()])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env("LANCE_BACKFILL_API_KEY_HASHES", key_hashes())
            .env("LANCE_BACKFILL_POLICY", policy.to_string())
            .env("LANCE_BACKFILL_JWT_ISSUER", "https://issuer.isolation")
            .env("LANCE_BACKFILL_JWT_AUDIENCE", "lance-backfill")
            .envs(SECRETS)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        let child = command.spawn().expect("start serve");
        let url = format!("http://127.0.0.1:{port}");
        let client = reqwest::Client::new();
        ready(&client, &url).await;
        Self {
            _dir: dir,
            root,
            child,
            url,
            client,
            log,
        }
    }

    async fn post(&self, key: &str, path: &str, body: Value) -> (u16, Value) {
        let url = format!("{}{path}", self.url);
        lance_backfill_tests::post_as(&self.client, &url, key, &body).await
    }

    async fn declare(&self, key: &str, entry: Value) {
        let body = json!({"new_columns": [entry]});
        let (status, answer) = self.post(key, "/v1/table/items/add_columns", body).await;
        assert_eq!(status, 200, "add_columns: {answer}");
    }

    async fn submit(&self, key: &str, body: Value) -> String {
        let (status, answer) = self
            .post(key, "/v1/table/items/backfill_column", body)
            .await;
        assert_eq!(status, 202, "backfill_column: {answer}");
        answer["job_id"].as_str().unwrap().to_string()
    }

    /// The job once it has ended.
    async fn ended(&self, key: &str, job_id: &str) -> Value {
        let until = Instant::now() + Duration::from_secs(300);
        loop {
            let job: Value = self
                .client
                .get(format!("{}/v1/job/{job_id}", self.url))
                .header("x-api-key", key)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if ["DONE", "FAILED", "CANCELLED"].contains(&job["state"].as_str().unwrap_or("")) {
                return job;
            }
            assert!(Instant::now() < until, "job {job_id} did not end: {job}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Whether the same process still runs and answers.
    async fn serving(&mut self) -> bool {
        let running = self.child.try_wait().unwrap().is_none();
        let health = self.client.get(format!("{}/health", self.url)).send().await;
        running && health.is_ok_and(|r| r.status().is_success())
    }

    /// The server's peak resident memory (VmHWM), in MiB.
    fn peak_rss_mb(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()));
        status
            .ok()
            .and_then(|text| {
                let line = text.lines().find(|l| l.starts_with("VmHWM:"))?.to_string();
                line.split_whitespace().nth(1)?.parse::<u64>().ok()
            })
            .map_or(0, |kb| kb / 1024)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A table of `rows` rows in `fragments` fragments: `id`, `x` (the id) and
/// `s` from `text` of the row.
async fn write_table(uri: &str, rows: i64, fragments: i64, text: impl Fn(i64) -> String) {
    use arrow_schema::{DataType, Field, Schema};
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("x", DataType::Int64, true),
        Field::new("s", DataType::Utf8, true),
    ]));
    let per = rows / fragments;
    let batches: Vec<RecordBatch> = (0..fragments)
        .map(|f| {
            let ids: Vec<i64> = (f * per..(f + 1) * per).collect();
            let s: Vec<String> = ids.iter().map(|i| text(*i)).collect();
            RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(Int64Array::from(ids.clone())),
                    Arc::new(Int64Array::from(ids)),
                    Arc::new(StringArray::from(s)),
                ],
            )
            .unwrap()
        })
        .collect();
    let params = lance::dataset::WriteParams {
        max_rows_per_file: per as usize,
        ..Default::default()
    };
    let reader = arrow_array::RecordBatchIterator::new(batches.into_iter().map(Ok), schema);
    lance::Dataset::write(reader, uri, Some(params))
        .await
        .unwrap();
}

/// A column of the table, as strings (`Utf8`) or numbers (`Int64`), by id.
async fn read_column(uri: &str, column: &str) -> Vec<Value> {
    let dataset = lance::Dataset::open(uri).await.unwrap();
    let mut scanner = dataset.scan();
    scanner.project(&["id", column]).unwrap();
    let batches: Vec<RecordBatch> = scanner
        .try_into_stream()
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let mut rows: Vec<(i64, Value)> = Vec::new();
    for batch in batches {
        let ids = batch
            .column(0)
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap();
        let values = batch.column(1);
        for row in 0..batch.num_rows() {
            let value = if values.is_null(row) {
                Value::Null
            } else if let Some(text) = values.as_any().downcast_ref::<StringArray>() {
                json!(text.value(row))
            } else {
                json!(
                    values
                        .as_any()
                        .downcast_ref::<Int64Array>()
                        .unwrap()
                        .value(row)
                )
            };
            rows.push((ids.value(row), value));
        }
    }
    rows.sort_by_key(|(id, _)| *id);
    rows.into_iter().map(|(_, v)| v).collect()
}

fn function(column: &str, inputs: &[&str], data_type: Value, udf: &str) -> Value {
    json!({"name": column, "virtual_column": {"input_columns": inputs,
        "outputs": [{"column": column, "struct_field": column, "data_type": data_type,
                     "nullable": true}],
        "udf": udf, "udf_name": column, "udf_version": "1", "image": "local"}})
}

/// What rows of `items` hold in `s`: paths for the function probing them.
fn probed(root: &Path) -> [String; 4] {
    [
        root.join("_lance_backfill").join("state.db"),
        root.join("items.lance"),
        root.join("other.lance"),
        PathBuf::from("/usr"),
    ]
    .map(|p| p.to_string_lossy().into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn user_code_sees_nothing_of_the_service_and_tenants_never_share_a_process() {
    let state = tempfile::tempdir().unwrap();
    let udfs = crate::udf::payloads(state.path());
    let served = Served::start(|root| async move {
        let paths = probed(&root);
        let items = root.join("items.lance");
        write_table(items.to_str().unwrap(), 400, 4, |i| {
            paths[i as usize % 4].clone()
        })
        .await;
        lance_backfill_tests::write_sample_table(root.join("other.lance").to_str().unwrap(), 10, 1)
            .await
            .unwrap();
    })
    .await;
    let utf8 = json!({"type": "utf8"});
    let int64 = json!({"type": "int64"});
    served
        .declare(
            ALICE,
            function("env", &["x"], utf8.clone(), &udfs["environment"]),
        )
        .await;
    served
        .declare(ALICE, function("probe", &["s"], utf8, &udfs["probe_paths"]))
        .await;
    served
        .declare(
            ALICE,
            function("alice_pid", &["x"], int64.clone(), &udfs["pid"]),
        )
        .await;
    served
        .declare(BOB, function("bob_pid", &["x"], int64, &udfs["pid"]))
        .await;
    let mut jobs = Vec::new();
    for (key, column) in [
        (ALICE, "env"),
        (ALICE, "probe"),
        (ALICE, "alice_pid"),
        (BOB, "bob_pid"),
    ] {
        jobs.push((key, served.submit(key, json!({"column": column})).await));
    }
    for (key, job_id) in &jobs {
        let job = served.ended(key, job_id).await;
        assert_eq!(job["state"], "DONE", "{job}\n{}", served.log());
    }
    let uri = served.root.join("items.lance");
    let uri = uri.to_str().unwrap();

    // The environment: none of the service's variables, nor their values.
    let environments: HashSet<String> = read_column(uri, "env")
        .await
        .into_iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    for environment in &environments {
        for (name, value) in SECRETS {
            assert!(
                !environment.contains(value),
                "{name}'s value reached user code"
            );
        }
        for secret in [ALICE, BOB, &key_hashes()] {
            assert!(
                !environment.contains(secret),
                "an API key reached user code"
            );
        }
        assert!(!environment.contains("LANCE_BACKFILL_"), "{environment}");
        assert!(environment.contains("PATH="), "{environment}");
    }
    println!("FIGURES a function's whole environment: {environments:?}");

    // Files: not the state, not this table's, not another's; /usr is there.
    let probes = read_column(uri, "probe").await;
    let expected = |i: usize| if i % 4 == 3 { "read" } else { "refused" };
    for (i, probe) in probes.iter().enumerate() {
        let probe = probe.as_str().unwrap();
        assert!(
            probe.starts_with(expected(i)),
            "row {i}: {probe}\n{}",
            served.log()
        );
    }

    // Processes: never one that ran the other principal's batches.
    let pids = |values: Vec<Value>| -> HashSet<i64> {
        values.iter().map(|v| v.as_i64().unwrap()).collect()
    };
    let alice = pids(read_column(uri, "alice_pid").await);
    let bob = pids(read_column(uri, "bob_pid").await);
    assert!(!alice.is_empty() && !bob.is_empty());
    assert!(alice.is_disjoint(&bob), "alice {alice:?}, bob {bob:?}");
}

/// Each of the functions that make more than they read, asked for more
/// memory than the machine has, over 20,000 rows of 2,000 characters.
const MEMORY_BOMBS: [&str; 7] = [
    "rpad(s, x * 1000000)",
    "regexp_replace(s, '.', repeat(s, 1000), 'g')",
    "array_repeat(s, 1000000)",
    "concat(repeat(s, 100000), repeat(s, 100000))",
    "array_to_string(array_repeat(x, 100000), repeat(s, 1000))",
    "generate_series(0, x * 100000000)",
    "length(repeat(s, 1000000))",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sql_past_all_memory_gets_an_answer_and_the_server_stays_up() {
    let mut served = Served::start(|root| async move {
        let items = root.join("items.lance");
        write_table(items.to_str().unwrap(), 20_000, 4, |i| {
            format!("{i:0>2000}")
        })
        .await;
    })
    .await;
    let pid = served.child.id();
    // Filled once, at declaration: the answer is a 400 naming the bound,
    // and the column is not left behind.
    let (status, answer) = served
        .post(
            ALICE,
            "/v1/table/items/add_columns",
            json!({"new_columns": [{"name": "bomb", "expression": "repeat(s, 1000000)"}]}),
        )
        .await;
    assert_eq!(
        (status, answer["code"].clone()),
        (400, json!(13)),
        "{answer}"
    );
    assert!(
        answer["error"].as_str().unwrap().contains("bytes"),
        "{answer}"
    );
    assert!(served.serving().await, "{}", served.log());
    // Declared, then backfilled: the job fails with the reason.
    for (i, sql) in MEMORY_BOMBS.iter().enumerate() {
        let column = format!("c{i}");
        served
            .declare(ALICE, json!({"name": column, "computed": sql}))
            .await;
        let job_id = served.submit(ALICE, json!({"column": column})).await;
        let job = served.ended(ALICE, &job_id).await;
        assert_eq!(job["state"], "FAILED", "{sql}: {job}");
        let error = job["error"].as_str().unwrap_or_default();
        assert!(error.contains("bytes"), "{sql}: {error}");
        assert!(served.serving().await, "{sql}: {}", served.log());
    }
    // A `where` that would do the same.
    let job_id = served
        .submit(
            ALICE,
            json!({"column": "c0", "where": "length(repeat(s, 1000000)) > 0"}),
        )
        .await;
    let job = served.ended(ALICE, &job_id).await;
    assert_eq!(job["state"], "FAILED", "{job}");
    assert!(served.serving().await, "{}", served.log());
    assert_eq!(served.child.id(), pid, "the same process throughout");
    println!(
        "FIGURES memory bombs: {} requests, each a 400 or a FAILED job; server pid {pid} \
         unchanged; peak RSS {} MiB",
        MEMORY_BOMBS.len() + 2,
        served.peak_rss_mb()
    );
}
