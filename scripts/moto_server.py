"""moto's server, with DynamoDB requests isolated from each other.

moto runs requests on threads without a lock, and its TransactWriteItems
applies items one by one and, on a failed condition, restores a copy of the
whole table taken before it started. Two concurrent requests can then see
each other half-done or undo each other, which DynamoDB never allows (each
request, and each transaction, is atomic and serialisable). The tests rely
on DynamoDB's behaviour, so the item operations run under one lock here.
"""

import functools
import sys
import threading

from moto.dynamodb.models import DynamoDBBackend
from moto.server import main

_LOCK = threading.RLock()

for _name in (
    "put_item",
    "get_item",
    "update_item",
    "delete_item",
    "query",
    "scan",
    "transact_write_items",
):
    _method = getattr(DynamoDBBackend, _name)

    def _locked(*args, _method=_method, **kwargs):
        with _LOCK:
            return _method(*args, **kwargs)

    setattr(DynamoDBBackend, _name, functools.wraps(_method)(_locked))

if __name__ == "__main__":
    main(sys.argv[1:])
