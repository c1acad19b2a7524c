"""Tests of scripts/moto_server.py: injected faults, limits, request log.

Starts the server on a free port (as scripts/moto.sh does) and talks to it
with boto3, retries off, so each call is one request. Run with the project
venv: ``~/.cache/lance-backfill/venv/bin/python -m pytest scripts/tests``.
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from urllib.parse import urlencode

import boto3
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

SERVER = Path(__file__).resolve().parents[1] / "moto_server.py"
DDB = "com.amazonaws.dynamodb.v20120810#"
# The config given in MOTO_FAULTS at start (on a table no test uses).
INITIAL_FAULTS = {"seed": 3, "dynamodb": {"throttling": 1.0}, "tables": ["none"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Moto:
    """The server under test: clients and its control endpoints."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        config = Config(retries={"total_max_attempts": 1}, s3={"addressing_style": "path"})
        self.clients = {
            name: boto3.client(
                name,
                endpoint_url=endpoint,
                region_name="us-east-1",
                aws_access_key_id="testing",
                aws_secret_access_key="testing",
                config=config,
            )
            for name in ("dynamodb", "sqs", "s3")
        }

    def call(self, method: str, path: str, body: object = None) -> tuple[int, dict]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.endpoint + path, data=data, method=method)
        try:
            with urllib.request.urlopen(request) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def faults(self, config: dict | None = None) -> dict:
        status, body = self.call(
            *(("GET", "/_faults") if config is None else ("POST", "/_faults", config))
        )
        assert status == 200, body
        return body

    def stats(self) -> dict:
        return self.call("GET", "/_stats")[1]

    def query(self, params: dict) -> tuple[int, str]:
        """An SQS call in the query protocol (form body, XML answer)."""
        body = urlencode({**params, "Version": "2012-11-05"})
        headers = {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"}
        signed = AWSRequest("POST", self.endpoint + "/", data=body, headers=headers)
        SigV4Auth(Credentials("testing", "testing"), "sqs", "us-east-1").add_auth(signed)
        request = urllib.request.Request(
            self.endpoint + "/",
            data=body.encode(),
            headers=dict(signed.headers),
            method="POST",
        )
        try:
            with urllib.request.urlopen(request) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    port = free_port()
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("w")
    env = {**os.environ, "MOTO_FAULTS": json.dumps(INITIAL_FAULTS)}
    command = [sys.executable, str(SERVER), "-H", "127.0.0.1", "-p", str(port)]
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint + "/moto-api/").read()
            break
        except OSError:
            assert process.poll() is None, f"moto_server exited; see {log.name}"
            assert time.monotonic() < deadline, f"moto_server did not start; see {log.name}"
            time.sleep(0.2)
    moto = Moto(endpoint)
    moto.initial_faults = moto.faults()
    yield moto
    process.terminate()
    process.wait(10)
    log.close()


@pytest.fixture
def moto(server: Moto) -> Moto:
    """The server with no faults and a zeroed request log."""
    server.call("POST", "/_faults/reset")
    server.call("POST", "/_stats/reset")
    return server


