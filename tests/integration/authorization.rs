//! The authorization policy over HTTP: who may read, submit, declare and
//! cancel on which tables; jobs of other tables do not exist for them.

use lance_backfill::api::auth::{Authenticator, sha256_hex};
use lance_backfill::api::policy::Access;
use lance_backfill_tests::{Stack, StackOptions, write_sample_table};
use serde_json::{Value, json};

const OPS: &str = "ops-secret";
const READER: &str = "reader-secret";
const SUBMITTER: &str = "submitter-secret";
const STRANGER: &str = "stranger-secret";

const POLICY: &str = r#"{
    "ops": {"tables": ["*"], "actions": ["read", "submit", "declare", "udf", "cancel"]},
    "reader": {"tables": ["items"], "actions": ["read"]},
    "submitter": {"tables": ["item?"], "actions": ["read", "submit", "declare"]}
}"#;

async fn stack() -> Stack {
    let mut auth = Authenticator::default();
    for (name, key) in [
        ("ops", OPS),
        ("reader", READER),
        ("submitter", SUBMITTER),
        ("stranger", STRANGER),
    ] {
        auth = auth
            .with_key_digest(&format!("{name}:{}", sha256_hex(key)))
            .unwrap();
    }
    let auth = auth.with_access(Access::parse(POLICY).unwrap());
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
    let body = (method == "POST").then(|| body.to_string());
    stack
        .call(method, path, &[("x-api-key", key)], body.as_deref())
        .await
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
