//! What cfn-lint does not check in template.yaml: the values the service
//! depends on.

use serde_yaml::Value;

fn template() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../template.yaml");
    serde_yaml::from_str(&std::fs::read_to_string(path).expect("template.yaml"))
        .expect("valid YAML")
}

fn resource<'a>(template: &'a Value, name: &str) -> &'a Value {
    &template["Resources"][name]
}

/// `!Ref X` parses as a tagged value; this returns X.
fn reference(value: &Value) -> Option<String> {
    match value {
        Value::Tagged(tagged) if tagged.tag == "!Ref" => tagged.value.as_str().map(str::to_string),
        _ => None,
    }
}

/// A function's own environment variables (Globals sets none).
fn environment<'a>(template: &'a Value, function: &str) -> &'a Value {
    &resource(template, function)["Properties"]["Environment"]["Variables"]
}

/// What only the API function may hold: how callers authenticate, what
/// they may do, and the key that seals page tokens.
const API_SECRETS: [&str; 9] = [
    "LANCE_BACKFILL_API_KEYS",
    "LANCE_BACKFILL_API_KEY_HASHES",
    "LANCE_BACKFILL_JWT_ISSUER",
    "LANCE_BACKFILL_JWT_AUDIENCE",
    "LANCE_BACKFILL_JWT_SECRET",
    "LANCE_BACKFILL_JWT_PUBLIC_KEY",
    "LANCE_BACKFILL_JWT_JWKS",
    "LANCE_BACKFILL_POLICY",
    "LANCE_BACKFILL_TOKEN_SECRET",
];

