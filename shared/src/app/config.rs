//! Configuration from the environment, read once at start-up.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context, anyhow};

use crate::adapters::local::pool::PoolConfig;
use crate::app::runtimes::{self, Targets};
use crate::http::auth::Authenticator;
use crate::model::policy::Access;
use crate::ports::udf::runtimes::UdfRuntimes;
use crate::run::engine::EngineConfig;

/// Every variable the service reads (README lists them with their meaning).
pub mod env {
    pub const ROOT: &str = "LANCE_BACKFILL_ROOT";
    pub const STORAGE_OPTIONS: &str = "LANCE_BACKFILL_STORAGE_OPTIONS";
    pub const JOBS_TABLE: &str = "LANCE_BACKFILL_JOBS_TABLE";
    pub const QUEUE_URL: &str = "LANCE_BACKFILL_QUEUE_URL";
    pub const DLQ_URL: &str = "LANCE_BACKFILL_DLQ_URL";
    pub const CLUSTERS: &str = "LANCE_BACKFILL_CLUSTERS";
    pub const MANIFESTS: &str = "LANCE_BACKFILL_MANIFESTS";
    pub const INLINE_PLAN_LIMIT: &str = "LANCE_BACKFILL_INLINE_PLAN_LIMIT";
    pub const MAX_RECEIVE_COUNT: &str = "LANCE_BACKFILL_MAX_RECEIVE_COUNT";
    pub const VISIBILITY_SECONDS: &str = "LANCE_BACKFILL_VISIBILITY_SECONDS";
    pub const LEASE_SECONDS: &str = "LANCE_BACKFILL_LEASE_SECONDS";
    pub const DEADLINE_MARGIN_SECONDS: &str = "LANCE_BACKFILL_DEADLINE_MARGIN_SECONDS";
    pub const API_KEYS: &str = "LANCE_BACKFILL_API_KEYS";
    pub const API_KEY_HASHES: &str = "LANCE_BACKFILL_API_KEY_HASHES";
    pub const JWT_ISSUER: &str = "LANCE_BACKFILL_JWT_ISSUER";
    pub const JWT_AUDIENCE: &str = "LANCE_BACKFILL_JWT_AUDIENCE";
    pub const JWT_SECRET: &str = "LANCE_BACKFILL_JWT_SECRET";
    pub const JWT_PUBLIC_KEY: &str = "LANCE_BACKFILL_JWT_PUBLIC_KEY";
    pub const JWT_JWKS: &str = "LANCE_BACKFILL_JWT_JWKS";
    pub const AUTH: &str = "LANCE_BACKFILL_AUTH";
    pub const POLICY: &str = "LANCE_BACKFILL_POLICY";
    pub const UDF_RUNTIMES: &str = "LANCE_BACKFILL_UDF_RUNTIMES";
    pub const UDF_PYTHON: &str = "LANCE_BACKFILL_UDF_PYTHON";
    pub const UDF_WORKERS: &str = "LANCE_BACKFILL_UDF_WORKERS";
    pub const UDF_TIMEOUT_SECONDS: &str = "LANCE_BACKFILL_UDF_TIMEOUT_SECONDS";
    pub const UDF_HTTP_SECRET: &str = "LANCE_BACKFILL_UDF_HTTP_SECRET";
    pub const TOKEN_SECRET: &str = "LANCE_BACKFILL_TOKEN_SECRET";
    pub const EVENT_SECRET: &str = "LANCE_BACKFILL_EVENT_SECRET";
    pub const LOG_FORMAT: &str = "LANCE_BACKFILL_LOG_FORMAT";
    pub const EVENT_BUS: &str = "LANCE_BACKFILL_EVENT_BUS";
    pub const METRICS_STACK: &str = "LANCE_BACKFILL_METRICS_STACK";
    pub const MAINTAIN_QUEUE_URL: &str = "LANCE_BACKFILL_MAINTAIN_QUEUE_URL";
}