def name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def table(moto: Moto) -> str:
    table_name = name("t")
    moto.clients["dynamodb"].create_table(
        TableName=table_name,
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    return table_name


def get(moto: Moto, table_name: str, pk: str) -> dict | None:
    return (
        moto.clients["dynamodb"].get_item(TableName=table_name, Key={"pk": {"S": pk}}).get("Item")
    )


def error(call, *args, **kwargs) -> dict:
    """The ClientError's response of a call that must fail."""
    with pytest.raises(ClientError) as raised:
        call(*args, **kwargs)
    return raised.value.response


def code(response: dict) -> str:
    return response["Error"]["Code"]


def put(table_name: str, pk: str, **attributes: dict) -> dict:
    return {"Put": {"TableName": table_name, "Item": {"pk": {"S": pk}, **attributes}}}


# --- configuration -----------------------------------------------------------


def test_moto_faults_from_the_environment_apply_at_start(server: Moto) -> None:
    assert server.initial_faults["config"] == INITIAL_FAULTS


def test_bad_configs_are_refused_and_the_old_one_kept(moto: Moto) -> None:
    moto.faults({"sqs": {"empty_receive": 0.5}})
    for bad in (
        {"dynamodb": {"throttling": 2}},
        {"dynamodb": {"throtling": 0.1}},
        {"sqs": {"operations": "ReceiveMessage"}},
        {"colour": "red"},
        [1],
    ):
        status, body = moto.call("POST", "/_faults", bad)
        assert status == 400 and body["error"], bad
    assert moto.faults()["config"] == {"sqs": {"empty_receive": 0.5}}


def test_faults_reset_removes_faults_and_zeroes_counters(moto: Moto) -> None:
    t = table(moto)
    moto.faults({"dynamodb": {"internal_error": 1}})
    assert code(error(moto.clients["dynamodb"].get_item, TableName=t, Key={"pk": {"S": "a"}})) == (
        "InternalServerError"
    )
    assert moto.faults()["injected"]["dynamodb.internal_error"] == 1
    status, body = moto.call("POST", "/_faults/reset")
    assert status == 200 and body["config"] == {}
    assert set(body["injected"].values()) == {0} and body["eligible"] == {}
    assert get(moto, t, "a") is None  # answered by moto again


# --- DynamoDB ------------------------------------------------------------------


def test_transaction_conflict_cancels_the_transaction_without_applying_it(
    moto: Moto,
) -> None:
    ddb, t = moto.clients["dynamodb"], table(moto)
    ddb.put_item(TableName=t, Item={"pk": {"S": "a"}, "n": {"N": "1"}})
    moto.faults({"seed": 1, "dynamodb": {"transaction_conflict": 1}})
    items = [
        {
            "Update": {
                "TableName": t,
                "Key": {"pk": {"S": "a"}},
                "UpdateExpression": "SET n = :two",
                "ExpressionAttributeValues": {":two": {"N": "2"}},
            }
        },
        put(t, "b"),
        put(t, "c"),
    ]
    culprits = set()
    for _ in range(10):
        response = error(ddb.transact_write_items, TransactItems=items)
        assert code(response) == "TransactionCanceledException"
        assert response["ResponseMetadata"]["HTTPStatusCode"] == 400
        headers = response["ResponseMetadata"]["HTTPHeaders"]
        assert headers["x-amzn-errortype"] == DDB + "TransactionCanceledException"
        reasons = response["CancellationReasons"]
        assert len(reasons) == 3
        conflict = {
            "Code": "TransactionConflict",
            "Message": "Transaction is ongoing for the item",
        }
        assert [r for r in reasons if r != {"Code": "None"}] == [conflict]
        culprits.add(reasons.index(conflict))
        listed = ", ".join(r["Code"] for r in reasons)
        assert response["Error"]["Message"] == (
            "Transaction cancelled, please refer cancellation reasons for specific reasons "
            f"[{listed}]"
        )
    assert len(culprits) > 1  # the conflicting item is drawn
    assert get(moto, t, "a")["n"] == {"N": "1"}  # GetItem is not a transaction: no fault
    assert get(moto, t, "b") is None and get(moto, t, "c") is None
    assert moto.faults()["injected"]["dynamodb.transaction_conflict"] == 10


def test_throttling_takes_each_shape_dynamodb_sends(moto: Moto) -> None:
    ddb, t = moto.clients["dynamodb"], table(moto)
    moto.faults({"seed": 2, "dynamodb": {"throttling": 1}})
    single = {code(error(ddb.get_item, TableName=t, Key={"pk": {"S": "a"}})) for _ in range(16)}
    assert single == {"ThrottlingException", "ProvisionedThroughputExceededException"}
    response = error(
        ddb.query,
        TableName=t,
        KeyConditionExpression="pk = :a",
        ExpressionAttributeValues={":a": {"S": "a"}},
    )
    assert code(response) == "ThrottlingException"
    assert response["Error"]["Message"] == "Rate of requests exceeds the allowed throughput."
    shapes = set()
    for _ in range(16):
        response = error(ddb.transact_write_items, TransactItems=[put(t, "x"), put(t, "y")])
        shapes.add(code(response))
        if code(response) == "TransactionCanceledException":
            reasons = response["CancellationReasons"]
            throttled = [r for r in reasons if r["Code"] != "None"]
            assert len(reasons) == 2 and len(throttled) == 1
            assert throttled[0]["Code"] == "ThrottlingError"
            assert throttled[0]["Message"].startswith("Throughput exceeds the current capacity")
    assert shapes == {"ThrottlingException", "TransactionCanceledException"}
    assert code(error(ddb.put_item, TableName=t, Item={"pk": {"S": "x"}})) in single
    moto.call("POST", "/_faults/reset")
    assert get(moto, t, "x") is None and get(moto, t, "y") is None


def test_internal_errors_and_item_conflicts_change_nothing(moto: Moto) -> None:
    ddb, t = moto.clients["dynamodb"], table(moto)
    ddb.put_item(TableName=t, Item={"pk": {"S": "a"}, "n": {"N": "1"}})
    moto.faults({"dynamodb": {"internal_error": 1}})
    response = error(ddb.put_item, TableName=t, Item={"pk": {"S": "b"}})
    assert code(response) == "InternalServerError"
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 500
    moto.faults({"dynamodb": {"item_conflict": 1}})
    update = {
        "TableName": t,
        "Key": {"pk": {"S": "a"}},
        "UpdateExpression": "SET n = :two",
        "ExpressionAttributeValues": {":two": {"N": "2"}},
    }
    response = error(ddb.update_item, **update)
    assert code(response) == "TransactionConflictException"
    assert response["Error"]["Message"] == "Transaction is ongoing for the item"
    assert (
        code(error(ddb.delete_item, TableName=t, Key={"pk": {"S": "a"}}))
        == "TransactionConflictException"
    )
    assert get(moto, t, "a")["n"] == {"N": "1"} and get(moto, t, "b") is None
    ddb.transact_write_items(TransactItems=[{"Update": update}])  # not an item conflict's target
    assert get(moto, t, "a")["n"] == {"N": "2"}


def test_faults_hit_only_the_named_operations_and_tables(moto: Moto) -> None:
    ddb, hit, spared = moto.clients["dynamodb"], table(moto), table(moto)
    moto.faults({"dynamodb": {"internal_error": 1, "operations": ["PutItem"]}, "tables": [hit]})
    ddb.put_item(TableName=spared, Item={"pk": {"S": "a"}})
    ddb.update_item(
        TableName=hit,
        Key={"pk": {"S": "a"}},
        UpdateExpression="SET n = :one",
        ExpressionAttributeValues={":one": {"N": "1"}},
    )
    assert (
        code(error(ddb.put_item, TableName=hit, Item={"pk": {"S": "b"}})) == "InternalServerError"
    )
    ddb.transact_write_items(TransactItems=[put(spared, "c"), put(hit, "c")])  # not a PutItem
    assert get(moto, hit, "c") and get(moto, hit, "b") is None
    assert moto.faults()["injected"]["dynamodb.internal_error"] == 1


def outcomes(moto: Moto, t: str, n: int) -> list[str]:
    result = []
    for _ in range(n):
        try:
            moto.clients["dynamodb"].get_item(TableName=t, Key={"pk": {"S": "a"}})
            result.append("ok")
        except ClientError as e:
            result.append(code(e.response))
    return result


def test_rates_are_honoured_and_a_seed_repeats_its_faults(moto: Moto) -> None:
    t = table(moto)
    config = {"seed": 11, "dynamodb": {"throttling": 0.2}}
    moto.faults(config)
    first = outcomes(moto, t, 300)
    failures = sum(o != "ok" for o in first)
    assert 35 <= failures <= 85, failures  # 60 expected; sd 7
    counters = moto.faults()
    assert counters["eligible"]["dynamodb.throttling"] == 300
    assert counters["injected"]["dynamodb.throttling"] == failures
    moto.faults(config)
    assert outcomes(moto, t, 300) == first
    moto.faults({**config, "seed": 12})
    assert outcomes(moto, t, 300) != first


# --- SQS -----------------------------------------------------------------------


def queue(moto: Moto, **attributes: str) -> str:
    return moto.clients["sqs"].create_queue(QueueName=name("tasks"), Attributes=attributes)[
        "QueueUrl"
    ]


def receive(moto: Moto, url: str, **kwargs) -> list[dict]:
    response = moto.clients["sqs"].receive_message(
        QueueUrl=url,
        MaxNumberOfMessages=10,
        MessageSystemAttributeNames=["All"],
        **kwargs,
    )
    return response.get("Messages", [])


def test_sqs_internal_errors_are_not_applied(moto: Moto) -> None:
    sqs, url = moto.clients["sqs"], queue(moto)
    moto.faults({"sqs": {"internal_error": 1}})
    response = error(sqs.send_message, QueueUrl=url, MessageBody="one")
    assert code(response) == "InternalError"
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 500
    assert (
        response["ResponseMetadata"]["HTTPHeaders"]["x-amzn-query-error"]
        == "InternalError;Receiver"
    )
    moto.call("POST", "/_faults/reset")
    assert receive(moto, url) == []  # the failed send sent nothing
    sqs.send_message(QueueUrl=url, MessageBody="two")
    moto.faults({"sqs": {"internal_error": 1}})
    assert code(error(sqs.receive_message, QueueUrl=url)) == "InternalError"
    moto.call("POST", "/_faults/reset")
    [message] = receive(moto, url)
    assert message["Attributes"]["ApproximateReceiveCount"] == "1"  # the failed receive took none
    moto.faults({"sqs": {"internal_error": 1}})
    assert (
        code(error(sqs.delete_message, QueueUrl=url, ReceiptHandle=message["ReceiptHandle"]))
        == "InternalError"
    )
    moto.call("POST", "/_faults/reset")
    sqs.change_message_visibility(
        QueueUrl=url, ReceiptHandle=message["ReceiptHandle"], VisibilityTimeout=0
    )
    assert [m["Body"] for m in receive(moto, url)] == ["two"]  # not deleted


def test_sqs_faults_in_the_query_protocol(moto: Moto) -> None:
    url = queue(moto)
    status, body = moto.query({"Action": "SendMessage", "QueueUrl": url, "MessageBody": "hi"})
    assert status == 200 and "<MessageId>" in body
    moto.faults({"sqs": {"internal_error": 1}})
    status, body = moto.query({"Action": "ReceiveMessage", "QueueUrl": url})
    assert status == 500
    assert "<Type>Receiver</Type><Code>InternalError</Code>" in body
    moto.faults({"sqs": {"empty_receive": 1}})
    status, body = moto.query({"Action": "ReceiveMessage", "QueueUrl": url})
    assert status == 200 and "<ReceiveMessageResult/>" in body
    assert moto.stats()["calls"]["sqs.ReceiveMessage"] == 2


def test_empty_receives_leave_the_messages_in_the_queue(moto: Moto) -> None:
    sqs, url = moto.clients["sqs"], queue(moto)
    for body in ("a", "b", "c"):
        sqs.send_message(QueueUrl=url, MessageBody=body)
    moto.faults({"sqs": {"empty_receive": 1}})
    for _ in range(5):
        assert receive(moto, url) == []
    assert moto.faults()["injected"]["sqs.empty_receive"] == 5
    moto.call("POST", "/_faults/reset")
    messages = receive(moto, url)
    assert sorted(m["Body"] for m in messages) == ["a", "b", "c"]
    assert {m["Attributes"]["ApproximateReceiveCount"] for m in messages} == {"1"}


def test_empty_receive_rate_is_honoured(moto: Moto) -> None:
    url = queue(moto)
    moto.clients["sqs"].send_message(QueueUrl=url, MessageBody="a")
    moto.faults({"seed": 5, "sqs": {"empty_receive": 0.3}})
    empty = sum(receive(moto, url, VisibilityTimeout=0) == [] for _ in range(200))
    assert 40 <= empty <= 80, empty  # 60 expected; sd 6.5
    assert moto.faults()["injected"]["sqs.empty_receive"] == empty


def test_lost_deletes_succeed_and_the_messages_come_back(moto: Moto) -> None:
    sqs, url = moto.clients["sqs"], queue(moto)
    for body in ("a", "b", "c"):
        sqs.send_message(QueueUrl=url, MessageBody=body)
    messages = receive(moto, url, VisibilityTimeout=1)
    assert len(messages) == 3
    moto.faults({"sqs": {"lost_delete": 1}})
    sqs.delete_message(QueueUrl=url, ReceiptHandle=messages[0]["ReceiptHandle"])
    entries = [
        {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages[1:])
    ]
    response = sqs.delete_message_batch(QueueUrl=url, Entries=entries)
    assert sorted(e["Id"] for e in response["Successful"]) == ["0", "1"]
    assert not response.get("Failed")
    assert moto.faults()["injected"]["sqs.lost_delete"] == 3
    moto.call("POST", "/_faults/reset")
    assert receive(moto, url) == []  # in flight until the visibility timeout
    time.sleep(1.3)
    back = receive(moto, url)
    assert sorted(m["Body"] for m in back) == ["a", "b", "c"]
    assert {m["Attributes"]["ApproximateReceiveCount"] for m in back} == {"2"}
    for m in back:
        sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])
    assert receive(moto, url, VisibilityTimeout=0) == []  # deleted for real now


