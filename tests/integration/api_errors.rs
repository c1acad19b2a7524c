//! Every error row of SEMANTICS.md, over HTTP, against moto and a real table.

use std::time::Duration;

use lance_backfill::app::runner::RunnerConfig;
use lance_backfill_tests::{API_KEY, Moto, Stack, StackOptions, fast_engine, write_sample_table};
use serde_json::json;

async fn stack_with_table() -> Stack {
    let moto = Moto::connect().await;
    let stack = Stack::aws(&moto, StackOptions::default()).await;
    write_sample_table(&stack.table_uri("items"), 1000, 4)
        .await
        .unwrap();
    stack.declare("items", &[("y", "x * 2 + 1")]).await;
    stack
}

async fn expect_error(
    stack: &Stack,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
    status: u16,
    code: i64,
    mentions: &str,
) {
    let (got, response) = stack.call("POST", path, headers, Some(body)).await;
    assert_eq!(got, status, "{path} {body}: {response}");
    assert_eq!(response["code"].as_i64(), Some(code), "{body}: {response}");
    let message = response["error"].as_str().unwrap_or_default();
    assert!(
        message.contains(mentions),
        "{body}: '{message}' should mention '{mentions}'"
    );
    assert_eq!(
        response["instance"].as_str(),
        Some(path.split('?').next().unwrap())
    );
}

