"""Helpers for scripts/lambda-invoke.sh: prepare moto and a Lance table,
turn a queued task into an SQS event, and check results."""

import argparse
import json
import sys

import boto3


def clients(endpoint):
    kwargs = dict(
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    return boto3.client("dynamodb", **kwargs), boto3.client("sqs", **kwargs)


def setup(args):
    import lance
    import pyarrow as pa

    dynamodb, sqs = clients(args.endpoint)
    dynamodb.create_table(
        TableName=args.table,
        BillingMode="PAY_PER_REQUEST",
        AttributeDefinitions=[
            {"AttributeName": n, "AttributeType": "S"}
            for n in ("pk", "sk", "table_key", "created_sk", "list_key")
        ],
        KeySchema=[
            {"AttributeName": "pk", "KeyType": "HASH"},
            {"AttributeName": "sk", "KeyType": "RANGE"},
        ],
        GlobalSecondaryIndexes=[
            {
                "IndexName": "by_table",
                "KeySchema": [
                    {"AttributeName": "table_key", "KeyType": "HASH"},
                    {"AttributeName": "created_sk", "KeyType": "RANGE"},
                ],
                "Projection": {"ProjectionType": "ALL"},
            },
            {
                "IndexName": "recent",
                "KeySchema": [
                    {"AttributeName": "list_key", "KeyType": "HASH"},
                    {"AttributeName": "created_sk", "KeyType": "RANGE"},
                ],
                "Projection": {"ProjectionType": "ALL"},
            },
        ],
    )
    url = sqs.create_queue(QueueName=args.queue)["QueueUrl"]
    x = pa.array(range(1000), pa.int64())
    lance.write_dataset(pa.table({"id": x, "x": x}), f"{args.root}/items.lance")
    # The table LanceDB's client session works on (4 fragments).
    lance.write_dataset(
        pa.table({"id": x, "x": x}), f"{args.root}/lancedb.lance", max_rows_per_file=250
    )
    print(url)


def sqs_event(args):
    _, sqs = clients(args.endpoint)
    messages = sqs.receive_message(
        QueueUrl=args.queue_url,
        MaxNumberOfMessages=10,
        WaitTimeSeconds=2,
        VisibilityTimeout=60,
        MessageSystemAttributeNames=["All"],
    ).get("Messages", [])
    if args.any_number:
        if not messages:
            return
    elif len(messages) != 1:
        sys.exit(f"expected one queued task, found {len(messages)}")
    with open(args.template) as f:
        event = json.load(f)
    template = event["Records"][0]
    event["Records"] = []
    for message in messages:
        record = dict(template)
        record["messageId"] = message["MessageId"]
        record["receiptHandle"] = message["ReceiptHandle"]
        record["body"] = message["Body"]
        event["Records"].append(record)
    json.dump(event, sys.stdout)


def lancedb_result(args):
    """Checks what tests/lancedb_session.py printed (LanceDB's client)."""
    with open(args.file) as f:
        out = json.load(f)
    result = out["result"]
    expected = {"rows_assigned": args.rows, "rows_failed": 0, "rows_remaining": 0}
    wrong = {k: result[k] for k, v in expected.items() if result[k] != v}
    if wrong or out["status"] != "finished" or result["published_version"] is None:
        sys.exit(f"unexpected LanceDB session result: {out}")
    if out["unknown_column"] != "HttpError: 400":
        sys.exit(f"an unknown column should be a 400: {out}")
    print(json.dumps(result))


def expect(args):
    with open(args.file) as f:
        response = json.load(f)
    if "statusCode" in response:
        status = response["statusCode"]
        body = json.loads(response.get("body") or "null")
        if status != args.status:
            sys.exit(f"expected status {args.status}, got {status}: {body}")
        if args.print_field:
            print(body[args.print_field])
    elif response != json.loads(args.equals):
        sys.exit(f"expected {args.equals}, got {response}")


def verify(args):
    import lance

    table = lance.dataset(f"{args.root}/items.lance").to_table(columns=["x", "y"]).to_pydict()
    bad = [(x, y) for x, y in zip(table["x"], table["y"], strict=True) if y != x * 2 + 1]
    if bad or len(table["x"]) != 1000:
        sys.exit(f"{len(bad)} wrong values, e.g. {bad[:3]}")
    print(f"verified {len(table['x'])} rows: y = x * 2 + 1")


def append(args):
    import lance
    import pyarrow as pa

    uri = f"{args.root}/{args.table}.lance"
    dataset = lance.dataset(uri)
    start = dataset.count_rows()
    x = pa.array(range(start, start + args.rows), pa.int64())
    columns = {"id": x, "x": x}
    # The table's computed columns are written null, as any append does.
    data = pa.table(
        {f.name: columns.get(f.name, pa.nulls(args.rows, f.type)) for f in dataset.schema}
    )
    lance.write_dataset(data, uri, mode="append")


def verify_column(args):
    import lance

    table = lance.dataset(f"{args.root}/{args.table}.lance").to_table(columns=["x", args.column])
    table = table.to_pydict()
    bad = [(x, v) for x, v in zip(table["x"], table[args.column], strict=True) if v != x + 1]
    if bad or len(table["x"]) != args.rows:
        sys.exit(f"{len(bad)} wrong of {len(table['x'])} rows, e.g. {bad[:3]}")
    print(f"verified {len(table['x'])} rows: {args.column} = x + 1")


def trigger_jobs(args):
    with open(args.file) as f:
        response = json.load(f)
    if len(response.get("jobs", [])) != args.count:
        sys.exit(f"expected {args.count} submitted jobs, got {response}")
    print(json.dumps(response))


def job_state(args):
    with open(args.file) as f:
        job = json.load(f)
    if job.get("state") != args.state:
        sys.exit(f"expected job state {args.state}, got {job}")


parser = argparse.ArgumentParser()
sub = parser.add_subparsers(dest="command", required=True)
p = sub.add_parser("setup")
p.add_argument("--endpoint")
p.add_argument("--root")
p.add_argument("--table")
p.add_argument("--queue")
p.set_defaults(run=setup)
p = sub.add_parser("sqs-event")
p.add_argument("--endpoint")
p.add_argument("--queue-url")
p.add_argument("--template")
p.add_argument("--any-number", action="store_true", help="0 or more messages, all in one event")
p.set_defaults(run=sqs_event)
p = sub.add_parser("lancedb-result")
p.add_argument("file")
p.add_argument("--rows", type=int)
p.set_defaults(run=lancedb_result)
p = sub.add_parser("expect")
p.add_argument("file")
p.add_argument("--status", type=int)
p.add_argument("--equals")
p.add_argument("--print-field")
p.set_defaults(run=expect)
p = sub.add_parser("verify")
p.add_argument("--root")
p.set_defaults(run=verify)
p = sub.add_parser("append")
p.add_argument("--root")
p.add_argument("--table")
p.add_argument("--rows", type=int)
p.set_defaults(run=append)
p = sub.add_parser("verify-column")
p.add_argument("--root")
p.add_argument("--table")
p.add_argument("--column")
p.add_argument("--rows", type=int)
p.set_defaults(run=verify_column)
p = sub.add_parser("trigger-jobs")
p.add_argument("file")
p.add_argument("--count", type=int)
p.set_defaults(run=trigger_jobs)
p = sub.add_parser("job-state")
p.add_argument("file")
p.add_argument("--state")
p.set_defaults(run=job_state)
if __name__ == "__main__":
    args = parser.parse_args()
    args.run(args)