fn var(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

fn number<T: std::str::FromStr>(name: &str, default: T) -> anyhow::Result<T> {
    match var(name) {
        Some(text) => text
            .parse()
            .map_err(|_| anyhow!("{name}={text} is not a valid number")),
        None => Ok(default),
    }
}

/// Storage options for the object store (`aws_endpoint`, `allow_http`, ...),
/// given as a JSON object or `key=value` pairs separated by commas.
pub fn storage_options() -> anyhow::Result<HashMap<String, String>> {
    let Some(text) = var(env::STORAGE_OPTIONS) else {
        return Ok(HashMap::new());
    };
    if text.starts_with('{') {
        let value: HashMap<String, serde_json::Value> = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a JSON object", env::STORAGE_OPTIONS))?;
        return Ok(value
            .into_iter()
            .map(|(k, v)| {
                (
                    k,
                    v.as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| v.to_string()),
                )
            })
            .collect());
    }
    text.split(',')
        .map(|pair| {
            pair.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .ok_or_else(|| anyhow!("{}: '{pair}' is not key=value", env::STORAGE_OPTIONS))
        })
        .collect()
}

pub fn root() -> anyhow::Result<String> {
    var(env::ROOT).ok_or_else(|| {
        anyhow!(
            "{} must name the namespace root (a path or s3://bucket/prefix)",
            env::ROOT
        )
    })
}

/// Named worker pools: `name=queue-url` pairs separated by commas.
pub fn clusters() -> anyhow::Result<Vec<(String, String)>> {
    let Some(text) = var(env::CLUSTERS) else {
        return Ok(Vec::new());
    };
    text.split(',')
        .map(|pair| {
            pair.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .ok_or_else(|| anyhow!("{}: '{pair}' is not name=queue-url", env::CLUSTERS))
        })
        .collect()
}

/// Named runtime environments a job may ask for.
pub fn manifests() -> Vec<String> {
    var(env::MANIFESTS)
        .map(|text| {
            text.split(',')
                .map(|m| m.trim().to_string())
                .filter(|m| !m.is_empty())
                .collect()
        })
        .unwrap_or_default()
}

pub fn inline_plan_limit() -> anyhow::Result<u64> {
    number(
        env::INLINE_PLAN_LIMIT,
        crate::submit::DEFAULT_INLINE_PLAN_LIMIT,
    )
}

/// How submissions are planned and which manifests they may name.
pub fn submit_settings() -> anyhow::Result<crate::submit::SubmitSettings> {
    Ok(crate::submit::SubmitSettings {
        inline_plan_limit: inline_plan_limit()?,
        manifests: manifests(),
    })
}

/// The queue's visibility timeout when nothing sets it: six times the
/// worker function's 15-minute timeout, as AWS advises for event sources.
const DEFAULT_VISIBILITY_SECONDS: u64 = 6 * 15 * 60;

/// The task queue's visibility timeout (template.yaml sets it and passes it on).
pub fn visibility() -> anyhow::Result<Duration> {
    Ok(Duration::from_secs(number(
        env::VISIBILITY_SECONDS,
        DEFAULT_VISIBILITY_SECONDS,
    )?))
}

pub fn engine() -> anyhow::Result<EngineConfig> {
    let mut config = EngineConfig::default();
    config.max_receive_count = number(env::MAX_RECEIVE_COUNT, config.max_receive_count)?;
    config.lease_ttl = Duration::from_secs(number(env::LEASE_SECONDS, config.lease_ttl.as_secs())?);
    config.deadline_margin = Duration::from_secs(number(
        env::DEADLINE_MARGIN_SECONDS,
        config.deadline_margin.as_secs(),
    )?);
    Ok(config)
}

