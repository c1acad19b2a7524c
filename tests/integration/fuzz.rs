//! Property tests of the API handler: arbitrary bodies, path ids,
//! delimiters, query strings and headers never panic and never get a 5xx;
//! every error is an ErrorResponse with a code.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use lance_backfill::api::Service;
use lance_backfill_tests::{API_KEY, Stack, StackOptions, write_sample_table};
use proptest::prelude::*;
use serde_json::{Value, json};

const FIELDS: &[&str] = &[
    "column",
    "identity",
    "id",
    "branch",
    "where",
    "concurrency",
    "intra_applier_concurrency",
    "min_checkpoint_size",
    "max_checkpoint_size",
    "batch_checkpoint_flush_interval_seconds",
    "read_version",
    "task_size",
    "num_frags",
    "checkpoint_size",
    "commit_granularity",
    "cluster",
    "manifest",
    "new_columns",
    "context",
    "unknown",
];

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        prop_oneof![
            Just(0i64),
            Just(1),
            Just(-1),
            Just(i32::MAX as i64 + 1),
            Just(i32::MIN as i64)
        ]
        .prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        prop_oneof![
            Just("y".to_string()),
            Just("x".to_string()),
            Just("x > 3".to_string()),
            Just("`y` IS NULL".to_string()),
            Just("y.z".to_string()),
            Just("main".to_string()),
            Just("gpu".to_string()),
            Just("py311".to_string()),
            ".{0,12}".prop_map(|s| s),
        ]
        .prop_map(Value::from),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    scalar().prop_recursive(2, 8, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map("[a-z_]{1,8}", inner, 0..3)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => prop::collection::vec((prop::sample::select(FIELDS), value()), 0..6).prop_map(|fields| {
            let mut object = serde_json::Map::new();
            for (k, v) in fields {
                object.insert(k.to_string(), v);
            }
            if !object.contains_key("column") {
                object.insert("column".into(), json!("y"));
            }
            Value::Object(object).to_string().into_bytes()
        }),
        1 => prop::collection::vec(any::<u8>(), 0..64),
        1 => value().prop_map(|v| v.to_string().into_bytes()),
    ]
}

fn path() -> impl Strategy<Value = (Method, String)> {
    let id = prop_oneof![
        6 => Just("items".to_string()), 1 => Just("items%24x".to_string()), 1 => Just("%24".to_string()),
        1 => Just("".to_string()), 1 => Just("%ZZ".to_string()), 1 => Just("%C3%28".to_string()),
        2 => "[a-zA-Z0-9$%._~-]{0,16}".prop_map(|s| s),
    ];
    // Mostly real routes with their method, so requests reach validation.
    let route = prop_oneof![
        6 => Just((Method::POST, "/v1/table/{}/backfill_column")),
        2 => Just((Method::POST, "/v1/table/{}/add_columns")),
        1 => Just((Method::GET, "/v1/table/{}/jobs")),
        1 => Just((Method::GET, "/v1/job/{}")),
        1 => Just((Method::POST, "/v1/job/{}/cancel")),
        1 => Just((Method::DELETE, "/v1/table/{}/backfill_column")),
        1 => Just((Method::GET, "/{}")),
    ];
    (route, id).prop_map(|((m, r), id)| (m, r.replace("{}", &id)))
}

fn query() -> impl Strategy<Value = Option<String>> {
    proptest::option::of(prop_oneof![
        Just("delimiter=%24".to_string()),
        Just("delimiter=".to_string()),
        Just("delimiter=.".to_string()),
        Just("limit=0".to_string()),
        Just("limit=5&page_token=abc".to_string()),
        Just("delimiter=%FF".to_string()),
        "[a-z=&%0-9]{0,20}".prop_map(|s| s),
    ])
}

fn headers() -> impl Strategy<Value = Vec<(&'static str, String)>> {
    prop::collection::vec(
        (
            prop_oneof![
                Just("x-api-key"),
                Just("authorization"),
                Just("idempotency-key"),
                Just("content-type")
            ],
            prop_oneof![
                6 => Just(API_KEY.to_string()), 1 => Just("Bearer a.b.c".to_string()), 1 => Just("Basic x".to_string()),
                1 => "[ -~]{0,24}".prop_map(|s| s),
            ],
        ),
        0..3,
    )
}

#[test]
fn the_api_handler_takes_anything() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (stack, service): (Stack, Arc<Service>) = runtime.block_on(async {
        let stack = Stack::embedded(StackOptions::default()).await;
        write_sample_table(&stack.table_uri("items"), 200, 2)
            .await
            .unwrap();
        stack.declare("items", &[("y", "x * 2 + 1")]).await;
        let service = stack.service.clone();
        (stack, service)
    });
    let cases: u32 = std::env::var("LANCE_BACKFILL_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600);
    let mut runner = lance_backfill_tests::seeded_runner(cases);
    let strategy = (
        path(),
        query(),
        headers(),
        body(),
        prop::bool::weighted(0.8),
    );
    let statuses = std::sync::Mutex::new(std::collections::BTreeMap::<u16, u32>::new());
    runner
        .run(
            &strategy,
            |((method, path), query, headers, body, with_key)| {
                let mut map = HeaderMap::new();
                if with_key {
                    map.insert("x-api-key", HeaderValue::from_static(API_KEY));
                }
                for (name, value) in headers {
                    if let Ok(value) = HeaderValue::from_str(&value) {
                        map.insert(HeaderName::from_static(name), value);
                    }
                }
                let target = match query {
                    Some(q) => format!("{path}?{q}"),
                    None => path,
                };
                let request = lance_backfill::api::request(method, &target, map, Bytes::from(body));
                let response = runtime.block_on(service.handle(request));
                *statuses
                    .lock()
                    .unwrap()
                    .entry(response.status.as_u16())
                    .or_default() += 1;
                prop_assert!(
                    response.status.as_u16() < 500,
                    "{target}: {} {}",
                    response.status,
                    String::from_utf8_lossy(&response.body)
                );
                let json: Value = serde_json::from_slice(&response.body).expect("JSON body");
                if response.status.as_u16() >= 400 {
                    prop_assert!(json["code"].is_i64(), "{json}");
                    prop_assert!(json["error"].is_string(), "{json}");
                }
                Ok(())
            },
        )
        .unwrap();
    println!(
        "FIGURES fuzz: {cases} requests, no 5xx, no panic; statuses {:?} (seed {})",
        statuses.lock().unwrap(),
        lance_backfill_tests::fuzz_seed()
    );
    drop(stack);
}
