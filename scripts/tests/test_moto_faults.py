"""Tests of scripts/moto_server.py: injected faults, limits, transaction rollback,
request log.

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
    assert server.initial_faults["settings"] == {"dynamodb.page_bytes": 1_048_576}


def test_bad_configs_are_refused_and_the_old_one_kept(moto: Moto) -> None:
    moto.faults({"sqs": {"empty_receive": 0.5}})
    for bad in (
        {"dynamodb": {"throttling": 2}},
        {"dynamodb": {"throtling": 0.1}},
        {"sqs": {"operations": "ReceiveMessage"}},
        {"dynamodb": {"page_bytes": 0}},
        {"dynamodb": {"page_bytes": 1.5}},
        {"dynamodb": {"page_bytes": True}},
        {"sqs": {"page_bytes": 1024}},
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


def test_sqs_receipt_handles_and_counts_in_a_long_queue(moto: Moto) -> None:
    """moto's answers kept with the handle index and lazy receives: a
    handle of an earlier receive still deletes its message, an unknown one
    is refused, a second delete succeeds, visibility changes find their
    message, the counts and a long poll see the queue as it is. The time
    of a receive-and-delete in a queue of 50 messages and of 2,000 is
    printed (measured, not asserted)."""
    sqs, url = moto.clients["sqs"], queue(moto)

    def send(count: int) -> None:
        for start in range(0, count, 10):
            entries = [{"Id": str(i), "MessageBody": f"m{start + i}"} for i in range(10)]
            sqs.send_message_batch(QueueUrl=url, Entries=entries)

    def counts() -> tuple[int, int]:
        names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
        got = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=names)["Attributes"]
        return tuple(int(got[n]) for n in names)

    def receive_and_delete() -> float:
        start = time.monotonic()
        for _ in range(20):
            for m in receive(moto, url, VisibilityTimeout=30)[:1]:
                sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])
        return (time.monotonic() - start) / 20

    send(50)
    [first] = receive(moto, url, VisibilityTimeout=0)[:1]
    again = [m for m in receive(moto, url, VisibilityTimeout=30) if m["Body"] == first["Body"]]
    assert counts() == (40, 10)
    assert code(error(sqs.delete_message, QueueUrl=url, ReceiptHandle="not-a-handle")) == (
        "ReceiptHandleIsInvalid"
    )
    sqs.delete_message(QueueUrl=url, ReceiptHandle=first["ReceiptHandle"])  # an earlier handle
    sqs.delete_message(QueueUrl=url, ReceiptHandle=first["ReceiptHandle"])  # again: success
    assert counts() == (40, 9) and again  # the first ten came back together
    rest = receive(moto, url, VisibilityTimeout=30)
    sqs.change_message_visibility(
        QueueUrl=url, ReceiptHandle=rest[0]["ReceiptHandle"], VisibilityTimeout=0
    )
    assert counts() == (31, 18)
    assert code(
        error(
            sqs.change_message_visibility,
            QueueUrl=url,
            ReceiptHandle="not-a-handle",
            VisibilityTimeout=0,
        )
    ) == ("ReceiptHandleIsInvalid")
    small = receive_and_delete()
    send(2000)
    large = receive_and_delete()
    drained = sqs.purge_queue(QueueUrl=url) and counts()
    assert drained == (0, 0)
    started = time.monotonic()
    assert sqs.receive_message(QueueUrl=url, WaitTimeSeconds=1).get("Messages") is None
    assert time.monotonic() - started >= 0.9  # an empty queue is waited on
    print(
        f"\na receive and a delete: {small * 1000:.1f} ms in 50 messages, "
        f"{large * 1000:.1f} ms in 2,000"
    )


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


# --- DynamoDB pages ------------------------------------------------------------

ITEM_BYTES = 40 * 1024  # each item of the paged table, by DynamoDB's rules
PAGE_ITEMS = 1_048_576 // ITEM_BYTES  # 25 such items make a 1 MB page
ITEMS = 60
BY_PK = {"KeyConditionExpression": "pk = :p", "ExpressionAttributeValues": {":p": {"S": "p"}}}
BY_G = {
    "IndexName": "by_g",
    "KeyConditionExpression": "g = :g",
    "ExpressionAttributeValues": {":g": {"S": "g"}},
}


def paged_item(i: int) -> dict:
    """Item i: table key (p, s<i>), index key (g, t<i % 7>: ties, which the
    table key orders), and a string that makes it ITEM_BYTES."""
    key = {"pk": "p", "sk": f"s{i:03d}", "g": "g", "gs": f"t{i % 7}"}
    filler = ITEM_BYTES - sum(len(k) + len(v) for k, v in key.items()) - len("v")
    return {**{k: {"S": v} for k, v in key.items()}, "v": {"S": "x" * filler}}


@pytest.fixture(scope="module")
def paged(server: Moto) -> str:
    """A table of ITEMS items in one partition, with an index on (g, gs)
    projecting everything and one projecting keys only."""
    server.call("POST", "/_faults/reset")
    ddb, t = server.clients["dynamodb"], name("paged")
    index_key = [
        {"AttributeName": "g", "KeyType": "HASH"},
        {"AttributeName": "gs", "KeyType": "RANGE"},
    ]
    ddb.create_table(
        TableName=t,
        KeySchema=[
            {"AttributeName": "pk", "KeyType": "HASH"},
            {"AttributeName": "sk", "KeyType": "RANGE"},
        ],
        AttributeDefinitions=[
            {"AttributeName": a, "AttributeType": "S"} for a in ("pk", "sk", "g", "gs")
        ],
        GlobalSecondaryIndexes=[
            {"IndexName": "by_g", "KeySchema": index_key, "Projection": {"ProjectionType": "ALL"}},
            {
                "IndexName": "keys",
                "KeySchema": index_key,
                "Projection": {"ProjectionType": "KEYS_ONLY"},
            },
        ],
        BillingMode="PAY_PER_REQUEST",
    )
    for i in range(ITEMS):
        ddb.put_item(TableName=t, Item=paged_item(i))
    return t


def pages(moto: Moto, operation: str, **params) -> list[dict]:
    """Every page of a Query or Scan, following LastEvaluatedKey."""
    result = []
    while True:
        page = getattr(moto.clients["dynamodb"], operation)(**params)
        result.append(page)
        if "LastEvaluatedKey" not in page:
            return result
        assert len(result) <= ITEMS, "paging does not end"
        params = {**params, "ExclusiveStartKey": page["LastEvaluatedKey"]}


def sort_keys(page_list: list[dict]) -> list[str]:
    return [item["sk"]["S"] for page in page_list for item in page["Items"]]


def test_a_query_page_stops_at_1_mb_before_its_limit(moto: Moto, paged: str) -> None:
    ddb = moto.clients["dynamodb"]
    page = ddb.query(TableName=paged, Limit=100, **BY_PK)
    assert PAGE_ITEMS == 25 and page["Count"] == page["ScannedCount"] == PAGE_ITEMS
    assert [item["sk"]["S"] for item in page["Items"]] == [f"s{i:03d}" for i in range(25)]
    assert page["Items"][0] == paged_item(0)
    assert page["LastEvaluatedKey"] == {"pk": {"S": "p"}, "sk": {"S": "s024"}}
    page = ddb.query(TableName=paged, Limit=10, **BY_PK)  # Limit first when it is smaller
    assert page["Count"] == 10 and page["LastEvaluatedKey"]["sk"] == {"S": "s009"}
    start = {"pk": {"S": "p"}, "sk": {"S": "s050"}}  # any key, not only a returned one
    page = ddb.query(TableName=paged, ExclusiveStartKey=start, **BY_PK)
    assert sort_keys([page]) == [f"s{i:03d}" for i in range(51, ITEMS)]
    assert "LastEvaluatedKey" not in page
    backward = pages(
        moto,
        "query",
        TableName=paged,
        ScanIndexForward=False,
        KeyConditionExpression="pk = :p AND sk BETWEEN :lo AND :hi",
        ExpressionAttributeValues={":p": {"S": "p"}, ":lo": {"S": "s005"}, ":hi": {"S": "s054"}},
    )
    assert [p["Count"] for p in backward] == [25, 25, 0]  # the cut came at the range's end
    assert sort_keys(backward) == [f"s{i:03d}" for i in range(54, 4, -1)]


@pytest.mark.parametrize("limit", [None, 100])
@pytest.mark.parametrize("forward", [True, False], ids=["forward", "backward"])
@pytest.mark.parametrize("index", [False, True], ids=["table", "index"])
def test_query_pages_read_every_item_once_in_order(
    moto: Moto, paged: str, index: bool, forward: bool, limit: int | None
) -> None:
    params = {"TableName": paged, "ScanIndexForward": forward, **(BY_G if index else BY_PK)}
    if limit is not None:
        params["Limit"] = limit
    result = pages(moto, "query", **params)
    assert [p["Count"] for p in result] == [25, 25, 10]
    keys = {"pk", "sk", "g", "gs"} if index else {"pk", "sk"}
    assert [set(p["LastEvaluatedKey"]) for p in result[:-1]] == [keys, keys]
    items = [item for p in result for item in p["Items"]]
    for p in result[:-1]:  # the key of the page's last item
        assert p["LastEvaluatedKey"] == {k: p["Items"][-1][k] for k in keys}
    assert sorted(sort_keys(result)) == [f"s{i:03d}" for i in range(ITEMS)]  # each once
    order = [item["gs" if index else "sk"]["S"] for item in items]
    assert order == sorted(order, reverse=not forward)


def test_a_query_reads_its_own_partition_among_many(moto: Moto) -> None:
    """Partitions interleaved in one table: a Query returns its partition's
    items only, in sort-key order both ways, paged by Limit and resumed
    from ExclusiveStartKey; a missing partition is empty. moto read every
    item of the table for each Query; the time of one Query in a table of
    2,000 partitions against one of 20 is printed (measured, not asserted)."""
    ddb, t = moto.clients["dynamodb"], name("parts")
    ddb.create_table(
        TableName=t,
        KeySchema=[
            {"AttributeName": "pk", "KeyType": "HASH"},
            {"AttributeName": "sk", "KeyType": "RANGE"},
        ],
        AttributeDefinitions=[{"AttributeName": a, "AttributeType": "S"} for a in ("pk", "sk")],
        BillingMode="PAY_PER_REQUEST",
    )

    def query(pk: str, **params) -> list[dict]:
        values = {":p": {"S": pk}}
        return pages(
            moto,
            "query",
            TableName=t,
            KeyConditionExpression="pk = :p",
            ExpressionAttributeValues=values,
            **params,
        )

    def timed_query() -> float:
        start = time.monotonic()
        for _ in range(20):
            query("p1")
        return (time.monotonic() - start) / 20

    for i in range(60):  # sort keys put out of order, partitions interleaved
        ddb.put_item(TableName=t, Item={"pk": {"S": f"p{i % 3}"}, "sk": {"S": f"s{59 - i:02d}"}})
    wanted = [f"s{59 - i:02d}" for i in range(60) if i % 3 == 1]
    assert sort_keys(query("p1")) == sorted(wanted)
    assert sort_keys(query("p1", ScanIndexForward=False)) == sorted(wanted, reverse=True)
    paged_by_limit = query("p1", Limit=7)
    assert [p["Count"] for p in paged_by_limit] == [7, 7, 6]
    assert sort_keys(paged_by_limit) == sorted(wanted)
    assert [(p["Count"], p["Items"]) for p in query("p9")] == [(0, [])]
    small = timed_query()
    for i in range(2000):
        ddb.put_item(TableName=t, Item={"pk": {"S": f"q{i}"}, "sk": {"S": "s"}})
    large = timed_query()
    assert sort_keys(query("p1")) == sorted(wanted)
    print(
        f"\na Query of 20 items: {small * 1000:.1f} ms in 80 items, {large * 1000:.1f} ms in 2,060"
    )


def test_scan_pages_read_every_item_once(moto: Moto, paged: str) -> None:
    table_pages = pages(moto, "scan", TableName=paged)
    assert [p["Count"] for p in table_pages] == [25, 25, 10]
    assert sort_keys(table_pages) == [f"s{i:03d}" for i in range(ITEMS)]
    assert table_pages[0]["LastEvaluatedKey"] == {"pk": {"S": "p"}, "sk": {"S": "s024"}}
    index_pages = pages(moto, "scan", TableName=paged, IndexName="by_g", Limit=40)
    assert [p["Count"] for p in index_pages] == [25, 25, 10]
    assert set(index_pages[0]["LastEvaluatedKey"]) == {"pk", "sk", "g", "gs"}
    assert sorted(sort_keys(index_pages)) == [f"s{i:03d}" for i in range(ITEMS)]


def test_index_pages_count_index_entries(moto: Moto, paged: str) -> None:
    page = moto.clients["dynamodb"].query(TableName=paged, **{**BY_G, "IndexName": "keys"})
    assert page["Count"] == ITEMS and "LastEvaluatedKey" not in page  # 60 small entries
    assert set(page["Items"][0]) == {"pk", "sk", "g", "gs"}


def test_count_and_filters_cover_one_page(moto: Moto, paged: str) -> None:
    counted = pages(moto, "query", TableName=paged, Select="COUNT", **BY_PK)
    assert [(p["Count"], p["ScannedCount"]) for p in counted] == [(25, 25), (25, 25), (10, 10)]
    assert all("Items" not in p for p in counted)
    assert counted[0]["LastEvaluatedKey"] == {"pk": {"S": "p"}, "sk": {"S": "s024"}}
    filtered = pages(
        moto,
        "scan",
        TableName=paged,
        Select="COUNT",
        FilterExpression="gs = :t",
        ExpressionAttributeValues={":t": {"S": "t0"}},
    )  # the page limit counts the items read, not those the filter keeps
    assert [(p["Count"], p["ScannedCount"]) for p in filtered] == [
        (4, 25),
        (4, 25),
        (1, 10),
    ]  # i % 7 == 0
    projected = pages(moto, "query", TableName=paged, ProjectionExpression="sk", **BY_PK)
    assert [p["Count"] for p in projected] == [25, 25, 10]


def test_page_bytes_lowers_the_page_limit(moto: Moto, paged: str) -> None:
    ddb = moto.clients["dynamodb"]
    # a setting, not a fault: the tables filter does not restrict it
    body = moto.faults({"dynamodb": {"page_bytes": 3 * ITEM_BYTES}, "tables": ["none"]})
    assert body["settings"] == {"dynamodb.page_bytes": 3 * ITEM_BYTES}
    assert ddb.query(TableName=paged, Limit=100, **BY_PK)["Count"] == 3  # exactly the limit
    moto.faults({"dynamodb": {"page_bytes": 3 * ITEM_BYTES - 1}})
    assert ddb.query(TableName=paged, Limit=100, **BY_PK)["Count"] == 2
    assert ddb.scan(TableName=paged, IndexName="by_g")["Count"] == 2
    moto.faults({"dynamodb": {"page_bytes": 1000}})  # smaller than an item: one a page
    result = pages(moto, "query", TableName=paged, ScanIndexForward=False, **BY_G)
    assert [p["Count"] for p in result] == [1] * ITEMS
    assert sorted(sort_keys(result)) == [f"s{i:03d}" for i in range(ITEMS)]
    moto.faults({"dynamodb": {"page_bytes": 20 * 15}})  # keys-only entries are 15 bytes
    assert ddb.query(TableName=paged, **{**BY_G, "IndexName": "keys"})["Count"] == 20
    moto.call("POST", "/_faults/reset")
    assert ddb.query(TableName=paged, Limit=100, **BY_PK)["Count"] == 25


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


# --- DynamoDB transactions: rollback of the items they touch -------------------


def indexed_table(moto: Moto) -> str:
    """A table keyed (pk, sk) with a global index on g and a local one on l."""
    table_name = name("ix")
    moto.clients["dynamodb"].create_table(
        TableName=table_name,
        KeySchema=[
            {"AttributeName": "pk", "KeyType": "HASH"},
            {"AttributeName": "sk", "KeyType": "RANGE"},
        ],
        AttributeDefinitions=[
            {"AttributeName": a, "AttributeType": "S"} for a in ("pk", "sk", "g", "l")
        ],
        GlobalSecondaryIndexes=[
            {
                "IndexName": "by_g",
                "KeySchema": [{"AttributeName": "g", "KeyType": "HASH"}],
                "Projection": {"ProjectionType": "ALL"},
            }
        ],
        LocalSecondaryIndexes=[
            {
                "IndexName": "by_l",
                "KeySchema": [
                    {"AttributeName": "pk", "KeyType": "HASH"},
                    {"AttributeName": "l", "KeyType": "RANGE"},
                ],
                "Projection": {"ProjectionType": "ALL"},
            }
        ],
        BillingMode="PAY_PER_REQUEST",
    )
    return table_name


def contents(moto: Moto, *tables: str) -> dict:
    """Every item of the tables and every entry of indexed tables' indexes."""
    result = {}
    for t in tables:
        indexes = [None]
        if t.startswith("ix-"):
            indexes += ["by_g", "by_l"]
        for index in indexes:
            params = {"TableName": t, **({"IndexName": index} if index else {})}
            items = [item for page in pages(moto, "scan", **params) for item in page["Items"]]
            result[t, index] = sorted(items, key=lambda item: json.dumps(item, sort_keys=True))
    return result


