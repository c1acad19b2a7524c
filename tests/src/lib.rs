//! Test harness: real components only. Lance tables in temp dirs (or in
//! moto's S3), DynamoDB and SQS in the moto server that `scripts/test`
//! starts on 127.0.0.1 and names in `MOTO_ENDPOINT`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use lance::Dataset;
use lance_backfill::adapters::aws::DynamoJobStore;
use lance_backfill::adapters::aws::SqsQueue;
use lance_backfill::adapters::aws::dynamodb::ShardPolicy;
use lance_backfill::app::bootstrap::{self, Components};
use lance_backfill::app::runner::{self, RunnerConfig};
use lance_backfill::http::auth::Authenticator;
use lance_backfill::http::{Service, server};
use lance_backfill::model::job::{Job, JobState};
use lance_backfill::model::table::Catalog;
use lance_backfill::ports::queue::{QueueSet, TaskQueue};
use lance_backfill::ports::store::JobStore;
use lance_backfill::run::engine::EngineConfig;
use lance_backfill::submit::SubmitSettings;
use lance_namespace_reqwest_client::apis::configuration::{ApiKey, Configuration};
use tokio::sync::watch;

pub use lance_backfill_sample::{verify, write_sample_table, write_sample_table_with};

pub const API_KEY: &str = "test-key-1";

/// The moto server of this test run.
#[derive(Clone)]
pub struct Moto {
    pub endpoint: String,
    pub sdk: aws_config::SdkConfig,
}

impl Moto {
    /// Panics (the test fails) when the test command did not start moto.
    pub async fn connect() -> Self {
        let endpoint = std::env::var("MOTO_ENDPOINT")
            .expect("MOTO_ENDPOINT is not set: run the tests with scripts/test, which starts moto");
        Self::at(endpoint).await
    }

    /// The fault-injecting moto of this run (`MOTO_FAULTS_ENDPOINT`), its
    /// faults cleared. Tests using it run one at a time (`faults::`).
    pub async fn faulty() -> Self {
        let endpoint = std::env::var("MOTO_FAULTS_ENDPOINT").expect(
            "MOTO_FAULTS_ENDPOINT is not set: run the tests with scripts/test, which starts it",
        );
        let moto = Self::at(endpoint).await;
        moto.clear_faults().await;
        moto
    }

    /// Replaces the fault configuration (see scripts/moto_server.py).
    pub async fn set_faults(&self, config: serde_json::Value) {
        reqwest::Client::new()
            .post(format!("{}/_faults", self.endpoint))
            .json(&config)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .expect("configure faults");
    }

    pub async fn clear_faults(&self) {
        reqwest::Client::new()
            .post(format!("{}/_faults/reset", self.endpoint))
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .expect("reset faults");
    }

    /// Faults injected so far, by kind.
    pub async fn faults_injected(&self) -> serde_json::Value {
        self.fault_state().await["injected"].clone()
    }

    /// What the per-key limits counted (`POST /_faults` with `key_limits`):
    /// per table, units used and calls throttled, and per key the same
    /// with the busiest second's units.
    pub async fn capacity(&self) -> serde_json::Value {
        self.fault_state().await["capacity"].clone()
    }

    /// `GET /_faults`: the configuration and what it counted.
    async fn fault_state(&self) -> serde_json::Value {
        reqwest::Client::new()
            .get(format!("{}/_faults", self.endpoint))
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .expect("read faults")
            .json()
            .await
            .expect("faults json")
    }

    /// Starts counting calls from zero.
    pub async fn reset_calls(&self) {
        reqwest::Client::new()
            .post(format!("{}/_stats/reset", self.endpoint))
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .expect("reset stats");
    }

    /// Calls per operation since the last reset (`dynamodb.TransactWriteItems`, ...).
    pub async fn calls(&self) -> serde_json::Value {
        let stats: serde_json::Value = reqwest::Client::new()
            .get(format!("{}/_stats", self.endpoint))
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .expect("read stats")
            .json()
            .await
            .expect("stats json");
        stats["calls"].clone()
    }

