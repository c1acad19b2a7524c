#!/usr/bin/env bash
# Both functions under `cargo lambda watch`, driven with `cargo lambda
# invoke` and the events in events/: declare a computed column, submit a
# backfill (API Gateway events), run the queued task (an SQS event), read
# the job through the watch router (path parameters), check the table.
# Needs MOTO_ENDPOINT (scripts/test starts moto).
source "$(dirname "$0")/env.sh"
ensure_venv
cd "$REPO"
: "${MOTO_ENDPOINT:?start moto first (scripts/test does)}"
PY="$VENV/bin/python"
CARGO_LAMBDA="$VENV/bin/cargo-lambda"
PORT="${LAMBDA_PORT:-9123}"
WORK="$(mktemp -d)"
ROOT="$WORK/tables"
SUFFIX="$RANDOM$RANDOM"
TABLE="lambda-jobs-$SUFFIX"
QUEUE_URL="$("$PY" scripts/lambda_check.py setup --endpoint "$MOTO_ENDPOINT" --root "$ROOT" --table "$TABLE" --queue "lambda-tasks-$SUFFIX")"

# The watch passes its environment to the functions; Cargo.toml's
# [workspace.metadata.lambda.env] adds the moto endpoint and the API key.
export LANCE_BACKFILL_ROOT="$ROOT" LANCE_BACKFILL_JOBS_TABLE="$TABLE" LANCE_BACKFILL_QUEUE_URL="$QUEUE_URL"
export AWS_ENDPOINT_URL="$MOTO_ENDPOINT" AWS_REGION=us-east-1 AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing

# The watch runs `cargo run --bin <function>`, which builds each function
# alone: without the tests' dev-dependencies (LanceDB's client) its features
# differ from the workspace build's, so Lance compiles once more for it. Built
# here first, with no time limit, the invocations below only start it.
log "cargo build of the three functions, as the watch runs them"
cargo build --bin api --bin worker --bin trigger

log "cargo lambda watch on port $PORT"
"$CARGO_LAMBDA" lambda watch --ignore-changes --invoke-address 127.0.0.1 --invoke-port "$PORT" \
  >"$WORK/watch.log" 2>&1 &
WATCH=$!
cleanup() { kill "$WATCH" 2>/dev/null || true; wait "$WATCH" 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
for _ in $(seq 1 150); do
  (echo >"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
  sleep 0.2
done

# Invokes the worker with whatever is queued, until process $1 ends (or,
# with $1 = none, until the queue stays empty), at most $2 receives.
run_queued_tasks() {
  for _ in $(seq 1 "$2"); do
    if [ "$1" != none ]; then kill -0 "$1" 2>/dev/null || break; fi
    "$PY" scripts/lambda_check.py sqs-event --any-number --endpoint "$MOTO_ENDPOINT" --queue-url "$QUEUE_URL" \
      --template events/sqs-task.json >"$WORK/tasks.json"
    if [ -s "$WORK/tasks.json" ]; then
      invoke worker "$WORK/tasks.json" "$WORK/worker-tasks.json"
    elif [ "$1" = none ]; then
      break
    fi
  done
}

invoke() { # function event-file output
  timeout 300 "$CARGO_LAMBDA" lambda invoke "$1" --invoke-address 127.0.0.1 --invoke-port "$PORT" --data-file "$2" >"$3" \
    || { cat "$WORK/watch.log" >&2; exit 1; }
}

invoke api events/apigw-add-columns.json "$WORK/add.json"
"$PY" scripts/lambda_check.py expect "$WORK/add.json" --status 200 || { cat "$WORK/watch.log" >&2; exit 1; }
log "POST add_columns: 200"

invoke api events/apigw-backfill-column.json "$WORK/backfill.json"
JOB_ID="$("$PY" scripts/lambda_check.py expect "$WORK/backfill.json" --status 202 --print-field job_id)"
log "POST backfill_column: 202, job $JOB_ID"

"$PY" scripts/lambda_check.py sqs-event --endpoint "$MOTO_ENDPOINT" --queue-url "$QUEUE_URL" \
  --template events/sqs-task.json >"$WORK/sqs.json"
invoke worker "$WORK/sqs.json" "$WORK/worker.json"
"$PY" scripts/lambda_check.py expect "$WORK/worker.json" --equals '{"batchItemFailures": []}'
log "worker SQS event: no batch item failures"

curl -fsS -H "x-api-key: local-key" "http://127.0.0.1:$PORT/v1/job/$JOB_ID" >"$WORK/job.json"
"$PY" scripts/lambda_check.py job-state "$WORK/job.json" --state DONE
log "GET /v1/job/$JOB_ID through the watch router: DONE"

sed "s/JOB_ID/$JOB_ID/g" events/apigw-get-job.json >"$WORK/get-job.json"
invoke api "$WORK/get-job.json" "$WORK/get.json"
"$PY" scripts/lambda_check.py expect "$WORK/get.json" --status 200
"$PY" scripts/lambda_check.py verify --root "$ROOT"

# LanceDB's own client against the API function: open, add a computed
# column, refresh it as a job and wait; the worker function is invoked with
# whatever the job queues until the session ends.
log "LanceDB client (lancedb 0.40.0) against the API function"
"$PY" tests/lancedb_session.py "http://127.0.0.1:$PORT" local-key lancedb >"$WORK/lancedb.json" 2>"$WORK/lancedb.err" &
SESSION=$!
run_queued_tasks "$SESSION" 120
wait "$SESSION" || { cat "$WORK/lancedb.err" "$WORK/watch.log" >&2; exit 1; }
"$PY" scripts/lambda_check.py lancedb-result "$WORK/lancedb.json" --rows 1000
log "LanceDB client: refresh_column_async(...).wait() finished through the API function"

# A maintained column: declared with auto_backfill, then rows appended; the
# trigger function (here with the job-ended event it also receives) submits
# the job that fills them.
curl -fsS -H "x-api-key: local-key" -X POST "http://127.0.0.1:$PORT/v1/table/items/add_columns" \
  -d '{"new_columns":[{"name":"m","computed":"x + 1"}],"context":{"auto_backfill":"true"}}' >"$WORK/declare-m.json"
run_queued_tasks none 10
"$PY" scripts/lambda_check.py append --root "$ROOT" --table items --rows 500
invoke trigger events/eventbridge-job-ended.json "$WORK/trigger.json"
"$PY" scripts/lambda_check.py trigger-jobs "$WORK/trigger.json" --count 1
invoke trigger events/eventbridge-job-ended.json "$WORK/trigger-again.json"
"$PY" scripts/lambda_check.py trigger-jobs "$WORK/trigger-again.json" --count 0
run_queued_tasks none 10
"$PY" scripts/lambda_check.py verify-column --root "$ROOT" --table items --column m --rows 1500
log "trigger function: the appended rows of a maintained column filled"
log "cargo lambda: all invocations passed"