def by_g(moto: Moto, t: str, g: str) -> list[dict]:
    return moto.clients["dynamodb"].query(
        TableName=t,
        IndexName="by_g",
        KeyConditionExpression="g = :g",
        ExpressionAttributeValues={":g": {"S": g}},
    )["Items"]


def seed_transaction_tables(moto: Moto) -> tuple[str, str, str]:
    """A plain table and an indexed one, seeded; and the indexed one's ARN."""
    ddb, t, ix = moto.clients["dynamodb"], table(moto), indexed_table(moto)
    for item in (
        {"pk": {"S": "over"}, "v": {"S": "old"}},
        {"pk": {"S": "upd"}, "n": {"N": "5"}, "l": {"L": [{"S": "a"}]}, "s": {"SS": ["x"]}},
        {"pk": {"S": "del"}, "v": {"S": "doomed"}},
        {"pk": {"S": "guard"}, "v": {"S": "here"}},
    ):
        ddb.put_item(TableName=t, Item=item)
    for item in (
        {"pk": {"S": "a"}, "sk": {"S": "1"}, "g": {"S": "ga"}, "l": {"S": "la"}},
        {"pk": {"S": "a"}, "sk": {"S": "2"}, "g": {"S": "gb"}, "l": {"S": "lb"}},
    ):
        ddb.put_item(TableName=ix, Item=item)
    arn = ddb.describe_table(TableName=ix)["Table"]["TableArn"]
    return t, ix, arn