    async fn at(endpoint: String) -> Self {
        let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .endpoint_url(&endpoint)
            .region(aws_config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_dynamodb::config::Credentials::new(
                "testing", "testing", None, None, "moto",
            ))
            .load()
            .await;
        Self { endpoint, sdk }
    }

    pub fn dynamodb(&self) -> aws_sdk_dynamodb::Client {
        aws_sdk_dynamodb::Client::new(&self.sdk)
    }

    pub fn sqs(&self) -> aws_sdk_sqs::Client {
        aws_sdk_sqs::Client::new(&self.sdk)
    }

    /// A new, empty jobs table.
    pub async fn fresh_store(&self) -> (DynamoJobStore, String) {
        let name = unique("jobs");
        let store = DynamoJobStore::new(self.dynamodb(), name.clone());
        store.ensure_table().await.expect("create table in moto");
        (store, name)
    }

    /// A new queue with a DLQ.
    pub async fn fresh_queue(&self, max_receive_count: u32, visibility: Duration) -> SqsQueue {
        SqsQueue::create_with_dlq(self.sqs(), &unique("tasks"), max_receive_count, visibility)
            .await
            .expect("create queue in moto")
    }

    /// A new bucket; returns the storage options that reach it.
    pub async fn fresh_bucket(&self) -> (String, HashMap<String, String>) {
        let bucket = unique("bucket");
        reqwest::Client::new()
            .put(format!("{}/{bucket}", self.endpoint))
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .expect("create bucket in moto");
        let options = HashMap::from([
            ("aws_endpoint".to_string(), self.endpoint.clone()),
            ("allow_http".to_string(), "true".to_string()),
            ("aws_region".to_string(), "us-east-1".to_string()),
            ("aws_access_key_id".to_string(), "testing".to_string()),
            ("aws_secret_access_key".to_string(), "testing".to_string()),
        ]);
        (bucket, options)
    }
}

/// Short leases and waits, so tests that stop workers do not wait a minute.
pub fn fast_engine() -> EngineConfig {
    EngineConfig {
        lease_ttl: Duration::from_secs(3),
        busy_wait: Duration::from_secs(3),
        busy_delay: Duration::from_millis(200),
        paused_delay: Duration::from_millis(300),
        ..EngineConfig::default()
    }
}

