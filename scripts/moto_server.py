"""moto's server, made to behave more like DynamoDB, SQS and S3 under load.

moto answers every request and never fails one; the real services do, and
our code must be tested against that. This wraps moto's WSGI app and its
backends with five additions, each in its own section below:

1. **Isolation.** moto runs requests on threads without a lock, and its
   TransactWriteItems applies items one by one and, on a failed condition,
   restores a copy of the whole table taken before it started. Two
   concurrent requests can then see each other half-done or undo each other,
   which DynamoDB never allows. DynamoDB item operations run under one lock.
   That copy also made every transaction cost the size of its tables (a job
   filling one table was quadratic); a transaction here saves and restores
   only the items it touches instead (``undo_transactions_by_item``).
   Likewise a Query read every item of its table to find its partition's;
   it reads the partition only (``query_one_partition``).

2. **Fault injection**, seeded and rate-controlled: transaction conflicts,
   throttling, internal errors and item conflicts (DynamoDB); internal
   errors, empty receives and lost deletes (SQS); SlowDown (S3). Each fault
   is answered exactly as the service answers it on the wire, and has no
   side effect. Configured from the environment variable ``MOTO_FAULTS``
   (JSON) at start and over HTTP on the same port at runtime:

   - ``POST /_faults``        body replaces the config, reseeds the RNGs,
                              zeroes the counters
   - ``GET /_faults``         config, counters of injected faults, settings
   - ``POST /_faults/reset``  no faults, counters zero

   Config (rates are probabilities per eligible request, absent = 0)::

     {"seed": 7,
      "dynamodb": {"transaction_conflict": 0.25, "throttling": 0.05,
                   "internal_error": 0.02, "item_conflict": 0.05,
                   "operations": ["TransactWriteItems", "UpdateItem"],
                   "page_bytes": 65536},
      "sqs": {"internal_error": 0.05, "empty_receive": 0.2,
              "lost_delete": 0.1, "operations": ["ReceiveMessage"]},
      "s3": {"slow_down": 0.05, "methods": ["GET", "PUT"]},
      "tables": ["jobs-1"], "queues": ["tasks-"], "buckets": ["data"]}

   ``operations``/``methods`` restrict a service's faults to those calls;
   ``tables`` (exact names), ``queues`` (substrings of the queue name) and
   ``buckets`` (exact, path-style requests) to those resources. Each kind
   has its own ``random.Random`` seeded from ``seed`` and the kind's name,
   drawn under a lock once per eligible request, so a seed and a request
   sequence always give the same faults, and enabling one kind does not
   change the draws of another (a request two kinds hit gets the first of
   internal error, throttling, conflict; empty receive after internal error).

   ``dynamodb.page_bytes`` is not a fault but the Query/Scan page size of
   section 3 (a positive integer, default 1,048,576), so that tests can
   page small tables; ``operations`` and ``tables`` do not restrict it, and
   a config without it (``/_faults/reset`` too) restores the default.
   ``dynamodb.key_limits`` is not a fault either: it turns on the
   per-partition-key throughput limits of section 5.

3. **Limits moto lacks** (moto 5.2.5 already refuses more than 100
   TransactWriteItems actions and more than 10 SQS batch entries; those are
   left to it):

   - DynamoDB items at most 400 KB (409,600 bytes) after the write, sized by
     DynamoDB's rules (see ``item_size``), for PutItem, the result of
     UpdateItem (including nested paths, which moto never checked) and each
     TransactWriteItems action (cancellation reason ``ValidationError``).
     moto's own check (405,000 by a measure counting binary values as
     base64 and numbers as text) is removed so that there is one rule.
   - TransactWriteItems at most 4 MB (Put items, updated items after the
     write, keys of Delete and ConditionCheck): ``ValidationException``.
   - SQS messages at most 262,144 bytes, counted in UTF-8 bytes with their
     message attributes, and SendMessageBatch at most 262,144 bytes in
     total. moto 5.2.5 follows AWS's 2025 raise of the limit to 1 MiB and
     counts characters; 256 KiB is what a queue created before then (or
     with ``MaximumMessageSize`` 262144) enforces, and what our code keeps to.
   - DynamoDB Query and Scan pages at most 1 MB (1,048,576 bytes, or
     ``dynamodb.page_bytes``) of items read, each sized by ``item_size``.
     A page ends before the item that would take it past the limit, even
     with Limit not reached, and carries a LastEvaluatedKey (for an index:
     the index keys and the table keys); an item larger than the limit is a
     page of its own. Items are counted as read, before FilterExpression and
     ProjectionExpression, so Count (also with ``Select: COUNT``) and
     ScannedCount cover that page only; an index read counts its index
     entries (the attributes the index projects), not the table's items.
     moto 5.2.5 has the same cut, hard-wired at 1,000,000 bytes by its own
     measure (numbers as text, no list/map overhead, whole items for
     indexes), and raises an IndexError (a 500) if the first item of a page
     is larger than its limit. Its loop is kept; the limit and the measure
     are replaced (BatchGetItem's 16 MB check now uses the measure too).

4. **Request log**: calls per service and operation (``dynamodb.PutItem``,
   ``sqs.ReceiveMessage``, ``s3.PUT``), faulted calls included, at
   ``GET /_stats``; ``POST /_stats/reset`` zeroes them.

5. **Per-partition-key throughput** (opt-in). DynamoDB gives each partition
   key value at most 3,000 read and 1,000 write capacity units (RCU, WCU) a
   second, on-demand tables included, and throttles past that. The config
   ``{"dynamodb": {"key_limits": {"wcu": 1000, "rcu": 3000}}}`` turns this
   on for the tables ``tables`` names (all without it; ``operations`` does
   not restrict it). A unit left out takes that default, a positive number
   replaces it (``"wcu": 5``: a test throttles after a few writes), ``null``
   counts without limiting; without ``key_limits`` nothing is limited or
   counted. Charged per partition key value (the value of the table's HASH
   key attribute; for a global secondary index, of the index's, counted as
   the table ``<table>/index/<name>``; a local index is its table's):

   - a write (PutItem, UpdateItem, DeleteItem, each BatchWriteItem entry):
     1 WCU per started KB (1,024 bytes) of the larger of the item before and
     after it, sized by ``item_size`` (a delete: the deleted item), at least 1;
   - a read (GetItem, each BatchGetItem key): 1 RCU per started 4 KB of the
     item (a missing one: 0 bytes), at least 1; half if eventually
     consistent (0.5 RCU per 4 KB);
   - a Query or Scan page: per partition key, the sizes of the items it read
     (as section 3 counts them: before FilterExpression and projection, an
     index read its index entries) summed, then 1 RCU per started 4 KB, at
     least 1, halved if eventually consistent; a Query page that read
     nothing is charged the minimum on its key, a Scan page nothing;
   - TransactWriteItems: each Put, Update and Delete 2 WCU per started KB,
     each ConditionCheck 2 RCU per started 4 KB (a transactional read);
     TransactGetItems: each Get 2 RCU per started 4 KB.

   Window: each key's budget is per fixed one-second window, which starts
   with the key's first call after its previous window ended. AWS lets a
   partition bank up to 300 seconds of unused capacity as burst; here
   nothing is banked, so a call that would take a key past its limit within
   its window is throttled, whatever went unused before (strict and
   deterministic: a test sees throttling at once). A call whose cost alone
   exceeds a limit is always throttled.

   A throttled call writes nothing and is charged nothing; it is answered:

   - a single-item call, Query, Scan: ``ProvisionedThroughputExceededException``
     (400, the message of section 2's throttling of single-item calls). An
     UpdateItem's cost is known only once applied: it is undone (section 1's
     ``UndoLog``) before the answer;
   - TransactWriteItems, TransactGetItems: ``TransactionCanceledException``,
     reason ``ThrottlingError`` for each action on a throttled key and
     ``None`` for the others; the transaction is undone as in section 1;
   - BatchWriteItem, BatchGetItem: the other entries are applied and the
     throttled ones returned in UnprocessedItems, UnprocessedKeys (with the
     table's ConsistentRead and projection); if every entry is throttled,
     ``ProvisionedThroughputExceededException``.

   A call is charged when it succeeds or fails its condition (DynamoDB
   charges failed conditional writes: the cost of the write, or for an
   UpdateItem the item before); not when refused otherwise (validation,
   size limits, injected faults, a transaction cancelled for another
   reason). Writes to indexes and PartiQL are not charged; the
   ConsumedCapacity in answers is moto's own. Each check and its charge run
   under the DynamoDB lock of section 1 (TransactGetItems too, while this is
   on), so concurrent calls are charged one after another.

   ``GET /_faults`` reports the counters under ``capacity``; ``POST /_faults``
   and ``/_faults/reset`` zero them::

     {"key_limits": {"rcu": 3000, "wcu": 1000},        (null: off)
      "tables": {"jobs-1": {"rcu": 4.5, "wcu": 12, "throttled": 1,
                            "keys": {"a": {"rcu": 4.5, "wcu": 12,
                                           "peak_rcu": 4.5, "peak_wcu": 8,
                                           "throttled": 1}}}}}

   per table and key: ``rcu``, ``wcu`` consumed in total, ``peak_rcu``,
   ``peak_wcu`` the most in one window, ``throttled`` the calls (batch
   entries) refused for the key; a table's figures are the sums of its
   keys' (which are listed once they consumed or were throttled).

Started by ``scripts/moto.sh`` with moto's own command line (``-H``, ``-p``).
"""

from __future__ import annotations

import copy
import functools
import inspect
import io
import json
import logging
import math
import os
import random
import sys
import threading
import time
import uuid
import zlib
from base64 import b64decode, b64encode
from collections import Counter
from collections.abc import Container
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import parse_qs, urlsplit
from xml.sax.saxutils import escape