def writes(t: str, ix: str) -> list[dict]:
    """Puts (new and overwriting), updates (ADD to a counter and a set, a
    list append, one creating its item) and deletes in both tables."""
    one = {":one": {"N": "1"}}
    return [
        put(t, "new", v={"S": "new"}),
        put(t, "over", v={"S": "replaced"}),
        {
            "Update": {
                "TableName": t,
                "Key": {"pk": {"S": "upd"}},
                "UpdateExpression": "ADD n :one, s :y SET l = list_append(l, :b), w = :b",
                "ExpressionAttributeValues": {
                    **one,
                    ":y": {"SS": ["y"]},
                    ":b": {"L": [{"S": "b"}]},
                },
            }
        },
        {
            "Update": {
                "TableName": t,
                "Key": {"pk": {"S": "fresh"}},
                "UpdateExpression": "ADD n :one",
                "ExpressionAttributeValues": one,
            }
        },
        {"Delete": {"TableName": t, "Key": {"pk": {"S": "del"}}}},
        {
            "Put": {
                "TableName": ix,
                "Item": {"pk": {"S": "b"}, "sk": {"S": "1"}, "g": {"S": "gnew"}, "l": {"S": "l"}},
            }
        },
        {
            "Update": {
                "TableName": ix,
                "Key": {"pk": {"S": "a"}, "sk": {"S": "1"}},
                "UpdateExpression": "SET g = :g, l = :l",
                "ExpressionAttributeValues": {":g": {"S": "gmoved"}, ":l": {"S": "lmoved"}},
            }
        },
        {"Delete": {"TableName": ix, "Key": {"pk": {"S": "a"}, "sk": {"S": "2"}}}},
    ]