# --- S3 ------------------------------------------------------------------------


def test_s3_slow_down_is_a_503_and_writes_nothing(moto: Moto) -> None:
    s3 = moto.clients["s3"]
    hit, spared = name("data"), name("other")
    for bucket in (hit, spared):
        s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=hit, Key="k", Body=b"old")
    moto.faults({"s3": {"slow_down": 1, "methods": ["PUT"]}, "buckets": [hit]})
    response = error(s3.put_object, Bucket=hit, Key="k", Body=b"new" * 100_000)
    assert code(response) == "SlowDown"
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert response["Error"]["Message"] == "Please reduce your request rate."
    assert s3.get_object(Bucket=hit, Key="k")["Body"].read() == b"old"  # GET is spared
    s3.put_object(Bucket=spared, Key="k", Body=b"x")  # another bucket is spared
    moto.faults({"s3": {"slow_down": 1}})
    assert code(error(s3.get_object, Bucket=spared, Key="k")) == "SlowDown"
    assert moto.faults()["injected"]["s3.slow_down"] == 1


# --- limits --------------------------------------------------------------------


def test_dynamodb_items_are_at_most_400_kb_after_the_write(moto: Moto) -> None:
    ddb, t = moto.clients["dynamodb"], table(moto)
    # "pk" + "k" + "v" + value = 409,600 bytes: the limit, which is accepted
    ddb.put_item(TableName=t, Item={"pk": {"S": "k"}, "v": {"S": "x" * 409_596}})
    response = error(ddb.put_item, TableName=t, Item={"pk": {"S": "k2"}, "v": {"S": "x" * 409_596}})
    assert code(response) == "ValidationException"
    assert response["Error"]["Message"] == "Item size has exceeded the maximum allowed size"
    ddb.put_item(
        TableName=t, Item={"pk": {"S": "bin"}, "v": {"B": b"\0" * 305_000}}
    )  # raw, not base64
    ddb.put_item(TableName=t, Item={"pk": {"S": "m"}, "m": {"M": {}}})
    grow = {
        "TableName": t,
        "UpdateExpression": "SET m.big = :v",
        "ExpressionAttributeValues": {":v": {"S": "x" * 409_600}},
    }
    response = error(ddb.update_item, Key={"pk": {"S": "m"}}, **grow)
    assert code(response) == "ValidationException"
    assert "exceeded the maximum allowed size" in response["Error"]["Message"]
    assert get(moto, t, "m")["m"] == {"M": {}}  # unchanged
    response = error(
        ddb.update_item,
        TableName=t,
        Key={"pk": {"S": "new"}},
        UpdateExpression="SET v = :v",
        ExpressionAttributeValues={":v": {"S": "x" * 409_600}},
    )
    assert code(response) == "ValidationException"
    assert get(moto, t, "new") is None


