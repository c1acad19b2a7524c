//! `lance-backfill serve` killed with SIGKILL at random points, many times
//! (seeded); after restarts every job ends DONE with exactly the expected
//! values, no fragment is committed twice and no checkpoint is left.
//! `LANCE_BACKFILL_CRASH_RUNS` raises the number of runs (default 20).

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lance_backfill::adapters::aws::SqsQueue;
use lance_backfill_tests::{Moto, read_i64, replacements_per_fragment, write_sample_table};
use rand::{Rng, SeedableRng};
use serde_json::json;

pub(crate) const KEY: &str = "crash-key";

/// Where in a job a kill lands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Computing,
    Staging,
    Committing,
}

pub(crate) fn binary() -> PathBuf {
    // target/<profile>/deps/integration-<hash> -> target/<profile>/lance-backfill
    let exe = std::env::current_exe().expect("test executable");
    let path = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("lance-backfill");
    assert!(
        path.exists(),
        "{} is missing: build the workspace first (scripts/test does)",
        path.display()
    );
    path
}

pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub(crate) struct Serve {
    pub child: Child,
    pub url: String,
}

/// Where `serve` keeps its jobs and tasks.
pub(crate) enum Backend {
    /// The embedded SQLite store and queue beside the tables.
    Embedded,
    /// DynamoDB and SQS in a moto (`serve --aws`), named per run.
    Aws(Box<AwsBackend>),
}

pub(crate) struct AwsBackend {
    moto: Moto,
    table: String,
    queue: SqsQueue,
}

impl Backend {
    /// A fresh AWS backend: its own jobs table and queue.
    pub(crate) async fn aws(moto: &Moto) -> Self {
        let (_, table) = moto.fresh_store().await;
        let queue = moto.fresh_queue(10, Duration::from_secs(2)).await;
        Self::Aws(Box::new(AwsBackend {
            moto: moto.clone(),
            table,
            queue,
        }))
    }

    fn configure(&self, command: &mut Command) {
        if let Self::Aws(aws) = self {
            let AwsBackend { moto, table, queue } = aws.as_ref();
            command
                .arg("--aws")
                .env("AWS_ENDPOINT_URL", &moto.endpoint)
                .env("AWS_ACCESS_KEY_ID", "testing")
                .env("AWS_SECRET_ACCESS_KEY", "testing")
                .env("AWS_REGION", "us-east-1")
                .env("LANCE_BACKFILL_JOBS_TABLE", table)
                .env("LANCE_BACKFILL_QUEUE_URL", queue.url())
                .env(
                    "LANCE_BACKFILL_DLQ_URL",
                    queue.dead_letter_url().unwrap_or_default(),
                );
        }
    }

    /// Whether the task queue holds no message (waiting or in flight).
    pub(crate) async fn queue_empty(&self, root: &str) -> bool {
        match self {
            Self::Embedded => {
                let state = lance_backfill::app::bootstrap::default_state_path(root).unwrap();
                let queue = lance_backfill::adapters::sqlite::SqliteQueue::new(
                    lance_backfill::adapters::sqlite::embedded::EmbeddedDb::open(&state).unwrap(),
                    "tasks",
                    10,
                );
                queue.depth().await.unwrap_or(1) == 0
            }
            Self::Aws(aws) => aws.queue.approximate_depth().await.unwrap_or(1) == 0,
        }
    }
}

