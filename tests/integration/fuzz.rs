//! Property tests of the API handler: arbitrary bodies, path ids,
//! delimiters, query strings and headers on every route, and `add_columns`
//! bodies declaring user functions (`virtual_column`), never panic and
//! never get a 5xx; every error is an ErrorResponse with a code.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use lance_backfill::http::Service;
use lance_backfill_tests::{API_KEY, Stack, StackOptions, write_sample_table};
use proptest::prelude::*;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

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
    "job_id",
    "limit",
    "page_token",
    "version",
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

fn body(job_id: String) -> impl Strategy<Value = Vec<u8>> {
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
        1 => amplifying_sql().prop_map(|sql| {
            json!({"column": "y", "where": format!("length({sql}) > 0")}).to_string().into_bytes()
        }),
        1 => value().prop_map(|v| v.to_string().into_bytes()),
        // What `/v1/jobs/*` read: a job that exists, a page.
        1 => Just(json!({ "job_id": job_id }).to_string().into_bytes()),
        1 => (
            proptest::option::of(0u64..2000),
            proptest::option::of("[a-zA-Z0-9=_-]{0,16}"),
        )
            .prop_map(|(limit, page_token)| {
                json!({"limit": limit, "page_token": page_token})
                    .to_string()
                    .into_bytes()
            }),
    ]
}

/// Output names of generated declarations: few, so one that is accepted
/// once is refused as a duplicate after; the table's own columns; names
/// that are empty or hold a separator.
const UDF_OUTPUTS: &[&str] = &["f", "g", "emb", "x", "y", "", " ", "a.b", "f$g"];

/// Input columns: the table's, the declared `y`, missing ones.
const UDF_INPUTS: &[&str] = &["x", "s", "id", "y", "nope", "", "X"];

/// A pickle: the API never unpickles it, so any bytes do.
fn pickle() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..128)
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A list of lists `depth` deep: past serde's recursion limit at the deep
/// end, a long walk for the type conversion before it.
fn nested_list(depth: usize) -> Value {
    let mut data_type = json!({"type": "int64"});
    for _ in 0..depth {
        data_type = json!({"type": "list", "fields": [{"name": "item", "nullable": true, "type": data_type}]});
    }
    data_type
}

/// A struct of `width` int64 fields.
fn wide_struct(width: usize) -> Value {
    let fields: Vec<Value> = (0..width)
        .map(|i| json!({"name": format!("f{i}"), "nullable": true, "type": {"type": "int64"}}))
        .collect();
    json!({"type": "struct", "fields": fields})
}

/// An output's `data_type`: JSON Arrow types this service takes, names it
/// does not, sizes and precisions out of every range, nested, deep and
/// wide ones.
fn data_type() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        4 => prop::sample::select(vec![
            json!({"type": "int64"}),
            json!({"type": "float32"}),
            json!({"type": "utf8"}),
            json!({"type": "BOOL"}),
            json!({"type": "timestamp"}),
            json!({"type": "null"}),
            json!({"type": "large_binary"}),
            json!({"type": "date32"}),
        ]),
        2 => prop::sample::select(vec![
            json!({"type": "quaternion"}),
            json!({"type": ""}),
            json!({"type": 7}),
            json!("int64"),
            Value::Null,
            json!({}),
            json!([]),
            json!({"type": "list"}),
            json!({"type": "struct"}),
            json!({"type": "map", "fields": [{"name": "entries", "nullable": false, "type": {"type": "int64"}}]}),
        ]),
        2 => (
            prop::sample::select(vec!["decimal32", "decimal128", "decimal256", "fixed_size_binary"]),
            prop_oneof![
                Just(0i64),
                Just(-1i64),
                Just(38_010i64),
                Just(1i64 << 31),
                Just(i64::MAX),
                Just(i64::MIN),
                any::<i64>(),
            ],
        )
            .prop_map(|(name, length)| json!({"type": name, "length": length})),
    ];
    let nested = leaf.prop_recursive(3, 16, 3, |inner| {
        prop_oneof![
            inner.clone().prop_map(|item| {
                json!({"type": "list", "fields": [{"name": "item", "nullable": true, "type": item}]})
            }),
            (
                inner.clone(),
                prop_oneof![
                    Just(4i64),
                    Just(0i64),
                    Just(-1i64),
                    Just(1i64 << 31),
                    Just(i64::MAX)
                ],
            )
                .prop_map(|(item, length)| {
                    json!({"type": "fixed_size_list", "length": length,
                        "fields": [{"name": "item", "nullable": true, "type": item}]})
                }),
            prop::collection::vec(inner, 0..3).prop_map(|types| {
                let fields: Vec<Value> = types
                    .into_iter()
                    .enumerate()
                    .map(|(i, t)| json!({"name": format!("f{i}"), "nullable": true, "type": t}))
                    .collect();
                json!({"type": "struct", "fields": fields})
            }),
        ]
    });
    prop_oneof![
        8 => nested,
        1 => (2usize..60).prop_map(nested_list),
        1 => (10usize..300).prop_map(wide_struct),
    ]
}

