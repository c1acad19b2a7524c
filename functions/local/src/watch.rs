//! `watch`: follows a job until it ends, with a live progress bar (rows
//! computed, rows/s, ETA, fragments and commits) on a terminal and a line
//! every few seconds elsewhere. The exit code is the job's: 0 DONE,
//! 1 FAILED, 2 CANCELLED.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;

use crate::client::Api;

/// How often the job is read.
const POLL: Duration = Duration::from_secs(1);
/// How often a line is printed when stderr is not a terminal.
const LINE_EVERY: Duration = Duration::from_secs(10);

pub async fn watch(api: &Api, job_id: &str, as_json: bool) -> anyhow::Result<i32> {
    let interactive = !as_json && std::io::stderr().is_terminal();
    let bar = progress_bar(interactive);
    let mut last_line: Option<Instant> = None;
    loop {
        let job = api.get(&["v1", "job", job_id], &[]).await?;
        let progress = Progress::of(&job);
        bar.set_length(progress.rows_total.max(1));
        bar.set_position(progress.rows_done);
        bar.set_message(progress.summary());
        if !interactive && !as_json && last_line.is_none_or(|at| at.elapsed() >= LINE_EVERY) {
            eprintln!("{job_id} {}", progress.line());
            last_line = Some(Instant::now());
        }
        if let Some(code) = exit_code(&progress.state) {
            bar.finish_and_clear();
            report_end(job_id, &job, &progress, as_json);
            return Ok(code);
        }
        tokio::time::sleep(POLL).await;
    }
}

fn progress_bar(interactive: bool) -> ProgressBar {
    if !interactive {
        return ProgressBar::with_draw_target(None, ProgressDrawTarget::hidden());
    }
    let bar = ProgressBar::new(1);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} rows \
             {per_sec} ETA {eta}  {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// The job's end as an exit code; `None` while it runs.
fn exit_code(state: &str) -> Option<i32> {
    match state {
        "DONE" => Some(0),
        "FAILED" => Some(1),
        "CANCELLED" => Some(2),
        _ => None,
    }
}

fn report_end(job_id: &str, job: &Value, progress: &Progress, as_json: bool) {
    if as_json {
        println!("{job}");
        return;
    }
    println!("{job_id} {}", progress.line());
    if let Some(error) = job["error"].as_str() {
        println!("error: {error}");
    }
}

/// What `watch` shows of a job's page.
#[derive(Debug, PartialEq)]
struct Progress {
    state: String,
    rows_done: u64,
    rows_total: u64,
    rows_committed: u64,
    rows_failed: u64,
    fragments: (u64, u64),
    commits: (u64, u64),
}

impl Progress {
    fn of(job: &Value) -> Self {
        let metrics = &job["metrics"];
        let pair = |name: &str| {
            (
                metrics[name]["done"].as_u64().unwrap_or(0),
                metrics[name]["total"].as_u64().unwrap_or(0),
            )
        };
        let (rows_done, rows_total) = pair("rows_computed");
        Self {
            state: job["state"].as_str().unwrap_or("UNKNOWN").to_string(),
            rows_done,
            rows_total,
            rows_committed: pair("rows_committed").0,
            rows_failed: metrics["rows_failed"].as_u64().unwrap_or(0),
            fragments: pair("fragments"),
            commits: pair("commits"),
        }
    }

    /// Beside the bar: what the rows count does not say.
    fn summary(&self) -> String {
        let mut text = format!(
            "{} | fragments {}/{} | commits {}/{}",
            self.state, self.fragments.0, self.fragments.1, self.commits.0, self.commits.1
        );
        if self.rows_failed > 0 {
            text.push_str(&format!(" | {} rows failed", self.rows_failed));
        }
        text
    }

    /// One line for a log: everything.
    fn line(&self) -> String {
        format!(
            "{}: rows computed {}/{}, committed {} | fragments {}/{} | commits {}/{}{}",
            self.state,
            self.rows_done,
            self.rows_total,
            self.rows_committed,
            self.fragments.0,
            self.fragments.1,
            self.commits.0,
            self.commits.1,
            match self.rows_failed {
                0 => String::new(),
                n => format!(" | {n} rows failed"),
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_jobs_page_becomes_its_progress_and_exit_code() {
        let job = json!({"state": "RUNNING", "metrics": {
            "rows_computed": {"done": 40, "total": 100},
            "rows_committed": {"done": 20, "total": 100},
            "rows_failed": 2,
            "fragments": {"done": 1, "total": 4},
            "commits": {"done": 1, "total": 2}}});
        let progress = Progress::of(&job);
        assert_eq!(
            progress.line(),
            "RUNNING: rows computed 40/100, committed 20 | fragments 1/4 | commits 1/2 | 2 rows failed"
        );
        assert_eq!(exit_code(&progress.state), None);
        assert_eq!(exit_code("DONE"), Some(0));
        assert_eq!(exit_code("FAILED"), Some(1));
        assert_eq!(exit_code("CANCELLED"), Some(2));
        assert_eq!(Progress::of(&json!({})).state, "UNKNOWN");
    }
}