FAILED_CONDITION = {"Code": "ConditionalCheckFailed", "Message": "The conditional request failed"}


@pytest.mark.parametrize("last", ["ConditionCheck", "Put", "Update", "Delete"])
def test_a_failed_condition_undoes_every_write_of_the_transaction(moto: Moto, last: str) -> None:
    ddb = moto.clients["dynamodb"]
    t, ix, arn = seed_transaction_tables(moto)
    before = contents(moto, t, ix)
    guard = {"TableName": t, "ConditionExpression": "v = :other"}
    guard["ExpressionAttributeValues"] = {":other": {"S": "elsewhere"}}
    if last == "Put":
        guard["Item"] = {"pk": {"S": "guard"}, "v": {"S": "taken"}}
        guard["ReturnValuesOnConditionCheckFailure"] = "ALL_OLD"
    else:
        guard["Key"] = {"pk": {"S": "guard"}}
    if last == "Update":
        guard["UpdateExpression"] = "SET v = :other"
    # the indexed table by its ARN, which moto's own rollback missed
    response = error(ddb.transact_write_items, TransactItems=[*writes(t, arn), {last: guard}])
    assert code(response) == "TransactionCanceledException"
    failed = dict(FAILED_CONDITION)
    if last == "Put":
        failed["Item"] = {"pk": {"S": "guard"}, "v": {"S": "here"}}
    assert response["CancellationReasons"] == [{"Code": "None"}] * 8 + [failed]
    assert contents(moto, t, ix) == before
    assert by_g(moto, ix, "gnew") == [] and by_g(moto, ix, "gmoved") == []
    assert [item["sk"] for item in by_g(moto, ix, "ga")] == [{"S": "1"}]