fn output() -> impl Strategy<Value = Value> {
    (
        prop::sample::select(UDF_OUTPUTS),
        prop::sample::select(vec!["", "f", "value"]),
        data_type(),
        any::<bool>(),
        proptest::option::of(prop::collection::btree_map("[a-z:]{1,8}", ".{0,8}", 0..3)),
    )
        .prop_map(|(column, struct_field, data_type, nullable, metadata)| {
            let mut output = json!({"column": column, "struct_field": struct_field,
                "data_type": data_type, "nullable": nullable});
            if let Some(metadata) = metadata {
                output["metadata"] = json!(metadata);
            }
            output
        })
}

/// `udf` and `udf_backend` (absent when None): well-formed payloads of
/// both backends, and each way one can be broken.
fn udf_payload() -> impl Strategy<Value = (Value, Option<Value>)> {
    prop_oneof![
        // cloudpickle, named, null or implied.
        3 => (
            pickle(),
            prop::sample::select(vec![None, Some(Value::Null), Some(json!("cloudpickle"))]),
        )
            .prop_map(|(pickle, backend)| (json!(BASE64.encode(pickle)), backend)),
        // DockerUDFSpecV1 with its checksum right (in either case), wrong
        // or missing, and code archives that are or are not base64.
        3 => (
            pickle(),
            0u8..5,
            proptest::option::of(prop::collection::vec(
                prop::sample::select(vec!["UEsFBgAAAAAAAAAAAAAAAAAAAAAAAA==", "***"]),
                0..3,
            )),
        )
            .prop_map(|(pickle, checksum, zips)| {
                let right = sha256_hex(&pickle);
                let checksum = match checksum {
                    0 | 1 => json!(right),
                    2 => json!(right.to_uppercase()),
                    3 => json!("00"),
                    _ => Value::Null,
                };
                let mut document = json!({"image": "local", "tag": "1",
                    "udf_pickle": BASE64.encode(&pickle), "udf_checksum": checksum,
                    "workspace_checksum": null});
                if let Some(zips) = zips {
                    document["workspace_zips"] = json!(zips);
                }
                (
                    json!(BASE64.encode(document.to_string())),
                    Some(json!("DockerUDFSpecV1")),
                )
            }),
        // The Docker backend named, no such document in the payload.
        1 => prop_oneof![
            pickle(),
            Just(b"{}".to_vec()),
            Just(br#"{"udf_pickle": "***", "udf_checksum": "00"}"#.to_vec()),
        ]
        .prop_map(|raw| (json!(BASE64.encode(raw)), Some(json!("DockerUDFSpecV1")))),
        // Not base64.
        2 => (
            prop::sample::select(vec!["***", "YQ", "a b", "====", "\u{0}"]),
            prop::sample::select(vec![
                None,
                Some(json!("cloudpickle")),
                Some(json!("DockerUDFSpecV1")),
            ]),
        )
            .prop_map(|(udf, backend)| (json!(udf), backend)),
        // Backends this service does not read.
        2 => (
            pickle(),
            prop_oneof![
                Just("torchscript".to_string()),
                Just(String::new()),
                Just("CLOUDPICKLE".to_string()),
                ".{0,12}".prop_map(|s| s),
            ],
        )
            .prop_map(|(pickle, backend)| (json!(BASE64.encode(pickle)), Some(json!(backend)))),
        // Not a string at all.
        1 => prop::sample::select(vec![Value::Null, json!(5), json!({"udf": "x"}), json!(["a"])])
            .prop_map(|udf| (udf, None::<Value>)),
    ]
}

/// `manifest` and `manifest_checksum`: none, matching, not matching, a
/// checksum without its manifest.
fn manifest() -> impl Strategy<Value = Vec<(&'static str, Value)>> {
    (0u8..4).prop_map(|kind| match kind {
        0 => Vec::new(),
        1 => vec![
            ("manifest", json!("py311")),
            ("manifest_checksum", json!(sha256_hex(b"py311"))),
        ],
        2 => vec![
            ("manifest", json!("py311")),
            ("manifest_checksum", json!("00")),
        ],
        _ => vec![("manifest_checksum", json!(sha256_hex(b"py311")))],
    })
}

/// A `virtual_column` entry (docs/udf.md), valid or broken in any field.
fn virtual_column() -> impl Strategy<Value = Value> {
    let inputs = prop_oneof![
        8 => prop::collection::vec(prop::sample::select(UDF_INPUTS), 0..4).prop_map(|c| json!(c)),
        // More than a function may read (256), or not a list.
        1 => Just(json!(vec!["x"; 300])),
        1 => Just(json!("x")),
    ];
    let outputs = prop_oneof![
        8 => prop::collection::vec(output(), 0..4).prop_map(Value::from),
        // More than a function may fill (64), or not a list.
        1 => Just(Value::from(
            (0..65)
                .map(|i| json!({"column": format!("o{i}"), "struct_field": "",
                    "data_type": {"type": "int64"}, "nullable": true}))
                .collect::<Vec<_>>()
        )),
        1 => Just(json!({"column": "f"})),
    ];
    (
        inputs,
        outputs,
        udf_payload(),
        manifest(),
        prop::sample::select(vec![
            None,
            Some(json!(true)),
            Some(json!(false)),
            Some(json!("yes")),
        ]),
        prop::sample::select(vec!["local", "", "gpu"]),
        proptest::option::of(prop::collection::btree_map("[a-z:-]{1,8}", ".{0,8}", 0..3)),
    )
        .prop_map(
            |(inputs, outputs, (udf, backend), manifest, auto_backfill, image, field_metadata)| {
                let mut entry = json!({"input_columns": inputs, "outputs": outputs, "udf": udf,
                    "udf_name": "f", "udf_version": "1", "image": image});
                if let Some(backend) = backend {
                    entry["udf_backend"] = backend;
                }
                for (field, value) in manifest {
                    entry[field] = value;
                }
                if let Some(auto_backfill) = auto_backfill {
                    entry["auto_backfill"] = auto_backfill;
                }
                if let Some(field_metadata) = field_metadata {
                    entry["field_metadata"] = json!(field_metadata);
                }
                entry
            },
        )
}

/// An `add_columns` body declaring user functions: `virtual_column`
/// entries, one beside a `computed` in the same entry, a null one, SQL
/// ones, and the request's `auto_backfill`.
fn declaration() -> impl Strategy<Value = Vec<u8>> {
    let entry = prop_oneof![
        6 => (prop::sample::select(UDF_OUTPUTS), virtual_column())
            .prop_map(|(name, udf)| json!({"name": name, "virtual_column": udf})),
        1 => (prop::sample::select(UDF_OUTPUTS), virtual_column())
            .prop_map(|(name, udf)| json!({"name": name, "virtual_column": udf, "computed": "x + 1"})),
        1 => prop::sample::select(UDF_OUTPUTS)
            .prop_map(|name| json!({"name": name, "virtual_column": null})),
        1 => prop::sample::select(vec!["c", "x", ""])
            .prop_map(|name| json!({"name": name, "computed": "x + 1"})),
        1 => amplifying_sql().prop_map(|sql| json!({"name": "c", "computed": sql})),
    ];
    (
        prop::collection::vec(entry, 0..3),
        prop::sample::select(vec![None, Some("true"), Some("false"), Some("maybe")]),
    )
        .prop_map(|(entries, auto_backfill)| {
            let mut body = json!({ "new_columns": entries });
            if let Some(auto_backfill) = auto_backfill {
                body["context"] = json!({ "auto_backfill": auto_backfill });
            }
            body.to_string().into_bytes()
        })
}

fn path(job_id: String) -> impl Strategy<Value = (Method, String)> {
    let id = prop_oneof![
        6 => Just("items".to_string()), 1 => Just("items%24x".to_string()), 1 => Just("%24".to_string()),
        1 => Just("".to_string()), 1 => Just("%ZZ".to_string()), 1 => Just("%C3%28".to_string()),
        2 => "[a-zA-Z0-9$%._~-]{0,16}".prop_map(|s| s),
        // A job that exists, for the job routes.
        2 => Just(job_id),
    ];
    // Mostly real routes with their method, so requests reach validation:
    // every route of http/routes.rs, and some with the wrong method.
    let route = prop_oneof![
        6 => Just((Method::POST, "/v1/table/{}/backfill_column")),
        4 => Just((Method::POST, "/v1/table/{}/add_columns")),
        1 => Just((Method::GET, "/v1/table/{}/jobs")),
        1 => Just((Method::GET, "/v1/job/{}")),
        1 => Just((Method::POST, "/v1/job/{}/cancel")),
        2 => Just((Method::POST, "/v1/table/{}/describe")),
        1 => Just((Method::POST, "/v1/table/{}/describe/")),
        2 => Just((Method::POST, "/v1/jobs/describe")),
        1 => Just((Method::POST, "/v1/jobs/list")),
        1 => Just((Method::POST, "/v1/jobs/cancel")),
        1 => Just((Method::GET, "/health")),
        1 => Just((Method::DELETE, "/v1/table/{}/backfill_column")),
        1 => Just((Method::GET, "/v1/jobs/list")),
        1 => Just((Method::POST, "/health")),
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

/// The process's peak resident set (`VmHWM`) in MB: the server's and the
/// generator's together, so a bound on the handler's. Under nextest each
/// test is a process of its own; under `cargo test` the other tests of the
/// binary count too.
fn peak_rss_mb() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024)
}

#[test]
fn the_api_handler_takes_anything() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (stack, service, job_id): (Stack, Arc<Service>, String) = runtime.block_on(async {
        let stack = Stack::embedded(StackOptions::default()).await;
        write_sample_table(&stack.table_uri("items"), 200, 2)
            .await
            .unwrap();
        stack.declare("items", &[("y", "x * 2 + 1")]).await;
        // A job for the job routes to find (no worker runs it).
        let job_id = stack.submit("items", json!({"column": "y"})).await;
        let service = stack.service.clone();
        (stack, service, job_id)
    });
    let cases: u32 = std::env::var("LANCE_BACKFILL_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000);
    let mut runner = lance_backfill_tests::seeded_runner(cases);
    let strategy = (
        path(job_id.clone()),
        query(),
        headers(),
        body(job_id),
        prop::bool::weighted(0.8),
        declaration(),
        prop::bool::weighted(0.7),
    );
    let statuses = std::sync::Mutex::new(BTreeMap::<u16, u32>::new());
    // `add_columns` requests that declared user functions, and those of
    // them answered 200.
    let declarations = AtomicU32::new(0);
    let accepted = AtomicU32::new(0);
    runner
        .run(
            &strategy,
            |((method, path), query, headers, body, with_key, declaration, declaring)| {
                // Most `add_columns` requests declare user functions; the
                // other routes never read a declaration.
                let declaring = declaring && path.ends_with("/add_columns");
                let body = if declaring { declaration } else { body };
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
                let request =
                    lance_backfill::http::request(method, &target, map, Bytes::from(body));
                let response = runtime.block_on(service.handle(request));
                *statuses
                    .lock()
                    .unwrap()
                    .entry(response.status.as_u16())
                    .or_default() += 1;
                if declaring {
                    declarations.fetch_add(1, Ordering::Relaxed);
                    if response.status.as_u16() == 200 {
                        accepted.fetch_add(1, Ordering::Relaxed);
                    }
                }
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
    let statuses = statuses.into_inner().unwrap();
    let mut classes = BTreeMap::<String, u32>::new();
    for (status, count) in &statuses {
        *classes.entry(format!("{}xx", *status / 100)).or_default() += *count;
    }
    let peak = peak_rss_mb().map_or_else(|| "unknown".to_string(), |mb| format!("{mb} MB"));
    println!(
        "FIGURES fuzz: {cases} requests ({} add_columns declaring user functions, {} accepted), no 5xx, no panic; by class {classes:?}; statuses {statuses:?}; peak RSS {peak} (seed {})",
        declarations.load(Ordering::Relaxed),
        accepted.load(Ordering::Relaxed),
        lance_backfill_tests::fuzz_seed()
    );
    drop(stack);
}

/// Counts a function may be asked for: small, huge, from the data, negative.
const COUNTS: &[&str] = &[
    "0",
    "-5",
    "3",
    "1000",
    "1000000",
    "100000000",
    "2000000000",
    "x",
    "x * 1000000",
    "length(s)",
];

/// A string expression built of functions that make more than they read.
fn text_sql() -> impl Strategy<Value = String> {
    let leaf = prop::sample::select(vec!["s", "'ab'", "'é'", "CAST(x AS VARCHAR)"])
        .prop_map(str::to_string);
    leaf.prop_recursive(3, 12, 3, |inner| {
        let count = prop::sample::select(COUNTS);
        prop_oneof![
            (inner.clone(), count.clone()).prop_map(|(e, c)| format!("repeat({e}, {c})")),
            (inner.clone(), count.clone()).prop_map(|(e, c)| format!("lpad({e}, {c})")),
            (inner.clone(), count.clone(), inner.clone())
                .prop_map(|(e, c, f)| format!("rpad({e}, {c}, {f})")),
            (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("concat({a}, {b})")),
            (inner.clone(), inner.clone(), inner.clone())
                .prop_map(|(a, b, c)| format!("concat_ws({a}, {b}, {c}, {b})")),
            (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("replace({a}, 'a', {b})")),
            (inner.clone(), inner.clone())
                .prop_map(|(a, b)| format!("regexp_replace({a}, '.', {b}, 'g')")),
            inner.clone().prop_map(|a| format!("upper({a})")),
            (count.clone(), inner.clone())
                .prop_map(|(c, e)| { format!("array_to_string(array_repeat(x, {c}), {e})") }),
        ]
    })
}

/// What a computed column may be: text, lists of it, series, or a length.
fn amplifying_sql() -> impl Strategy<Value = String> {
    let count = prop::sample::select(COUNTS);
    prop_oneof![
        4 => text_sql(),
        1 => (text_sql(), count.clone()).prop_map(|(e, c)| format!("array_repeat({e}, {c})")),
        1 => count.clone().prop_map(|c| format!("range(0, {c})")),
        1 => count.clone().prop_map(|c| format!("generate_series(x, {c})")),
        1 => count.clone().prop_map(|c| format!("array_resize(make_array(x), {c}, 0)")),
        1 => text_sql().prop_map(|e| format!("string_to_array({e}, '')")),
        1 => text_sql().prop_map(|e| format!("length({e})")),
    ]
}

/// 64 rows: `x` 0..64, `s` of up to 2,000 characters.
fn long_strings() -> arrow_array::RecordBatch {
    use arrow_array::{Int64Array, StringArray};
    let s: Vec<String> = (0..64).map(|i| "abcé".repeat(i * 8)).collect();
    arrow_array::RecordBatch::try_from_iter(vec![
        (
            "x",
            Arc::new(Int64Array::from_iter_values(0..64)) as arrow_array::ArrayRef,
        ),
        ("s", Arc::new(StringArray::from(s)) as arrow_array::ArrayRef),
    ])
    .unwrap()
}

/// What becomes of `sql` declared as a computed column and evaluated over
/// `batch` as a worker evaluates it.
async fn evaluate_as_worker(sql: &str, batch: &arrow_array::RecordBatch) -> &'static str {
    use lance_backfill::run::computed::{Program, TargetColumn, infer_expression};
    let base = batch.schema();
    let Ok((data_type, _)) = infer_expression(&base, sql, "the expression") else {
        return "refused when declared";
    };
    let mut fields: Vec<arrow_schema::Field> =
        base.fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.push(arrow_schema::Field::new("y", data_type.clone(), true));
    let arrow = Arc::new(arrow_schema::Schema::new(fields));
    let schema = lance::datatypes::Schema::try_from(arrow.as_ref()).unwrap();
    let target = TargetColumn {
        name: "y".into(),
        expression: sql.into(),
        data_type: data_type.clone(),
        udf: None,
    };
    let Ok(program) = Program::compile(&schema, &target, None) else {
        return "refused when planned";
    };
    let mut columns = batch.columns().to_vec();
    columns.push(arrow_array::new_null_array(&data_type, batch.num_rows()));
    let full = arrow_array::RecordBatch::try_new(arrow, columns).unwrap();
    let names: Vec<&str> = program
        .read_schema
        .fields
        .iter()
        .map(|f| f.name.as_str())
        .collect();
    let indices: Vec<usize> = names
        .iter()
        .map(|n| full.schema().index_of(n).unwrap())
        .collect();
    let read = full.project(&indices).unwrap();
    match program.evaluate(&read, None).await {
        Ok(_) => "values",
        Err(_) => "failed its task",
    }
}

/// SQL built of the functions that make more than they read (repeat,
/// lpad/rpad, concat and concat_ws of repeats, replace and regexp_replace,
/// array functions, series), at counts up to billions, evaluated over rows
/// of up to 2,000 characters as a worker evaluates it: each gets values or
/// an error; the process is never aborted, its memory never runs away.
#[test]
fn amplifying_sql_gets_values_or_an_error_never_the_end_of_the_process() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let cases: u32 = std::env::var("LANCE_BACKFILL_SQL_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400);
    let batch = long_strings();
    let outcomes = std::sync::Mutex::new(BTreeMap::<&str, u32>::new());
    let mut runner = lance_backfill_tests::seeded_runner(cases);
    runner
        .run(&amplifying_sql(), |sql| {
            let outcome = runtime.block_on(evaluate_as_worker(&sql, &batch));
            *outcomes.lock().unwrap().entry(outcome).or_default() += 1;
            Ok(())
        })
        .unwrap();
    let peak = peak_rss_mb().map_or_else(|| "unknown".to_string(), |mb| format!("{mb} MB"));
    println!(
        "FIGURES sql fuzz: {cases} expressions, outcomes {:?}, peak RSS {peak} (seed {})",
        outcomes.into_inner().unwrap(),
        lance_backfill_tests::fuzz_seed()
    );
}
