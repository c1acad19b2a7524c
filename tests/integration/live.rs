//! Live tables: a backfill through `serve` while another writer (pylance,
//! tests/live_writer.py) declares a column, compacts, deletes, updates,
//! rewrites an input in place or appends; two backfills of one table at
//! once; the filled column dropped under its job; a cancel during
//! commits; and `serve` killed (SIGKILL) around those changes. Each test
//! checks the values in the table: every row that existed when the job
//! read the table, and still exists, holds `x * 2 + 1` of its current
//! `x`; no deleted row is back.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use arrow_array::{Array, Int64Array};
use futures::TryStreamExt;
use lance_backfill_tests::{Moto, write_sample_table};
use serde_json::{Value, json};

use crate::crash::{Backend, KEY, Serve, free_port, job, ready, start};

const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
/// The table every test starts from: 200 fragments of 500 rows.
const ROWS: u64 = 100_000;
const FRAGMENTS: u64 = 200;

/// A table, a `serve` over it, and the job the test follows.
struct Live {
    _dir: tempfile::TempDir,
    root: String,
    uri: String,
    log: PathBuf,
    backend: Backend,
    port: u16,
    serve: Serve,
    client: reqwest::Client,
}

impl Drop for Live {
    fn drop(&mut self) {
        let _ = self.serve.child.kill();
        let _ = self.serve.child.wait();
    }
}

/// What the table holds after a job, read with a fresh reader.
#[derive(Debug, Default)]
struct Holds {
    rows: usize,
    ids: HashSet<i64>,
    /// Rows that existed at the job's read version with a wrong or missing
    /// value.
    wrong: Vec<(i64, Option<i64>, Option<i64>)>,
    /// Rows appended since, with a value (filled by a compaction that
    /// mixed them with the job's rows) or not.
    appended_filled: usize,
}

impl Live {
    async fn start(backend: Backend) -> Self {
        Self::start_with(backend, ROWS, FRAGMENTS).await
    }

    /// [`Live::start`] on a table of `rows` rows in `fragments` fragments.
    async fn start_with(backend: Backend, rows: u64, fragments: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_string_lossy().into_owned();
        let uri = format!("{root}/items.lance");
        let log = dir.path().join("serve.log");
        write_sample_table(&uri, rows, fragments).await.unwrap();
        let port = free_port();
        let serve = start(&backend, &root, port, &log);
        let client = reqwest::Client::new();
        ready(&client, &serve.url).await;
        Self {
            _dir: dir,
            root,
            uri,
            log,
            backend,
            port,
            serve,
            client,
        }
    }