def test_a_transaction_that_succeeds_applies_every_write(moto: Moto) -> None:
    ddb = moto.clients["dynamodb"]
    t, ix, _ = seed_transaction_tables(moto)
    check = {"TableName": t, "Key": {"pk": {"S": "guard"}}, "ConditionExpression": "v = :here"}
    check["ExpressionAttributeValues"] = {":here": {"S": "here"}}
    ddb.transact_write_items(TransactItems=[*writes(t, ix), {"ConditionCheck": check}])
    assert get(moto, t, "new") == {"pk": {"S": "new"}, "v": {"S": "new"}}
    assert get(moto, t, "over") == {"pk": {"S": "over"}, "v": {"S": "replaced"}}
    assert get(moto, t, "upd") == {
        "pk": {"S": "upd"},
        "n": {"N": "6"},
        "l": {"L": [{"S": "a"}, {"S": "b"}]},
        "s": {"SS": ["x", "y"]},
        "w": {"L": [{"S": "b"}]},
    }
    assert get(moto, t, "fresh") == {"pk": {"S": "fresh"}, "n": {"N": "1"}}
    assert get(moto, t, "del") is None
    assert get(moto, t, "guard") == {"pk": {"S": "guard"}, "v": {"S": "here"}}
    assert contents(moto, ix)[ix, None] == [
        {"pk": {"S": "a"}, "sk": {"S": "1"}, "g": {"S": "gmoved"}, "l": {"S": "lmoved"}},
        {"pk": {"S": "b"}, "sk": {"S": "1"}, "g": {"S": "gnew"}, "l": {"S": "l"}},
    ]
    assert [item["pk"] for item in by_g(moto, ix, "gnew")] == [{"S": "b"}]
    assert by_g(moto, ix, "ga") == [] and by_g(moto, ix, "gb") == []


def test_a_transaction_cancelled_for_size_changes_nothing(moto: Moto) -> None:
    ddb = moto.clients["dynamodb"]
    t, ix, _ = seed_transaction_tables(moto)
    before = contents(moto, t, ix)
    big = put(t, "big", v={"S": "x" * 409_600})
    response = error(ddb.transact_write_items, TransactItems=[*writes(t, ix), big])
    assert [r["Code"] for r in response["CancellationReasons"]] == ["None"] * 8 + [
        "ValidationError"
    ]
    assert contents(moto, t, ix) == before
    # updates that each fit but together pass 4 MB, after eight other writes
    grow = [
        {
            "Update": {
                "TableName": t,
                "Key": {"pk": {"S": f"g{i}"}},
                "UpdateExpression": "SET v = :v",
                "ExpressionAttributeValues": {":v": {"S": "x" * 390_000}},
            }
        }
        for i in range(11)
    ]
    response = error(ddb.transact_write_items, TransactItems=[*writes(t, ix), *grow])
    assert code(response) == "ValidationException"
    assert "4 MB" in response["Error"]["Message"]
    assert contents(moto, t, ix) == before


def test_a_transaction_refused_midway_changes_nothing(moto: Moto) -> None:
    ddb = moto.clients["dynamodb"]
    t, ix, _ = seed_transaction_tables(moto)
    before = contents(moto, t, ix)
    # moto applies the writes before it notices the second action on "new"
    again = put(t, "new", v={"S": "again"})
    response = error(ddb.transact_write_items, TransactItems=[*writes(t, ix), again])
    assert code(response) == "ValidationException"
    assert "multiple operations on one item" in response["Error"]["Message"]
    assert contents(moto, t, ix) == before