def test_transactions_refuse_large_items_and_more_than_4_mb(moto: Moto) -> None:
    ddb, t = moto.clients["dynamodb"], table(moto)
    big = {"v": {"S": "x" * 409_600}}
    response = error(
        ddb.transact_write_items, TransactItems=[put(t, "small"), put(t, "big", **big)]
    )
    assert code(response) == "TransactionCanceledException"
    assert response["CancellationReasons"] == [
        {"Code": "None"},
        {
            "Code": "ValidationError",
            "Message": "Item size has exceeded the maximum allowed size",
        },
    ]
    assert get(moto, t, "small") is None
    ddb.put_item(TableName=t, Item={"pk": {"S": "u"}, "n": {"N": "1"}})
    grow = {
        "TableName": t,
        "Key": {"pk": {"S": "u"}},
        "UpdateExpression": "SET v = :v",
        "ExpressionAttributeValues": {":v": {"S": "x" * 409_600}},
    }
    response = error(ddb.transact_write_items, TransactItems=[{"Update": grow}, put(t, "small")])
    assert [r["Code"] for r in response["CancellationReasons"]] == [
        "ValidationError",
        "None",
    ]
    assert get(moto, t, "u") == {"pk": {"S": "u"}, "n": {"N": "1"}}
    response = error(ddb.transact_write_items, TransactItems=[put(t, f"i{i}") for i in range(101)])
    assert code(response) == "ValidationException"  # moto's own check
    large = {"v": {"S": "x" * 390_000}}
    response = error(
        ddb.transact_write_items,
        TransactItems=[put(t, f"l{i}", **large) for i in range(11)],
    )
    assert code(response) == "ValidationException"
    assert "4 MB" in response["Error"]["Message"]
    assert get(moto, t, "l0") is None
    ddb.transact_write_items(TransactItems=[put(t, f"l{i}", **large) for i in range(10)])  # 3.9 MB