import moto.core.utils
import moto.dynamodb.models
import moto.dynamodb.models.table
import moto.server
import moto.sqs.models
from moto.dynamodb.exceptions import (
    ConditionalCheckFailed,
    ItemSizeTooLarge,
    ItemSizeToUpdateTooLarge,
    MockValidationException,
)
from moto.dynamodb.models import DynamoDBBackend
from moto.dynamodb.models.dynamo_type import DynamoType, Item, LimitedSizeDict
from moto.dynamodb.models.table import Table
from moto.dynamodb.responses import DynamoHandler
from moto.moto_server.werkzeug_app import DomainDispatcherApplication
from moto.sqs.exceptions import (
    BatchRequestTooLong,
    InvalidParameterValue,
    QueueDoesNotExist,
    ReceiptHandleIsInvalid,
)
from moto.sqs.models import Message, Queue, SQSBackend
from werkzeug.wrappers import Response

# --------------------------------------------------------------------------
# What is recognised: services, operations, fault kinds
# --------------------------------------------------------------------------

DYNAMODB_DATA_OPS = frozenset(
    {
        "GetItem",
        "PutItem",
        "UpdateItem",
        "DeleteItem",
        "Query",
        "Scan",
        "BatchGetItem",
        "BatchWriteItem",
        "TransactGetItems",
        "TransactWriteItems",
    }
)
SINGLE_ITEM_OPS = frozenset({"GetItem", "PutItem", "UpdateItem", "DeleteItem"})
SQS_DATA_OPS = frozenset(
    {
        "SendMessage",
        "SendMessageBatch",
        "ReceiveMessage",
        "DeleteMessage",
        "DeleteMessageBatch",
        "ChangeMessageVisibility",
        "ChangeMessageVisibilityBatch",
    }
)

# Per service: each fault kind and the operations it can hit, in the order
# of precedence when several fire on one request. S3 kinds hit any method.
FAULT_KINDS: dict[str, dict[str, frozenset[str] | None]] = {
    "dynamodb": {
        "internal_error": DYNAMODB_DATA_OPS,
        "throttling": DYNAMODB_DATA_OPS,
        "transaction_conflict": frozenset({"TransactWriteItems"}),
        "item_conflict": frozenset({"PutItem", "UpdateItem", "DeleteItem"}),
    },
    "sqs": {
        "internal_error": SQS_DATA_OPS,
        "empty_receive": frozenset({"ReceiveMessage"}),
        "lost_delete": frozenset({"DeleteMessage", "DeleteMessageBatch"}),
    },
    "s3": {"slow_down": None},
}
OPERATION_FILTER = {"dynamodb": "operations", "sqs": "operations", "s3": "methods"}
# Per service: settings that are not faults, with their defaults.
SETTINGS: dict[str, dict[str, int]] = {"dynamodb": {"page_bytes": 1024 * 1024}}
RESOURCE_FILTER = {"dynamodb": "tables", "sqs": "queues", "s3": "buckets"}
# Section 5: the per-partition-key limits, per second, and their window.
KEY_LIMITS_KEY = "key_limits"
KEY_LIMITS = {"rcu": 3000, "wcu": 1000}
WINDOW_SECONDS = 1.0

ITEM_MAX_BYTES = 400 * 1024
TRANSACTION_MAX_BYTES = 4 * 1024 * 1024
SQS_MAX_MESSAGE_BYTES = 262_144

DDB = "com.amazonaws.dynamodb.v20120810#"

# --------------------------------------------------------------------------
# Fault configuration, RNGs and counters
# --------------------------------------------------------------------------


def validate_config(config: Any) -> dict[str, Any]:
    """The config if it is well formed; ValueError or TypeError naming the
    bad key if not."""
    if not isinstance(config, dict):
        raise TypeError("the fault config must be a JSON object")
    allowed = {"seed", *FAULT_KINDS, *RESOURCE_FILTER.values()}
    for key, value in config.items():
        if key not in allowed:
            raise ValueError(f"unknown key {key!r} (expected one of {sorted(allowed)})")
        if key == "seed":
            if not isinstance(value, (int, str)) or isinstance(value, bool):
                raise ValueError("seed must be an integer or a string")
        elif key in FAULT_KINDS:
            _validate_service_section(key, value)
        else:
            _validate_names(key, value)
    return config


def _validate_service_section(service: str, section: Any) -> None:
    if not isinstance(section, dict):
        raise TypeError(f"{service} must be an object")
    for key, value in section.items():
        if key == OPERATION_FILTER[service]:
            _validate_names(f"{service}.{key}", value)
        elif key in FAULT_KINDS[service]:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not ok or not 0 <= value <= 1:
                raise ValueError(f"{service}.{key} must be a probability in [0, 1]")
        elif key in SETTINGS.get(service, {}):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{service}.{key} must be a positive integer")
        elif service == "dynamodb" and key == KEY_LIMITS_KEY:
            _validate_key_limits(value)
        else:
            expected = sorted(
                [
                    *FAULT_KINDS[service],
                    *SETTINGS.get(service, {}),
                    *([KEY_LIMITS_KEY] if service == "dynamodb" else []),
                    OPERATION_FILTER[service],
                ]
            )
            raise ValueError(f"unknown key {service}.{key} (expected one of {expected})")


def _validate_key_limits(limits: Any) -> None:
    name = f"dynamodb.{KEY_LIMITS_KEY}"
    if not isinstance(limits, dict):
        raise TypeError(f"{name} must be an object")
    for unit, limit in limits.items():
        if unit not in KEY_LIMITS:
            raise ValueError(f"unknown key {name}.{unit} (expected one of {sorted(KEY_LIMITS)})")
        number = isinstance(limit, (int, float)) and not isinstance(limit, bool)
        if limit is not None and not (number and 0 < limit < math.inf):
            raise ValueError(f"{name}.{unit} must be a positive number or null")


def _validate_names(key: str, value: Any) -> None:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{key} must be a list of strings")


@dataclass
class Injection:
    """A fault that fired: its kind and an RNG for its details (which item,
    which variant), split off the kind's RNG so it is deterministic too."""

    service: str
    kind: str
    rng: random.Random


@dataclass(frozen=True)
class Charge:
    """Capacity units a call takes from one partition key value of a table
    (or of a global index, named ``<table>/index/<name>``)."""

    table: str
    key: str
    rcu: float = 0.0
    wcu: float = 0.0


@dataclass
class KeyUse:
    """One partition key value's current window and its counters."""

    window_start: float = -math.inf
    window_rcu: float = 0.0
    window_wcu: float = 0.0
    rcu: float = 0.0
    wcu: float = 0.0
    peak_rcu: float = 0.0
    peak_wcu: float = 0.0
    throttled: int = 0