def test_a_cancelled_transaction_leaves_no_stream_records(moto: Moto) -> None:
    ddb, t = moto.clients["dynamodb"], name("st")
    ddb.create_table(
        TableName=t,
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
        StreamSpecification={"StreamEnabled": True, "StreamViewType": "NEW_AND_OLD_IMAGES"},
    )
    ddb.put_item(TableName=t, Item={"pk": {"S": "a"}})
    absent = {"TableName": t, "Key": {"pk": {"S": "z"}}}
    absent["ConditionExpression"] = "attribute_exists(pk)"
    error(ddb.transact_write_items, TransactItems=[put(t, "b"), {"ConditionCheck": absent}])
    ddb.transact_write_items(TransactItems=[put(t, "c")])
    streams = boto3.client(
        "dynamodbstreams",
        endpoint_url=moto.endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    arn = ddb.describe_table(TableName=t)["Table"]["LatestStreamArn"]
    shard = streams.describe_stream(StreamArn=arn)["StreamDescription"]["Shards"][0]
    iterator = streams.get_shard_iterator(
        StreamArn=arn, ShardId=shard["ShardId"], ShardIteratorType="TRIM_HORIZON"
    )["ShardIterator"]
    records = streams.get_records(ShardIterator=iterator)["Records"]
    assert [r["dynamodb"]["Keys"]["pk"]["S"] for r in records] == ["a", "c"]


def test_a_transaction_costs_what_it_touches_not_the_table(moto: Moto) -> None:
    """1,000 transactions of two puts into a table that grows to 2,000
    items. moto copied every table a transaction touched, which made this
    quadratic; the figures are printed (speed is measured, not asserted:
    the Rust suite's 10,000-fragment job is what would time out)."""
    ddb, t = moto.clients["dynamodb"], table(moto)
    filler = {"v": {"S": "x" * 200}, "n": {"N": "12345"}}
    n, window, times = 1000, 100, []
    start = time.monotonic()
    for i in range(n):
        ddb.transact_write_items(
            TransactItems=[put(t, f"a{i}", **filler), put(t, f"b{i}", **filler)]
        )
        if (i + 1) % window == 0:
            times.append(time.monotonic())
    total = time.monotonic() - start
    first, last = times[0] - start, times[-1] - times[-2]
    print(
        f"\n{n} transactions in {total:.1f} s; "
        f"first {window}: {first:.2f} s, last {window}: {last:.2f} s"
    )
    assert ddb.describe_table(TableName=t)["Table"]["ItemCount"] == 2 * n


# --- DynamoDB per-partition-key throughput -------------------------------------

PTEE = "ProvisionedThroughputExceededException"
THROTTLED_TABLE = (
    "The level of configured provisioned throughput for the table was exceeded. "
    "Consider increasing your provisioning level with the UpdateTable API."
)
# "pk" + "a" + "v" + 3,580 bytes = 3,584 bytes (3.5 KB): 4 WCU, 1 RCU
BIG = {"v": {"S": "x" * 3580}}


def key(pk: str) -> dict:
    return {"pk": {"S": pk}}


def capacity(moto: Moto, t: str) -> dict:
    """The capacity counters of table t (per table and per key)."""
    return moto.faults()["capacity"]["tables"].get(t, {})


def assert_throughput_exceeded(response: dict) -> None:
    assert code(response) == PTEE
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert response["ResponseMetadata"]["HTTPHeaders"]["x-amzn-errortype"] == DDB + PTEE
    assert response["Error"]["Message"] == THROTTLED_TABLE


def test_key_limits_are_opt_in_defaulted_and_validated(moto: Moto) -> None:
    ddb, t = moto.clients["dynamodb"], table(moto)
    assert moto.faults()["capacity"] == {"key_limits": None, "tables": {}}
    ddb.put_item(TableName=t, Item=key("a"))  # off: not counted
    assert moto.faults()["capacity"]["tables"] == {}
    body = moto.faults({"dynamodb": {"key_limits": {}}})  # AWS's per-key limits
    assert body["capacity"] == {"key_limits": {"rcu": 3000, "wcu": 1000}, "tables": {}}
    for bad in (
        {"wcu": 0},
        {"rcu": -1},
        {"wcu": "5"},
        {"wcu": True},
        {"iops": 5},
        5,
        [],
    ):
        status, body = moto.call("POST", "/_faults", {"dynamodb": {"key_limits": bad}})
        assert status == 400 and body["error"], bad
    status, _ = moto.call("POST", "/_faults", {"sqs": {"key_limits": {}}})
    assert status == 400
    assert moto.faults()["config"] == {"dynamodb": {"key_limits": {}}}
    # only the tables named are limited (and counted)
    other = table(moto)
    moto.faults({"dynamodb": {"key_limits": {"wcu": 1}}, "tables": [other]})
    for _ in range(3):
        ddb.put_item(TableName=t, Item=key("a"))
    ddb.put_item(TableName=other, Item=key("a"))
    assert_throughput_exceeded(error(ddb.put_item, TableName=other, Item=key("a")))
    counters = moto.faults()["capacity"]["tables"]
    assert list(counters) == [other] and counters[other]["throttled"] == 1
    status, body = moto.call("POST", "/_faults/reset")
    assert body["capacity"] == {"key_limits": None, "tables": {}}


def test_writes_past_a_keys_budget_are_throttled_and_not_applied(moto: Moto) -> None:
    ddb, t = moto.clients["dynamodb"], table(moto)
    moto.faults({"dynamodb": {"key_limits": {"wcu": 5}}})
    ddb.put_item(TableName=t, Item={**key("a"), "n": {"N": "1"}})  # 1 WCU
    ddb.put_item(TableName=t, Item={**key("a"), **BIG})  # 3.5 KB: 4 WCU, 5 in this second
    # the item before is 3.5 KB: 4 more WCU, so nothing more goes to "a"
    assert_throughput_exceeded(error(ddb.put_item, TableName=t, Item={**key("a"), "n": {"N": "2"}}))
    assert code(error(ddb.delete_item, TableName=t, Key=key("a"))) == PTEE
    ddb.put_item(TableName=t, Item={**key("b"), **BIG})  # another key, same second: 4 WCU
    # an UpdateItem is charged by the item after: applied, over, undone
    ddb.put_item(TableName=t, Item={**key("u"), "n": {"N": "1"}})
    ddb.put_item(TableName=t, Item={**key("u"), "n": {"N": "2"}})  # 2 WCU
    grow = {
        "TableName": t,
        "Key": key("u"),
        "UpdateExpression": "SET v = :v",
        "ExpressionAttributeValues": {":v": BIG["v"]},
    }
    assert_throughput_exceeded(error(ddb.update_item, **grow))  # 2 + 4 > 5
    counters = capacity(moto, t)
    assert counters["keys"] == {
        "a": {"rcu": 0, "wcu": 5, "peak_rcu": 0, "peak_wcu": 5, "throttled": 2},
        "b": {"rcu": 0, "wcu": 4, "peak_rcu": 0, "peak_wcu": 4, "throttled": 0},
        "u": {"rcu": 0, "wcu": 2, "peak_rcu": 0, "peak_wcu": 2, "throttled": 1},
    }
    assert (counters["rcu"], counters["wcu"], counters["throttled"]) == (0, 11, 3)
    assert get(moto, t, "a") == {**key("a"), **BIG}  # not overwritten, not deleted
    assert get(moto, t, "u") == {**key("u"), "n": {"N": "2"}}  # the update was undone
    time.sleep(1.05)  # the windows that began with the first writes are over
    ddb.put_item(TableName=t, Item={**key("a"), "n": {"N": "3"}})
    ddb.update_item(**grow)
    assert get(moto, t, "a") == {**key("a"), "n": {"N": "3"}}
    assert get(moto, t, "u")["v"] == BIG["v"]
    counters = capacity(moto, t)["keys"]
    assert counters["a"]["wcu"] == 9 and counters["a"]["peak_wcu"] == 5
    assert counters["u"]["wcu"] == 6 and counters["u"]["peak_wcu"] == 4
    assert counters["a"]["rcu"] == 1  # two eventually consistent reads, 0.5 each


def test_transactions_cost_double_and_are_cancelled_with_throttling_error(moto: Moto) -> None:
    ddb, t = moto.clients["dynamodb"], table(moto)
    moto.faults({"dynamodb": {"key_limits": {"wcu": 5, "rcu": 3}}})
    ddb.transact_write_items(TransactItems=[put(t, "a", n={"N": "1"}), put(t, "b")])  # 2 WCU each
    ddb.transact_write_items(TransactItems=[put(t, "a", n={"N": "2"}), put(t, "c")])  # a: 4
    response = error(
        ddb.transact_write_items,
        TransactItems=[put(t, "d"), put(t, "a", n={"N": "3"}), put(t, "e")],  # a: 6 > 5
    )
    assert code(response) == "TransactionCanceledException"
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 400
    reasons = response["CancellationReasons"]
    assert [r["Code"] for r in reasons] == ["None", "ThrottlingError", "None"]
    assert reasons[1]["Message"].startswith("Throughput exceeds the current capacity")
    assert response["Error"]["Message"] == (
        "Transaction cancelled, please refer cancellation reasons for specific reasons "
        "[None, ThrottlingError, None]"
    )
    # a ConditionCheck is a transactional read: 2 RCU per 4 KB
    check = {
        "ConditionCheck": {
            "TableName": t,
            "Key": key("b"),
            "ConditionExpression": "attribute_exists(pk)",
        }
    }
    ddb.transact_write_items(TransactItems=[check, put(t, "f")])  # b: 2 RCU
    response = error(ddb.transact_write_items, TransactItems=[check, put(t, "g")])  # b: 4 > 3
    assert [r["Code"] for r in response["CancellationReasons"]] == ["ThrottlingError", "None"]
    # TransactGetItems: 2 RCU per 4 KB and Get
    ddb.transact_get_items(TransactItems=[{"Get": {"TableName": t, "Key": key("c")}}])  # c: 2
    response = error(
        ddb.transact_get_items,
        TransactItems=[
            {"Get": {"TableName": t, "Key": key("f")}},
            {"Get": {"TableName": t, "Key": key("c")}},  # c: 4 > 3
        ],
    )
    assert code(response) == "TransactionCanceledException"
    assert [r["Code"] for r in response["CancellationReasons"]] == ["None", "ThrottlingError"]
    keys = capacity(moto, t)["keys"]
    assert keys["a"] == {"rcu": 0, "wcu": 4, "peak_rcu": 0, "peak_wcu": 4, "throttled": 1}
    assert keys["b"] == {"rcu": 2, "wcu": 2, "peak_rcu": 2, "peak_wcu": 2, "throttled": 1}
    assert keys["c"] == {"rcu": 2, "wcu": 2, "peak_rcu": 2, "peak_wcu": 2, "throttled": 1}
    assert keys["f"]["rcu"] == 0  # the cancelled TransactGetItems is not charged
    assert not {"d", "e", "g"} & set(keys)  # nor the cancelled transactions' other items
    moto.call("POST", "/_faults/reset")
    assert get(moto, t, "a") == {**key("a"), "n": {"N": "2"}}
    assert [get(moto, t, pk) for pk in "deg"] == [None, None, None]


def test_reads_cost_per_4_kb_and_half_when_eventually_consistent(moto: Moto) -> None:
    ddb, t = moto.clients["dynamodb"], table(moto)
    ddb.put_item(TableName=t, Item={**key("r"), "v": {"S": "x" * 4996}})  # 5,000 bytes
    moto.faults({"dynamodb": {"key_limits": {"rcu": 4, "wcu": None}}})
    ddb.get_item(TableName=t, Key=key("r"), ConsistentRead=True)  # 2 RCU
    ddb.get_item(TableName=t, Key=key("r"))  # eventually consistent: 1 RCU
    page = ddb.query(
        TableName=t,
        KeyConditionExpression="pk = :r",
        FilterExpression="attribute_not_exists(v)",
        ExpressionAttributeValues={":r": {"S": "r"}},
    )  # charged for the item read, although the filter drops it: 1 RCU
    assert page["Count"] == 0 and page["ScannedCount"] == 1
    assert_throughput_exceeded(error(ddb.get_item, TableName=t, Key=key("r")))
    ddb.get_item(TableName=t, Key=key("none"), ConsistentRead=True)  # missing: 1 RCU
    ddb.get_item(TableName=t, Key=key("none"))  # 0.5
    counters = capacity(moto, t)
    assert counters["keys"] == {
        "r": {"rcu": 4, "wcu": 0, "peak_rcu": 4, "peak_wcu": 0, "throttled": 1},
        "none": {"rcu": 1.5, "wcu": 0, "peak_rcu": 1.5, "peak_wcu": 0, "throttled": 0},
    }
    assert counters["rcu"] == 5.5 and counters["throttled"] == 1


def test_count_only_limits_count_queries_scans_and_index_reads_per_key(moto: Moto) -> None:
    ddb, ix = moto.clients["dynamodb"], indexed_table(moto)
    body = moto.faults({"dynamodb": {"key_limits": {"rcu": None, "wcu": None}}})
    assert body["capacity"]["key_limits"] == {"rcu": None, "wcu": None}
    filler = {"v": {"S": "x" * 3000}}  # items of 3,010 bytes: 3 WCU
    for sk in "12":
        ddb.put_item(TableName=ix, Item={**key("a"), "sk": {"S": sk}, "g": {"S": "ga"}, **filler})
    ddb.put_item(TableName=ix, Item={**key("b"), "sk": {"S": "1"}, "g": {"S": "gb"}})  # 1 WCU
    for _ in range(20):  # far past any limit: only counted
        ddb.put_item(TableName=ix, Item={**key("hot"), "sk": {"S": "1"}})
    ddb.scan(TableName=ix)  # per key: a 6,020 bytes: 1 RCU (eventual), b 0.5, hot 0.5
    ddb.query(
        TableName=ix,
        ConsistentRead=True,
        KeyConditionExpression="pk = :a",
        ExpressionAttributeValues={":a": {"S": "a"}},
    )  # a: 2 RCU
    ddb.query(
        TableName=ix,
        KeyConditionExpression="pk = :none",
        ExpressionAttributeValues={":none": {"S": "none"}},
    )  # nothing read: the minimum, 0.5
    by_g(moto, ix, "ga")  # the global index's partition "ga": 1 RCU
    ddb.query(
        TableName=ix,
        IndexName="by_l",
        KeyConditionExpression="pk = :b",
        ExpressionAttributeValues={":b": {"S": "b"}},
    )  # a local index is its table's partition: b 0.5
    tables = moto.faults()["capacity"]["tables"]
    keys = {k: (v["rcu"], v["wcu"], v["throttled"]) for k, v in tables[ix]["keys"].items()}
    assert keys == {"a": (3, 6, 0), "b": (1, 1, 0), "hot": (0.5, 20, 0), "none": (0.5, 0, 0)}
    assert tables[f"{ix}/index/by_g"]["keys"] == {
        "ga": {"rcu": 1, "wcu": 0, "peak_rcu": 1, "peak_wcu": 0, "throttled": 0}
    }
    moto.faults({"dynamodb": {"key_limits": {"rcu": None, "wcu": None}}})  # zeroes them
    assert moto.faults()["capacity"]["tables"] == {}


def test_batches_return_throttled_entries_unprocessed(moto: Moto) -> None:
    ddb, t = moto.clients["dynamodb"], table(moto)
    spare = table(moto)  # not limited
    ddb.put_item(TableName=t, Item={**key("d"), "n": {"N": "4"}})
    moto.faults({"dynamodb": {"key_limits": {"wcu": 2, "rcu": 1}}, "tables": [t]})
    # "pk" + "a" + "v" + 1,500 = 1,504 bytes: 2 WCU, the budget of "a"
    ddb.put_item(TableName=t, Item={**key("a"), "v": {"S": "x" * 1500}})
    refused = {**key("a"), "n": {"N": "1"}, "bin": {"B": b"\x00\xff"}}
    response = ddb.batch_write_item(
        RequestItems={
            t: [
                {"PutRequest": {"Item": refused}},
                {"PutRequest": {"Item": {**key("b"), "n": {"N": "1"}}}},
                {"DeleteRequest": {"Key": key("c")}},  # a missing item: 1 WCU
            ]
        }
    )
    assert response["UnprocessedItems"] == {t: [{"PutRequest": {"Item": refused}}]}
    # every entry throttled: the call fails; an entry of a table not limited is not
    only_a = {t: [{"PutRequest": {"Item": refused}}]}
    assert_throughput_exceeded(error(ddb.batch_write_item, RequestItems=only_a))
    response = ddb.batch_write_item(
        RequestItems={**only_a, spare: [{"PutRequest": {"Item": key("a")}}]}
    )
    assert response["UnprocessedItems"] == only_a
    ddb.get_item(TableName=t, Key=key("b"), ConsistentRead=True)  # 1 RCU: b's budget
    request = {"Keys": [key("b"), key("d")], "ConsistentRead": True, "ProjectionExpression": "pk"}
    response = ddb.batch_get_item(RequestItems={t: request})
    assert response["Responses"] == {t: [key("d")]}
    assert response["UnprocessedKeys"] == {t: {**request, "Keys": [key("b")]}}
    only_b = {t: {"Keys": [key("b")], "ConsistentRead": True}}
    assert_throughput_exceeded(error(ddb.batch_get_item, RequestItems=only_b))
    assert list(moto.faults()["capacity"]["tables"]) == [t]
    keys = capacity(moto, t)["keys"]
    assert {k: (v["rcu"], v["wcu"], v["throttled"]) for k, v in keys.items()} == {
        "a": (0, 2, 3),
        "b": (1, 1, 2),
        "c": (0, 1, 0),
        "d": (1, 0, 0),
    }
    moto.call("POST", "/_faults/reset")
    assert get(moto, t, "a") == {**key("a"), "v": {"S": "x" * 1500}}
    assert get(moto, t, "b") == {**key("b"), "n": {"N": "1"}}
    assert get(moto, spare, "a") == key("a")