def test_sqs_messages_are_at_most_262144_bytes(moto: Moto) -> None:
    sqs, url = moto.clients["sqs"], queue(moto)
    attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["MaximumMessageSize"])
    assert attributes["Attributes"]["MaximumMessageSize"] == "262144"
    sqs.send_message(QueueUrl=url, MessageBody="x" * 262_144)
    for body, extra in (
        ("x" * 262_145, {}),
        ("é" * 131_073, {}),  # 262,146 bytes in UTF-8
        (
            "x" * 262_100,
            {"MessageAttributes": {"a": {"DataType": "String", "StringValue": "y" * 100}}},
        ),
    ):
        response = error(sqs.send_message, QueueUrl=url, MessageBody=body, **extra)
        assert code(response) == "InvalidParameterValue"
        assert response["Error"]["Message"].endswith("Message must be shorter than 262144 bytes.")
    entries = [{"Id": str(i), "MessageBody": "x" * 140_000} for i in range(2)]
    response = error(sqs.send_message_batch, QueueUrl=url, Entries=entries)
    assert code(response) == "AWS.SimpleQueueService.BatchRequestTooLong"  # the query code
    assert (
        response["ResponseMetadata"]["HTTPHeaders"]["x-amzn-errortype"]
        == "com.amazonaws.sqs#BatchRequestTooLong"
    )
    assert len(receive(moto, url)) == 1  # only the first message was sent