pub(crate) fn start(backend: &Backend, root: &str, port: u16, log: &Path) -> Serve {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let mut command = Command::new(binary());
    command
        .args([
            "serve",
            "--root",
            root,
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .args([
            "--pollers",
            "2",
            "--batch-size",
            "4",
            "--visibility-timeout",
            "2",
            // Each kill costs the in-flight messages a receive; the crash
            // loop kills up to three times a run.
            "--max-receive-count",
            "10",
        ])
        .env("LANCE_BACKFILL_API_KEYS", KEY)
        .env("LANCE_BACKFILL_LEASE_SECONDS", "1")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log);
    backend.configure(&mut command);
    let child = command.spawn().expect("start serve");
    Serve {
        child,
        url: format!("http://127.0.0.1:{port}"),
    }
}

pub(crate) async fn ready(client: &reqwest::Client, url: &str) {
    let until = Instant::now() + Duration::from_secs(30);
    while Instant::now() < until {
        if client.get(format!("{url}/health")).send().await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("serve did not come up at {url}");
}

pub(crate) async fn job(
    client: &reqwest::Client,
    url: &str,
    id: &str,
) -> Option<serde_json::Value> {
    let response = client
        .get(format!("{url}/v1/job/{id}"))
        .header("x-api-key", KEY)
        .send()
        .await
        .ok()?;
    response.json().await.ok()
}

pub(crate) fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What a crash loop fills: a table of `rows` rows in `fragments`
/// fragments, `y` declared by `declaration` (its values must be
/// `x * 2 + 1`), the backfill request `body`.
pub(crate) struct Shape {
    pub rows: u64,
    pub fragments: u64,
    pub declaration: serde_json::Value,
    pub body: serde_json::Value,
}

impl Shape {
    /// 80,000 rows in 8 fragments, 40 tasks of 2,500 rows checkpointed
    /// every 250, one commit per fragment.
    pub(crate) fn split(declaration: serde_json::Value) -> Self {
        Self {
            rows: 80_000,
            fragments: 8,
            declaration,
            body: json!({
                "column": "y", "task_size": 2500, "checkpoint_size": 250,
                "batch_checkpoint_flush_interval_seconds": 0, "commit_granularity": 1, "concurrency": 2,
            }),
        }
    }
}

/// The SQL column `y = x * 2 + 1`, as `add_columns` declares it.
pub(crate) fn computed_y() -> serde_json::Value {
    json!({"name": "y", "computed": "x * 2 + 1"})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn serve_survives_sigkill_at_random_points() {
    let runs = env_number("LANCE_BACKFILL_CRASH_RUNS", 20);
    let shape = Shape::split(computed_y());
    crash_loop(|| async { Backend::Embedded }, runs, "crash", &shape).await;
}

/// The loop over small fragments packed into tasks: 120 fragments of 25
/// rows, packs of up to 20 fragments (`task_size` 500), outcomes recorded
/// at once (flush interval 0) and one commit per 10 fragments.
/// `LANCE_BACKFILL_PACK_CRASH_RUNS` (default 8).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn serve_survives_sigkill_while_filling_packs() {
    let runs = env_number("LANCE_BACKFILL_PACK_CRASH_RUNS", 8);
    let shape = Shape {
        rows: 3_000,
        fragments: 120,
        declaration: computed_y(),
        body: json!({
            "column": "y", "task_size": 500, "batch_checkpoint_flush_interval_seconds": 0,
            "commit_granularity": 10, "concurrency": 2,
        }),
    };
    crash_loop(|| async { Backend::Embedded }, runs, "pack crash", &shape).await;
}

/// The same loop over a user function (`y = x * 2 + 1` in Python, on the
/// local pool): the pool's processes die with `serve` and new ones serve
/// the restarted job. `LANCE_BACKFILL_UDF_CRASH_RUNS` (default 5).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn serve_survives_sigkill_during_a_udf_job() {
    let runs = env_number("LANCE_BACKFILL_UDF_CRASH_RUNS", 5);
    let state = tempfile::tempdir().unwrap();
    let udfs = crate::udf::payloads(state.path());
    let entry = crate::udf::virtual_column(
        "y",
        &["x"],
        vec![crate::udf::output("y", crate::udf::int64())],
        &udfs["double_plus_one"],
    );
    let shape = Shape::split(serde_json::to_value(entry).unwrap());
    crash_loop(|| async { Backend::Embedded }, runs, "udf crash", &shape).await;
}

/// Runs of: write a table, start `serve`, declare `y`, submit, kill it one
/// to three times at random points of the job, and check the outcome.
pub(crate) async fn crash_loop<B, F>(backend: B, runs: u64, label: &str, shape: &Shape)
where
    B: Fn() -> F,
    F: std::future::Future<Output = Backend>,
{
    let seed = env_number("LANCE_BACKFILL_CRASH_SEED", 7);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let client = reqwest::Client::new();
    let mut kills = 0;
    let mut phases: std::collections::BTreeMap<Phase, u32> = Default::default();
    let mut killed_while_running = 0;
    let granularity = shape.body["commit_granularity"]
        .as_u64()
        .unwrap_or(1)
        .max(1);
    let commits = shape.fragments.div_ceil(granularity);
    for run in 0..runs {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_string_lossy().into_owned();
        let uri = format!("{root}/items.lance");
        let log = dir.path().join("serve.log");
        write_sample_table(&uri, shape.rows, shape.fragments)
            .await
            .unwrap();
        let backend = backend().await;
        let port = free_port();
        let mut serve = start(&backend, &root, port, &log);
        ready(&client, &serve.url).await;
        let declared = client
            .post(format!("{}/v1/table/items/add_columns", serve.url))
            .header("x-api-key", KEY)
            .json(&json!({"new_columns": [shape.declaration]}))
            .send()
            .await
            .unwrap();
        assert_eq!(declared.status(), 200);
        let before = lance::Dataset::open(&uri).await.unwrap().manifest().version;
        let body = &shape.body;
        // Under injected faults the store may answer busy (429) or be out
        // of reach (503): a client asks again with the same idempotency key.
        let key = format!("crash-{run}-{}", uuid::Uuid::new_v4().simple());
        let mut response = serde_json::Value::Null;
        for _ in 0..20 {
            let answer = client
                .post(format!("{}/v1/table/items/backfill_column", serve.url))
                .header("x-api-key", KEY)
                .header("idempotency-key", &key)
                .json(body)
                .send()
                .await
                .unwrap();
            let retry = answer.status().as_u16() == 429 || answer.status().is_server_error();
            response = answer.json().await.unwrap();
            if !retry {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let job_id = response["job_id"].as_str().expect("job id").to_string();
        // One to three kills, each when the job reaches a random point:
        // rows computed (mid-compute, mid-flush), fragments finished (around
        // staging) or commits made (just after one).
        for _ in 0..rng.random_range(1..=3) {
            let (phase, threshold) = match rng.random_range(0..3) {
                0 => (Phase::Computing, rng.random_range(0..shape.rows)),
                1 => (Phase::Staging, rng.random_range(1..=shape.fragments)),
                _ => (Phase::Committing, rng.random_range(1..=commits)),
            };
            let until = Instant::now() + Duration::from_secs(60);
            let running = loop {
                let Some(current) = job(&client, &serve.url, &job_id).await else {
                    break false;
                };
                let state = current["state"].as_str().unwrap_or("");
                if state != "PENDING" && state != "RUNNING" {
                    break false;
                }
                let metrics = &current["metrics"];
                let reached = match phase {
                    Phase::Computing => {
                        metrics["rows_computed"]["done"].as_u64().unwrap_or(0) >= threshold
                    }
                    Phase::Staging => {
                        metrics["fragments"]["done"].as_u64().unwrap_or(0) + 1 >= threshold
                    }
                    Phase::Committing => {
                        metrics["commits"]["done"].as_u64().unwrap_or(0) >= threshold
                    }
                };
                if reached || Instant::now() > until {
                    break true;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            };
            serve.child.kill().unwrap();
            serve.child.wait().unwrap();
            kills += 1;
            if running {
                killed_while_running += 1;
                *phases.entry(phase).or_insert(0) += 1;
            }
            serve = start(&backend, &root, port, &log);
            ready(&client, &serve.url).await;
        }
        let until = Instant::now() + Duration::from_secs(120);
        let final_job = loop {
            let current = job(&client, &serve.url, &job_id)
                .await
                .expect("job readable");
            let state = current["state"].as_str().unwrap_or("").to_string();
            if state == "DONE" || state == "FAILED" || state == "CANCELLED" {
                break current;
            }
            assert!(
                Instant::now() < until,
                "run {run}: job stuck: {current}\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        // Stragglers (a holder still computing when the job ended, a
        // message redelivered after a kill, a retry after its backoff)
        // remove what they left once they run: wait for the queue to empty.
        lance_backfill_tests::eventually(Duration::from_secs(120), || backend.queue_empty(&root))
            .await
            .expect("the queue empties after the job is done");
        serve.child.kill().unwrap();
        serve.child.wait().unwrap();
        assert_eq!(
            final_job["state"], "DONE",
            "run {run} (seed {seed}): {final_job}"
        );
        let x = read_i64(&uri, "x", &HashMap::new()).await.unwrap();
        let y = read_i64(&uri, "y", &HashMap::new()).await.unwrap();
        let expected: Vec<Option<i64>> = x.iter().map(|v| v.map(|x| x * 2 + 1)).collect();
        assert!(y == expected, "run {run}: wrong values");
        let changes = replacements_per_fragment(&uri, &HashMap::new(), "y", before).await;
        assert_eq!(
            changes.len() as u64,
            shape.fragments,
            "run {run}: every fragment replaced: {changes:?}"
        );
        assert!(
            changes.values().all(|c| *c == 1),
            "run {run}: a fragment committed twice: {changes:?}"
        );
        let leftovers = crate::worker_runs::leftovers(&format!("{uri}/_backfill"));
        assert!(
            leftovers.is_empty(),
            "run {run}: leftover checkpoints {leftovers:?}\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
    println!(
        "FIGURES {label}: {runs} runs, {kills} kills ({killed_while_running} while the job ran: {phases:?}), failures: 0 (seed {seed})"
    );
    assert!(
        killed_while_running * 2 >= kills,
        "most kills must hit a running job: {killed_while_running} of {kills}"
    );
}
