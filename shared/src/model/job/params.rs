//! The parameters of a backfill: their defaults, their bounds, and the
//! effective value of each for a request.

use lance_namespace_reqwest_client::models::AlterTableBackfillColumnsRequest;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::model::error::Error;

pub const DEFAULT_CONCURRENCY: u32 = 8;
pub const DEFAULT_INTRA_APPLIER_CONCURRENCY: u32 = 1;
pub const DEFAULT_CHECKPOINT_SIZE: u32 = 10_240;
pub const DEFAULT_FLUSH_INTERVAL_SECONDS: f64 = 10.0;
/// Batches computed at once inside one task; more only costs memory.
pub const MAX_INTRA_APPLIER_CONCURRENCY: u32 = 256;
/// Concurrency slots are leases in the job store; more than this many is
/// no longer a limit anyone means.
pub const MAX_CONCURRENCY: u32 = 10_000;
/// Rows computed and checkpointed at once: a batch is held in memory, so
/// a million rows is the most a request may ask for.
pub const MAX_CHECKPOINT_SIZE: u32 = 1 << 20;
/// Buffered batches are made durable at least this often (an hour): a
/// longer interval is a task that may lose an hour of work.
pub const MAX_FLUSH_INTERVAL_SECONDS: f64 = 3600.0;
/// Fragments per commit; a commit of more would not fit one Lance manifest
/// write any better.
pub const MAX_COMMIT_GRANULARITY: u32 = 100_000;
/// Tasks a job may plan: each is a queue message and a record in the job store.
pub const MAX_TASKS_PER_JOB: u64 = 100_000;
/// Aim for about this many commits in a big table's job.
const COMMITS_PER_JOB: u64 = 20;
/// ... but never fewer fragments than this per commit.
const MIN_DEFAULT_COMMIT_GRANULARITY: u64 = 64;

/// The effective value of every request parameter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Params {
    pub concurrency: u32,
    pub intra_applier_concurrency: u32,
    /// Rows per task; `None` means one task per fragment.
    pub task_size: Option<u64>,
    pub num_frags: Option<u64>,
    pub checkpoint_size: u32,
    pub min_checkpoint_size: u32,
    pub max_checkpoint_size: u32,
    /// Adaptive batch sizing is on only when the request set a bound.
    pub adaptive_checkpoint: bool,
    /// How often computed values are checkpointed at least.
    #[serde(
        rename = "batch_checkpoint_flush_interval_seconds",
        with = "flush_seconds"
    )]
    pub flush_interval: Duration,
    pub commit_granularity: u32,
    pub cluster: Option<String>,
    pub manifest: Option<String>,
}

/// The flush interval as the request and the job record write it: seconds,
/// bounded again when read (jobs recorded by earlier versions).
mod flush_seconds {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    use super::MAX_FLUSH_INTERVAL_SECONDS;

    pub fn serialize<S: Serializer>(interval: &Duration, out: S) -> Result<S::Ok, S::Error> {
        out.serialize_f64(interval.as_secs_f64())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(input: D) -> Result<Duration, D::Error> {
        let seconds = f64::deserialize(input)?;
        let seconds = match seconds.is_finite() {
            true => seconds.clamp(0.0, MAX_FLUSH_INTERVAL_SECONDS),
            false => MAX_FLUSH_INTERVAL_SECONDS,
        };
        Ok(Duration::from_secs_f64(seconds))
    }
}

/// `max(64, ceil(fragments / 20))`: about twenty commits for a big table.
pub fn default_commit_granularity(fragments: u64) -> u32 {
    fragments
        .div_ceil(COMMITS_PER_JOB)
        .max(MIN_DEFAULT_COMMIT_GRANULARITY)
        .min(u32::MAX as u64) as u32
}

fn at_least_one(value: Option<i32>, field: &str) -> Result<Option<u32>, Error> {
    match value {
        None => Ok(None),
        Some(v) if v >= 1 => Ok(Some(v as u32)),
        Some(v) => Err(Error::invalid_input(format!(
            "field '{field}' must be at least 1, got {v}"
        ))),
    }
}

fn at_most(value: u32, max: u32, field: &str) -> Result<u32, Error> {
    if value > max {
        return Err(Error::invalid_input(format!(
            "field '{field}' must be at most {max}, got {value}"
        )));
    }
    Ok(value)
}

fn named(value: &Option<Option<String>>, field: &str) -> Result<Option<String>, Error> {
    match value.clone().flatten() {
        Some(name) if name.trim().is_empty() => Err(Error::invalid_input(format!(
            "field '{field}' must not be empty"
        ))),
        other => Ok(other),
    }
}

/// `(min, max, adaptive)`: adaptive sizing is on only when a bound was set.
fn checkpoint_bounds(
    request: &AlterTableBackfillColumnsRequest,
    checkpoint_size: u32,
) -> Result<(u32, u32, bool), Error> {
    let min = rows(request.min_checkpoint_size.flatten(), "min_checkpoint_size")?;
    let max = rows(request.max_checkpoint_size.flatten(), "max_checkpoint_size")?;
    let adaptive = min.is_some() || max.is_some();
    let min = min.unwrap_or(1);
    let max = max.unwrap_or(checkpoint_size.max(min));
    if min > max {
        return Err(Error::invalid_input(format!(
            "field 'min_checkpoint_size' ({min}) must not exceed 'max_checkpoint_size' ({max})"
        )));
    }
    Ok((min, max, adaptive))
}

fn flush_interval(request: &AlterTableBackfillColumnsRequest) -> Result<Duration, Error> {
    let flush = request
        .batch_checkpoint_flush_interval_seconds
        .flatten()
        .unwrap_or(DEFAULT_FLUSH_INTERVAL_SECONDS);
    if !flush.is_finite() || !(0.0..=MAX_FLUSH_INTERVAL_SECONDS).contains(&flush) {
        return Err(Error::invalid_input(format!(
            "field 'batch_checkpoint_flush_interval_seconds' must be from 0 to \
             {MAX_FLUSH_INTERVAL_SECONDS}, got {flush}"
        )));
    }
    Ok(Duration::from_secs_f64(flush))
}

/// A size field: at least 1, at most [`MAX_CHECKPOINT_SIZE`].
fn rows(value: Option<i32>, field: &str) -> Result<Option<u32>, Error> {
    at_least_one(value, field)?
        .map(|v| at_most(v, MAX_CHECKPOINT_SIZE, field))
        .transpose()
}

/// The parameters a request asked for, checked, with every default
/// applied but the commit granularity's (it depends on the table's
/// fragments, known only once the table is opened).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RequestedParams {
    params: Params,
    commit_granularity: Option<u32>,
}