/// API keys and JWT settings. `LANCE_BACKFILL_AUTH=none` opens the API
/// (local use only).
pub fn authenticator() -> anyhow::Result<Authenticator> {
    if var(env::AUTH).as_deref() == Some("none") {
        return Ok(Authenticator::open());
    }
    let mut auth = Authenticator::default().with_access(access()?);
    for key in var(env::API_KEYS).iter().flat_map(|t| t.split(',')) {
        let key = key.trim();
        if !key.is_empty() {
            auth = auth.with_plain_key(key);
        }
    }
    for entry in var(env::API_KEY_HASHES).iter().flat_map(|t| t.split(',')) {
        let entry = entry.trim();
        if !entry.is_empty() {
            auth = auth.with_key_digest(entry).map_err(|e| anyhow!(e))?;
        }
    }
    if let (Some(issuer), Some(audience)) = (var(env::JWT_ISSUER), var(env::JWT_AUDIENCE)) {
        auth = auth
            .with_jwt(
                &issuer,
                &audience,
                var(env::JWT_SECRET).as_deref(),
                var(env::JWT_PUBLIC_KEY).as_deref(),
                var(env::JWT_JWKS).as_deref(),
            )
            .map_err(|e| anyhow!(e))?;
    }
    Ok(auth)
}

/// The authorization policy (`LANCE_BACKFILL_POLICY`: JSON, or `@path` of a
/// JSON file); without one every authenticated caller may do everything.
pub fn access() -> anyhow::Result<Access> {
    match var(env::POLICY) {
        Some(spec) => Access::parse(&spec).map_err(|e| anyhow!("{}: {e}", env::POLICY)),
        None => Ok(Access::Open),
    }
}

/// Where user functions run: `LANCE_BACKFILL_UDF_RUNTIMES` rules, the rest
/// on the local pool of `LANCE_BACKFILL_UDF_PYTHON` processes (`workers`
/// of them if given, else `LANCE_BACKFILL_UDF_WORKERS`), which may not see
/// the directories `hidden` names.
pub fn udf_runtimes(
    aws: Option<&aws_config::SdkConfig>,
    workers: Option<usize>,
    hidden: Vec<std::path::PathBuf>,
) -> anyhow::Result<UdfRuntimes> {
    let defaults = PoolConfig::default();
    let size = match workers {
        Some(workers) => workers,
        None => number(env::UDF_WORKERS, defaults.size)?,
    };
    let pool = PoolConfig {
        python: var(env::UDF_PYTHON).unwrap_or(defaults.python),
        size: size.max(1),
        call_timeout: Duration::from_secs(number(
            env::UDF_TIMEOUT_SECONDS,
            defaults.call_timeout.as_secs(),
        )?),
        hidden,
    };
    runtimes::parse(
        &var(env::UDF_RUNTIMES).unwrap_or_default(),
        &Targets {
            pool,
            aws,
            http_secret: var(env::UDF_HTTP_SECRET).as_deref(),
        },
    )
    .with_context(|| format!("{} is not valid", env::UDF_RUNTIMES))
}

/// Where job events go on AWS: the EventBridge bus `LANCE_BACKFILL_EVENT_BUS`
/// names (none when unset or empty), and CloudWatch metrics (EMF lines in
/// the log) when `LANCE_BACKFILL_METRICS_STACK` names the stack.
pub fn event_publisher(sdk: &aws_config::SdkConfig) -> crate::ports::events::Publisher {
    let mut publisher = crate::ports::events::Publisher::default();
    if let Some(stack) = var(env::METRICS_STACK).filter(|s| !s.trim().is_empty()) {
        publisher = publisher.with(std::sync::Arc::new(crate::adapters::aws::MetricsSink::new(
            stack.trim(),
        )));
    }
    match var(env::EVENT_BUS).filter(|bus| !bus.trim().is_empty()) {
        Some(bus) => publisher.with(std::sync::Arc::new(
            crate::adapters::aws::EventBridgeSink::new(
                aws_sdk_eventbridge::Client::new(sdk),
                bus.trim(),
            ),
        )),
        None => publisher,
    }
}

/// AWS SDK configuration; `AWS_ENDPOINT_URL` points it at an emulator.
pub async fn aws() -> aws_config::SdkConfig {
    aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await
}
