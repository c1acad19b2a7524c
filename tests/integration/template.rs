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

#[test]
fn functions_queue_and_table_fit_together() {
    let template = template();
    let globals = &template["Globals"]["Function"];
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
    let env = &globals["Environment"]["Variables"];
    assert_eq!(
        env["LANCE_BACKFILL_VISIBILITY_SECONDS"].as_str(),
        Some(visibility.to_string().as_str())
    );
    // The worker's "last attempt" is the queue's redrive limit.
    assert_eq!(
        reference(&queue["RedrivePolicy"]["maxReceiveCount"]),
        reference(&env["LANCE_BACKFILL_MAX_RECEIVE_COUNT"])
    );

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
        Some(lance_backfill::store::dynamodb::BY_TABLE_INDEX)
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
/// udf-runtime/, which the worker may invoke and which reads kept pickles.
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
            let table = lance_backfill::trigger::table_of_event("s3://BUCKET/PREFIX", &event);
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
        vec![
            "GET /v1/job/{job_id}",
            "GET /v1/table/{id}/jobs",
            "POST /v1/job/{job_id}/cancel",
            "POST /v1/table/{id}/add_columns",
            "POST /v1/table/{id}/backfill_column",
        ]
    );
}