    fn serve_log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let url = format!("{}{path}", self.serve.url);
        lance_backfill_tests::post_as(&self.client, &url, KEY, &body).await
    }

    /// Declares `y` (and any other entries) with `add_columns`.
    async fn declare(&self, entries: Vec<Value>) {
        let (status, body) = self
            .post(
                "/v1/table/items/add_columns",
                json!({ "new_columns": entries }),
            )
            .await;
        assert_eq!(status, 200, "add_columns: {body}");
    }

    async fn submit(&self, body: Value) -> String {
        let (status, answer) = self.post("/v1/table/items/backfill_column", body).await;
        assert_eq!(status, 202, "backfill_column: {answer}");
        answer["job_id"].as_str().expect("job id").to_string()
    }

    async fn job(&self, id: &str) -> Value {
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(job) = job(&self.client, &self.serve.url, id).await {
                return job;
            }
            assert!(Instant::now() < until, "job {id} unreadable");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until `reached` holds for the job (or it ended); returns it.
    async fn wait_for(&self, id: &str, reached: impl Fn(&Value) -> bool) -> Value {
        let until = Instant::now() + Duration::from_secs(180);
        loop {
            let job = self.job(id).await;
            let state = job["state"].as_str().unwrap_or("");
            if reached(&job) || !matches!(state, "PENDING" | "RUNNING") {
                return job;
            }
            assert!(
                Instant::now() < until,
                "job {id} stuck: {job}\n{}",
                self.serve_log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_end(&self, id: &str) -> Value {
        self.wait_for(id, |_| false).await
    }

    async fn wait_done(&self, id: &str) -> Value {
        let job = self.wait_end(id).await;
        assert_eq!(
            job["state"],
            "DONE",
            "job {id}: {job}\n{}",
            self.serve_log()
        );
        job
    }

    /// Runs the other writer (tests/live_writer.py) on the table.
    fn writer(&self, args: &[&str]) -> String {
        let output = Command::new(crate::udf::python())
            .arg(format!("{REPO}/tests/live_writer.py"))
            .arg(&self.uri)
            .args(args)
            .output()
            .expect("run tests/live_writer.py");
        assert!(
            output.status.success(),
            "live_writer {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Runs the other writer while the job's function is held (see
    /// `slow_double_plus_one`): no task finishes and no group commits
    /// meanwhile, so the change lands mid-job however slow the machine
    /// (a writer racing the job's commits could land only after the last).
    fn mid_job(&self, state: &std::path::Path, args: &[&str]) {
        let hold = state.join("hold");
        std::fs::write(&hold, "").unwrap();
        self.writer(args);
        std::fs::remove_file(&hold).unwrap();
    }

    fn kill(&mut self) {
        self.serve.child.kill().unwrap();
        self.serve.child.wait().unwrap();
    }

    async fn restart(&mut self) {
        self.serve = start(&self.backend, &self.root, self.port, &self.log);
        ready(&self.client, &self.serve.url).await;
    }

    /// What the table holds: for each row, `column` against `x * 2 + 1`.
    async fn holds(&self, column: &str) -> Holds {
        let mut holds = Holds::default();
        for row in scan(&self.uri, &["id", "x", column]).await {
            let (id, x, y) = (row[0].expect("an id"), row[1], row[2]);
            holds.rows += 1;
            holds.ids.insert(id);
            let expected = x.map(|x| x * 2 + 1);
            if (id as u64) < ROWS {
                if y != expected {
                    holds.wrong.push((id, x, y));
                }
            } else if y.is_some() {
                assert_eq!(y, expected, "appended row {id} has a wrong value");
                holds.appended_filled += 1;
            }
        }
        holds
    }

    /// Every row the job read holds its value; nothing is left behind.
    async fn assert_exact(&self, column: &str) -> Holds {
        let holds = self.holds(column).await;
        assert!(
            holds.wrong.is_empty(),
            "{} rows wrong, first: {:?}\n{}",
            holds.wrong.len(),
            &holds.wrong[..holds.wrong.len().min(5)],
            self.serve_log()
        );
        self.assert_no_leftovers().await;
        holds
    }

    /// No checkpoint left, and no file of the filled columns that no
    /// version holds (a staged file nobody committed or removed), once the
    /// queue is empty.
    async fn assert_no_leftovers(&self) {
        lance_backfill_tests::eventually(Duration::from_secs(120), || {
            self.backend.queue_empty(&self.root)
        })
        .await
        .expect("the queue empties");
        let leftovers = crate::worker_runs::leftovers(&format!("{}/_backfill", self.uri));
        assert!(leftovers.is_empty(), "leftover checkpoints {leftovers:?}");
        let orphans = self.writer(&["orphans", "y", "u", "w"]);
        assert_eq!(
            orphans.trim(),
            "[]",
            "files of the job's columns no version holds"
        );
    }
}

/// One int64 column of the table by id, with a fresh reader.
async fn live_values(uri: &str, column: &str) -> Vec<(i64, Option<i64>)> {
    scan(uri, &["id", column])
        .await
        .into_iter()
        .map(|row| (row[0].expect("an id"), row[1]))
        .collect()
}

/// Int64 columns of every live row, in order, with a fresh reader.
async fn scan(uri: &str, columns: &[&str]) -> Vec<Vec<Option<i64>>> {
    let dataset = lance::Dataset::open(uri).await.unwrap();
    let mut scanner = dataset.scan();
    scanner.project(columns).unwrap();
    let batches: Vec<arrow_array::RecordBatch> = scanner
        .try_into_stream()
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let mut rows = Vec::new();
    for batch in batches {
        let arrays: Vec<&Int64Array> = (0..columns.len())
            .map(|i| {
                batch
                    .column(i)
                    .as_any()
                    .downcast_ref::<Int64Array>()
                    .unwrap()
            })
            .collect();
        for row in 0..batch.num_rows() {
            let value = |a: &&Int64Array| a.is_valid(row).then(|| a.value(row));
            rows.push(arrays.iter().map(value).collect());
        }
    }
    rows
}

/// The user function `y = x * 2 + 1`, taking 30 ms a call.
fn slow_y(state: &std::path::Path) -> Value {
    let udfs = crate::udf::payloads(state);
    let entry = crate::udf::virtual_column(
        "y",
        &["x"],
        vec![crate::udf::output("y", crate::udf::int64())],
        &udfs["slow_double_plus_one"],
    );
    serde_json::to_value(entry).unwrap()
}

/// The backfill every test submits: a task per fragment (not packed),
/// 250-row batches (two calls a fragment), a commit per 40 fragments.
/// (Lance refuses another writer's update, merge or new column over a
/// commit of the same fragments: such a writer retries, and gets in
/// between commits; a commit every few fragments would keep it out.)
fn fill_y() -> Value {
    json!({"column": "y", "checkpoint_size": 250, "task_size": 500, "commit_granularity": 40, "concurrency": 2})
}

fn metric(job: &Value, name: &str) -> u64 {
    let value = &job["metrics"][name];
    value["done"].as_u64().or(value.as_u64()).unwrap_or(0)
}

/// Declares the slow `y`, submits its backfill and waits until it has
/// committed `commits` groups.
async fn started(live: &Live, state: &std::path::Path, commits: u64) -> String {
    live.declare(vec![slow_y(state)]).await;
    let job_id = live.submit(fill_y()).await;
    let job = live
        .wait_for(&job_id, |job| metric(job, "commits") >= commits)
        .await;
    assert_eq!(job["state"], "RUNNING", "the job ended too soon: {job}");
    job_id
}

fn events(job: &Value) -> Vec<String> {
    job["events"]
        .as_array()
        .map(|events| {
            events
                .iter()
                .filter_map(|e| e["message"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Values carried to rows' new places, from the job's events.
fn carried(job: &Value) -> u64 {
    events(job)
        .iter()
        .filter_map(|e| {
            let (before, _) = e.split_once(" computed values carried")?;
            before.rsplit(' ').next()?.parse::<u64>().ok()
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_column_declared_mid_job_keeps_the_job() {
    let state = tempfile::tempdir().unwrap();
    let live = Live::start(Backend::Embedded).await;
    let job_id = started(&live, state.path(), 1).await;
    live.mid_job(state.path(), &["add-column", "z", "x + 100"]);
    let job = live.wait_done(&job_id).await;
    let holds = live.assert_exact("y").await;
    assert_eq!(holds.rows as u64, ROWS);
    assert_eq!(
        metric(&job, "fragments_replanned"),
        0,
        "nothing moved: {job}"
    );
    assert!(metric(&job, "commits_rebased") > 0, "{job}");
    // The other writer's column is intact.
    let z = live_values(&live.uri, "z").await;
    assert!(z.iter().all(|(id, z)| *z == Some(id + 100)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_compaction_mid_job_keeps_the_values_computed() {
    let state = tempfile::tempdir().unwrap();
    let live = Live::start(Backend::Embedded).await;
    let job_id = started(&live, state.path(), 1).await;
    live.mid_job(state.path(), &["compact", "20000"]);
    let job = live.wait_done(&job_id).await;
    let holds = live.assert_exact("y").await;
    assert_eq!(holds.rows as u64, ROWS);
    let replanned = metric(&job, "rows_replanned");
    assert!(replanned > 0, "compaction moved rows of the job: {job}");
    let carried = carried(&job);
    assert!(
        carried > 0,
        "values computed before the compaction were carried: {job}"
    );
    // Rows carried were not computed again.
    assert!(
        metric(&job, "rows_computed") + carried <= ROWS + replanned,
        "computed {} + carried {carried} > {ROWS} + {replanned}: {job}",
        metric(&job, "rows_computed")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_update_mid_job_gets_the_values_of_the_new_inputs() {
    let state = tempfile::tempdir().unwrap();
    let live = Live::start(Backend::Embedded).await;
    let job_id = started(&live, state.path(), 1).await;
    live.mid_job(state.path(), &["update", "x % 7 = 0", "x", "x + 1000"]);
    let job = live.wait_done(&job_id).await;
    let holds = live.assert_exact("y").await;
    assert_eq!(holds.rows as u64, ROWS);
    assert!(metric(&job, "rows_replanned") > 0, "{job}");
    let x = live_values(&live.uri, "x").await;
    assert!(
        x.iter().any(|(id, x)| id % 7 == 0 && *x == Some(id + 1000)),
        "the update happened"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_input_rewritten_in_place_mid_job_is_computed_again() {
    let state = tempfile::tempdir().unwrap();
    let live = Live::start(Backend::Embedded).await;
    let job_id = started(&live, state.path(), 1).await;
    live.mid_job(state.path(), &["patch-x", "3", "5000"]);
    let job = live.wait_done(&job_id).await;
    let holds = live.assert_exact("y").await;
    assert_eq!(holds.rows as u64, ROWS);
    assert!(metric(&job, "fragments_replanned") > 0, "{job}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deletes_and_appends_mid_job() {
    let state = tempfile::tempdir().unwrap();
    let live = Live::start(Backend::Embedded).await;
    let job_id = started(&live, state.path(), 1).await;
    live.mid_job(state.path(), &["delete", "x % 5 = 0"]);
    live.writer(&["append", &ROWS.to_string(), "3000"]);
    live.wait_done(&job_id).await;
    let holds = live.assert_exact("y").await;
    assert!(
        holds.ids.iter().all(|id| *id as u64 >= ROWS || id % 5 != 0),
        "no deleted row is back"
    );
    assert_eq!(holds.rows as u64, ROWS - ROWS / 5 + 3000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_columns_of_one_table_fill_at_once() {
    let state = tempfile::tempdir().unwrap();
    let live = Live::start(Backend::Embedded).await;
    live.declare(vec![
        slow_y(state.path()),
        json!({"name": "w", "computed": "x * 2 + 1"}),
    ])
    .await;
    let y = live.submit(fill_y()).await;
    let w = live
        .submit(json!({"column": "w", "commit_granularity": 5, "task_size": 500}))
        .await;
    live.wait_done(&y).await;
    live.wait_done(&w).await;
    live.assert_exact("y").await;
    live.assert_exact("w").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dropping_the_column_mid_job_fails_the_job_naming_it() {
    let state = tempfile::tempdir().unwrap();
    let live = Live::start(Backend::Embedded).await;
    let job_id = started(&live, state.path(), 1).await;
    live.mid_job(state.path(), &["drop-column", "y"]);
    let job = live.wait_end(&job_id).await;
    assert_eq!(job["state"], "FAILED", "{job}");
    let error = job["error"].as_str().unwrap_or("");
    assert!(error.contains("column 'y'"), "{error}");
    let dataset = lance::Dataset::open(&live.uri).await.unwrap();
    assert!(dataset.schema().field("y").is_none());
    assert_eq!(dataset.count_rows(None).await.unwrap() as u64, ROWS);
    live.assert_no_leftovers().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancelled_job_publishes_nothing_after_the_answer() {
    let state = tempfile::tempdir().unwrap();
    let live = Live::start(Backend::Embedded).await;
    let job_id = started(&live, state.path(), 1).await;
    let (status, answer) = live
        .post(&format!("/v1/job/{job_id}/cancel"), json!({}))
        .await;
    assert_eq!(status, 200, "{answer}");
    let at_answer = lance::Dataset::open(&live.uri)
        .await
        .unwrap()
        .manifest()
        .version;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let later = lance::Dataset::open(&live.uri)
        .await
        .unwrap()
        .manifest()
        .version;
    assert_eq!(at_answer, later, "a version was published after the cancel");
    assert_eq!(live.job(&job_id).await["state"], "CANCELLED");
}

/// Each change of the other writer, with `serve` killed once before it
/// and once after, at random points: the job still ends DONE, exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn serve_killed_around_each_change_of_the_table() {
    use rand::{Rng, SeedableRng};
    let seed = crate::crash::env_number("LANCE_BACKFILL_CRASH_SEED", 7);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let changes: [&[&str]; 5] = [
        &["add-column", "z", "x + 100"],
        &["compact", "20000"],
        &["update", "x % 7 = 0", "x", "x + 1000"],
        &["delete", "x % 5 = 0"],
        &["patch-x", "3", "5000"],
    ];
    for change in changes {
        let state = tempfile::tempdir().unwrap();
        let mut live = Live::start(Backend::Embedded).await;
        let job_id = started(&live, state.path(), rng.random_range(1..3)).await;
        live.kill();
        live.writer(change);
        live.restart().await;
        tokio::time::sleep(Duration::from_millis(rng.random_range(100..1500))).await;
        live.kill();
        live.restart().await;
        live.wait_done(&job_id).await;
        live.assert_exact("y").await;
    }
}

/// On DynamoDB and SQS with conflicts, throttling and lost deletes
/// injected: a compaction and an update mid-job, over the table's first
/// 60 fragments (30,000 rows, the only ones checked).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn faults_live_table_on_aws_with_faults() {
    let moto = Moto::faulty().await;
    moto.set_faults(json!({"seed": 11,
        "dynamodb": {"transaction_conflict": 0.05, "throttling": 0.05},
        "sqs": {"lost_delete": 0.1, "empty_receive": 0.1}}))
        .await;
    for change in [
        &["compact", "20000"][..],
        &["update", "x % 7 = 0", "x", "x + 1000"],
    ] {
        let state = tempfile::tempdir().unwrap();
        let live = Live::start(Backend::aws(&moto).await).await;
        live.declare(vec![slow_y(state.path())]).await;
        let mut body = fill_y();
        body["num_frags"] = json!(60);
        body["commit_granularity"] = json!(15);
        let job_id = live.submit(body).await;
        let job = live
            .wait_for(&job_id, |job| metric(job, "commits") >= 1)
            .await;
        assert_eq!(job["state"], "RUNNING", "the job ended too soon: {job}");
        live.mid_job(state.path(), change);
        live.wait_done(&job_id).await;
        let holds = live.holds("y").await;
        let wrong: Vec<_> = holds.wrong.iter().filter(|(id, ..)| *id < 30_000).collect();
        assert!(
            wrong.is_empty(),
            "{} of the job's rows wrong: {:?}",
            wrong.len(),
            &wrong[..wrong.len().min(5)]
        );
        live.assert_no_leftovers().await;
    }
    moto.clear_faults().await;
}

/// The soak: another writer appends, deletes, updates `x` and compacts
/// without pause for `LANCE_BACKFILL_SOAK_SECONDS` (60 by default;
/// scripts/soak runs 600) while a maintained SQL column and a maintained
/// user-function column keep up. At the end every live row holds both
/// values of its current `x`, no deleted row is back, every job has ended
/// and nothing is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn soak_maintained_columns_keep_up_with_a_busy_writer() {
    let seconds = crate::crash::env_number("LANCE_BACKFILL_SOAK_SECONDS", 60);
    let state = tempfile::tempdir().unwrap();
    let live = Live::start(Backend::Embedded).await;
    let udfs = crate::udf::payloads(state.path());
    let mut udf = crate::udf::virtual_column(
        "u",
        &["x"],
        vec![crate::udf::output("u", crate::udf::int64())],
        &udfs["double_plus_one"],
    );
    udf.virtual_column
        .as_mut()
        .unwrap()
        .as_mut()
        .unwrap()
        .auto_backfill = Some(Some(true));
    let (status, body) = live
        .post(
            "/v1/table/items/add_columns",
            json!({"new_columns": [{"name": "y", "computed": "x * 2 + 1"}, udf],
                   "context": {"auto_backfill": "true"}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let report: Value =
        serde_json::from_str(&live.writer(&["soak", &seconds.to_string(), "7", &ROWS.to_string()]))
            .unwrap();
    let deleted: HashSet<i64> = report["deleted"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_i64)
        .collect();
    let until = Instant::now() + Duration::from_secs(300);
    loop {
        let (y, u) = (live.holds_all("y").await, live.holds_all("u").await);
        if y && u {
            break;
        }
        assert!(
            Instant::now() < until,
            "the columns did not catch up\n{}",
            live.serve_log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let holds = live.holds("y").await;
    assert!(holds.ids.is_disjoint(&deleted), "a deleted row is back");
    let jobs = live.all_jobs().await;
    assert!(
        jobs.iter()
            .all(|job| job["state"] == "DONE" || job["state"] == "FAILED")
    );
    live.assert_no_leftovers().await;
    let sum = |name: &str| jobs.iter().map(|job| metric(job, name)).sum::<u64>();
    println!(
        "FIGURES soak {seconds} s: {} rows at the end, operations {}, {} jobs ({} failed), \
         {} rows re-planned, {} commits rebased",
        holds.rows,
        report["operations"],
        jobs.len(),
        jobs.iter().filter(|job| job["state"] == "FAILED").count(),
        sum("rows_replanned"),
        sum("commits_rebased"),
    );
}

impl Live {
    /// Whether every row holds `x * 2 + 1` in `column` (appended ones too).
    async fn holds_all(&self, column: &str) -> bool {
        live_values(&self.uri, column)
            .await
            .iter()
            .zip(live_values(&self.uri, "x").await)
            .all(|((_, value), (_, x))| *value == x.map(|x| x * 2 + 1))
    }

    /// Every job of the table, through the API's listing.
    async fn all_jobs(&self) -> Vec<Value> {
        let mut jobs = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut url = format!("{}/v1/table/items/jobs?limit=100", self.serve.url);
            if let Some(token) = &token {
                url.push_str(&format!("&page_token={token}"));
            }
            let page: Value = self
                .client
                .get(url)
                .header("x-api-key", KEY)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            jobs.extend(page["jobs"].as_array().cloned().unwrap_or_default());
            token = page["page_token"].as_str().map(str::to_string);
            if token.is_none() {
                return jobs;
            }
        }
    }
}