impl Default for RequestedParams {
    /// Every parameter's default.
    fn default() -> Self {
        Self::parse(&AlterTableBackfillColumnsRequest::default())
            .expect("a request without parameters is valid")
    }
}

impl RequestedParams {
    /// Reads and bounds a request's parameters; an invalid one is an error
    /// naming its field.
    pub fn parse(request: &AlterTableBackfillColumnsRequest) -> Result<Self, Error> {
        let concurrency = at_least_one(request.concurrency.flatten(), "concurrency")?
            .unwrap_or(DEFAULT_CONCURRENCY);
        let intra = at_least_one(
            request.intra_applier_concurrency.flatten(),
            "intra_applier_concurrency",
        )?
        .unwrap_or(DEFAULT_INTRA_APPLIER_CONCURRENCY);
        let checkpoint_size = rows(request.checkpoint_size.flatten(), "checkpoint_size")?
            .unwrap_or(DEFAULT_CHECKPOINT_SIZE);
        let (min_checkpoint_size, max_checkpoint_size, adaptive_checkpoint) =
            checkpoint_bounds(request, checkpoint_size)?;
        let commit_granularity =
            at_least_one(request.commit_granularity.flatten(), "commit_granularity")?
                .map(|g| at_most(g, MAX_COMMIT_GRANULARITY, "commit_granularity"))
                .transpose()?;
        let params = Params {
            concurrency: at_most(concurrency, MAX_CONCURRENCY, "concurrency")?,
            intra_applier_concurrency: at_most(
                intra,
                MAX_INTRA_APPLIER_CONCURRENCY,
                "intra_applier_concurrency",
            )?,
            task_size: request
                .task_size
                .flatten()
                .filter(|s| *s > 0)
                .map(|s| s as u64),
            num_frags: at_least_one(request.num_frags.flatten(), "num_frags")?.map(u64::from),
            checkpoint_size,
            min_checkpoint_size,
            max_checkpoint_size,
            adaptive_checkpoint,
            flush_interval: flush_interval(request)?,
            commit_granularity: 0,
            cluster: named(&request.cluster, "cluster")?,
            manifest: named(&request.manifest, "manifest")?,
        };
        Ok(Self {
            params,
            commit_granularity,
        })
    }

    /// The effective parameters of a job over `fragments` fragments.
    pub fn effective(&self, fragments: u64) -> Params {
        Params {
            commit_granularity: self
                .commit_granularity
                .unwrap_or_else(|| default_commit_granularity(fragments)),
            ..self.params.clone()
        }
    }

    /// The named cluster whose queue the job's tasks go to.
    pub fn cluster(&self) -> Option<&str> {
        self.params.cluster.as_deref()
    }

    /// The named runtime environment the job asks for.
    pub fn manifest(&self) -> Option<&str> {
        self.params.manifest.as_deref()
    }

    /// Fragments to fill at most (`None`: every one).
    pub fn num_frags(&self) -> Option<u64> {
        self.params.num_frags
    }
}

