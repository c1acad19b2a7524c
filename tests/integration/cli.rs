//! The client commands of `lance-backfill` against a running `serve`, as a
//! user types them: submit and wait, list, describe, watch, cancel and
//! errors, with their exit codes and the values they leave in the table.

use std::collections::HashMap;
use std::process::Output;

use lance_backfill_tests::{post_as, read_i64, write_sample_table};
use serde_json::{Value, json};

use crate::crash::{Backend, KEY, binary, free_port, ready, start};

/// `lance-backfill <args>` as a client of `url` with the test's key.
fn run(url: &str, args: &[&str]) -> Output {
    std::process::Command::new(binary())
        .args(["--url", url])
        .args(args)
        .env("LANCE_BACKFILL_API_KEY", KEY)
        .output()
        .expect("run lance-backfill")
}

fn stdout_json(output: &Output) -> Value {
    let text = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|_| {
        panic!(
            "not JSON: {text}\nstderr: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

async fn declare(client: &reqwest::Client, url: &str, table: &str, name: &str, sql: &str) {
    let body = json!({"new_columns": [{"name": name, "computed": sql}]});
    let path = format!("{url}/v1/table/{table}/add_columns");
    let (status, answer) = post_as(client, &path, KEY, &body).await;
    assert_eq!(status, 200, "{answer}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_client_commands_submit_follow_list_cancel_and_explain_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_string_lossy().into_owned();
    let items = format!("{root}/items.lance");
    write_sample_table(&items, 20_000, 8).await.unwrap();
    write_sample_table(&format!("{root}/big.lance"), 200_000, 200)
        .await
        .unwrap();
    let mut serve = start(
        &Backend::Embedded,
        &root,
        free_port(),
        &dir.path().join("serve.log"),
    );
    let client = reqwest::Client::new();
    ready(&client, &serve.url).await;
    let url = serve.url.clone();
    declare(&client, &url, "items", "y", "x * 2 + 1").await;
    declare(&client, &url, "items", "z", "x / (x - x)").await;
    declare(&client, &url, "big", "y", "x * 2 + 1").await;

    // submit --wait: the job's end, exit 0, and the values in the table.
    let done = run(&url, &["--json", "submit", "items", "y", "--wait"]);
    assert_eq!(done.status.code(), Some(0), "{}", text(&done));
    let job = stdout_json(&done);
    assert_eq!(job["state"], "DONE", "{job}");
    let job_id = job["job_id"].as_str().unwrap().to_string();
    let x = read_i64(&items, "x", &HashMap::new()).await.unwrap();
    let y = read_i64(&items, "y", &HashMap::new()).await.unwrap();
    let expected: Vec<Option<i64>> = x.iter().map(|x| x.map(|x| x * 2 + 1)).collect();
    assert_eq!(y, expected);

    // A job that fails: exit 1, its error shown by `errors`.
    let failed = run(&url, &["submit", "items", "z", "--wait"]);
    assert_eq!(failed.status.code(), Some(1), "{}", text(&failed));
    assert!(text(&failed).contains("FAILED"), "{}", text(&failed));
    let failed_id = latest_job(&url, "items", "FAILED");
    let errors = run(&url, &["--json", "errors", &failed_id]);
    assert_eq!(errors.status.code(), Some(0), "{}", text(&errors));
    let errors = stdout_json(&errors);
    assert!(
        errors["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{errors}"
    );

    // Listing: by table, by state, and every table.
    let listed = stdout_json(&run(&url, &["--json", "jobs", "items"]));
    assert_eq!(ids(&listed).len(), 2, "{listed}");
    let done_only = stdout_json(&run(&url, &["--json", "jobs", "items", "--state", "done"]));
    assert_eq!(ids(&done_only), vec![job_id.clone()]);
    let human = run(&url, &["jobs", "--state", "FAILED"]);
    assert!(text(&human).contains(&failed_id), "{}", text(&human));
    assert!(!text(&human).contains(&job_id), "{}", text(&human));
    let bad_state = run(&url, &["jobs", "--state", "SLEEPING"]);
    assert_ne!(bad_state.status.code(), Some(0));

    // describe: the columns and what fills them.
    let described = run(&url, &["describe", "items"]);
    assert!(
        text(&described).contains("= x * 2 + 1"),
        "{}",
        text(&described)
    );

    // A dry run: the plan and its estimate, and no job.
    let dry = run(&url, &["submit", "big", "y", "--dry-run"]);
    assert_eq!(dry.status.code(), Some(0), "{}", text(&dry));
    assert!(
        text(&dry).contains("would fill 200000 rows of y in 200 fragments"),
        "{}",
        text(&dry)
    );
    assert!(text(&dry).contains("on AWS: about"), "{}", text(&dry));
    let dry = stdout_json(&run(&url, &["--json", "submit", "big", "y", "--dry-run"]));
    assert_eq!(
        dry["tasks"], 2,
        "200 fragments of 1,000 rows go as 2 packs: {dry}"
    );
    assert!(
        dry["estimate"]["cost_usd"]["total"].as_f64().unwrap() > 0.0,
        "{dry}"
    );
    let none = stdout_json(&run(&url, &["--json", "jobs", "big"]));
    assert!(ids(&none).is_empty(), "a dry run makes no job: {none}");

    // cancel a running job; watch then exits 2.
    let submitted = run(&url, &["submit", "big", "y"]);
    assert_eq!(submitted.status.code(), Some(0), "{}", text(&submitted));
    let big_job = String::from_utf8_lossy(&submitted.stdout)
        .trim()
        .to_string();
    let cancelled = stdout_json(&run(&url, &["--json", "cancel", &big_job]));
    assert_eq!(cancelled["state"], "CANCELLED", "{cancelled}");
    let watched = run(&url, &["watch", &big_job]);
    assert_eq!(watched.status.code(), Some(2), "{}", text(&watched));
    assert!(text(&watched).contains("CANCELLED"), "{}", text(&watched));

    // Without the key: refused with what to do.
    let anonymous = std::process::Command::new(binary())
        .args(["--url", &url, "jobs", "items"])
        .env_remove("LANCE_BACKFILL_API_KEY")
        .output()
        .unwrap();
    assert_ne!(anonymous.status.code(), Some(0));
    assert!(
        text(&anonymous).contains("--api-key"),
        "{}",
        text(&anonymous)
    );
    let _ = serve.child.kill();
    let _ = serve.child.wait();
}

/// `estimate` needs no service: a billion rows, three functions, two
/// concurrencies, as BENCHMARKS.md's projection runs it.
#[test]
fn the_estimate_command_projects_jobs_over_a_billion_rows() {
    let args = [
        "estimate",
        "--rows",
        "1000000000",
        "--fragments",
        "1000",
        "--function",
        "sql,10,1000",
        "--concurrency",
        "100,1000",
    ];
    let table = run("http://127.0.0.1:9", &args);
    assert_eq!(table.status.code(), Some(0), "{}", text(&table));
    let rows: Vec<String> = text(&table)
        .lines()
        .filter(|line| line.starts_with("| 1.00 G / 1000 |"))
        .map(str::to_string)
        .collect();
    assert_eq!(rows.len(), 6, "{}", text(&table));
    let json_args: Vec<&str> = std::iter::once("--json").chain(args).collect();
    let projected = stdout_json(&run("http://127.0.0.1:9", &json_args));
    let projected = projected.as_array().unwrap();
    let wall = |i: usize| projected[i]["estimate"]["wall_seconds"].as_f64().unwrap();
    let cost = |i: usize| {
        projected[i]["estimate"]["cost_usd"]["total"]
            .as_f64()
            .unwrap()
    };
    // The same function on 10 times the workers: 10 times faster while the
    // workers bound it, the same dollars.
    assert_eq!(projected[4]["estimate"]["bottleneck"], "workers");
    assert!((wall(4) / wall(5) - 10.0).abs() < 1e-6, "{projected:?}");
    assert!((cost(4) - cost(5)).abs() < 1e-9 * cost(4));
    assert!(
        cost(4) > cost(2) && cost(2) > cost(0),
        "a dearer function costs more"
    );
    let refused = run(
        "http://127.0.0.1:9",
        &[
            "estimate",
            "--rows",
            "10",
            "--fragments",
            "1",
            "--function=-3",
        ],
    );
    assert_ne!(refused.status.code(), Some(0));
    assert!(
        text(&refused).contains("milliseconds per 1,000 rows"),
        "{}",
        text(&refused)
    );
}

fn ids(listing: &Value) -> Vec<String> {
    listing["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|job| job["job_id"].as_str().unwrap().to_string())
        .collect()
}

fn latest_job(url: &str, table: &str, state: &str) -> String {
    let listed = stdout_json(&run(
        url,
        &["--json", "jobs", table, "--state", state, "--limit", "1"],
    ));
    ids(&listed).pop().expect("a job in that state")
}