#[test]
fn functions_queue_and_table_fit_together() {
    let template = template();
    for (function, binary) in [("ApiFunction", "api"), ("WorkerFunction", "worker")] {
        let function = resource(&template, function);
        assert_eq!(
            function["Properties"]["Runtime"].as_str(),
            Some("provided.al2023")
        );
        assert_eq!(
            function["Properties"]["Handler"].as_str(),
            Some("bootstrap")
        );
        assert_eq!(
            function["Metadata"]["BuildMethod"].as_str(),
            Some("rust-cargolambda")
        );
        assert_eq!(
            function["Metadata"]["BuildProperties"]["Binary"].as_str(),
            Some(binary)
        );
    }

    let worker = resource(&template, "WorkerFunction");
    let timeout = worker["Properties"]["Timeout"]
        .as_u64()
        .expect("worker timeout");
    let event = &worker["Properties"]["Events"]["Tasks"]["Properties"];
    assert_eq!(
        event["FunctionResponseTypes"][0].as_str(),
        Some("ReportBatchItemFailures")
    );
    assert!(event["ScalingConfig"]["MaximumConcurrency"] != Value::Null);

    let queue = &resource(&template, "TasksQueue")["Properties"];
    let visibility = queue["VisibilityTimeout"]
        .as_u64()
        .expect("visibility timeout");
    assert!(
        visibility >= 6 * timeout,
        "visibility {visibility} must be at least 6 x the worker timeout {timeout}"
    );
    let env = environment(&template, "WorkerFunction");
    assert_eq!(
        env["LANCE_BACKFILL_VISIBILITY_SECONDS"].as_str(),
        Some(visibility.to_string().as_str())
    );
    // The worker's "last attempt" is the queue's redrive limit.
    assert_eq!(
        reference(&queue["RedrivePolicy"]["maxReceiveCount"]),
        reference(&env["LANCE_BACKFILL_MAX_RECEIVE_COUNT"])
    );
    // Each function lists its own variables: the Rust ones name the same
    // root, table, queues and bus.
    for function in ["ApiFunction", "TriggerFunction"] {
        let other = environment(&template, function);
        for name in [
            "LANCE_BACKFILL_ROOT",
            "LANCE_BACKFILL_JOBS_TABLE",
            "LANCE_BACKFILL_QUEUE_URL",
            "LANCE_BACKFILL_DLQ_URL",
            "LANCE_BACKFILL_MAX_RECEIVE_COUNT",
            "LANCE_BACKFILL_VISIBILITY_SECONDS",
            "LANCE_BACKFILL_EVENT_BUS",
        ] {
            assert!(env[name] != Value::Null, "WorkerFunction lacks {name}");
            assert_eq!(other[name], env[name], "{function}: {name}");
        }
    }

    let table = &resource(&template, "JobsTable")["Properties"];
    assert_eq!(table["BillingMode"].as_str(), Some("PAY_PER_REQUEST"));
    assert_eq!(
        table["TimeToLiveSpecification"]["AttributeName"].as_str(),
        Some("expires_at")
    );
    assert_eq!(
        table["PointInTimeRecoverySpecification"]["PointInTimeRecoveryEnabled"].as_bool(),
        Some(true)
    );
    assert_eq!(
        table["GlobalSecondaryIndexes"][0]["IndexName"].as_str(),
        Some(lance_backfill::adapters::aws::dynamodb::BY_TABLE_INDEX)
    );

    // Every API route reaches the api function.
    let events = resource(&template, "ApiFunction")["Properties"]["Events"]
        .as_mapping()
        .expect("api events");
    let routes: Vec<(String, String)> = events
        .values()
        .map(|e| {
            (
                e["Properties"]["Method"].as_str().unwrap().to_string(),
                e["Properties"]["Path"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for route in [
        ("POST", "/v1/table/{id}/backfill_column"),
        ("POST", "/v1/table/{id}/add_columns"),
        ("GET", "/v1/table/{id}/jobs"),
        ("GET", "/v1/job/{job_id}"),
        ("POST", "/v1/job/{job_id}/cancel"),
    ] {
        assert!(
            routes.contains(&(route.0.to_string(), route.1.to_string())),
            "missing route {route:?}"
        );
    }
    // Dead letters reach the worker (which fails their jobs), so the alarm
    // counts arrivals rather than depth.
    let worker_events = &resource(&template, "WorkerFunction")["Properties"]["Events"];
    let dead_letters = &worker_events["DeadLetters"]["Properties"];
    assert_eq!(
        serde_yaml::to_string(&dead_letters["Queue"])
            .unwrap()
            .trim(),
        "!GetAtt TasksDeadLetterQueue.Arn"
    );
    assert_eq!(
        dead_letters["FunctionResponseTypes"][0].as_str(),
        Some("ReportBatchItemFailures")
    );
    assert_eq!(
        resource(&template, "DeadLetterAlarm")["Properties"]["MetricName"].as_str(),
        Some("NumberOfMessagesReceived")
    );
    assert!(template["Outputs"]["ApiUrl"] != Value::Null);
}

/// The API is throttled and logged at the gateway, its function has reserved
/// concurrency, and it reads the authorization policy the stack names.
#[test]
fn the_api_is_throttled_logged_and_governed_by_the_policy() {
    let template = template();
    let api = &resource(&template, "HttpApi")["Properties"];
    let throttling = &api["DefaultRouteSettings"];
    assert_eq!(
        reference(&throttling["ThrottlingBurstLimit"]).as_deref(),
        Some("ApiThrottleBurst")
    );
    assert_eq!(
        reference(&throttling["ThrottlingRateLimit"]).as_deref(),
        Some("ApiThrottleRate")
    );
    let logs = &api["AccessLogSettings"];
    assert_eq!(
        serde_yaml::to_string(&logs["DestinationArn"])
            .unwrap()
            .trim(),
        "!GetAtt ApiAccessLogs.Arn"
    );
    let format = logs["Format"].as_str().expect("access log format");
    for field in ["$context.requestId", "$context.status", "$context.path"] {
        assert!(
            format.contains(field),
            "{field} missing from the access log"
        );
    }
    assert!(resource(&template, "ApiAccessLogs")["Properties"]["RetentionInDays"] != Value::Null);
    let function = &resource(&template, "ApiFunction")["Properties"];
    assert_eq!(
        reference(&function["ReservedConcurrentExecutions"]).as_deref(),
        Some("ApiReservedConcurrency")
    );
    let policy =
        serde_yaml::to_string(&function["Environment"]["Variables"]["LANCE_BACKFILL_POLICY"])
            .unwrap();
    assert!(
        policy.contains("resolve:ssm:${PolicyParameterName}"),
        "{policy}"
    );
}

/// User functions run on a container-image function built from
/// udf-runtime/, which the worker may invoke.
#[test]
fn the_udf_function_is_built_from_the_runtime_and_invoked_by_the_worker() {
    let template = template();
    let udf = resource(&template, "UdfFunction");
    assert_eq!(udf["Properties"]["PackageType"].as_str(), Some("Image"));
    assert_eq!(
        udf["Metadata"]["DockerContext"].as_str(),
        Some("./udf-runtime")
    );
    let dockerfile = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../udf-runtime"))
        .join(udf["Metadata"]["Dockerfile"].as_str().unwrap());
    assert!(dockerfile.exists(), "{}", dockerfile.display());
    let worker = &resource(&template, "WorkerFunction")["Properties"];
    let runtimes =
        serde_yaml::to_string(&worker["Environment"]["Variables"]["LANCE_BACKFILL_UDF_RUNTIMES"])
            .unwrap();
    assert!(
        runtimes.contains("default=lambda:${UdfFunction}"),
        "{runtimes}"
    );
    let policies = serde_yaml::to_string(&worker["Policies"]).unwrap();
    assert!(policies.contains("lambda:InvokeFunction") && policies.contains("UdfFunction.Arn"));
}

#[test]
fn events_cover_every_route_and_the_worker() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../events");
    let mut routes = Vec::new();
    let mut eventbridge = 0;
    for entry in std::fs::read_dir(dir).expect("events/") {
        let path = entry.unwrap().path();
        let event: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        if let Some(route) = event["routeKey"].as_str() {
            routes.push(route.to_string());
            assert_eq!(event["version"], "2.0", "{path:?} is an HTTP API v2 event");
        } else if let Some(kind) = event["detail-type"].as_str() {
            // The trigger function's EventBridge events: each names a table
            // (the S3 sample's placeholders as the root).
            let table =
                lance_backfill::submit::trigger::table_of_event("s3://BUCKET/PREFIX", &event);
            assert!(table.is_some(), "{path:?} ({kind}) names no table");
            eventbridge += 1;
        } else {
            assert_eq!(event["Records"][0]["eventSource"], "aws:sqs", "{path:?}");
        }
    }
    assert_eq!(eventbridge, 2, "a table version and a job's end");
    routes.sort();
    assert_eq!(
        routes,
        routed(&template()),
        "one sample per route the HTTP API routes"
    );
}

/// "METHOD /path" of every route the HTTP API sends to the API function.
fn routed(template: &Value) -> Vec<String> {
    let events = resource(template, "ApiFunction")["Properties"]["Events"]
        .as_mapping()
        .expect("the API's events");
    let mut routed: Vec<String> = events
        .values()
        .map(|e| {
            let p = &e["Properties"];
            format!(
                "{} {}",
                p["Method"].as_str().unwrap(),
                p["Path"].as_str().unwrap()
            )
        })
        .collect();
    routed.sort();
    routed
}

/// The UDF function runs users' code: it gets none of the service's
/// settings or secrets (Globals would give it all of them) and no access
/// to the bucket, since batches and pickles travel in its payload. Only
/// the API function authenticates, and it seals page tokens with a
/// generated secret.
#[test]
fn user_code_gets_no_secrets_and_no_bucket() {
    let template = template();
    assert!(
        template["Globals"]["Function"]["Environment"].is_null(),
        "Globals reach UdfFunction: no environment there"
    );
    let udf_env = environment(&template, "UdfFunction");
    let mut forbidden = API_SECRETS.to_vec();
    forbidden.extend([
        "LANCE_BACKFILL_EVENT_SECRET",
        "LANCE_BACKFILL_UDF_HTTP_SECRET",
        "LANCE_BACKFILL_ROOT",
    ]);
    for name in forbidden {
        assert!(udf_env[name].is_null(), "UdfFunction has {name}");
    }
    for function in ["WorkerFunction", "TriggerFunction"] {
        let env = environment(&template, function);
        for name in API_SECRETS {
            assert!(env[name].is_null(), "{function} has {name}");
        }
    }

    let udf = &resource(&template, "UdfFunction")["Properties"];
    assert!(
        udf["Role"].is_null(),
        "UdfFunction's role is the one SAM makes"
    );
    let policies = serde_yaml::to_string(&udf["Policies"]).unwrap();
    assert!(
        !policies.to_lowercase().contains("s3") && !policies.contains("TablesBucket"),
        "UdfFunction may read the bucket: {policies}"
    );

    let api = environment(&template, "ApiFunction");
    for name in [
        "LANCE_BACKFILL_API_KEY_HASHES",
        "LANCE_BACKFILL_JWT_ISSUER",
        "LANCE_BACKFILL_JWT_AUDIENCE",
        "LANCE_BACKFILL_JWT_JWKS",
        "LANCE_BACKFILL_POLICY",
    ] {
        assert!(!api[name].is_null(), "ApiFunction lacks {name}");
    }
    let (name, secret) = ("LANCE_BACKFILL_TOKEN_SECRET", "PageTokenSecret");
    let value = api[name].as_str().unwrap_or_default();
    assert!(
        value.contains(&format!("{{{{resolve:secretsmanager:${{{secret}}}")),
        "ApiFunction's {name}: {value}"
    );
    let generated = resource(&template, secret);
    assert_eq!(
        generated["Type"].as_str(),
        Some("AWS::SecretsManager::Secret")
    );
    assert!(!generated["Properties"]["GenerateSecretString"].is_null());

    // Callers send an API key or a JWT and the function checks both: a
    // gateway authorizer would turn key-only requests away.
    let auth =
        serde_yaml::to_string(&resource(&template, "HttpApi")["Properties"]["Auth"]).unwrap();
    assert!(!auth.contains("DefaultAuthorizer"), "{auth}");
}

/// The worker's and the UDF function's reserved concurrency are parameters,
/// -1 leaving a function unreserved; the worker's default covers both of
/// its SQS event sources.
#[test]
fn worker_and_udf_concurrency_are_reserved_by_parameters() {
    let template = template();
    for (function, parameter, condition) in [
        (
            "WorkerFunction",
            "WorkerReservedConcurrency",
            "ReserveWorkerConcurrency",
        ),
        (
            "UdfFunction",
            "UdfReservedConcurrency",
            "ReserveUdfConcurrency",
        ),
    ] {
        let declared = &template["Parameters"][parameter];
        assert_eq!(declared["Type"].as_str(), Some("Number"), "{parameter}");
        assert!(declared["Default"].as_i64().is_some(), "{parameter}");
        let unreserved = serde_yaml::to_string(&template["Conditions"][condition]).unwrap();
        assert!(
            unreserved.contains(parameter) && unreserved.contains("-1"),
            "{condition}: {unreserved}"
        );
        // !If [condition, !Ref parameter, !Ref AWS::NoValue]
        let reserved = &resource(&template, function)["Properties"]["ReservedConcurrentExecutions"];
        match reserved {
            Value::Tagged(tagged) => assert!(tagged.tag == "!If", "{function}"),
            _ => panic!("{function}: ReservedConcurrentExecutions is not an !If"),
        }
        assert_eq!(reserved[0].as_str(), Some(condition), "{function}");
        assert_eq!(
            reference(&reserved[1]).as_deref(),
            Some(parameter),
            "{function}"
        );
        assert_eq!(
            reference(&reserved[2]).as_deref(),
            Some("AWS::NoValue"),
            "{function}"
        );
    }
    let parameters = &template["Parameters"];
    let events = &resource(&template, "WorkerFunction")["Properties"]["Events"];
    let dead_letters = events["DeadLetters"]["Properties"]["ScalingConfig"]["MaximumConcurrency"]
        .as_i64()
        .expect("the dead-letter source's concurrency");
    let tasks = parameters["WorkerMaxConcurrency"]["Default"]
        .as_i64()
        .expect("WorkerMaxConcurrency's default");
    let reserved = parameters["WorkerReservedConcurrency"]["Default"]
        .as_i64()
        .unwrap();
    assert!(
        reserved >= tasks + dead_letters,
        "WorkerReservedConcurrency {reserved} < {tasks} + {dead_letters}: SQS would be throttled"
    );
}

/// The bucket the stack creates refuses every request not made over TLS.
#[test]
fn the_bucket_refuses_requests_without_tls() {
    let template = template();
    let resources = template["Resources"].as_mapping().expect("resources");
    let policy = resources
        .values()
        .find(|r| {
            r["Type"].as_str() == Some("AWS::S3::BucketPolicy")
                && reference(&r["Properties"]["Bucket"]).as_deref() == Some("TablesBucket")
        })
        .expect("a bucket policy on TablesBucket");
    let statements = policy["Properties"]["PolicyDocument"]["Statement"]
        .as_sequence()
        .expect("statements");
    let deny = statements
        .iter()
        .find(|statement| {
            statement["Effect"].as_str() == Some("Deny")
                && statement["Condition"]["Bool"]["aws:SecureTransport"].as_str() == Some("false")
        })
        .expect("a Deny when aws:SecureTransport is false");
    assert_eq!(deny["Principal"].as_str(), Some("*"));
    assert_eq!(deny["Action"].as_str(), Some("s3:*"));
    let covered = serde_yaml::to_string(&deny["Resource"]).unwrap();
    assert!(
        covered.contains("TablesBucket.Arn") && covered.contains("${TablesBucket.Arn}/*"),
        "the bucket and its objects: {covered}"
    );
}

/// Every EventBridge target (a rule's, or a function's EventBridgeRule
/// event) retries, then leaves what it could not deliver in an SQS queue
/// that its rule may send to.
#[test]
fn every_eventbridge_target_has_a_dead_letter_queue() {
    let template = template();
    let resources = template["Resources"].as_mapping().expect("resources");
    // (the rule's logical id, the target)
    let mut targets: Vec<(String, &Value)> = Vec::new();
    for (name, declared) in resources.iter() {
        let name = name.as_str().unwrap_or_default();
        match declared["Type"].as_str() {
            Some("AWS::Serverless::Function") => {
                let Some(events) = declared["Properties"]["Events"].as_mapping() else {
                    continue;
                };
                for (event, spec) in events.iter() {
                    if matches!(
                        spec["Type"].as_str(),
                        Some("EventBridgeRule" | "CloudWatchEvent" | "Schedule")
                    ) {
                        // SAM names the rule <function><event>.
                        let rule = format!("{name}{}", event.as_str().unwrap_or_default());
                        targets.push((rule, &spec["Properties"]));
                    }
                }
            }
            Some("AWS::Events::Rule") => {
                for target in declared["Properties"]["Targets"]
                    .as_sequence()
                    .into_iter()
                    .flatten()
                {
                    targets.push((name.to_string(), target));
                }
            }
            _ => {}
        }
    }
    assert!(targets.len() >= 2, "the trigger's rules: {targets:?}");
    for (rule, target) in &targets {
        let retries = &target["RetryPolicy"];
        assert!(retries["MaximumRetryAttempts"].as_u64().is_some(), "{rule}");
        assert!(
            retries["MaximumEventAgeInSeconds"].as_u64().is_some(),
            "{rule}"
        );
        let arn = serde_yaml::to_string(&target["DeadLetterConfig"]["Arn"]).unwrap();
        let queue = arn
            .trim()
            .strip_prefix("!GetAtt ")
            .and_then(|arn| arn.strip_suffix(".Arn"))
            .unwrap_or_else(|| panic!("{rule}: no dead-letter queue ({arn})"));
        assert_eq!(
            resource(&template, queue)["Type"].as_str(),
            Some("AWS::SQS::Queue"),
            "{rule}"
        );
        let policy = resources
            .values()
            .find(|r| {
                r["Type"].as_str() == Some("AWS::SQS::QueuePolicy")
                    && r["Properties"]["Queues"]
                        .as_sequence()
                        .into_iter()
                        .flatten()
                        .any(|q| reference(q).as_deref() == Some(queue))
            })
            .unwrap_or_else(|| panic!("{rule}: no policy on {queue}"));
        let policy = serde_yaml::to_string(&policy["Properties"]["PolicyDocument"]).unwrap();
        let rule_arn = format!("{rule}.Arn");
        for needed in [
            "events.amazonaws.com",
            "sqs:SendMessage",
            "aws:SourceArn",
            rule_arn.as_str(),
        ] {
            assert!(
                policy.contains(needed),
                "{rule}: {queue}'s policy lacks {needed}"
            );
        }
    }
}

/// Every route the API serves is routed by the HTTP API, and the stack's
/// dashboard and alarms watch the API, the queue, both functions and the
/// jobs (the metrics the functions write as EMF lines).
#[test]
fn every_route_is_routed_and_every_signal_watched() {
    let template = template();
    let mut served = vec![
        "GET /health",
        "GET /ui",
        "GET /v1/job/{job_id}",
        "GET /v1/table/{id}/jobs",
        "POST /v1/job/{job_id}/cancel",
        "POST /v1/job/{job_id}/pause",
        "POST /v1/job/{job_id}/resume",
        "POST /v1/jobs/cancel",
        "POST /v1/jobs/describe",
        "POST /v1/jobs/list",
        "POST /v1/jobs/pause",
        "POST /v1/jobs/query_events",
        "POST /v1/jobs/resume",
        "POST /v1/table/{id}/add_columns",
        "POST /v1/table/{id}/backfill_column",
        "POST /v1/table/{id}/describe",
        "POST /v1/table/{id}/errors",
    ];
    served.sort();
    assert_eq!(routed(&template), served);
    let watched: Vec<(String, String)> = template["Resources"]
        .as_mapping()
        .unwrap()
        .values()
        .filter(|r| r["Type"] == "AWS::CloudWatch::Alarm")
        .map(|r| {
            let p = &r["Properties"];
            (
                p["Namespace"].as_str().unwrap().to_string(),
                p["MetricName"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for (namespace, metric) in [
        ("AWS/ApiGateway", "5xx"),
        ("AWS/ApiGateway", "Latency"),
        ("AWS/SQS", "ApproximateAgeOfOldestMessage"),
        ("AWS/Lambda", "Errors"),
        ("AWS/Lambda", "Duration"),
        ("LanceBackfill", "JobChanges"),
    ] {
        assert!(
            watched.contains(&(namespace.to_string(), metric.to_string())),
            "no alarm on {namespace} {metric}"
        );
    }
    let body = serde_yaml::to_string(
        &resource(&template, "OperationsDashboard")["Properties"]["DashboardBody"],
    )
    .unwrap();
    for metric in [
        "Latency",
        "ApproximateAgeOfOldestMessage",
        "Duration",
        "Throttles",
        "JobChanges",
    ] {
        assert!(body.contains(metric), "the dashboard shows no {metric}");
    }
    // The functions that change jobs write the metrics for the alarms.
    for function in ["ApiFunction", "WorkerFunction", "TriggerFunction"] {
        assert!(
            !environment(&template, function)["LANCE_BACKFILL_METRICS_STACK"].is_null(),
            "{function} writes no job metrics"
        );
    }
    assert_eq!(
        lance_backfill::adapters::aws::METRICS_NAMESPACE,
        "LanceBackfill"
    );
}
