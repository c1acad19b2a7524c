//! The authorization policy over HTTP: who may read, submit, declare and
//! cancel on which tables; jobs of other tables do not exist for them. A
//! principal is an API key's name or a bearer token's `sub`; the policy is
//! JSON or `@path` of a file holding it.

use lance_backfill::http::auth::{Authenticator, sha256_hex};
use lance_backfill::model::policy::Access;
use lance_backfill_tests::{Stack, StackOptions, write_sample_table};
use serde_json::{Value, json};

const OPS: &str = "ops-secret";
const READER: &str = "reader-secret";
const SUBMITTER: &str = "submitter-secret";
const STRANGER: &str = "stranger-secret";
const DECLARER: &str = "declarer-secret";

/// Bearer tokens are HS256 JWTs signed with this, for this issuer and
/// audience.
const JWT_ISSUER: &str = "https://issuer.example";
const JWT_AUDIENCE: &str = "lance-backfill";
const JWT_SECRET: &str = "jwt-secret";

const POLICY: &str = r#"{
    "ops": {"tables": ["*"], "actions": ["read", "submit", "declare", "udf", "cancel"]},
    "reader": {"tables": ["items"], "actions": ["read"]},
    "submitter": {"tables": ["item?"], "actions": ["read", "submit", "declare"]},
    "declarer": {"tables": ["items"], "actions": ["read", "declare"]},
    "jwt:https://issuer.example:carol": {"tables": ["items"], "actions": ["read", "submit", "declare"]}
}"#;

async fn stack() -> Stack {
    stack_with(Access::parse(POLICY).unwrap()).await
}

/// The keys above and bearer tokens (`token`), under `access`.
async fn stack_with(access: Access) -> Stack {
    let mut auth = Authenticator::default();
    for (name, key) in [
        ("ops", OPS),
        ("reader", READER),
        ("submitter", SUBMITTER),
        ("stranger", STRANGER),
        ("declarer", DECLARER),
    ] {
        auth = auth
            .with_key_digest(&format!("{name}:{}", sha256_hex(key)))
            .unwrap();
    }
    let auth = auth
        .with_jwt(JWT_ISSUER, JWT_AUDIENCE, Some(JWT_SECRET), None, None)
        .unwrap()
        .with_access(access);
    let stack = Stack::embedded(StackOptions {
        auth,
        ..StackOptions::default()
    })
    .await;
    for table in ["items", "secret"] {
        write_sample_table(&stack.table_uri(table), 100, 1)
            .await
            .unwrap();
    }
    stack
}

async fn call(stack: &Stack, key: &str, method: &str, path: &str, body: Value) -> (u16, Value) {
    call_with(stack, ("x-api-key", key), method, path, body).await
}

/// A call with one credential header (`x-api-key` or `authorization`).
async fn call_with(
    stack: &Stack,
    credential: (&str, &str),
    method: &str,
    path: &str,
    body: Value,
) -> (u16, Value) {
    let body = (method == "POST").then(|| body.to_string());
    stack
        .call(method, path, &[credential], body.as_deref())
        .await
}

/// A bearer token the deployment verifies, with `sub` when given.
fn token(sub: Option<&str>) -> String {
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
    let mut claims = json!({"iss": JWT_ISSUER, "aud": JWT_AUDIENCE,
        "exp": chrono::Utc::now().timestamp() + 600});
    if let Some(sub) = sub {
        claims["sub"] = json!(sub);
    }
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .expect("sign a token")
}

fn denied((status, body): (u16, Value)) {
    assert_eq!((status, body["code"].clone()), (403, json!(15)), "{body}");
}