impl Params {
    /// The effective parameters of a request over a table of `fragments`
    /// fragments (the commit granularity's default depends on it).
    pub fn effective(
        request: &AlterTableBackfillColumnsRequest,
        fragments: u64,
    ) -> Result<Self, Error> {
        Ok(RequestedParams::parse(request)?.effective(fragments))
    }

    /// Commits a job of `fragments` fragments is expected to make.
    pub fn commits_expected(&self, fragments: u64) -> u64 {
        fragments.div_ceil(self.commit_granularity.max(1) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(json: serde_json::Value) -> AlterTableBackfillColumnsRequest {
        serde_json::from_value(json).unwrap()
    }

    fn message(err: Error) -> String {
        match err {
            Error::InvalidInput(message) => message,
            other => panic!("not invalid input: {other:?}"),
        }
    }

    #[test]
    fn defaults() {
        let params = Params::effective(&request(serde_json::json!({"column": "c"})), 100).unwrap();
        assert_eq!(params.concurrency, 8);
        assert_eq!(params.intra_applier_concurrency, 1);
        assert_eq!(params.task_size, None);
        assert_eq!(params.checkpoint_size, 10_240);
        assert!(!params.adaptive_checkpoint);
        assert_eq!(params.flush_interval, Duration::from_secs(10));
        assert_eq!(params.commit_granularity, 64);
        let params =
            Params::effective(&request(serde_json::json!({"column": "c"})), 10_000).unwrap();
        assert_eq!(params.commit_granularity, 500);
        assert_eq!(default_commit_granularity(16), 64);
    }

    #[test]
    fn the_flush_interval_is_recorded_in_seconds_and_bounded_when_read() {
        let body =
            serde_json::json!({"column": "c", "batch_checkpoint_flush_interval_seconds": 2.5});
        let params = Params::effective(&request(body), 1).unwrap();
        assert_eq!(params.flush_interval, Duration::from_millis(2_500));
        let mut recorded = serde_json::to_value(&params).unwrap();
        assert_eq!(recorded["batch_checkpoint_flush_interval_seconds"], 2.5);
        assert_eq!(
            serde_json::from_value::<Params>(recorded.clone()).unwrap(),
            params
        );
        // A job recorded before the bound existed is read within it.
        recorded["batch_checkpoint_flush_interval_seconds"] = serde_json::json!(1e9);
        let read: Params = serde_json::from_value(recorded).unwrap();
        assert_eq!(read.flush_interval, Duration::from_secs(3_600));
    }

    #[test]
    fn adaptive_bounds() {
        let params = Params::effective(
            &request(serde_json::json!({"column": "c", "min_checkpoint_size": 100})),
            1,
        )
        .unwrap();
        assert!(params.adaptive_checkpoint);
        assert_eq!(
            (params.min_checkpoint_size, params.max_checkpoint_size),
            (100, 10_240)
        );
        let err = Params::effective(
            &request(serde_json::json!({"column": "c", "min_checkpoint_size": 10, "max_checkpoint_size": 5})),
            1,
        )
        .unwrap_err();
        assert!(message(err).contains("min_checkpoint_size"));
    }

    #[test]
    fn bad_values_name_their_field() {
        for (field, value) in [
            ("concurrency", serde_json::json!(0)),
            ("concurrency", serde_json::json!(10_001)),
            ("intra_applier_concurrency", serde_json::json!(-1)),
            ("num_frags", serde_json::json!(0)),
            ("checkpoint_size", serde_json::json!(0)),
            ("min_checkpoint_size", serde_json::json!(0)),
            ("max_checkpoint_size", serde_json::json!(0)),
            (
                "batch_checkpoint_flush_interval_seconds",
                serde_json::json!(-0.5),
            ),
            ("commit_granularity", serde_json::json!(0)),
            ("commit_granularity", serde_json::json!(100_001)),
            ("checkpoint_size", serde_json::json!(2_000_000)),
            ("max_checkpoint_size", serde_json::json!(2_000_000)),
            (
                "batch_checkpoint_flush_interval_seconds",
                serde_json::json!(1e20),
            ),
            ("cluster", serde_json::json!(" ")),
        ] {
            let mut body = serde_json::json!({"column": "c"});
            body[field] = value;
            let err = message(Params::effective(&request(body), 1).unwrap_err());
            assert!(err.contains(field), "{field}: {err}");
        }
        // task_size 0 or less means whole fragments.
        let params = Params::effective(
            &request(serde_json::json!({"column": "c", "task_size": -5})),
            1,
        )
        .unwrap();
        assert_eq!(params.task_size, None);
        let params = Params::effective(
            &request(
                serde_json::json!({"column": "c", "batch_checkpoint_flush_interval_seconds": 0}),
            ),
            1,
        )
        .unwrap();
        assert_eq!(params.flush_interval, Duration::ZERO);
    }
}
