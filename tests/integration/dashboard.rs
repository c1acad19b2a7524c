//! The job dashboard (`GET /ui`) in a real browser: headless Chromium
//! (Debian's package, installed by scripts/test) loads the page against a
//! service with a finished job and a paused one, and the test reads what
//! the page shows once its script has called the API with the key.

use std::time::Duration;

use lance_backfill::app::runner::RunnerConfig;
use lance_backfill_tests::{API_KEY, Stack, StackOptions, fast_engine, write_sample_table};
use serde_json::json;

fn chromium() -> String {
    std::env::var("LANCE_BACKFILL_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into())
}

/// The page's DOM after its script ran (`--dump-dom`); with `screenshot`,
/// a PNG of it there too.
async fn render(url: &str, screenshot: Option<&std::path::Path>) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut command = tokio::process::Command::new(chromium());
    command.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--window-size=1400,900",
        "--virtual-time-budget=8000",
    ]);
    command.arg(format!("--user-data-dir={}", profile.path().display()));
    match screenshot {
        Some(path) => command.arg(format!("--screenshot={}", path.display())),
        None => command.arg("--dump-dom"),
    };
    let output = tokio::time::timeout(Duration::from_secs(120), command.arg(url).output())
        .await
        .expect("chromium in time")
        .expect("run chromium");
    assert!(
        output.status.success(),
        "chromium: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_dashboard_shows_jobs_their_progress_errors_and_events() {
    let mut stack = Stack::embedded(StackOptions::default()).await;
    write_sample_table(&stack.table_uri("items"), 4_000, 4)
        .await
        .unwrap();
    stack
        .declare("items", &[("y", "x * 2 + 1"), ("z", "x + 5")])
        .await;
    stack.start_worker(
        fast_engine(),
        RunnerConfig::default(),
        Duration::from_secs(30),
    );
    let done = stack.submit("items", json!({"column": "y"})).await;
    stack.wait_done(&done, Duration::from_secs(60)).await;
    // A second job, paused before it starts.
    stack.stop_workers().await;
    let paused = stack.submit("items", json!({"column": "z"})).await;
    let (status, _) = stack
        .post(&format!("/v1/job/{paused}/pause"), json!({}))
        .await;
    assert_eq!(status, 200);
    // The page itself holds nothing and needs no key; its calls do.
    let (status, _) = stack.call("GET", "/ui", &[], None).await;
    assert_eq!(status, 200);
    let base = stack.base_url();
    let base = base.trim_end_matches('/');
    let url = format!("{base}/ui#key={API_KEY}&job={done}");
    let mut dom = String::new();
    for _ in 0..5 {
        dom = render(&url, None).await;
        if dom.contains("jobs, updated") {
            break;
        }
    }
    assert!(
        dom.contains("jobs, updated"),
        "the page never loaded its jobs: {dom}"
    );
    // The listing: both jobs under their table, with their states.
    let shown = |id: &str| format!(">…{}<", &id[id.len() - 12..]);
    assert!(
        dom.contains(&shown(&done)) && dom.contains(&shown(&paused)),
        "{dom}"
    );
    assert!(dom.contains(">items<") && dom.contains(">DONE<") && dom.contains(">PAUSED<"));
    assert!(
        dom.contains("4,000 / 4,000"),
        "the finished job's rows: {dom}"
    );
    // The selected job: its chart of rows committed, fragments, events.
    assert!(dom.contains("Rows committed over time") && dom.contains("<polyline"));
    assert!(
        dom.contains("committed fragments"),
        "its commit events: {dom}"
    );
    assert!(dom.contains(&format!("Job {done}")));
    // A wrong key shows the API's refusal, and no job.
    let refused = render(&format!("{base}/ui#key=wrong"), None).await;
    assert!(
        refused.contains("error: 403: the API key is not valid"),
        "{refused}"
    );
    assert!(!refused.contains(&shown(&done)));
    if let Ok(path) = std::env::var("LANCE_BACKFILL_DASHBOARD_PNG") {
        render(&url, Some(std::path::Path::new(&path))).await;
    }
}
