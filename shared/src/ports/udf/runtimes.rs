//! Which runtime runs which function: a job's cluster's, else its
//! function's image's, else the default ([`crate::app::runtimes`] builds
//! them from `LANCE_BACKFILL_UDF_RUNTIMES`).

use std::collections::HashMap;
use std::sync::Arc;

use super::UdfRuntime;

#[derive(Clone)]
pub struct UdfRuntimes {
    default: Arc<dyn UdfRuntime>,
    by_image: HashMap<String, Arc<dyn UdfRuntime>>,
    by_cluster: HashMap<String, Arc<dyn UdfRuntime>>,
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

    /// The default runtime, with the runtimes of some images and clusters.
    pub fn new(
        default: Arc<dyn UdfRuntime>,
        by_image: HashMap<String, Arc<dyn UdfRuntime>>,
        by_cluster: HashMap<String, Arc<dyn UdfRuntime>>,
    ) -> Self {
        Self {
            default,
            by_image,
            by_cluster,
        }
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