# --- request log ---------------------------------------------------------------


def test_stats_count_calls_per_service_and_operation(moto: Moto) -> None:
    t = table(moto)
    url = queue(moto)
    bucket = name("stats")
    moto.clients["s3"].create_bucket(Bucket=bucket)
    moto.call("POST", "/_stats/reset")
    ddb, sqs, s3 = (moto.clients[n] for n in ("dynamodb", "sqs", "s3"))
    ddb.put_item(TableName=t, Item={"pk": {"S": "a"}})
    ddb.put_item(TableName=t, Item={"pk": {"S": "b"}})
    ddb.transact_write_items(TransactItems=[put(t, "c")])
    sqs.send_message(QueueUrl=url, MessageBody="m")
    receive(moto, url)
    s3.put_object(Bucket=bucket, Key="k", Body=b"v")
    s3.get_object(Bucket=bucket, Key="k")["Body"].read()
    moto.faults({"dynamodb": {"throttling": 1}})
    error(ddb.get_item, TableName=t, Key={"pk": {"S": "a"}})  # a faulted call is a call
    stats = moto.stats()
    assert stats["calls"] == {
        "dynamodb.GetItem": 1,
        "dynamodb.PutItem": 2,
        "dynamodb.TransactWriteItems": 1,
        "s3.GET": 1,
        "s3.PUT": 1,
        "sqs.ReceiveMessage": 1,
        "sqs.SendMessage": 1,
    }
    assert stats["by_service"] == {"dynamodb": 4, "sqs": 2, "s3": 2} and stats["total"] == 8
    status, body = moto.call("POST", "/_stats/reset")
    assert status == 200 and body["calls"] == {} and moto.stats()["total"] == 0
