//! Which runtime runs which function, from `LANCE_BACKFILL_UDF_RUNTIMES`:
//! it maps a job's cluster or a function's image to a runtime; the rest go
//! to the default (the local process pool, or a Lambda function in AWS).
//!
//! `default=local,image:embedder=http://gpu-1:8000/,cluster:gpu=lambda:embed`

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::adapters::aws::lambda::LambdaRuntime;
use crate::adapters::endpoint::HttpRuntime;
use crate::adapters::local::pool::{LocalPool, PoolConfig};
use crate::ports::udf::UdfRuntime;
use crate::ports::udf::runtimes::UdfRuntimes;

/// Longest one batch may take on an HTTP endpoint.
const HTTP_TIMEOUT: Duration = Duration::from_secs(900);

/// What builds the runtimes a configuration names.
pub struct Targets<'a> {
    pub pool: PoolConfig,
    /// AWS configuration, for `lambda:` targets.
    pub aws: Option<&'a aws_config::SdkConfig>,
    /// The secret `http(s)://` runtimes sign each request with.
    pub http_secret: Option<&'a str>,
}

/// Parses `selector=target` pairs separated by commas; without a
/// `default` rule the default is the local pool (built only if used).
pub fn parse(spec: &str, targets: &Targets<'_>) -> anyhow::Result<UdfRuntimes> {
    let mut local: Option<Arc<dyn UdfRuntime>> = None;
    let mut build = |target: &str| -> anyhow::Result<Arc<dyn UdfRuntime>> {
        if target != "local" {
            return build_remote(target, targets);
        }
        if local.is_none() {
            local = Some(Arc::new(LocalPool::new(targets.pool.clone())?));
        }
        local.clone().context("the local pool")
    };
    let mut default = None;
    let (mut by_image, mut by_cluster) = (HashMap::new(), HashMap::new());
    for rule in spec.split(',').map(str::trim).filter(|r| !r.is_empty()) {
        let (selector, target) = rule
            .split_once('=')
            .with_context(|| format!("UDF runtime rule '{rule}' is not selector=target"))?;
        let runtime = build(target.trim())?;
        match selector.trim().split_once(':') {
            None if selector.trim() == "default" => default = Some(runtime),
            Some(("image", image)) => {
                by_image.insert(image.to_string(), runtime);
            }
            Some(("cluster", cluster)) => {
                by_cluster.insert(cluster.to_string(), runtime);
            }
            _ => bail!(
                "UDF runtime selector '{selector}' is not default, image:<name> or cluster:<name>"
            ),
        }
    }
    let default = match default {
        Some(runtime) => runtime,
        None => build("local")?,
    };
    Ok(UdfRuntimes::new(default, by_image, by_cluster))
}

fn build_remote(target: &str, targets: &Targets<'_>) -> anyhow::Result<Arc<dyn UdfRuntime>> {
    if let Some(function) = target.strip_prefix("lambda:") {
        let aws = targets
            .aws
            .context("a lambda: UDF runtime needs the AWS configuration")?;
        return Ok(Arc::new(LambdaRuntime::new(
            aws_sdk_lambda::Client::new(aws),
            function,
        )));
    }
    if target.starts_with("http://") || target.starts_with("https://") {
        return Ok(Arc::new(HttpRuntime::new(
            target,
            HTTP_TIMEOUT,
            targets.http_secret,
        )?));
    }
    bail!("UDF runtime target '{target}' is not local, lambda:<function> or an http(s) URL")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_choose_by_cluster_then_image() {
        let targets = Targets {
            pool: PoolConfig::default(),
            aws: None,
            http_secret: None,
        };
        let runtimes = parse(
            "image:embedder=http://gpu:8000/,cluster:gpu=http://other:9000/",
            &targets,
        )
        .unwrap();
        assert!(
            runtimes
                .for_job(None, "embedder")
                .describe()
                .contains("gpu:8000")
        );
        assert!(
            runtimes
                .for_job(Some("gpu"), "embedder")
                .describe()
                .contains("other:9000")
        );
        assert!(runtimes.for_job(None, "x").describe().contains("local"));
        assert!(parse("nonsense", &targets).is_err());
        assert!(parse("default=ftp://x", &targets).is_err());
        assert!(parse("default=lambda:f", &targets).is_err());
    }
}
