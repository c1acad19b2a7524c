//! Batch sizing: fixed at `checkpoint_size`, or adaptive between the
//! request's bounds, aiming at a fixed time per batch.

use std::time::Duration;

use crate::model::job::Params;

/// Time a batch should take when sizing adapts.
pub const TARGET_BATCH_TIME: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct BatchSizer {
    size: u64,
    min: u64,
    max: u64,
    adaptive: bool,
    last_rate: Option<f64>,
}

impl BatchSizer {
    pub fn new(params: &Params) -> Self {
        let min = params.min_checkpoint_size.max(1) as u64;
        let max = (params.max_checkpoint_size as u64).max(min);
        let adaptive = params.adaptive_checkpoint && min < max;
        let size = if params.adaptive_checkpoint {
            (params.checkpoint_size as u64).clamp(min, max)
        } else {
            params.checkpoint_size.max(1) as u64
        };
        Self {
            size,
            min,
            max,
            adaptive,
            last_rate: None,
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether every batch has the same size (no adaptive sizing).
    pub fn is_fixed(&self) -> bool {
        !self.adaptive
    }

    /// Feeds back how long a batch of `rows` took.
    pub fn observe(&mut self, rows: u64, elapsed: Duration) {
        if !self.adaptive || rows == 0 {
            return;
        }
        let secs = elapsed.as_secs_f64().max(1e-6);
        let rate = rows as f64 / secs;
        if elapsed > TARGET_BATCH_TIME * 2 {
            // Too slow: aim straight at the target.
            let aimed = (rate * TARGET_BATCH_TIME.as_secs_f64()) as u64;
            self.size = aimed.min(self.size / 2).clamp(self.min, self.max);
        } else if elapsed < TARGET_BATCH_TIME / 2 && rows >= self.size {
            // Grow only while throughput holds up.
            let stable = self.last_rate.is_none_or(|last| rate >= last * 0.8);
            if stable {
                self.size = (self.size.saturating_mul(2)).clamp(self.min, self.max);
            }
        }
        self.last_rate = Some(rate);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(checkpoint: u32, min: u32, max: u32, adaptive: bool) -> Params {
        Params {
            concurrency: 1,
            intra_applier_concurrency: 1,
            task_size: None,
            num_frags: None,
            checkpoint_size: checkpoint,
            min_checkpoint_size: min,
            max_checkpoint_size: max,
            adaptive_checkpoint: adaptive,
            flush_interval: std::time::Duration::from_secs(10),
            commit_granularity: 64,
            cluster: None,
            manifest: None,
        }
    }

    #[test]
    fn fixed_size_never_moves() {
        let mut sizer = BatchSizer::new(&params(1000, 1, 1000, false));
        sizer.observe(1000, Duration::from_millis(1));
        sizer.observe(1000, Duration::from_secs(60));
        assert_eq!(sizer.size(), 1000);
        let mut equal = BatchSizer::new(&params(1000, 500, 500, true));
        assert_eq!(equal.size(), 500);
        equal.observe(500, Duration::from_millis(1));
        assert_eq!(equal.size(), 500);
    }

    #[test]
    fn adapts_within_bounds() {
        let mut sizer = BatchSizer::new(&params(1000, 100, 8000, true));
        sizer.observe(1000, Duration::from_millis(10));
        assert_eq!(sizer.size(), 2000);
        sizer.observe(2000, Duration::from_millis(20));
        assert_eq!(sizer.size(), 4000);
        sizer.observe(4000, Duration::from_millis(40));
        sizer.observe(8000, Duration::from_millis(80));
        assert_eq!(sizer.size(), 8000);
        sizer.observe(8000, Duration::from_secs(40));
        assert_eq!(sizer.size(), 400);
        for _ in 0..10 {
            sizer.observe(400, Duration::from_secs(100));
        }
        assert_eq!(sizer.size(), 100);
    }

    #[test]
    fn unstable_throughput_stops_growth() {
        let mut sizer = BatchSizer::new(&params(1000, 100, 100_000, true));
        sizer.observe(1000, Duration::from_millis(10));
        assert_eq!(sizer.size(), 2000);
        // Twice the rows took ten times as long: throughput fell, hold.
        sizer.observe(2000, Duration::from_millis(100));
        assert_eq!(sizer.size(), 2000);
    }
}