fn declare(name: &str) -> Value {
    json!({"new_columns": [{"name": name, "computed": "x + 1"}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn principals_do_what_the_policy_grants_and_nothing_else() {
    let stack = stack().await;
    let denied = |(status, body): (u16, Value)| {
        assert_eq!((status, body["code"].clone()), (403, json!(15)), "{body}");
    };
    // Declaring needs `declare` on the table.
    denied(
        call(
            &stack,
            READER,
            "POST",
            "/v1/table/items/add_columns",
            declare("y"),
        )
        .await,
    );
    denied(
        call(
            &stack,
            STRANGER,
            "POST",
            "/v1/table/items/add_columns",
            declare("y"),
        )
        .await,
    );
    denied(
        call(
            &stack,
            SUBMITTER,
            "POST",
            "/v1/table/secret/add_columns",
            declare("y"),
        )
        .await,
    );
    let (status, body) = call(
        &stack,
        SUBMITTER,
        "POST",
        "/v1/table/items/add_columns",
        declare("y"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = call(
        &stack,
        OPS,
        "POST",
        "/v1/table/secret/add_columns",
        declare("y"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    // Submitting needs `submit`.
    let fill = json!({"column": "y"});
    denied(
        call(
            &stack,
            READER,
            "POST",
            "/v1/table/items/backfill_column",
            fill.clone(),
        )
        .await,
    );
    let (status, mine) = call(
        &stack,
        SUBMITTER,
        "POST",
        "/v1/table/items/backfill_column",
        fill.clone(),
    )
    .await;
    assert_eq!(status, 202, "{mine}");
    let (status, theirs) = call(
        &stack,
        OPS,
        "POST",
        "/v1/table/secret/backfill_column",
        fill,
    )
    .await;
    assert_eq!(status, 202, "{theirs}");
    let mine = mine["job_id"].as_str().unwrap().to_string();
    let theirs = theirs["job_id"].as_str().unwrap().to_string();

    // Reading: a job of a table one may not read does not exist.
    let (status, _) = call(&stack, READER, "GET", &format!("/v1/job/{mine}"), json!({})).await;
    assert_eq!(status, 200);
    let (status, body) = call(
        &stack,
        READER,
        "GET",
        &format!("/v1/job/{theirs}"),
        json!({}),
    )
    .await;
    assert_eq!((status, body["code"].clone()), (404, json!(10)), "{body}");
    denied(call(&stack, READER, "GET", "/v1/table/secret/jobs", json!({})).await);
    let (status, listed) = call(&stack, READER, "GET", "/v1/table/items/jobs", json!({})).await;
    assert_eq!(status, 200);
    assert_eq!(listed["jobs"].as_array().unwrap().len(), 1);

    // Cancelling needs `cancel`; an invisible job is still not found.
    denied(
        call(
            &stack,
            SUBMITTER,
            "POST",
            &format!("/v1/job/{mine}/cancel"),
            json!({}),
        )
        .await,
    );
    let (status, body) = call(
        &stack,
        SUBMITTER,
        "POST",
        &format!("/v1/job/{theirs}/cancel"),
        json!({}),
    )
    .await;
    assert_eq!((status, body["code"].clone()), (404, json!(10)), "{body}");
    let (status, body) = call(
        &stack,
        OPS,
        "POST",
        &format!("/v1/job/{mine}/cancel"),
        json!({}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    // A valid key the policy does not name may do nothing at all.
    denied(call(&stack, STRANGER, "GET", "/v1/table/items/jobs", json!({})).await);
    let (status, _) = call(
        &stack,
        STRANGER,
        "GET",
        &format!("/v1/job/{mine}"),
        json!({}),
    )
    .await;
    assert_eq!(status, 404);
}

/// Declaring a user function, and running one, is code execution: it needs
/// the `udf` action besides `declare` and `submit`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn user_functions_need_their_own_permission() {
    use base64::Engine as _;
    let stack = stack().await;
    let udf = base64::engine::general_purpose::STANDARD.encode(b"not unpickled by the API");
    let declare = |name: &str| {
        json!({"new_columns": [{"name": name, "virtual_column": {
            "input_columns": ["x"], "image": "local", "udf": udf, "udf_name": "f", "udf_version": "1",
            "outputs": [{"column": name, "struct_field": name, "data_type": {"type": "int64"}, "nullable": true}]}}]})
    };
    let (status, body) = call(
        &stack,
        SUBMITTER,
        "POST",
        "/v1/table/items/add_columns",
        declare("f"),
    )
    .await;
    assert_eq!((status, body["code"].clone()), (403, json!(15)), "{body}");
    let (status, body) = call(
        &stack,
        OPS,
        "POST",
        "/v1/table/items/add_columns",
        declare("f"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let fill = json!({"column": "f"});
    let (status, body) = call(
        &stack,
        SUBMITTER,
        "POST",
        "/v1/table/items/backfill_column",
        fill.clone(),
    )
    .await;
    assert_eq!((status, body["code"].clone()), (403, json!(15)), "{body}");
    let (status, body) = call(&stack, OPS, "POST", "/v1/table/items/backfill_column", fill).await;
    assert_eq!(status, 202, "{body}");
}

/// A bearer token's `sub` is its principal: it may do what the policy
/// grants that name, on those tables, and nothing else; a verified token
/// whose subject the policy does not name, or that has none, may do
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bearer_tokens_subject_is_its_principal() {
    let stack = stack().await;
    let bearer = format!("Bearer {}", token(Some("carol")));
    let carol = ("authorization", bearer.as_str());
    let (status, body) = call_with(
        &stack,
        carol,
        "POST",
        "/v1/table/items/add_columns",
        declare("y"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    denied(
        call_with(
            &stack,
            carol,
            "POST",
            "/v1/table/secret/add_columns",
            declare("y"),
        )
        .await,
    );
    let (status, body) = call(
        &stack,
        OPS,
        "POST",
        "/v1/table/secret/add_columns",
        declare("y"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let fill = json!({"column": "y"});
    let (status, mine) = call_with(
        &stack,
        carol,
        "POST",
        "/v1/table/items/backfill_column",
        fill.clone(),
    )
    .await;
    assert_eq!(status, 202, "{mine}");
    let (status, theirs) = call(
        &stack,
        OPS,
        "POST",
        "/v1/table/secret/backfill_column",
        fill,
    )
    .await;
    assert_eq!(status, 202, "{theirs}");
    let mine = mine["job_id"].as_str().unwrap().to_string();
    let theirs = theirs["job_id"].as_str().unwrap().to_string();
    // The job records the token's subject as its submitter.
    let job = stack
        .store()
        .get_job(&mine)
        .await
        .expect("read the job")
        .expect("the job exists");
    assert_eq!(job.spec.submitted_by, "jwt:https://issuer.example:carol");

    // It reads what the policy lets it read; other jobs do not exist.
    let (status, body) =
        call_with(&stack, carol, "GET", &format!("/v1/job/{mine}"), json!({})).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = call_with(
        &stack,
        carol,
        "GET",
        &format!("/v1/job/{theirs}"),
        json!({}),
    )
    .await;
    assert_eq!((status, body["code"].clone()), (404, json!(10)), "{body}");
    let (status, listed) = call_with(&stack, carol, "POST", "/v1/jobs/list", json!({})).await;
    assert_eq!(status, 200, "{listed}");
    let ids: Vec<&str> = listed["jobs"]
        .as_array()
        .expect("a list of jobs")
        .iter()
        .filter_map(|job| job["job_id"].as_str())
        .collect();
    assert_eq!(ids, vec![mine.as_str()], "{listed}");
    let (status, body) =
        call_with(&stack, carol, "POST", "/v1/table/items/describe", json!({})).await;
    assert_eq!(status, 200, "{body}");
    denied(
        call_with(
            &stack,
            carol,
            "POST",
            "/v1/table/secret/describe",
            json!({}),
        )
        .await,
    );
    // Cancelling is not among its actions, even of its own job.
    denied(
        call_with(
            &stack,
            carol,
            "POST",
            &format!("/v1/job/{mine}/cancel"),
            json!({}),
        )
        .await,
    );
    // The same token in the body's identity is the same principal.
    let body = json!({"column": "y", "identity": {"auth_token": token(Some("carol"))}});
    denied(
        stack
            .call(
                "POST",
                "/v1/table/secret/backfill_column",
                &[],
                Some(&body.to_string()),
            )
            .await,
    );

    // A token naming no subject names no principal: refused outright.
    let anonymous = format!("Bearer {}", token(None));
    let (status, body) = call_with(
        &stack,
        ("authorization", anonymous.as_str()),
        "GET",
        &format!("/v1/job/{mine}"),
        json!({}),
    )
    .await;
    denied((status, body.clone()));
    assert!(body["error"].as_str().unwrap().contains("'sub'"), "{body}");
    {
        let bearer = format!("Bearer {}", token(Some("mallory")));
        let other = ("authorization", bearer.as_str());
        denied(call_with(&stack, other, "GET", "/v1/table/items/jobs", json!({})).await);
        denied(
            call_with(
                &stack,
                other,
                "POST",
                "/v1/table/items/backfill_column",
                json!({"column": "y"}),
            )
            .await,
        );
        let (status, body) =
            call_with(&stack, other, "GET", &format!("/v1/job/{mine}"), json!({})).await;
        assert_eq!((status, body["code"].clone()), (404, json!(10)), "{body}");
    }
}

/// `LANCE_BACKFILL_POLICY=@path`: the policy is read from the file and it,
/// not anything else, decides. (The variable's value goes to the same
/// `Access::parse` as here; the test does not set the process's
/// environment, which other tests share.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_policy_in_a_file_is_read_and_enforced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("policy.json");
    // Unlike POLICY, this one lets the reader declare, and names no one else.
    std::fs::write(
        &path,
        r#"{"reader": {"tables": ["items"], "actions": ["read", "declare"]}}"#,
    )
    .expect("write the policy");
    let access = Access::parse(&format!("@{}", path.display())).expect("the policy file is read");
    let stack = stack_with(access).await;
    let (status, body) = call(
        &stack,
        READER,
        "POST",
        "/v1/table/items/add_columns",
        declare("y"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    denied(
        call(
            &stack,
            READER,
            "POST",
            "/v1/table/secret/add_columns",
            declare("y"),
        )
        .await,
    );
    denied(
        call(
            &stack,
            READER,
            "POST",
            "/v1/table/items/backfill_column",
            json!({"column": "y"}),
        )
        .await,
    );
    let (status, body) = call(&stack, READER, "GET", "/v1/table/items/jobs", json!({})).await;
    assert_eq!(status, 200, "{body}");
    // Principals of the inline policy are not in the file: nothing for them.
    denied(
        call(
            &stack,
            OPS,
            "POST",
            "/v1/table/secret/add_columns",
            declare("y"),
        )
        .await,
    );
    denied(call(&stack, SUBMITTER, "GET", "/v1/table/items/jobs", json!({})).await);
    // A file that is not there, or not a policy, stops the service from
    // starting rather than leaving it open.
    let missing = dir.path().join("missing.json");
    assert!(Access::parse(&format!("@{}", missing.display())).is_err());
    let broken = dir.path().join("broken.json");
    std::fs::write(&broken, r#"{"reader": {"tables": ["items"]}}"#).expect("write a bad policy");
    assert!(Access::parse(&format!("@{}", broken.display())).is_err());
}

/// Declaring alone starts no job: a maintained (`auto_backfill`) or an
/// `expression` column is filled by jobs, which need `submit` as well;
/// a plain computed column needs `declare` only.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn declaring_columns_that_start_jobs_needs_submit_too() {
    let stack = stack().await;
    let add = "/v1/table/items/add_columns";
    let maintained = json!({"new_columns": [{"name": "m", "computed": "x + 1"}],
        "context": {"auto_backfill": "true"}});
    let expression = json!({"new_columns": [{"name": "e", "expression": "x + 1"}]});
    for body in [maintained, expression] {
        let (status, answer) = call(&stack, DECLARER, "POST", add, body).await;
        denied((status, answer.clone()));
        assert!(
            answer["error"].as_str().unwrap().contains("submit"),
            "{answer}"
        );
    }
    let dataset = lance::Dataset::open(&stack.table_uri("items"))
        .await
        .unwrap();
    assert!(dataset.schema().field("m").is_none() && dataset.schema().field("e").is_none());
    let (status, answer) = call(&stack, DECLARER, "POST", add, declare("plain")).await;
    assert_eq!(status, 200, "{answer}");
}

/// A maintained column's jobs run on behalf of its declarer, with the
/// declarer's rights of the moment: revoked, the column stops (its record
/// and its last job say why); restored, it goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_maintained_column_runs_with_its_declarers_current_rights() {
    use std::time::Duration;

    use lance_backfill::app::runner::RunnerConfig;
    use lance_backfill::submit::maintain::MAINTAINER;
    use lance_backfill_tests::{append_rows, fast_engine};

    let mut stack = stack().await;
    stack.start_worker(
        fast_engine(),
        RunnerConfig::default(),
        Duration::from_secs(30),
    );
    let body = json!({"new_columns": [{"name": "m", "computed": "x + 1"}],
        "context": {"auto_backfill": "true"}});
    let (status, answer) = call(&stack, OPS, "POST", "/v1/table/items/add_columns", body).await;
    assert_eq!(status, 200, "{answer}");
    let first = answer["context"]["job_id"].as_str().unwrap().to_string();
    stack.wait_done(&first, Duration::from_secs(60)).await;
    let uri = stack.table_uri("items");
    let maintainer = |policy: &str| {
        stack
            .components
            .maintainer(StackOptions::default().settings)
            .with_access(Access::parse(policy).unwrap())
    };

    append_rows(&uri, 100, 50).await;
    let jobs = maintainer(POLICY).maintain(&items()).await.unwrap();
    assert_eq!(jobs.len(), 1);
    let job = stack.wait_done(&jobs[0], Duration::from_secs(60)).await;
    assert_eq!(job.spec.submitted_by, MAINTAINER);
    assert_eq!(job.spec.on_behalf_of.as_deref(), Some("key:ops"));

    // Ops may no longer submit: nothing runs, and the column says why.
    let revoked = POLICY.replace(
        r#""ops": {"tables": ["*"], "actions": ["read", "submit", "declare", "udf", "cancel"]}"#,
        r#""ops": {"tables": ["*"], "actions": ["read", "declare"]}"#,
    );
    assert_ne!(revoked, POLICY);
    append_rows(&uri, 150, 50).await;
    assert!(
        maintainer(&revoked)
            .maintain(&items())
            .await
            .unwrap()
            .is_empty()
    );
    let (mark, _) = stack.store().watermark(&items().key(), "m").await.unwrap();
    let reason = mark.stopped.expect("the column is stopped");
    assert!(
        reason.contains("key:ops") && reason.contains("submit"),
        "{reason}"
    );
    let events = stack.events(&job.job_id).await;
    assert!(events.iter().any(|e| e.contains("stopped")), "{events:?}");
    let m = lance_backfill_tests::read_i64(&uri, "m", &Default::default())
        .await
        .unwrap();
    assert_eq!(
        m.iter().filter(|v| v.is_none()).count(),
        50,
        "the new rows wait"
    );

    // Restored: the rows are filled.
    let jobs = maintainer(POLICY).maintain(&items()).await.unwrap();
    assert_eq!(jobs.len(), 1);
    stack.wait_done(&jobs[0], Duration::from_secs(60)).await;
    let m = lance_backfill_tests::read_i64(&uri, "m", &Default::default())
        .await
        .unwrap();
    assert!(m.iter().all(Option::is_some));
    let (mark, _) = stack.store().watermark(&items().key(), "m").await.unwrap();
    assert_eq!(mark.stopped, None);
}

fn items() -> lance_backfill::model::table::TableId {
    lance_backfill::model::table::TableId(vec!["items".to_string()])
}

/// A function of 64 outputs declared with a manifest of a million bytes:
/// the binding is kept once (the other outputs name the first), the
/// manifest beside the table, so the schema every later manifest copies
/// stays small; its job's record carries no binding; `describe` shows a
/// principal without `udf` no payload and no manifest.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_large_declaration_is_stored_once_and_shown_without_its_code() {
    use base64::Engine as _;
    let stack = stack().await;
    let outputs: Vec<Value> = (0..64)
        .map(|i| {
            json!({"column": format!("o{i}"), "struct_field": format!("o{i}"),
            "data_type": {"type": "int64"}, "nullable": true})
        })
        .collect();
    let manifest = json!({"description": "m".repeat(1_000_000)}).to_string();
    let pickle = base64::engine::general_purpose::STANDARD.encode([7u8; 1500]);
    let entry = json!({"name": "o0", "virtual_column": {"input_columns": ["x"],
        "outputs": outputs, "udf": pickle, "udf_name": "wide", "udf_version": "1",
        "image": "local", "manifest": manifest,
        "field_metadata": {"team": "search"}}});
    let body = json!({"new_columns": [entry]});
    let (status, answer) = call(&stack, OPS, "POST", "/v1/table/items/add_columns", body).await;
    assert_eq!(status, 200, "{answer}");

    let dataset = lance::Dataset::open(&stack.table_uri("items"))
        .await
        .unwrap();
    let metadata_bytes: usize = dataset
        .schema()
        .fields
        .iter()
        .flat_map(|f| f.metadata.iter().map(|(k, v)| k.len() + v.len()))
        .sum();
    assert!(
        metadata_bytes < 32 * 1024,
        "the schema's metadata: {metadata_bytes} bytes"
    );
    let last = dataset.schema().field("o63").unwrap();
    assert_eq!(last.metadata["lance-backfill:udf-output-of"], "o0");
    assert_eq!(last.metadata["team"], "search");

    // The job's record names the function; it does not carry it.
    let (status, answer) = call(
        &stack,
        OPS,
        "POST",
        "/v1/table/items/backfill_column",
        json!({"column": "o5"}),
    )
    .await;
    assert_eq!(status, 202, "{answer}");
    let job = stack
        .store()
        .get_job(answer["job_id"].as_str().unwrap())
        .await
        .unwrap()
        .unwrap();
    let record = serde_json::to_vec(&job.spec).unwrap().len();
    assert!(record < 8 * 1024, "the job's record: {record} bytes");
    assert_eq!(job.spec.columns().len(), 64);

    // Describe: small for everyone; the payload only for who may run code.
    let describe = "/v1/table/items/describe";
    let (status, for_reader) = call(&stack, READER, "POST", describe, json!({})).await;
    assert_eq!(status, 200, "{for_reader}");
    let text = for_reader.to_string();
    assert!(text.len() < 64 * 1024, "describe: {} bytes", text.len());
    assert!(
        !text.contains(&pickle) && !text.contains("mmmmmmmm"),
        "no code, no manifest"
    );
    assert!(text.contains("wide"), "the binding's metadata is shown");
    let (_, for_ops) = call(&stack, OPS, "POST", describe, json!({})).await;
    assert!(
        for_ops.to_string().contains(&pickle),
        "the payload, to who may run it"
    );

    // Metadata keys of the service's own are refused.
    let forged = json!({"new_columns": [{"name": "f", "virtual_column": {"input_columns": ["x"],
        "outputs": [{"column": "f", "struct_field": "f", "data_type": {"type": "int64"}, "nullable": true}],
        "udf": pickle, "udf_name": "f", "udf_version": "1", "image": "local",
        "field_metadata": {"lance-backfill:declared-by": "key:ops"}}}]});
    let (status, answer) = call(&stack, OPS, "POST", "/v1/table/items/add_columns", forged).await;
    assert_eq!(
        (status, answer["code"].clone()),
        (400, json!(13)),
        "{answer}"
    );
    assert!(
        answer["error"].as_str().unwrap().contains("reserved"),
        "{answer}"
    );
}