const BACKFILL: &str = "/v1/table/items/backfill_column";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_invalid_field_gets_its_status_and_code() {
    let stack = stack_with_table().await;
    let key = [("x-api-key", API_KEY)];
    let cases: Vec<(serde_json::Value, u16, i64, &str)> = vec![
        (json!({"column": "y", "id": ["other"]}), 400, 13, "'id'"),
        (json!({"column": "nope"}), 404, 12, "nope"),
        (json!({"column": "x"}), 400, 13, "not a computed column"),
        (json!({"column": "s.inner"}), 404, 12, "s.inner"),
        (json!({"column": ""}), 400, 13, "'column'"),
        (json!({"column": "y", "branch": "dev"}), 404, 22, "dev"),
        (
            json!({"column": "y", "where": "x >>> 3"}),
            400,
            13,
            "'where'",
        ),
        (
            json!({"column": "y", "where": "missing_col > 3"}),
            400,
            13,
            "'where'",
        ),
        (json!({"column": "y", "where": "x + 1"}), 400, 13, "'where'"),
        (json!({"column": "y", "where": "  "}), 400, 13, "'where'"),
        (
            json!({"column": "y", "read_version": 99}),
            404,
            11,
            "read_version",
        ),
        (
            json!({"column": "y", "read_version": 0}),
            404,
            11,
            "read_version",
        ),
        (
            json!({"column": "y", "concurrency": 0}),
            400,
            13,
            "concurrency",
        ),
        (
            json!({"column": "y", "intra_applier_concurrency": 0}),
            400,
            13,
            "intra_applier_concurrency",
        ),
        (json!({"column": "y", "num_frags": 0}), 400, 13, "num_frags"),
        (
            json!({"column": "y", "checkpoint_size": -1}),
            400,
            13,
            "checkpoint_size",
        ),
        (
            json!({"column": "y", "min_checkpoint_size": 100, "max_checkpoint_size": 10}),
            400,
            13,
            "min_checkpoint_size",
        ),
        (
            json!({"column": "y", "batch_checkpoint_flush_interval_seconds": -1}),
            400,
            13,
            "batch_checkpoint_flush_interval_seconds",
        ),
        (
            json!({"column": "y", "commit_granularity": 0}),
            400,
            13,
            "commit_granularity",
        ),
        (
            json!({"column": "y", "cluster": "nowhere"}),
            400,
            13,
            "cluster",
        ),
        (
            json!({"column": "y", "manifest": "py27"}),
            400,
            13,
            "manifest",
        ),
        (
            json!({"column": "y", "concurrency": "eight"}),
            400,
            13,
            "concurrency",
        ),
        (
            json!({"column": "y", "task_size": 3.5}),
            400,
            13,
            "task_size",
        ),
        (
            json!({"column": "y", "concurrency": 5_000_000_000u64}),
            400,
            13,
            "concurrency",
        ),
        (json!({"column": 5}), 400, 13, "column"),
        (json!({"concurrency": 2}), 400, 13, "column"),
        (json!([1, 2]), 400, 13, "JSON object"),
    ];
    for (body, status, code, mentions) in cases {
        expect_error(
            &stack,
            BACKFILL,
            &key,
            &body.to_string(),
            status,
            code,
            mentions,
        )
        .await;
    }
    expect_error(
        &stack,
        "/v1/table/missing/backfill_column",
        &key,
        r#"{"column":"y"}"#,
        404,
        4,
        "missing",
    )
    .await;
    let (status, response) = stack
        .call(
            "POST",
            "/v1/table/ns$missing/backfill_column",
            &key,
            Some(r#"{"column":"y"}"#),
        )
        .await;
    assert_eq!(status, 404, "{response}");
    assert!(
        matches!(response["code"].as_i64(), Some(1) | Some(4)),
        "{response}"
    );
    expect_error(
        &stack,
        BACKFILL,
        &key,
        "{not json",
        400,
        13,
        "not valid JSON",
    )
    .await;
    expect_error(&stack, BACKFILL, &key, "\"y\"", 400, 13, "JSON object").await;
    expect_error(&stack, BACKFILL, &key, "", 400, 13, "body").await;
    let huge = format!(r#"{{"column":"y","where":"{}"}}"#, "x".repeat(2 << 20));
    let (status, response) = stack.call("POST", BACKFILL, &key, Some(&huge)).await;
    assert_eq!(
        (status, response["code"].as_i64()),
        (400, Some(13)),
        "{response}"
    );
    // Auth: none, wrong, token without JWT configured, in body.
    expect_error(
        &stack,
        BACKFILL,
        &[],
        r#"{"column":"y"}"#,
        401,
        16,
        "credentials",
    )
    .await;
    expect_error(
        &stack,
        BACKFILL,
        &[("x-api-key", "wrong")],
        r#"{"column":"y"}"#,
        403,
        15,
        "API key",
    )
    .await;
    expect_error(
        &stack,
        BACKFILL,
        &[("authorization", "Bearer abc.def.ghi")],
        r#"{"column":"y"}"#,
        403,
        15,
        "token",
    )
    .await;
    expect_error(
        &stack,
        BACKFILL,
        &[],
        r#"{"column":"y","identity":{"api_key":"wrong"}}"#,
        403,
        15,
        "API key",
    )
    .await;
    // Nothing was recorded or queued for any of these.
    let sqs = stack.sqs.as_ref().unwrap();
    let messages = lance_backfill::ports::queue::TaskQueue::receive(
        sqs,
        10,
        std::time::Duration::from_secs(1),
        std::time::Duration::ZERO,
    )
    .await
    .unwrap();
    assert!(
        messages.is_empty(),
        "bad requests queued {} messages",
        messages.len()
    );
    let (status, jobs) = stack.get("/v1/table/items/jobs").await;
    assert_eq!(status, 200);
    assert_eq!(jobs["jobs"].as_array().unwrap().len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn routes_and_methods_answer_with_error_responses() {
    let stack = stack_with_table().await;
    let (status, body) = stack
        .call("GET", BACKFILL, &[("x-api-key", API_KEY)], None)
        .await;
    assert_eq!((status, body["code"].as_i64()), (405, Some(0)));
    let (status, body) = stack
        .call("POST", "/v1/nothing", &[("x-api-key", API_KEY)], Some("{}"))
        .await;
    assert_eq!((status, body["code"].as_i64()), (404, Some(0)));
    let (status, body) = stack.get("/v1/job/does-not-exist").await;
    assert_eq!((status, body["code"].as_i64()), (404, Some(10)));
    let (status, body) = stack.get("/v1/job/bad%20id").await;
    assert_eq!((status, body["code"].as_i64()), (400, Some(13)));
    let (status, body) = stack.get("/v1/table/items/jobs?limit=0").await;
    assert_eq!((status, body["code"].as_i64()), (400, Some(13)));
    let (status, body) = stack.get("/v1/table/items/jobs?page_token=garbage").await;
    assert_eq!((status, body["code"].as_i64()), (400, Some(13)));
    let (status, _) = stack.call("GET", "/v1/table/items/jobs", &[], None).await;
    assert_eq!(status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn add_columns_declares_fills_and_refuses_bad_entries() {
    let moto = Moto::connect().await;
    let mut stack = Stack::aws(&moto, StackOptions::default()).await;
    let uri = stack.table_uri("items");
    write_sample_table(&uri, 100, 2).await.unwrap();
    // An expression column is filled by a job, on the workers.
    stack.start_worker(
        fast_engine(),
        RunnerConfig::default(),
        Duration::from_secs(30),
    );
    let (status, body) = stack
        .post(
            "/v1/table/items/add_columns",
            json!({"new_columns": [
                {"name": "twice", "expression": "x * 2"},
                {"name": "later", "computed": "twice + length(s)", "expression": null},
            ]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let version = body["version"].as_i64().unwrap();
    let dataset = lance::Dataset::open(&uri).await.unwrap();
    assert_eq!(dataset.manifest().version as i64, version);
    let later = dataset.schema().field("later").unwrap();
    assert_eq!(
        later
            .metadata
            .get(lance_backfill::run::computed::BINDING_KEY)
            .map(String::as_str),
        Some("twice + length(s)")
    );
    assert_eq!(later.data_type(), arrow_schema::DataType::Int64);
    assert!(later.nullable);
    let twice = lance_backfill_tests::read_i64(&uri, "twice", &Default::default())
        .await
        .unwrap();
    assert_eq!(
        twice.iter().take(3).copied().collect::<Vec<_>>(),
        vec![Some(0), Some(2), Some(4)]
    );
    let later_values = lance_backfill_tests::read_i64(&uri, "later", &Default::default())
        .await
        .unwrap();
    assert!(
        later_values.iter().all(Option::is_none),
        "a computed column starts all-null"
    );

    let cases = [
        (
            // A user function needs its outputs declared.
            json!({"new_columns": [{"name": "py", "virtual_column": {"udf": "gASV", "udf_name": "f", "udf_version": "1", "input_columns": ["x"], "image": "i"}}]}),
            400,
            13,
            "outputs",
        ),
        (
            json!({"new_columns": [{"name": "twice", "computed": "x"}]}),
            400,
            13,
            "already exists",
        ),
        (
            json!({"new_columns": [{"name": "z", "computed": "nope + 1"}]}),
            400,
            13,
            "invalid expression",
        ),
        (
            json!({"new_columns": [{"name": "z", "computed": "x", "expression": "x"}]}),
            400,
            13,
            "exactly one",
        ),
        (
            json!({"new_columns": [{"name": "z"}]}),
            400,
            13,
            "exactly one",
        ),
        (json!({"new_columns": []}), 400, 13, "new_columns"),
        (
            json!({"new_columns": [{"name": "a", "computed": "x"}, {"name": "a", "computed": "x"}]}),
            400,
            13,
            "twice",
        ),
        (
            json!({"new_columns": [{"name": "n", "computed": "NULL"}]}),
            400,
            13,
            "no type",
        ),
    ];
    for (body, status, code, mentions) in cases {
        expect_error(
            &stack,
            "/v1/table/items/add_columns",
            &[("x-api-key", API_KEY)],
            &body.to_string(),
            status,
            code,
            mentions,
        )
        .await;
    }
    // Nothing of the refused requests reached the table.
    assert_eq!(
        lance::Dataset::open(&uri).await.unwrap().manifest().version as i64,
        version
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bearer_tokens_over_http() {
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
    let auth = lance_backfill::http::auth::Authenticator::default()
        .with_jwt(
            "https://issuer.example",
            "lance-backfill",
            Some("jwt-secret"),
            None,
            None,
        )
        .unwrap();
    let stack = Stack::embedded(StackOptions {
        auth,
        ..StackOptions::default()
    })
    .await;
    write_sample_table(&stack.table_uri("items"), 100, 1)
        .await
        .unwrap();
    let token = |secret: &str, aud: &str, exp: i64| {
        let claims = json!({"sub": "carol", "iss": "https://issuer.example", "aud": aud, "exp": chrono::Utc::now().timestamp() + exp});
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    };
    let good = token("jwt-secret", "lance-backfill", 600);
    let add = json!({"new_columns": [{"name": "y", "computed": "x + 1"}]}).to_string();
    let bearer = format!("Bearer {good}");
    let (status, _) = stack
        .call(
            "POST",
            "/v1/table/items/add_columns",
            &[("authorization", &bearer)],
            Some(&add),
        )
        .await;
    assert_eq!(status, 200);
    // The token may also come in the body's identity.
    let body = json!({"column": "y", "identity": {"auth_token": good}}).to_string();
    let (status, response) = stack.call("POST", BACKFILL, &[], Some(&body)).await;
    assert_eq!(status, 202, "{response}");
    let job = stack
        .store()
        .get_job(response["job_id"].as_str().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(job.spec.submitted_by, "jwt:https://issuer.example:carol");
    for (bad, why) in [
        (
            token("other-secret", "lance-backfill", 600),
            "bad signature",
        ),
        (token("jwt-secret", "lance-backfill", -600), "expired"),
        (token("jwt-secret", "someone-else", 600), "wrong audience"),
    ] {
        let header = format!("Bearer {bad}");
        let (status, response) = stack
            .call(
                "GET",
                "/v1/table/items/jobs",
                &[("authorization", &header)],
                None,
            )
            .await;
        assert_eq!(
            (status, response["code"].as_i64()),
            (403, Some(15)),
            "{why}: {response}"
        );
    }
    let (status, response) = stack.call("GET", "/v1/table/items/jobs", &[], None).await;
    assert_eq!(
        (status, response["code"].as_i64()),
        (401, Some(16)),
        "{response}"
    );
    // API keys are not configured on this deployment.
    let (status, _) = stack
        .call(
            "GET",
            "/v1/table/items/jobs",
            &[("x-api-key", API_KEY)],
            None,
        )
        .await;
    assert_eq!(status, 403);
}
