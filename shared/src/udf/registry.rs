//! Which runtime runs which function: `LANCE_BACKFILL_UDF_RUNTIMES` maps a
//! job's cluster or a function's image to a runtime; the rest go to the
//! default (the local process pool, or a Lambda function in AWS).
//!
//! `default=local,image:embedder=http://gpu-1:8000/,cluster:gpu=lambda:embed`

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};

use super::UdfRuntime;
use super::http::HttpRuntime;
use super::lambda::LambdaRuntime;
use super::pool::{LocalPool, PoolConfig};

/// Longest one batch may take on an HTTP endpoint.
const HTTP_TIMEOUT: Duration = Duration::from_secs(900);

#[derive(Clone)]
pub struct UdfRuntimes {
    default: Arc<dyn UdfRuntime>,
    by_image: HashMap<String, Arc<dyn UdfRuntime>>,
    by_cluster: HashMap<String, Arc<dyn UdfRuntime>>,
}

/// What builds the runtimes a configuration names.
pub struct Targets<'a> {
    pub pool: PoolConfig,
    /// AWS configuration, for `lambda:` targets.
    pub aws: Option<&'a aws_config::SdkConfig>,
    /// The secret `http(s)://` runtimes sign each request with.
    pub http_secret: Option<&'a str>,
}

impl UdfRuntimes {
    /// Every function on one runtime.
    pub fn only(runtime: Arc<dyn UdfRuntime>) -> Self {
        Self {
            default: runtime,
            by_image: HashMap::new(),
            by_cluster: HashMap::new(),
        }
    }

    /// Parses `selector=target` pairs separated by commas; without a
    /// `default` rule the default is the local pool (built only if used).
    pub fn parse(spec: &str, targets: &Targets<'_>) -> anyhow::Result<Self> {
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
        Ok(Self {
            default,
            by_image,
            by_cluster,
        })
    }

    /// The runtime of a job: its cluster's, else its function's image's,
    /// else the default.
    pub fn for_job(&self, cluster: Option<&str>, image: &str) -> Arc<dyn UdfRuntime> {
        cluster
            .and_then(|c| self.by_cluster.get(c))
            .or_else(|| self.by_image.get(image))
            .unwrap_or(&self.default)
            .clone()
    }
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
        let runtimes = UdfRuntimes::parse(
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
        assert!(UdfRuntimes::parse("nonsense", &targets).is_err());
        assert!(UdfRuntimes::parse("default=ftp://x", &targets).is_err());
        assert!(UdfRuntimes::parse("default=lambda:f", &targets).is_err());
    }
}