/// The seed of the fuzz suites: `LANCE_BACKFILL_FUZZ_SEED`, 7 by default,
/// so a run is repeatable and a failure can be replayed.
pub fn fuzz_seed() -> u64 {
    std::env::var("LANCE_BACKFILL_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(7)
}

/// A proptest runner of `cases` cases drawn from [`fuzz_seed`].
pub fn seeded_runner(cases: u32) -> proptest::test_runner::TestRunner {
    use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
    let mut seed = [0u8; 32];
    seed[..8].copy_from_slice(&fuzz_seed().to_le_bytes());
    TestRunner::new_with_rng(
        Config {
            cases,
            failure_persistence: None,
            ..Config::default()
        },
        TestRng::from_seed(RngAlgorithm::ChaCha, &seed),
    )
}

pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// The service assembled for a test: a namespace root, a store, a queue,
/// the HTTP API on a random port, and (when started) pollers.
pub struct Stack {
    pub dir: Option<tempfile::TempDir>,
    pub root: String,
    pub components: Components,
    pub queue: Arc<dyn TaskQueue>,
    pub sqs: Option<SqsQueue>,
    /// The embedded queue, when the stack uses it.
    pub sqlite: Option<lance_backfill::adapters::sqlite::SqliteQueue>,
    pub jobs_table: Option<String>,
    pub service: Arc<Service>,
    pub address: SocketAddr,
    /// One HTTP client for every call, as a real client keeps its session
    /// (building one costs milliseconds). No connection is kept idle: the
    /// service closes one after refusing a body unread, and a request sent
    /// on it meanwhile would fail.
    http: reqwest::Client,
    stop: watch::Sender<bool>,
    server_stop: watch::Sender<bool>,
    pollers: Vec<tokio::task::JoinHandle<()>>,
}

pub struct StackOptions {
    pub settings: SubmitSettings,
    pub max_receive_count: u32,
    pub visibility: Duration,
    pub storage_options: HashMap<String, String>,
    pub root: Option<String>,
    pub auth: Authenticator,
    /// Python processes of the local pool (default: as configured).
    pub udf_workers: Option<usize>,
    /// Where job events go (none by default).
    pub publisher: lance_backfill::ports::events::Publisher,
    /// How many shards the DynamoDB store gives a job ([`Stack::aws`]).
    pub shards: ShardPolicy,
}

impl Default for StackOptions {
    fn default() -> Self {
        Self {
            settings: SubmitSettings {
                inline_plan_limit: 1000,
                manifests: vec!["py311".to_string()],
            },
            max_receive_count: 4,
            visibility: Duration::from_secs(30),
            storage_options: HashMap::new(),
            root: None,
            auth: Authenticator::default().with_plain_key(API_KEY),
            udf_workers: None,
            publisher: Default::default(),
            shards: ShardPolicy::default(),
        }
    }
}

impl Stack {
    /// DynamoDB and SQS in moto, tables on local disk (or `options.root`).
    pub async fn aws(moto: &Moto, options: StackOptions) -> Self {
        let (store, table) = moto.fresh_store().await;
        let store = store.with_shard_policy(options.shards);
        let queue = moto
            .fresh_queue(options.max_receive_count, options.visibility)
            .await;
        let gpu = moto
            .fresh_queue(options.max_receive_count, options.visibility)
            .await;
        let (dir, root) = root_for(&options);
        let catalog = Arc::new(
            Catalog::open(&root, options.storage_options.clone())
                .await
                .expect("catalog"),
        );
        let components = Components {
            catalog,
            store: Arc::new(store),
            queues: QueueSet::new(Arc::new(queue.clone())).with_cluster("gpu", Arc::new(gpu)),
            udf: Some(Arc::new(
                lance_backfill::app::config::udf_runtimes(None, options.udf_workers, Vec::new())
                    .expect("UDF runtimes"),
            )),
            publisher: Default::default(),
        };
        let mut stack = Self::start(dir, root, components, Arc::new(queue.clone()), options).await;
        stack.sqs = Some(queue);
        stack.jobs_table = Some(table);
        stack
    }

    /// The embedded SQLite store and queue.
    pub async fn embedded(options: StackOptions) -> Self {
        let (dir, root) = root_for(&options);
        let state = bootstrap::default_state_path(&root).expect("local root");
        let (mut components, queue) = bootstrap::embedded(&root, &state, options.max_receive_count)
            .await
            .expect("embedded components");
        if let Some(workers) = options.udf_workers {
            components.udf = Some(Arc::new(
                lance_backfill::app::config::udf_runtimes(
                    None,
                    Some(workers),
                    lance_backfill::app::bootstrap::hidden_from_functions(&root, Some(&state)),
                )
                .expect("UDF runtimes"),
            ));
        }
        let mut stack = Self::start(dir, root, components, Arc::new(queue.clone()), options).await;
        stack.sqlite = Some(queue);
        stack
    }

    async fn start(
        dir: Option<tempfile::TempDir>,
        root: String,
        components: Components,
        queue: Arc<dyn TaskQueue>,
        options: StackOptions,
    ) -> Self {
        lance_backfill::app::telemetry::init();
        let mut components = components;
        components.publisher = options.publisher.clone();
        let service = Arc::new(components.service(options.auth, options.settings));
        let (stop, _) = watch::channel(false);
        // The server stops with the stack, not with its workers.
        let (server_stop, mut server_stopped) = watch::channel(false);
        let (address, _server) = server::serve(
            service.clone(),
            "127.0.0.1:0".parse().unwrap(),
            async move {
                let _ = server_stopped.changed().await;
            },
        )
        .await
        .expect("serve");
        Self {
            dir,
            root,
            components,
            queue,
            sqs: None,
            sqlite: None,
            jobs_table: None,
            service,
            address,
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .build()
                .expect("HTTP client"),
            stop,
            server_stop,
            pollers: Vec::new(),
        }
    }

    pub fn store(&self) -> &Arc<dyn JobStore> {
        &self.components.store
    }

    pub fn table_uri(&self, name: &str) -> String {
        format!("{}/{name}.lance", self.root)
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// The official client, with the test API key.
    pub fn client(&self) -> Configuration {
        Configuration {
            base_path: self.base_url(),
            api_key: Some(ApiKey {
                prefix: None,
                key: API_KEY.to_string(),
            }),
            ..Configuration::default()
        }
    }

    /// Takes every message waiting in the queue (hidden for ten minutes).
    pub async fn drain(&self) -> Vec<String> {
        let mut bodies = Vec::new();
        loop {
            let batch = self
                .queue
                .receive(10, Duration::from_secs(600), Duration::from_millis(300))
                .await
                .expect("receive");
            if batch.is_empty() {
                return bodies;
            }
            bodies.extend(batch.into_iter().map(|m| m.body));
        }
    }

    /// Starts pollers driving the worker from the queue.
    pub fn start_worker(
        &mut self,
        engine: EngineConfig,
        runner: RunnerConfig,
        visibility: Duration,
    ) {
        let worker = Arc::new(self.components.worker(engine, visibility));
        let handle = tokio::spawn(runner::run(
            worker,
            self.queue.clone(),
            visibility,
            runner,
            self.stop.subscribe(),
        ));
        self.pollers.push(handle);
    }

    pub async fn stop_workers(&mut self) {
        let _ = self.stop.send(true);
        for poller in self.pollers.drain(..) {
            let _ = poller.await;
        }
        // New pollers get a fresh channel; the server keeps serving.
        self.stop = watch::channel(false).0;
    }

    /// Raw HTTP: (status, JSON body).
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> (u16, serde_json::Value) {
        let mut request = self.http.request(
            method.parse().unwrap(),
            format!("{}{path}", self.base_url()),
        );
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        let response = request.send().await.expect("http call");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
        )
    }

    pub async fn post(&self, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        self.call(
            "POST",
            path,
            &[("x-api-key", API_KEY)],
            Some(&body.to_string()),
        )
        .await
    }

    pub async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        self.call("GET", path, &[("x-api-key", API_KEY)], None)
            .await
    }

    /// Declares computed columns `(name, sql)` through the API.
    pub async fn declare(&self, table: &str, columns: &[(&str, &str)]) {
        let entries: Vec<serde_json::Value> = columns
            .iter()
            .map(|(name, sql)| serde_json::json!({"name": name, "computed": sql}))
            .collect();
        let (status, body) = self
            .post(
                &format!("/v1/table/{table}/add_columns"),
                serde_json::json!({ "new_columns": entries }),
            )
            .await;
        assert_eq!(status, 200, "add_columns: {body}");
    }

    pub async fn submit(&self, table: &str, body: serde_json::Value) -> String {
        let (status, response) = self
            .post(&format!("/v1/table/{table}/backfill_column"), body)
            .await;
        assert_eq!(status, 202, "backfill_column: {response}");
        response["job_id"].as_str().expect("job_id").to_string()
    }

    /// Waits for a terminal state.
    pub async fn wait(&self, job_id: &str, timeout: Duration) -> Job {
        let until = Instant::now() + timeout;
        loop {
            let job = self
                .store()
                .get_job(job_id)
                .await
                .expect("get job")
                .expect("job exists");
            if job.state.is_terminal() {
                return job;
            }
            if Instant::now() >= until {
                panic!(
                    "job {job_id} still {:?} after {timeout:?}: {:?}",
                    job.state,
                    self.events(job_id).await
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn wait_done(&self, job_id: &str, timeout: Duration) -> Job {
        let job = self.wait(job_id, timeout).await;
        if job.state != JobState::Done {
            panic!(
                "job ended {:?}: {:?} {:?}",
                job.state,
                job.error,
                self.events(job_id).await
            );
        }
        job
    }

    /// The job's latest events' messages (oldest first).
    pub async fn events(&self, job_id: &str) -> Vec<String> {
        self.store()
            .list_events(job_id, 100)
            .await
            .expect("list events")
            .into_iter()
            .map(|e| e.message)
            .collect()
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        let _ = self.server_stop.send(true);
    }
}

fn root_for(options: &StackOptions) -> (Option<tempfile::TempDir>, String) {
    match &options.root {
        Some(root) => (None, root.clone()),
        None => {
            let dir = tempfile::tempdir().expect("tempdir");
            let root = dir.path().to_string_lossy().into_owned();
            (Some(dir), root)
        }
    }
}

/// Reads one int64 column of a table in row order with a fresh reader.
pub async fn read_i64(
    uri: &str,
    column: &str,
    storage: &HashMap<String, String>,
) -> anyhow::Result<Vec<Option<i64>>> {
    use arrow_array::Array;
    use futures::TryStreamExt;
    let dataset = lance::dataset::builder::DatasetBuilder::from_uri(uri)
        .with_storage_options(storage.clone())
        .load()
        .await?;
    let mut scanner = dataset.scan();
    scanner.project(&[column])?;
    let batches: Vec<arrow_array::RecordBatch> =
        scanner.try_into_stream().await?.try_collect().await?;
    let mut out = Vec::new();
    for batch in batches {
        let array = batch
            .column(0)
            .as_any()
            .downcast_ref::<arrow_array::Int64Array>()
            .context("not int64")?;
        for i in 0..array.len() {
            out.push(array.is_valid(i).then(|| array.value(i)));
        }
    }
    Ok(out)
}

/// POSTs `body` to a running server as the holder of `key`: the status and
/// the answer's JSON (null when it is not JSON).
pub async fn post_as(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    body: &serde_json::Value,
) -> (u16, serde_json::Value) {
    let response = client
        .post(url)
        .header("x-api-key", key)
        .json(body)
        .send()
        .await
        .expect("the server answers");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or_default())
}

pub async fn latest_version(uri: &str) -> u64 {
    Dataset::open(uri).await.expect("open").manifest().version
}

/// Polls `f` until it returns true.
pub async fn eventually<F, Fut>(timeout: Duration, mut f: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = Instant::now() + timeout;
    while Instant::now() < until {
        if f().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("condition not met within {timeout:?}")
}

/// How often each fragment's `column` file changed across the versions
/// after `from`: exactly once per fragment for a job that replaced each
/// fragment once.
pub async fn replacements_per_fragment(
    uri: &str,
    storage: &HashMap<String, String>,
    column: &str,
    from: u64,
) -> HashMap<u64, u32> {
    let latest = lance::dataset::builder::DatasetBuilder::from_uri(uri)
        .with_storage_options(storage.clone())
        .load()
        .await
        .expect("open the table");
    let field = latest.schema().field(column).expect("the column").id;
    let mut previous: HashMap<u64, Option<String>> = HashMap::new();
    let mut changes = HashMap::new();
    for version in from..=latest.manifest().version {
        let dataset = latest.checkout_version(version).await.expect("a version");
        for fragment in dataset.get_fragments() {
            let id = fragment.id() as u64;
            let file = fragment
                .metadata()
                .files
                .iter()
                .find(|f| f.fields.contains(&field))
                .map(|f| f.path.clone());
            if version > from && previous.get(&id) != Some(&file) {
                *changes.entry(id).or_insert(0) += 1;
            }
            previous.insert(id, file);
        }
    }
    changes
}

/// Writes the sample table (`id`, `x`, `s`) to any object store.
pub async fn write_table(
    uri: &str,
    rows: u64,
    fragments: u64,
    storage: &HashMap<String, String>,
) -> anyhow::Result<()> {
    lance_backfill_sample::write_sample_table_with(uri, rows, fragments, storage.clone()).await?;
    Ok(())
}

/// Appends rows `from..from + count` (x = id, s = id as text); the
/// table's other columns (computed ones) are written null.
pub async fn append_rows(uri: &str, from: i64, count: i64) {
    append_rows_with(uri, from, count, &HashMap::new()).await
}

/// [`append_rows`] on an object store reached with `storage` options.
pub async fn append_rows_with(uri: &str, from: i64, count: i64, storage: &HashMap<String, String>) {
    let schema = Arc::new(arrow_schema::Schema::new(vec![
        arrow_schema::Field::new("id", arrow_schema::DataType::Int64, false),
        arrow_schema::Field::new("x", arrow_schema::DataType::Int64, true),
        arrow_schema::Field::new("s", arrow_schema::DataType::Utf8, true),
    ]));
    let ids: Vec<i64> = (from..from + count).collect();
    let batch = arrow_array::RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(arrow_array::Int64Array::from(ids.clone())),
            Arc::new(arrow_array::Int64Array::from(ids.clone())),
            Arc::new(arrow_array::StringArray::from(
                ids.iter().map(|i| i.to_string()).collect::<Vec<_>>(),
            )),
        ],
    )
    .unwrap();
    let mut dataset = lance::dataset::builder::DatasetBuilder::from_uri(uri)
        .with_storage_options(storage.clone())
        .load()
        .await
        .unwrap();
    // The table has computed columns by now: appends write them as null.
    let full = Arc::new(arrow_schema::Schema::from(dataset.schema()));
    let columns: Vec<arrow_array::ArrayRef> = full
        .fields()
        .iter()
        .map(|f| match batch.column_by_name(f.name()) {
            Some(c) => c.clone(),
            None => arrow_array::new_null_array(f.data_type(), count as usize),
        })
        .collect();
    let batch = arrow_array::RecordBatch::try_new(full.clone(), columns).unwrap();
    let params = lance::dataset::WriteParams {
        mode: lance::dataset::WriteMode::Append,
        ..Default::default()
    };
    dataset
        .append(
            arrow_array::RecordBatchIterator::new(vec![Ok(batch)], full),
            Some(params),
        )
        .await
        .unwrap();
    let _ = schema;
}

/// Asserts `got` equals `expected`, numbers within a relative 1e-12 (a
/// float printed to JSON and read back may move by its last bit).
pub fn assert_json_close(got: &serde_json::Value, expected: &serde_json::Value) {
    use serde_json::Value;
    match (got, expected) {
        (Value::Number(a), Value::Number(b)) => {
            let (a, b) = (
                a.as_f64().unwrap_or(f64::NAN),
                b.as_f64().unwrap_or(f64::NAN),
            );
            assert!(
                (a - b).abs() <= 1e-12 * a.abs().max(b.abs()),
                "{a} is not {b}"
            );
        }
        (Value::Array(a), Value::Array(b)) => {
            assert_eq!(a.len(), b.len(), "{got} is not {expected}");
            a.iter().zip(b).for_each(|(a, b)| assert_json_close(a, b));
        }
        (Value::Object(a), Value::Object(b)) => {
            let keys = |o: &serde_json::Map<String, Value>| o.keys().cloned().collect::<Vec<_>>();
            assert_eq!(keys(a), keys(b), "{got} is not {expected}");
            a.iter().for_each(|(key, a)| assert_json_close(a, &b[key]));
        }
        _ => assert_eq!(got, expected),
    }
}

/// A PENDING job of `x + 1` into `column` of the table `table_id`, planned
/// over `fragments` fragments of `rows` rows in all with every default,
/// made here rather than by a submission (its spec as a stored job's is
/// read, every optional field left out): for the store's own tests.
pub fn pending_job(table_id: Vec<String>, column: &str, fragments: u64, rows: u64) -> Job {
    use lance_backfill::model::job::{Counter, JobSpec, Metrics, Params};
    use lance_namespace_reqwest_client::models::AlterTableBackfillColumnsRequest;
    let request = AlterTableBackfillColumnsRequest::new(column.into());
    let params = Params::effective(&request, fragments).expect("default parameters");
    let name = table_id.last().cloned().unwrap_or_default();
    let spec: JobSpec = serde_json::from_value(serde_json::json!({
        "table_id": table_id, "table_uri": format!("/tmp/{name}.lance"), "branch": null,
        "column": column, "expression": "x + 1", "where": format!("{column} IS NULL"),
        "read_version": 3, "params": params, "submitted_by": "tester",
        "plan": {"fragments": fragments, "tasks": fragments, "rows": rows, "fanned_out": false},
    }))
    .expect("a job spec");
    let mut metrics = Metrics::default();
    metrics.set(Counter::FragmentsTotal, fragments as i64);
    metrics.set(Counter::RowsTotal, rows as i64);
    Job::pending(spec, metrics)
}