class Capacity:
    """Section 5: the per-key limits (None: off), the tables they apply to,
    and each key's window and counters. ``over`` and ``charge`` are called
    under the DynamoDB lock, so a check and its charge are one step."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.configure({})

    def configure(self, config: dict[str, Any]) -> None:
        """Takes the limits and ``tables`` of a config; zeroes the counters."""
        limits = config.get("dynamodb", {}).get(KEY_LIMITS_KEY)
        with self._lock:
            self._limits: dict[str, float | None] | None = (
                None
                if limits is None
                else {unit: limits.get(unit, default) for unit, default in KEY_LIMITS.items()}
            )
            self._tables: list[str] | None = config.get(RESOURCE_FILTER["dynamodb"])
            self._keys: dict[tuple[str, str], KeyUse] = {}

    def active(self) -> bool:
        with self._lock:
            return self._limits is not None

    def applies(self, table: str) -> bool:
        """Whether calls on ``table`` (a table's name) are limited and counted."""
        with self._lock:
            return self._limits is not None and (self._tables is None or table in self._tables)

    def over(self, charges: list[Charge]) -> set[tuple[str, str]]:
        """The (table, key) pairs that ``charges`` would take past a limit in
        their current window, each counted as throttled once; empty if they
        all fit. Charges nothing."""
        wanted: dict[tuple[str, str], list[float]] = {}
        for c in charges:
            units = wanted.setdefault((c.table, c.key), [0.0, 0.0])
            units[0] += c.rcu
            units[1] += c.wcu
        now = time.monotonic()
        with self._lock:
            if self._limits is None:
                return set()
            rcu_limit, wcu_limit = self._limits["rcu"], self._limits["wcu"]
            over = set()
            for pair, (rcu, wcu) in wanted.items():
                use = self._use(pair, now)
                if (rcu_limit is not None and use.window_rcu + rcu > rcu_limit) or (
                    wcu_limit is not None and use.window_wcu + wcu > wcu_limit
                ):
                    over.add(pair)
                    use.throttled += 1
            return over

    def charge(self, charges: list[Charge]) -> None:
        """Adds ``charges`` to their keys' windows and totals."""
        now = time.monotonic()
        with self._lock:
            if self._limits is None:
                return
            for c in charges:
                use = self._use((c.table, c.key), now)
                use.window_rcu += c.rcu
                use.window_wcu += c.wcu
                use.rcu += c.rcu
                use.wcu += c.wcu
                use.peak_rcu = max(use.peak_rcu, use.window_rcu)
                use.peak_wcu = max(use.peak_wcu, use.window_wcu)

    def _use(self, pair: tuple[str, str], now: float) -> KeyUse:
        """A key's counters, its window restarted if the last one is over."""
        use = self._keys.setdefault(pair, KeyUse())
        if now - use.window_start >= WINDOW_SECONDS:
            use.window_start, use.window_rcu, use.window_wcu = now, 0.0, 0.0
        return use

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            tables: dict[str, dict[str, Any]] = {}
            for (table, key), use in sorted(self._keys.items()):
                if not (use.rcu or use.wcu or use.throttled):
                    continue  # only ever in a throttled call's other keys
                entry = tables.setdefault(
                    table, {"rcu": 0.0, "wcu": 0.0, "throttled": 0, "keys": {}}
                )
                entry["rcu"] += use.rcu
                entry["wcu"] += use.wcu
                entry["throttled"] += use.throttled
                entry["keys"][key] = {
                    "rcu": _units(use.rcu),
                    "wcu": _units(use.wcu),
                    "peak_rcu": _units(use.peak_rcu),
                    "peak_wcu": _units(use.peak_wcu),
                    "throttled": use.throttled,
                }
            for entry in tables.values():
                entry["rcu"], entry["wcu"] = _units(entry["rcu"]), _units(entry["wcu"])
            limits = None if self._limits is None else dict(sorted(self._limits.items()))
            return {"key_limits": limits, "tables": tables}


def _units(value: float | None) -> float | int | None:
    """Capacity units as JSON shows them: whole numbers without ``.0``."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


class Faults:
    """The current fault config, one RNG per kind and the counters (the
    capacity counters of section 5 are ``CAPACITY``'s, configured and
    reported with them)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.configure({})

    def configure(self, config: dict[str, Any]) -> None:
        """Replaces the config, reseeds every kind's RNG, zeroes the counters."""
        seed = config.get("seed", 0)
        with self._lock:
            self._config = config
            self._rngs = {
                (service, kind): random.Random(f"{seed}/{service}.{kind}")
                for service, kinds in FAULT_KINDS.items()
                for kind in kinds
            }
            self._eligible: Counter[str] = Counter()
            self._injected: Counter[str] = Counter()
            self._errors: Counter[str] = Counter()
        CAPACITY.configure(config)

    def draw(
        self, service: str, kinds: list[str], op: str, resources: list[str]
    ) -> Injection | None:
        """Draws each of ``kinds`` that has a rate and applies to the call;
        returns the first that fires (in ``kinds`` order), if any."""
        with self._lock:
            if not self._applies(service, op, resources):
                return None
            section = self._config.get(service, {})
            fired = None
            for kind in kinds:
                rate = section.get(kind, 0)
                if rate <= 0:
                    continue
                self._eligible[f"{service}.{kind}"] += 1
                rng = self._rngs[service, kind]
                if rng.random() < rate:
                    # every hit takes its detail seed, injected or not, so a
                    # kind's RNG never depends on the other kinds
                    detail = random.Random(rng.getrandbits(64))
                    if fired is None:
                        fired = Injection(service, kind, detail)
            if fired is not None:
                self._injected[f"{service}.{fired.kind}"] += 1
            return fired

    def _applies(self, service: str, op: str, resources: list[str]) -> bool:
        operations = self._config.get(service, {}).get(OPERATION_FILTER[service])
        if operations is not None and op not in operations:
            return False
        wanted = self._config.get(RESOURCE_FILTER[service])
        if wanted is None:
            return True
        if service == "sqs":
            return any(w in r for r in resources for w in wanted)
        return any(r in wanted for r in resources)

    def setting(self, service: str, key: str) -> int:
        """A setting of ``SETTINGS``: the config's value, else the default."""
        with self._lock:
            return self._config.get(service, {}).get(key, SETTINGS[service][key])

    def note_error(self, injection: Injection, code: str) -> None:
        """Counts the error code a fault was answered with (for variants)."""
        with self._lock:
            self._errors[f"{injection.service}.{injection.kind}.{code}"] += 1

    def snapshot(self) -> dict[str, Any]:
        capacity = CAPACITY.snapshot()
        with self._lock:
            return {
                "config": self._config,
                "injected": {
                    f"{s}.{k}": self._injected[f"{s}.{k}"]
                    for s, kinds in FAULT_KINDS.items()
                    for k in kinds
                },
                "eligible": dict(sorted(self._eligible.items())),
                "errors": dict(sorted(self._errors.items())),
                "settings": {
                    f"{s}.{k}": self._config.get(s, {}).get(k, default)
                    for s, defaults in SETTINGS.items()
                    for k, default in defaults.items()
                },
                "capacity": capacity,
            }


class Stats:
    """Calls per service and operation."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: Counter[str] = Counter()

    def count(self, name: str) -> None:
        with self._lock:
            self._calls[name] += 1

    def reset(self) -> None:
        with self._lock:
            self._calls.clear()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            calls = dict(sorted(self._calls.items()))
        by_service: Counter[str] = Counter()
        for name, n in calls.items():
            by_service[name.split(".", 1)[0]] += n
        return {
            "calls": calls,
            "by_service": dict(by_service),
            "total": sum(calls.values()),
        }


CAPACITY = Capacity()
FAULTS = Faults()
STATS = Stats()

# --------------------------------------------------------------------------
# Telling requests apart (as moto routes them)
# --------------------------------------------------------------------------


@dataclass
class Call:
    """One request to a service: which, what, on which resources."""

    service: str  # dynamodb | sqs | s3 | another signing name
    op: str  # DynamoDB/SQS action, or the HTTP method for S3
    protocol: str  # json | query | rest
    params: dict[str, Any] = field(default_factory=dict)
    resources: list[str] = field(default_factory=list)
    empty_receive: bool = False  # set when that fault fired; read by the backend


# The call a thread is serving, for the backend hooks (werkzeug serves each
# request on its own thread), and the open transaction's byte count.
_REQUEST = threading.local()


def current_call() -> Call | None:
    return getattr(_REQUEST, "call", None)


def classify(environ: dict[str, Any]) -> Call | None:
    """The service call a request is, or None for moto's own API.

    moto routes by ``X-Amz-Target`` (DynamoDB, SQS JSON), then by the
    service in the SigV4 credential scope (SQS query protocol, S3), and
    sends unsigned requests without a target to S3; so does this. The body
    of a DynamoDB or SQS request is read here and put back for moto.
    """
    path = environ.get("PATH_INFO", "")
    if path.startswith("/moto-api") or path == "/favicon.ico":
        return None
    target = environ.get("HTTP_X_AMZ_TARGET", "")
    if target.startswith("DynamoDB_"):
        params = _json(read_body(environ))
        op = target.split(".", 1)[-1]
        return Call("dynamodb", op, "json", params, dynamodb_tables(op, params))
    if target.startswith("AmazonSQS."):
        params = _json(read_body(environ))
        return Call("sqs", target.split(".", 1)[1], "json", params, sqs_queue(params, path))
    if target:
        return Call(target.split(".", 1)[0], target.split(".", 1)[-1], "json")
    service = signing_service(environ)
    if service == "sqs":
        params = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
        if environ.get("CONTENT_TYPE", "").startswith("application/x-www-form-urlencoded"):
            body = read_body(environ).decode("utf-8", "replace")
            params.update({k: v[0] for k, v in parse_qs(body, keep_blank_values=True).items()})
        return Call("sqs", params.get("Action", "?"), "query", params, sqs_queue(params, path))
    if service in (None, "s3"):
        method = environ.get("REQUEST_METHOD", "GET")
        return Call("s3", method, "rest", {}, s3_bucket(environ))
    return Call(service, environ.get("REQUEST_METHOD", "GET"), "other")


def read_body(environ: dict[str, Any]) -> bytes:
    """The request body, left in place for the app to read again."""
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    stream = environ["wsgi.input"]
    if environ.get("wsgi.input_terminated") and not length:
        body = stream.read()
    else:
        body = stream.read(length) if length > 0 else b""
    environ["wsgi.input"] = io.BytesIO(body)
    environ["CONTENT_LENGTH"] = str(len(body))
    return body


def drain_body(environ: dict[str, Any]) -> None:
    """Reads and drops a body the app will not read (a request answered by a
    fault), so the client is not cut off while it is still sending."""
    stream = environ["wsgi.input"]
    if environ.get("wsgi.input_terminated"):
        while stream.read(65536):
            pass
        return
    try:
        left = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        return
    while left > 0:
        chunk = stream.read(min(left, 65536))
        if not chunk:
            return
        left -= len(chunk)


def _json(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body or b"{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def signing_service(environ: dict[str, Any]) -> str | None:
    """The service of the SigV4 credential scope (header or presigned URL)."""
    credential = None
    auth = environ.get("HTTP_AUTHORIZATION", "")
    if "Credential=" in auth:
        credential = auth.split("Credential=", 1)[1].split(",", 1)[0]
    else:
        query = parse_qs(environ.get("QUERY_STRING", ""))
        credential = query.get("X-Amz-Credential", [None])[0]
    if not credential:
        return None
    parts = credential.strip().split("/")
    return parts[3].lower() if len(parts) >= 5 else None


def dynamodb_tables(op: str, params: dict[str, Any]) -> list[str]:
    """The tables a DynamoDB request names (by name, ARNs reduced to it)."""
    names: list[str] = []
    if "TableName" in params:
        names.append(params["TableName"])
    names.extend(params.get("RequestItems", {}) or {})
    for action in params.get("TransactItems", []) or []:
        for body in action.values() if isinstance(action, dict) else []:
            if isinstance(body, dict) and "TableName" in body:
                names.append(body["TableName"])
    return [n.split(":table/", 1)[-1].split("/", 1)[0] for n in names if isinstance(n, str)]


def sqs_queue(params: dict[str, Any], path: str) -> list[str]:
    """The queue name of an SQS request (from QueueUrl, else the path)."""
    url = params.get("QueueUrl")
    path = urlsplit(url).path if isinstance(url, str) else path
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return [name] if name else []


def s3_bucket(environ: dict[str, Any]) -> list[str]:
    """The bucket of a path-style S3 request (``/<bucket>/<key>``)."""
    bucket = environ.get("PATH_INFO", "").lstrip("/").split("/", 1)[0]
    return [bucket] if bucket else []


# --------------------------------------------------------------------------
# Faults as the services send them
# --------------------------------------------------------------------------


def _request_id() -> str:
    return uuid.uuid4().hex.upper()


def dynamodb_error(status: int, body: dict[str, Any]) -> Response:
    """A DynamoDB (awsJson1_0) error: ``__type`` in the body and in
    ``x-amzn-ErrorType``, with the CRC32 that botocore checks."""
    data = json.dumps(body).encode()
    return Response(
        data,
        status,
        {
            "Content-Type": "application/x-amz-json-1.0",
            "x-amzn-RequestId": _request_id(),
            "x-amzn-ErrorType": body["__type"],
            "x-amz-crc32": str(zlib.crc32(data)),
        },
    )


def error_body(name: str, message: str) -> dict[str, Any]:
    """The body of a DynamoDB error other than a cancelled transaction."""
    return {"__type": DDB + name, "message": message}


def transaction_cancelled(count: int, culprits: Container[int], reason: dict[str, str]) -> Response:
    """TransactionCanceledException: one reason per action, ``reason`` for
    the actions ``culprits`` and ``None`` for the others."""
    reasons = [reason if i in culprits else {"Code": "None"} for i in range(count)]
    codes = ", ".join(r["Code"] for r in reasons)
    return dynamodb_error(
        400,
        {
            "__type": DDB + "TransactionCanceledException",
            "CancellationReasons": reasons,
            "Message": "Transaction cancelled, please refer cancellation reasons "
            f"for specific reasons [{codes}]",
        },
    )


def sqs_error(call: Call, status: int, code: str, message: str, fault: str) -> Response:
    """An SQS error in the protocol of the request: JSON (``__type`` plus the
    ``x-amzn-query-error`` header of query-compatible services) or XML."""
    headers = {"x-amzn-RequestId": _request_id()}
    if call.protocol == "json":
        headers["Content-Type"] = "application/x-amz-json-1.0"
        headers["x-amzn-query-error"] = f"{code};{fault}"
        body = json.dumps({"__type": f"com.amazonaws.sqs#{code}", "message": message})
        return Response(body, status, headers)
    headers["Content-Type"] = "text/xml"
    body = (
        '<?xml version="1.0"?><ErrorResponse '
        'xmlns="http://queue.amazonaws.com/doc/2012-11-05/"><Error>'
        f"<Type>{fault}</Type><Code>{code}</Code><Message>{escape(message)}</Message>"
        f"<Detail/></Error><RequestId>{headers['x-amzn-RequestId']}</RequestId>"
        "</ErrorResponse>"
    )
    return Response(body, status, headers)


def s3_error(status: int, code: str, message: str) -> Response:
    """An S3 REST error (no body on HEAD: werkzeug drops it)."""
    request_id = _request_id()[:16]
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{escape(message)}</Message>"
        f"<RequestId>{request_id}</RequestId><HostId>{uuid.uuid4().hex}</HostId></Error>"
    )
    headers = {"Content-Type": "application/xml", "x-amz-request-id": request_id}
    return Response(body, status, headers)


# --------------------------------------------------------------------------
# Deciding faults, one function per service
# --------------------------------------------------------------------------


def _kinds(service: str, op: str) -> list[str]:
    return [k for k, ops in FAULT_KINDS[service].items() if ops is None or op in ops]


def dynamodb_fault(call: Call) -> Response | None:
    hit = FAULTS.draw("dynamodb", _kinds("dynamodb", call.op), call.op, call.resources)
    if hit is None:
        return None
    actions = len(call.params.get("TransactItems") or [])
    culprit = hit.rng.randrange(actions) if actions else 0  # the action that fails
    conflict = "Transaction is ongoing for the item"
    if hit.kind == "internal_error":
        code = "InternalServerError"
        response = dynamodb_error(500, error_body(code, "Internal server error"))
    elif hit.kind == "transaction_conflict":
        code = "TransactionCanceledException"
        reason = {"Code": "TransactionConflict", "Message": conflict}
        response = transaction_cancelled(actions, {culprit}, reason)
    elif hit.kind == "item_conflict":
        code = "TransactionConflictException"
        response = dynamodb_error(400, error_body(code, conflict))
    else:
        code, response = throttled(call, hit, actions, culprit)
    FAULTS.note_error(hit, code)
    return response


THROTTLED_INDEX = (
    "Throughput exceeds the current capacity for one or more global secondary "
    "indexes. DynamoDB is automatically scaling your index so please be patient."
)
THROTTLED_TABLE = (
    "The level of configured provisioned throughput for the table was exceeded. "
    "Consider increasing your provisioning level with the UpdateTable API."
)
THROTTLED_REQUESTS = "Rate of requests exceeds the allowed throughput."
THROTTLED_KEY = (
    "Throughput exceeds the current capacity of your table or index. DynamoDB is "
    "automatically scaling your table or index so please try again shortly. If "
    "exceptions persist, check if you have a hot key: "
    "https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/bp-partition-key-design.html"
)


def throughput_exceeded() -> Response:
    """ProvisionedThroughputExceededException, as DynamoDB sends it."""
    code = "ProvisionedThroughputExceededException"
    return dynamodb_error(400, error_body(code, THROTTLED_TABLE))


def throttled(call: Call, hit: Injection, actions: int, culprit: int) -> tuple[str, Response]:
    """Throttling as DynamoDB sends it: for a transaction, half the time a
    cancellation with a ThrottlingError reason; for a single-item call, half
    the time ProvisionedThroughputExceededException; else ThrottlingException
    (whose ``__type`` DynamoDB puts in the ``com.amazon.coral.availability``
    namespace)."""
    variant = hit.rng.random() < 0.5
    if call.op == "TransactWriteItems" and actions and variant:
        reason = {"Code": "ThrottlingError", "Message": THROTTLED_INDEX}
        code = "TransactionCanceledException"
        return code, transaction_cancelled(actions, {culprit}, reason)
    if call.op in SINGLE_ITEM_OPS and variant:
        return "ProvisionedThroughputExceededException", throughput_exceeded()
    body = error_body("ThrottlingException", THROTTLED_REQUESTS)
    body["__type"] = "com.amazon.coral.availability#ThrottlingException"
    return "ThrottlingException", dynamodb_error(400, body)


def sqs_fault(call: Call) -> Response | None:
    """Internal errors answered here; an empty receive is marked on the call
    for the backend hook (moto then renders the empty result in the request's
    protocol); lost deletes are drawn per message by the backend hook."""
    kinds = [k for k in _kinds("sqs", call.op) if k != "lost_delete"]
    hit = FAULTS.draw("sqs", kinds, call.op, call.resources)
    if hit is None:
        return None
    FAULTS.note_error(hit, "InternalError" if hit.kind == "internal_error" else "Empty")
    if hit.kind == "empty_receive":
        call.empty_receive = True
        return None
    message = "We encountered an internal error. Please try again."
    return sqs_error(call, 500, "InternalError", message, "Receiver")


def s3_fault(call: Call) -> Response | None:
    hit = FAULTS.draw("s3", _kinds("s3", call.op), call.op, call.resources)
    if hit is None:
        return None
    FAULTS.note_error(hit, "SlowDown")
    return s3_error(503, "SlowDown", "Please reduce your request rate.")


FAULT_DECIDERS = {"dynamodb": dynamodb_fault, "sqs": sqs_fault, "s3": s3_fault}

# --------------------------------------------------------------------------
# The WSGI middleware and its control endpoints
# --------------------------------------------------------------------------


class FaultInjector:
    """Wraps moto's dispatcher: answers ``/_faults`` and ``/_stats``, counts
    every service call, and answers a call with a fault when one fires."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        path = environ.get("PATH_INFO", "")
        if path in CONTROL_ROUTES:
            return control(environ)(environ, start_response)
        call = classify(environ)
        if call is None:
            return self.app(environ, start_response)
        STATS.count(f"{call.service}.{call.op}")
        decide = FAULT_DECIDERS.get(call.service)
        fault = decide(call) if decide else None
        if fault is not None:
            drain_body(environ)
            return fault(environ, start_response)
        _REQUEST.call = call
        try:
            return self.app(environ, start_response)
        except Answered as answered:  # by a backend hook, past moto and Flask
            return answered.response(environ, start_response)
        finally:
            _REQUEST.call = None


class Answered(BaseException):
    """A call a backend hook answers itself (section 5's throttling). A
    BaseException, so that moto (which turns an Exception inside a
    transaction into a cancellation reason) and Flask (which turns one into
    a 500) let it through to ``FaultInjector``, which sends ``response``;
    section 1's transaction undo restores what the call wrote on the way."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status)
        self.response = response


def _json_response(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body, indent=1), status, {"Content-Type": "application/json"})


def control(environ: dict[str, Any]) -> Response:
    """``/_faults``, ``/_faults/reset``, ``/_stats``, ``/_stats/reset``."""
    route = (environ.get("REQUEST_METHOD", "GET"), environ["PATH_INFO"])
    if route == ("GET", "/_faults"):
        return _json_response(FAULTS.snapshot())
    if route == ("POST", "/_faults"):
        try:
            config = validate_config(json.loads(read_body(environ) or b"{}"))
        except (ValueError, TypeError) as e:
            return _json_response({"error": str(e)}, 400)
        FAULTS.configure(config)
        return _json_response(FAULTS.snapshot())
    if route == ("POST", "/_faults/reset"):
        FAULTS.configure({})
        return _json_response(FAULTS.snapshot())
    if route == ("GET", "/_stats"):
        return _json_response(STATS.snapshot())
    if route == ("POST", "/_stats/reset"):
        STATS.reset()
        return _json_response(STATS.snapshot())
    return _json_response({"error": f"{route[0]} is not allowed on {route[1]}"}, 405)


CONTROL_ROUTES = frozenset({"/_faults", "/_faults/reset", "/_stats", "/_stats/reset"})

# --------------------------------------------------------------------------
# Backend hooks: SQS faults that need the queue
# --------------------------------------------------------------------------


def _wrap(cls: type, name: str, make: Any) -> None:
    """Replaces ``cls.name`` by ``make(original)``."""
    original = getattr(cls, name)
    setattr(cls, name, functools.wraps(original)(make(original)))


def inject_sqs_backend_faults() -> None:
    """Empty receives return no message without touching the queue; a lost
    delete answers success but leaves the message, which comes back after
    its visibility timeout. DeleteMessageBatch deletes through
    ``delete_message``, so each of its entries is drawn on its own."""

    def receive(original: Any) -> Any:
        def receive_message(self: SQSBackend, queue_name: str, *args: Any, **kwargs: Any) -> Any:
            call = current_call()
            if call is not None and call.empty_receive:
                self.get_queue(queue_name)  # a missing queue is still an error
                return []
            return original(self, queue_name, *args, **kwargs)

        return receive_message

    def delete(original: Any) -> Any:
        def delete_message(self: SQSBackend, queue_name: str, receipt_handle: str) -> None:
            call = current_call()
            eligible = call is not None and call.op in FAULT_KINDS["sqs"]["lost_delete"]
            if eligible and _holds_message(self, queue_name, receipt_handle):
                hit = FAULTS.draw("sqs", ["lost_delete"], call.op, [queue_name])
                if hit is not None:
                    FAULTS.note_error(hit, "Lost")
                    return None
            return original(self, queue_name, receipt_handle)

        return delete_message

    _wrap(SQSBackend, "receive_message", receive)
    _wrap(SQSBackend, "delete_message", delete)


def _holds_message(backend: SQSBackend, queue_name: str, receipt_handle: str) -> bool:
    """Whether the handle names a message still in the queue (only those
    deletes can be lost; the others keep moto's answer)."""
    try:
        queue = backend.get_queue(queue_name)
    except QueueDoesNotExist:
        return False
    return _queued(queue, receipt_handle) is not None


# --------------------------------------------------------------------------
# Limits: DynamoDB item, transaction and page size, SQS message size
# --------------------------------------------------------------------------


def item_size(item: dict[str, Any]) -> int:
    """An item's size by DynamoDB's rules: each attribute's name in UTF-8
    bytes plus its value's size (``value_size``)."""
    return sum(len(name.encode()) + value_size(value) for name, value in item.items())


def value_size(value: dict[str, Any]) -> int:
    """An AttributeValue's size: strings in UTF-8 bytes; binary in raw bytes
    (base64 decoded); numbers 1 byte per 2 significant digits plus 1 (plus 1
    if negative); BOOL and NULL 1; sets the sum of their elements; lists and
    maps 3 bytes plus, per element, 1 byte, its key (maps) and its size.
    Takes moto's stored values (``DynamoType``) as well as wire JSON."""
    if isinstance(value, DynamoType):
        kind, v = value.type, value.value
    elif isinstance(value, dict) and len(value) == 1:
        kind, v = next(iter(value.items()))
    else:
        return len(json.dumps(value, default=str).encode())
    if kind == "S":
        return len(v.encode())
    if kind == "N":
        return number_size(v)
    if kind == "B":
        return binary_size(v)
    if kind in ("BOOL", "NULL"):
        return 1
    if kind == "SS":
        return sum(len(s.encode()) for s in v)
    if kind == "NS":
        return sum(number_size(n) for n in v)
    if kind == "BS":
        return sum(binary_size(b) for b in v)
    if kind == "L":
        return 3 + sum(1 + value_size(e) for e in v)
    if kind == "M":
        return 3 + sum(1 + len(k.encode()) + value_size(e) for k, e in v.items())
    return len(json.dumps(v, default=str).encode())


def number_size(text: Any) -> int:
    try:
        digits = Decimal(str(text)).normalize().as_tuple()
    except InvalidOperation:
        return len(str(text))
    # normalize() drops trailing zeros; Decimal keeps no leading ones
    return (len(digits.digits) + 1) // 2 + 1 + digits.sign


def binary_size(value: Any) -> int:
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    try:
        return len(b64decode(value))
    except (ValueError, TypeError):
        return len(str(value))


def _moto_item_size(item: Any) -> int:
    return item_size(item.to_json()["Attributes"]) if item is not None else 0


class ValidationError(Exception):
    """An item too large inside TransactWriteItems. moto's transaction turns
    any other exception into a cancellation reason coded by the class name,
    so this cancels the transaction with reason ``ValidationError``."""


def _too_large(update: bool) -> Exception:
    if getattr(_REQUEST, "transaction", None) is not None:
        return ValidationError("Item size has exceeded the maximum allowed size")
    return ItemSizeToUpdateTooLarge() if update else ItemSizeTooLarge()


def _transaction_too_large() -> Exception:
    return MockValidationException("Transaction request cannot be larger than 4 MB")


def enforce_dynamodb_item_limits() -> None:
    """Item size after the write (PutItem, UpdateItem, and each of their
    TransactWriteItems actions) and the 4 MB transaction total."""
    del LimitedSizeDict.__setitem__  # moto's own item size rule; ours replaces it
    put_signature = inspect.signature(DynamoDBBackend.put_item)
    update_signature = inspect.signature(DynamoDBBackend.update_item)

    def put(original: Any) -> Any:
        def put_item(self: DynamoDBBackend, *args: Any, **kwargs: Any) -> Any:
            bound = put_signature.bind(self, *args, **kwargs)
            if item_size(bound.arguments["item_attrs"]) > ITEM_MAX_BYTES:
                raise _too_large(update=False)
            return original(self, *args, **kwargs)

        return put_item

    def update(original: Any) -> Any:
        def update_item(self: DynamoDBBackend, *args: Any, **kwargs: Any) -> Any:
            bound = update_signature.bind(self, *args, **kwargs)
            table = self.get_table(bound.arguments["table_name"])
            try:
                keys = self.get_keys_value(table, bound.arguments["key"])
            except (MockValidationException, KeyError, TypeError):
                return original(self, *args, **kwargs)  # moto reports the bad key
            before = table.get_item(*keys)
            saved = copy.deepcopy(before)
            item = original(self, *args, **kwargs)
            size = _moto_item_size(item)
            transaction = getattr(_REQUEST, "transaction", None)
            if transaction is not None:
                transaction["bytes"] += size
            if size > ITEM_MAX_BYTES or (
                transaction is not None and transaction["bytes"] > TRANSACTION_MAX_BYTES
            ):
                if before is None:
                    table.delete_item(*keys)
                else:
                    before.attrs = saved.attrs  # moto updated the stored item in place
                raise (
                    _too_large(update=True) if size > ITEM_MAX_BYTES else _transaction_too_large()
                )
            return item

        return update_item

    def transact(original: Any) -> Any:
        def transact_write_items(self: DynamoDBBackend, transact_items: list[Any]) -> Any:
            if len(transact_items) > 100:
                return original(self, transact_items)  # moto refuses it
            static = 0  # Puts' items and the keys of the others; Updates add theirs
            for action in transact_items:
                for kind, body in action.items() if isinstance(action, dict) else []:
                    if not isinstance(body, dict):
                        continue
                    if kind == "Put":
                        static += item_size(body.get("Item") or {})
                    elif kind in ("Delete", "ConditionCheck"):
                        static += item_size(body.get("Key") or {})
            if static > TRANSACTION_MAX_BYTES:
                raise _transaction_too_large()
            _REQUEST.transaction = {"bytes": static}
            try:
                return original(self, transact_items)
            finally:
                _REQUEST.transaction = None

        return transact_write_items

    _wrap(DynamoDBBackend, "put_item", put)
    _wrap(DynamoDBBackend, "update_item", update)
    _wrap(DynamoDBBackend, "transact_write_items", transact)


@dataclass
class Read:
    """The Query or Scan a thread is running: its page limit and, for an
    index, the attributes of its entries (None: whole items)."""

    page_bytes: int
    attributes: frozenset[str] | None


def index_attributes(table: Table, index_name: str | None) -> frozenset[str] | None:
    """The attributes an index's entries hold (keys of the table and the
    index, plus NonKeyAttributes for INCLUDE), None for ALL or no index (an
    unknown one is left to moto to refuse)."""
    index = {i.name: i for i in table.all_indexes()}.get(index_name) if index_name else None
    projection = (getattr(index, "projection", None) or {}).get("ProjectionType", "ALL")
    if index is None or projection not in ("KEYS_ONLY", "INCLUDE"):
        return None
    keys = [table.hash_key_attr, table.range_key_attr, *index.schema_key_attrs]
    if projection == "INCLUDE":
        keys.extend(index.projection.get("NonKeyAttributes", []))
    return frozenset(k for k in keys if k)


def limit_dynamodb_pages() -> None:
    """Query and Scan pages at most ``dynamodb.page_bytes`` of items read.

    moto's Table.query and Table.scan stop a page before the item for which
    ``result_size + item.size() > RESULT_SIZE_LIMIT`` (a module global), and
    then return the last item's key as LastEvaluatedKey. So that loop stays
    and is given the limit (set under the DynamoDB lock, per call) and the
    measure: while a read runs, ``Item.size`` is the size of the index entry
    or item by ``item_size``, at most the limit, so that an item larger than
    the limit fills a page alone instead of failing on an empty page."""
    query_signature = inspect.signature(Table.query)
    scan_signature = inspect.signature(Table.scan)

    def size(self: Item) -> int:
        read = getattr(_REQUEST, "read", None)
        if read is None:
            return item_size(self.attrs)
        attrs = self.attrs
        if read.attributes is not None:
            attrs = {k: v for k, v in attrs.items() if k in read.attributes}
        return min(item_size(attrs), read.page_bytes)

    def paged(original: Any, signature: inspect.Signature) -> Any:
        def read(self: Table, *args: Any, **kwargs: Any) -> Any:
            index_name = signature.bind(self, *args, **kwargs).arguments.get("index_name")
            with _LOCK:
                page_bytes = FAULTS.setting("dynamodb", "page_bytes")
                moto.dynamodb.models.table.RESULT_SIZE_LIMIT = page_bytes
                _REQUEST.read = Read(page_bytes, index_attributes(self, index_name))
                try:
                    return original(self, *args, **kwargs)
                finally:
                    _REQUEST.read = None

        return read

    Item.size = size
    _wrap(Table, "query", lambda original: paged(original, query_signature))
    _wrap(Table, "scan", lambda original: paged(original, scan_signature))


def message_size(body: str, attributes: dict[str, Any] | None) -> int:
    """An SQS message's size: body and message attributes (names, types and
    values) in UTF-8 bytes, binary values counted as sent (base64)."""
    size = len(body.encode())
    for name, attribute in (attributes or {}).items():
        size += len(name.encode())
        for part in ("DataType", "StringValue", "BinaryValue"):
            value = attribute.get(part) if isinstance(attribute, dict) else None
            if value is not None:
                size += len(value if isinstance(value, bytes) else str(value).encode())
    return size


def enforce_sqs_message_limits() -> None:
    """Messages at most 262,144 bytes (less if the queue's MaximumMessageSize
    says so), a SendMessageBatch at most 262,144 bytes in total, with moto's
    own error shapes (InvalidParameterValue, BatchRequestTooLong)."""
    # The default MaximumMessageSize of new queues, and moto's batch limit
    # and the number in its BatchRequestTooLong message.
    moto.sqs.models.MAXIMUM_MESSAGE_LENGTH = SQS_MAX_MESSAGE_BYTES
    send_signature = inspect.signature(SQSBackend.send_message)

    def check(backend: SQSBackend, queue_name: str, body: str, attributes: Any) -> None:
        queue = backend.get_queue(queue_name)
        limit = min(int(queue.maximum_message_size), SQS_MAX_MESSAGE_BYTES)
        if message_size(body, attributes) > limit:
            raise InvalidParameterValue(
                "One or more parameters are invalid. Reason: "
                f"Message must be shorter than {limit} bytes."
            )

    def send(original: Any) -> Any:
        def send_message(self: SQSBackend, *args: Any, **kwargs: Any) -> Any:
            bound = send_signature.bind(self, *args, **kwargs)
            arguments = bound.arguments
            check(
                self,
                arguments["queue_name"],
                arguments["message_body"],
                arguments.get("message_attributes"),
            )
            return original(self, *args, **kwargs)

        return send_message

    def send_batch(original: Any) -> Any:
        def send_message_batch(self: SQSBackend, queue_name: str, entries: Any) -> Any:
            sizes = [
                message_size(e.get("MessageBody", ""), e.get("MessageAttributes"))
                for e in entries.values()
            ]
            if sum(sizes) > SQS_MAX_MESSAGE_BYTES:
                raise BatchRequestTooLong(sum(sizes))
            for entry in entries.values():  # every entry before sending any
                check(
                    self,
                    queue_name,
                    entry.get("MessageBody", ""),
                    entry.get("MessageAttributes"),
                )
            return original(self, queue_name, entries)

        return send_message_batch

    _wrap(SQSBackend, "send_message", send)
    _wrap(SQSBackend, "send_message_batch", send_batch)


# --------------------------------------------------------------------------
# Speed: moto's paths that cost the whole table or the whole queue
# --------------------------------------------------------------------------


def query_one_partition() -> None:
    """A Query of a table (not an index) reads its own partition only.

    moto 5.2.5's Table.query takes the partition's items from
    ``all_items()``: every item of the table, sorted, then filtered by hash
    key. Each Query then cost the whole table, so a job whose task records
    fill the table made its own queries slower with every task (quadratic:
    a 5,000-task job in the scale model was dominated by it). While a Query
    of the table runs, ``all_items`` on that table returns the partition's
    items only, in the order ``all_items`` gives them; the rest of moto's
    Query (sort, conditions, paging, filters) is unchanged. Index queries
    and Scans still read the table."""
    query_signature = inspect.signature(Table.query)
    every_item = Table.all_items

    def all_items(self: Table) -> Any:
        partition = getattr(_REQUEST, "partition", None)
        if partition is None or partition[0] is not self:
            return every_item(self)
        stored = self.items.get(partition[1])
        if stored is None:
            return []
        if not self.range_key_attr:
            return [stored]
        return sorted(stored.values(), key=lambda item: item.range_key)

    def one_partition(original: Any) -> Any:
        def query(self: Table, *args: Any, **kwargs: Any) -> Any:
            arguments = query_signature.bind(self, *args, **kwargs).arguments
            hash_key = arguments.get("hash_key")
            if arguments.get("index_name") or hash_key is None:
                return original(self, *args, **kwargs)
            _REQUEST.partition = (self, hash_key)
            try:
                return original(self, *args, **kwargs)
            finally:
                _REQUEST.partition = None

        return query

    Table.all_items = all_items
    _wrap(Table, "query", one_partition)


class _VisibleMessages:
    """A queue's visible, undelayed messages, read lazily: receiving stops
    at the messages it takes and waiting at the first visible one, instead
    of building the list of every message each time (``Queue.messages``)."""

    def __init__(self, queue: Queue) -> None:
        self._queue = queue

    def __iter__(self) -> Any:
        return (m for m in list(self._queue._messages) if m.visible and not m.delayed)

    def __bool__(self) -> bool:
        return any(True for _ in self)

    def __len__(self) -> int:
        return sum(1 for _ in self)


# Every receipt handle a message was given, to its message (handles are
# random and never reused; a deleted message stays here, not in its queue).
_HANDLES: dict[str, Message] = {}


def _now_ms(dt: Any = None) -> float:
    """moto's ``unix_time_millis`` without its datetime arithmetic when it
    asks for now (each message's ``visible`` and ``delayed`` ask)."""
    return time.time() * 1000.0 if dt is None else moto.core.utils.unix_time_millis(dt)


def fast_sqs_queues() -> None:
    """SQS calls cost about the same however many messages a queue holds.

    moto 5.2.5 builds the list of a queue's visible messages for each
    ReceiveMessage, computes every queue attribute (three passes over the
    queue each) for every message it returns (to read the retention
    period), and finds a receipt handle by walking the queue twice per
    DeleteMessage and once per ChangeMessageVisibility, each step through
    datetime arithmetic: a queue of 5,000 tasks answered a receive in
    0.1 s, one of 100,000 would not be usable. Here: now is read from the
    clock directly, the retention period from the queue, visible messages
    are read lazily, and a handle finds its message in ``_HANDLES``. What
    the calls answer and do is moto's."""
    moto.sqs.models.unix_time_millis = _now_ms
    moto.sqs.models.unix_time = lambda dt=None: _now_ms(dt) / 1000.0
    Queue.messages = property(_VisibleMessages)

    def mark_received(original: Any) -> Any:
        def run(self: Message, *args: Any, **kwargs: Any) -> None:
            original(self, *args, **kwargs)
            _HANDLES[self.receipt_handle] = self

        return run

    def retained(self: SQSBackend, queue_name: str, message: Message) -> bool:
        retention = int(self.get_queue(queue_name).message_retention_period)
        return retention + message.sent_timestamp / 1000 > time.time()

    _wrap(Message, "mark_received", mark_received)
    SQSBackend.is_message_valid_based_on_retention_period = retained
    Queue.delete_message = _delete_message
    SQSBackend.change_message_visibility = _change_message_visibility


def _queued(queue: Queue, receipt_handle: str) -> Message | None:
    """The message in ``queue`` that was given ``receipt_handle``."""
    message = _HANDLES.get(receipt_handle)
    return message if message is not None and message in queue._messages else None


def _delete_message(self: Queue, receipt_handle: str) -> None:
    """moto's Queue.delete_message, finding the message by its handle."""
    if receipt_handle in self.deleted_messages:
        return  # deleted before: moto answers success
    message = _queued(self, receipt_handle)
    if message is None:
        raise ReceiptHandleIsInvalid()
    self.pending_messages.discard(message)
    self.deleted_messages.update(message.all_receipt_handles)
    remaining = list(self._messages)  # a new list, as moto's: receives iterate the old one
    remaining.remove(message)
    self._messages = remaining


def _change_message_visibility(
    self: SQSBackend, queue_name: str, receipt_handle: str, visibility_timeout: int
) -> None:
    """moto's SQSBackend.change_message_visibility, finding the message by
    its handle."""
    queue = self.get_queue(queue_name)
    message = _queued(queue, receipt_handle)
    if message is None:
        raise ReceiptHandleIsInvalid()
    until = _now_ms() + int(visibility_timeout) * 1000
    if until - message.sent_timestamp > 43200 * 1000:
        raise InvalidParameterValue(
            f"Value {visibility_timeout} for parameter VisibilityTimeout is invalid. Reason: Total "
            "VisibilityTimeout for the message is beyond the limit [43200 seconds]"
        )
    message.change_visibility(visibility_timeout)
    if message.visible and message in queue.pending_messages:
        queue.pending_messages.remove(message)


# --------------------------------------------------------------------------
# Transactions: undo the items they touched, not a copy of their tables
# --------------------------------------------------------------------------


@dataclass
class Saved:
    """An item as it was before a transaction: a deep copy, or None if there
    was none; for a table with a range key, also whether its hash key had a
    bucket in ``Table.items`` (moto leaves empty ones, and its get_item, a
    defaultdict lookup, makes them)."""

    table: Table
    hash_key: DynamoType
    range_key: DynamoType | None
    item: Item | None
    had_bucket: bool


class UndoLog:
    """What a TransactWriteItems can change: each item it names (Put, Update,
    Delete, ConditionCheck) and the records of its tables' streams.

    moto keeps no other state per item: ``Table.items`` is ``{hash: Item}``,
    or ``{hash: {range: Item}}`` with a range key, and indexes (global and
    local) are computed from it at each read; every read sorts what it
    returns, so the dict's order, which a restore may change, is not seen."""

    def __init__(self, backend: DynamoDBBackend, transact_items: list[Any]) -> None:
        self.saved: dict[tuple[int, DynamoType, DynamoType | None], Saved] = {}
        self.streams: dict[int, tuple[Any, list[Any], int]] = {}
        for action in transact_items:
            target = _target(backend, action)
            if target is not None:
                self._save(*target)

    def _save(self, table: Table, hash_key: DynamoType, range_key: DynamoType | None) -> None:
        if (id(table), hash_key, range_key) in self.saved:
            return  # moto refuses the transaction; the first copy is the one
        if table.has_range_key:
            bucket = table.items.get(hash_key)  # not table.items[...]: no bucket made
            item = bucket.get(range_key) if bucket is not None else None
        else:
            bucket, item = None, table.items.get(hash_key)
        self.saved[id(table), hash_key, range_key] = Saved(
            table, hash_key, range_key, copy.deepcopy(item), bucket is not None
        )
        shard = table.stream_shard
        if shard is not None and id(table) not in self.streams:
            # the list and its length: moto appends to it (or, when a Lambda
            # took the records, replaces it)
            self.streams[id(table)] = (shard, shard.items, len(shard.items))

    def restore(self) -> None:
        """Puts back every saved item (or its absence) and stream."""
        for s in self.saved.values():
            if not s.table.has_range_key:
                if s.item is None:
                    s.table.items.pop(s.hash_key, None)
                else:
                    s.table.items[s.hash_key] = s.item
            elif s.item is not None:
                s.table.items[s.hash_key][s.range_key] = s.item
            elif s.hash_key in s.table.items:
                s.table.items[s.hash_key].pop(s.range_key, None)
        for s in self.saved.values():
            if s.table.has_range_key and not s.had_bucket:
                bucket = s.table.items.get(s.hash_key)
                if bucket is not None and not bucket:
                    del s.table.items[s.hash_key]  # was absent, is empty again
        for shard, records, count in self.streams.values():
            shard.items = records[:count]


def _target(
    backend: DynamoDBBackend, action: Any
) -> tuple[Table, DynamoType, DynamoType | None] | None:
    """The table and key of a transaction's action, found as moto finds them
    (a Put's key from its item); None for an action moto cannot apply (a
    malformed one, an unknown table), which it reports and never writes."""
    if not isinstance(action, dict) or len(action) != 1:
        return None
    kind, body = next(iter(action.items()))
    if kind not in ("Put", "Update", "Delete", "ConditionCheck") or not isinstance(body, dict):
        return None
    try:
        table = backend.get_table(body["TableName"])
        key = body["Item"] if kind == "Put" else body["Key"]
        return (table, *backend.get_keys_value(table, key))
    except Exception:
        return None


class _TransactionCopy:
    """The ``copy`` module as moto's DynamoDB backend sees it: while this
    thread runs a transaction under an ``UndoLog``, ``deepcopy`` of a table
    (moto's backup of each table the transaction names) returns the table
    itself, so moto's rollback (putting that "copy" back in ``tables``)
    changes nothing and the log restores what the transaction wrote."""

    def __getattr__(self, name: str) -> Any:
        return getattr(copy, name)

    def deepcopy(self, x: Any, memo: Any = None) -> Any:
        if isinstance(x, Table) and getattr(_REQUEST, "undo", None) is not None:
            return x
        return copy.deepcopy(x, memo)


def undo_transactions_by_item() -> None:
    """TransactWriteItems saves the items it touches and, if it fails in any
    way (a cancellation, a refusal after some writes, a size limit), restores
    them and raises what moto raised; moto's copy of whole tables is skipped.
    Applied first, so it runs inside the size checks and the lock."""
    models = moto.dynamodb.models
    source = inspect.getsource(DynamoDBBackend.transact_write_items)
    if models.copy is not copy or "copy.deepcopy(" not in source:
        raise RuntimeError("moto's transact_write_items no longer copies tables as expected")
    models.copy = _TransactionCopy()

    def undo(original: Any) -> Any:
        def transact_write_items(self: DynamoDBBackend, transact_items: list[Any]) -> Any:
            if not isinstance(transact_items, list) or len(transact_items) > 100:
                return original(self, transact_items)  # moto refuses it, writing nothing
            log = UndoLog(self, transact_items)
            _REQUEST.undo = log
            try:
                return original(self, transact_items)
            except BaseException:
                log.restore()
                raise
            finally:
                _REQUEST.undo = None

        return transact_write_items

    _wrap(DynamoDBBackend, "transact_write_items", undo)


# --------------------------------------------------------------------------
# Throughput: per-partition-key capacity (section 5)
# --------------------------------------------------------------------------


def write_units(size: int) -> float:
    """WCU of a write of ``size`` bytes: 1 per started KB, at least 1."""
    return float(max(1, math.ceil(size / 1024)))


def read_units(size: int, consistent: bool) -> float:
    """RCU of a read of ``size`` bytes: 1 per started 4 KB, at least 1;
    half if eventually consistent."""
    units = float(max(1, math.ceil(size / 4096)))
    return units if consistent else units / 2


def key_label(value: DynamoType) -> str:
    """A partition key value as the counters name it (binary in base64)."""
    v = value.value
    return b64encode(v).decode() if isinstance(v, (bytes, bytearray)) else str(v)


def stored_item(table: Table, hash_key: DynamoType, range_key: DynamoType | None) -> Item | None:
    """The item stored under a key, looked up without making a bucket."""
    if table.has_range_key:
        bucket = table.items.get(hash_key)
        return bucket.get(range_key) if bucket is not None else None
    return table.items.get(hash_key)


def stored_size(table: Table, hash_key: DynamoType, range_key: DynamoType | None) -> int:
    item = stored_item(table, hash_key, range_key)
    return item_size(item.attrs) if item is not None else 0


Place = tuple[Table, DynamoType, DynamoType | None]


def _place(
    backend: DynamoDBBackend, ops: Container[str], table_name: Any, key: Any
) -> Place | None:
    """The table and key a backend call charges: None if the request is not
    one of ``ops``, its table is not limited, or moto is about to refuse it
    (an unknown table, a bad key), which costs nothing."""
    call = current_call()
    if call is None or call.op not in ops or not CAPACITY.active():
        return None
    try:
        table = backend.get_table(table_name)
        hash_key, range_key = backend.get_keys_value(table, key)
    except Exception:
        return None
    return (table, hash_key, range_key) if CAPACITY.applies(table.name) else None


@dataclass
class Batch:
    """What the backend hooks note for the request a handler wrapper runs:
    the BatchWriteItem/BatchGetItem entries throttled (a count, and per table
    as the request names it), or each TransactGetItems Get's charge (None:
    not charged), in order."""

    refused: int = 0
    unprocessed: dict[str, list[Any]] = field(default_factory=dict)
    gets: list[Charge | None] = field(default_factory=list)


def _admit(charges: list[Charge], table_name: Any = None, entry: Any = None) -> bool:
    """Whether ``charges`` fit their keys' budgets. If not: a batch entry
    (``entry``, under ``table_name``) is set aside as unprocessed (False);
    any other call is answered ProvisionedThroughputExceededException."""
    if not CAPACITY.over(charges):
        return True
    batch = getattr(_REQUEST, "batch", None)
    if batch is not None and entry is not None:
        batch.refused += 1
        batch.unprocessed.setdefault(table_name, []).append(entry)
        return False
    raise Answered(throughput_exceeded())


def _run_charged(run: Any, charges: list[Charge]) -> Any:
    """``run()``, charging ``charges`` if it succeeds or fails its condition."""
    try:
        result = run()
    except ConditionalCheckFailed:
        CAPACITY.charge(charges)
        raise
    CAPACITY.charge(charges)
    return result


THROTTLING_REASON = {"Code": "ThrottlingError", "Message": THROTTLED_KEY}


def _cancel_throttled(count: int, charges: list[tuple[int, Charge]]) -> None:
    """Charges a transaction's actions (``(index, charge)``) at once, or
    cancels it with ThrottlingError on each action of a key they would take
    past its limit."""
    over = CAPACITY.over([c for _, c in charges])
    if over:
        culprits = {i for i, c in charges if (c.table, c.key) in over}
        raise Answered(transaction_cancelled(count, culprits, THROTTLING_REASON))
    CAPACITY.charge([c for _, c in charges])


def charge_transactions() -> None:
    """TransactWriteItems: 2 WCU per started KB of each written item (the
    larger of before and after), 2 RCU per started 4 KB of each
    ConditionCheck's item, charged once the transaction applied; if a key
    would go over, the transaction is cancelled. Applied first (inside
    ``undo_transactions_by_item``), so the undo log restores its writes."""

    def transact(original: Any) -> Any:
        def transact_write_items(self: DynamoDBBackend, transact_items: list[Any]) -> Any:
            call = current_call()
            if (
                call is None
                or call.op != "TransactWriteItems"
                or not CAPACITY.active()
                or not isinstance(transact_items, list)
                or len(transact_items) > 100
            ):
                return original(self, transact_items)
            actions: list[tuple[int, str, Place, int]] = []
            for i, action in enumerate(transact_items):
                place = _target(self, action)
                if place is not None and CAPACITY.applies(place[0].name):
                    actions.append((i, next(iter(action)), place, stored_size(*place)))
            result = original(self, transact_items)
            charges = []
            for i, kind, place, before in actions:
                label = key_label(place[1])
                if kind == "ConditionCheck":
                    charge = Charge(place[0].name, label, rcu=2 * read_units(before, True))
                else:
                    size = max(before, stored_size(*place))
                    charge = Charge(place[0].name, label, wcu=2 * write_units(size))
                charges.append((i, charge))
            _cancel_throttled(len(transact_items), charges)
            return result

        return transact_write_items

    _wrap(DynamoDBBackend, "transact_write_items", transact)


def _partition(table: Table, index_name: str | None) -> tuple[str, str]:
    """The counters' table name and the partition key attribute of a read:
    the table's, or for a global index ``<table>/index/<name>`` and the
    index's HASH attribute (a local index shares its table's partitions)."""
    global_indexes = (table.global_indexes or []) if index_name else []
    for index in global_indexes:
        if index.name == index_name:
            hashes = [k["AttributeName"] for k in index.schema if k["KeyType"] == "HASH"]
            if hashes:
                return f"{table.name}/index/{index_name}", hashes[0]
    return table.name, table.hash_key_attr


def page_charges(
    table: Table,
    index_name: str | None,
    items: list[Item],
    consistent: bool,
    queried: DynamoType | None,
) -> list[Charge]:
    """A Query or Scan page's charges: per partition key, the summed sizes of
    the items (or index entries) it read; a Query that read none, the
    minimum on its key ``queried``."""
    name, hash_attr = _partition(table, index_name)
    sizes: dict[str, int] = {}
    for item in items:
        value = item.attrs.get(hash_attr)
        if value is not None:
            label = key_label(value)
            sizes[label] = sizes.get(label, 0) + item_size(item.attrs)
    if not sizes and queried is not None:
        sizes[key_label(queried)] = 0
    return [Charge(name, label, rcu=read_units(size, consistent)) for label, size in sizes.items()]


def limit_key_throughput() -> None:
    """The single-item calls, batches, TransactGetItems, Query and Scan
    (TransactWriteItems: ``charge_transactions``). Applied after the size
    limits and page limits (outside them, inside the lock), so a write they
    refuse is not charged and a page is cut before it is charged."""
    put_signature = inspect.signature(DynamoDBBackend.put_item)
    update_signature = inspect.signature(DynamoDBBackend.update_item)
    delete_signature = inspect.signature(DynamoDBBackend.delete_item)
    get_signature = inspect.signature(DynamoDBBackend.get_item)

    def put(original: Any) -> Any:
        def put_item(self: DynamoDBBackend, *args: Any, **kwargs: Any) -> Any:
            arguments = put_signature.bind(self, *args, **kwargs).arguments
            name, attrs = arguments["table_name"], arguments["item_attrs"]
            place = _place(self, ("PutItem", "BatchWriteItem"), name, attrs)
            size = item_size(attrs) if place is not None else 0
            if place is None or size > ITEM_MAX_BYTES:  # the size limit refuses it
                return original(self, *args, **kwargs)
            before = stored_size(*place)
            charges = [
                Charge(place[0].name, key_label(place[1]), wcu=write_units(max(before, size)))
            ]
            if not _admit(charges, name, {"PutRequest": {"Item": attrs}}):
                return None  # unprocessed; BatchWriteItem ignores what this returns
            return _run_charged(lambda: original(self, *args, **kwargs), charges)

        return put_item

    def update(original: Any) -> Any:
        def update_item(self: DynamoDBBackend, *args: Any, **kwargs: Any) -> Any:
            arguments = update_signature.bind(self, *args, **kwargs).arguments
            name, key = arguments["table_name"], arguments["key"]
            place = _place(self, ("UpdateItem",), name, key)
            if place is None:
                return original(self, *args, **kwargs)
            table, label, before = place[0].name, key_label(place[1]), stored_size(*place)
            least = [Charge(table, label, wcu=write_units(before))]
            _admit(least)  # the item after is not known yet: at least the one before
            log = UndoLog(self, [{"Update": {"TableName": name, "Key": key}}])
            try:
                item = original(self, *args, **kwargs)
            except ConditionalCheckFailed:
                CAPACITY.charge(least)
                raise
            after = item_size(item.attrs) if item is not None else 0
            charges = [Charge(table, label, wcu=write_units(max(before, after)))]
            if CAPACITY.over(charges):
                log.restore()
                raise Answered(throughput_exceeded())
            CAPACITY.charge(charges)
            return item

        return update_item

    def delete(original: Any) -> Any:
        def delete_item(self: DynamoDBBackend, *args: Any, **kwargs: Any) -> Any:
            arguments = delete_signature.bind(self, *args, **kwargs).arguments
            name, key = arguments["table_name"], arguments["key"]
            place = _place(self, ("DeleteItem", "BatchWriteItem"), name, key)
            if place is None:
                return original(self, *args, **kwargs)
            units = write_units(stored_size(*place))
            charges = [Charge(place[0].name, key_label(place[1]), wcu=units)]
            if not _admit(charges, name, {"DeleteRequest": {"Key": key}}):
                return None
            return _run_charged(lambda: original(self, *args, **kwargs), charges)

        return delete_item

    def get(original: Any) -> Any:
        def get_item(self: DynamoDBBackend, *args: Any, **kwargs: Any) -> Any:
            arguments = get_signature.bind(self, *args, **kwargs).arguments
            name, keys = arguments["table_name"], arguments["keys"]
            ops = ("GetItem", "BatchGetItem", "TransactGetItems")
            place = _place(self, ops, name, keys)
            call, batch = current_call(), getattr(_REQUEST, "batch", None)
            if call is not None and call.op == "TransactGetItems":
                if batch is not None:  # charged by the handler, all Gets at once
                    batch.gets.append(
                        None
                        if place is None
                        else Charge(
                            place[0].name,
                            key_label(place[1]),
                            rcu=2 * read_units(stored_size(*place), True),
                        )
                    )
                return original(self, *args, **kwargs)
            if place is None or call is None:
                return original(self, *args, **kwargs)
            if call.op == "GetItem":
                consistent = call.params.get("ConsistentRead") is True
            else:
                request = (call.params.get("RequestItems") or {}).get(name) or {}
                consistent = request.get("ConsistentRead") is True
            units = read_units(stored_size(*place), consistent)
            charges = [Charge(place[0].name, key_label(place[1]), rcu=units)]
            if not _admit(charges, name, keys):
                return None  # unprocessed: BatchGetItem lists no item for it
            CAPACITY.charge(charges)
            return original(self, *args, **kwargs)

        return get_item

    def batched(original: Any, unprocessed: str) -> Any:
        def run(self: DynamoHandler) -> Any:
            if not CAPACITY.active():
                return original(self)
            batch = Batch()
            _REQUEST.batch = batch
            try:
                result = original(self)
            finally:
                _REQUEST.batch = None
            if not batch.refused:
                return result
            requested = self.body["RequestItems"]
            if unprocessed == "UnprocessedItems":
                entries = sum(len(writes) for writes in requested.values())
            else:
                entries = sum(len(reads["Keys"]) for reads in requested.values())
            if batch.refused == entries:
                raise Answered(throughput_exceeded())  # nothing was read or written
            body = result.result
            for name, refused in batch.unprocessed.items():
                if unprocessed == "UnprocessedItems":
                    body[unprocessed].setdefault(name, []).extend(refused)
                else:  # the keys, with the table's read options
                    options = {k: v for k, v in requested[name].items() if k != "Keys"}
                    body[unprocessed].setdefault(name, {"Keys": [], **options})
                    body[unprocessed][name]["Keys"].extend(refused)
            return result

        return run

    def transact_get(original: Any) -> Any:
        def transact_get_items(self: DynamoHandler) -> Any:
            if not CAPACITY.active():
                return original(self)
            batch = Batch()
            _REQUEST.batch = batch
            try:
                with _LOCK:  # the reads, their check and their charge: one step
                    result = original(self)
                    charges = [(i, c) for i, c in enumerate(batch.gets) if c is not None]
                    _cancel_throttled(len(batch.gets), charges)
                    return result
            finally:
                _REQUEST.batch = None

        return transact_get_items

    def paged(original: Any, signature: inspect.Signature, projection: str) -> Any:
        """Reads the page without FilterExpression and projection, charges
        the items read, then filters and projects as moto does."""

        def read(self: Table, *args: Any, **kwargs: Any) -> Any:
            call = current_call()
            if call is None or call.op not in ("Query", "Scan") or not CAPACITY.applies(self.name):
                return original(self, *args, **kwargs)
            bound = signature.bind(self, *args, **kwargs)
            arguments = bound.arguments
            filter_expression = arguments.get("filter_expression")
            projection_expressions = arguments.get(projection)
            arguments["filter_expression"] = None
            arguments[projection] = None
            items, scanned_count, last_evaluated_key = original(*bound.args, **bound.kwargs)
            charges = page_charges(
                self,
                arguments.get("index_name"),
                items,
                bool(arguments.get("consistent_read")),
                arguments.get("hash_key"),
            )
            if CAPACITY.over(charges):
                raise Answered(throughput_exceeded())
            CAPACITY.charge(charges)
            if filter_expression is not None:
                items = [item for item in items if filter_expression.expr(item)]
            if projection_expressions:
                items = [item.project(projection_expressions) for item in items]
            return items, scanned_count, last_evaluated_key

        return read

    query_signature = inspect.signature(Table.query)
    scan_signature = inspect.signature(Table.scan)
    _wrap(DynamoDBBackend, "put_item", put)
    _wrap(DynamoDBBackend, "update_item", update)
    _wrap(DynamoDBBackend, "delete_item", delete)
    _wrap(DynamoDBBackend, "get_item", get)
    _wrap(DynamoHandler, "batch_write_item", lambda o: batched(o, "UnprocessedItems"))
    _wrap(DynamoHandler, "batch_get_item", lambda o: batched(o, "UnprocessedKeys"))
    _wrap(DynamoHandler, "transact_get_items", transact_get)
    _wrap(Table, "query", lambda o: paged(o, query_signature, "projection_expressions"))
    _wrap(Table, "scan", lambda o: paged(o, scan_signature, "projection_expression"))


# --------------------------------------------------------------------------
# Isolation: DynamoDB item operations one at a time
# --------------------------------------------------------------------------

_LOCK = threading.RLock()


def isolate_dynamodb_requests() -> None:
    """Runs DynamoDB item operations under one lock (applied last, so the
    size checks and their restores run inside it too)."""
    for name in (
        "put_item",
        "get_item",
        "update_item",
        "delete_item",
        "query",
        "scan",
        "transact_write_items",
    ):

        def locked(original: Any) -> Any:
            def run(*args: Any, **kwargs: Any) -> Any:
                with _LOCK:
                    return original(*args, **kwargs)

            return run

        _wrap(DynamoDBBackend, name, locked)


# --------------------------------------------------------------------------
# Start
# --------------------------------------------------------------------------


def main(argv: list[str]) -> None:
    """moto's own server and command line, serving its dispatcher wrapped in
    ``FaultInjector``, with the backend hooks installed and ``MOTO_FAULTS``
    as the first fault config."""
    try:
        FAULTS.configure(validate_config(json.loads(os.environ.get("MOTO_FAULTS") or "{}")))
    except (ValueError, TypeError) as e:
        sys.exit(f"MOTO_FAULTS: {e}")
    charge_transactions()
    undo_transactions_by_item()
    enforce_dynamodb_item_limits()
    limit_dynamodb_pages()
    query_one_partition()
    limit_key_throughput()
    fast_sqs_queues()
    enforce_sqs_message_limits()
    inject_sqs_backend_faults()
    isolate_dynamodb_requests()
    # werkzeug logs a line per request: an eighth of the server's time under
    # a scale model's load. Errors and warnings are still logged.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    moto.server.DomainDispatcherApplication = lambda create_app: FaultInjector(
        DomainDispatcherApplication(create_app)
    )
    moto.server.main(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
