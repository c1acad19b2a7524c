"""Fill a 64-dimension embedding column from a text column with a Python function.

End to end against a running `lance-backfill serve`:

    export LANCE_BACKFILL_API_KEYS=my-secret-key
    lance-backfill serve --root ./tables --listen 127.0.0.1:8080 &
    python python/examples/embeddings.py --url http://127.0.0.1:8080 \\
        --api-key my-secret-key --root ./tables --table docs --rows 100000

1. creates `<root>/<table>.lance` (`id`, `text`) with pylance if it is missing,
2. declares `embedding` (`fixed_size_list<float32, 64>`) as a virtual column
   computed by `HashedTrigramEmbedder` (`POST add_columns`, unless the table
   already has the column),
3. backfills it (`POST backfill_column`) and follows the job,
4. reads the table back with pylance and checks that every row equals the
   function applied locally, then prints the rows/s.

The embedding needs no model download: each text's UTF-8 character trigrams
are hashed into 2,048 buckets, the bucket counts are projected to 64
dimensions by a fixed random matrix (seeded) and the result is L2-normalised.
A null text gives a null embedding.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

DIM = 64
EMBEDDING_TYPE = pa.list_(pa.float32(), DIM)


class HashedTrigramEmbedder:
    """`pa.RecordBatch` with a string column -> `fixed_size_list<float32, DIM>`.

    `setup()` builds the projection matrix once per worker process; it is
    not part of the pickle (see `__getstate__`), which stays a few KB.
    """

    def __init__(
        self, column: str = "text", dim: int = DIM, buckets: int = 2048, seed: int = 20240611
    ) -> None:
        if buckets & (buckets - 1) or buckets < 2:
            raise ValueError("buckets must be a power of two")
        self.column = column
        self.dim = dim
        self.buckets = buckets
        self.seed = seed
        self._projection: Optional[np.ndarray] = None

    def setup(self) -> None:
        rng = np.random.default_rng(self.seed)
        projection = rng.standard_normal((self.buckets, self.dim), dtype=np.float32)
        self._projection = projection / np.float32(np.sqrt(self.dim))

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state["_projection"] = None
        return state

    def __call__(self, batch: pa.RecordBatch) -> pa.FixedSizeListArray:
        if self._projection is None:
            self.setup()
        texts = batch.column(self.column)
        if isinstance(texts, pa.ChunkedArray):
            texts = texts.combine_chunks()
        out_type = pa.list_(pa.float32(), self.dim)
        if len(texts) == 0:
            return pa.array([], type=out_type)
        vectors = np.empty((len(texts), self.dim), dtype=np.float32)
        step = 1024  # bounds the bucket-count matrix to step x buckets floats
        for start in range(0, len(texts), step):
            chunk = texts.slice(start, step)
            vectors[start : start + len(chunk)] = self._embed(chunk)
        flat = pa.array(vectors.reshape(-1))
        mask = texts.is_null() if texts.null_count else None
        return pa.FixedSizeListArray.from_arrays(flat, type=out_type, mask=mask)

    def _embed(self, texts: pa.Array) -> np.ndarray:
        """Embeddings of a chunk of texts (nulls give zero rows, masked later)."""
        assert self._projection is not None
        n = len(texts)

        # Two boundary markers on each side: every text, even "", has trigrams,
        # and its first and last characters count as much as inner ones.
        def text(s: str) -> pa.Scalar:
            return pa.scalar(s, pa.large_utf8())

        padded = pc.binary_join_element_wise(
            text("\x02\x02"), texts.cast(pa.large_utf8()), text("\x03\x03"), text("")
        ).cast(pa.large_binary())
        _, offsets_buf, data_buf = padded.buffers()
        offsets = np.frombuffer(offsets_buf, dtype=np.int64)[padded.offset : padded.offset + n + 1]
        data = np.frombuffer(data_buf or b"", dtype=np.uint8)
        starts = offsets[:-1]
        lengths = offsets[1:] - starts
        valid = ~np.asarray(padded.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        trigrams = np.where(valid, np.maximum(lengths - 2, 0), 0)
        total = int(trigrams.sum())
        rows = np.repeat(np.arange(n, dtype=np.int64), trigrams)
        first = np.cumsum(trigrams) - trigrams  # index of each row's first trigram
        pos = np.repeat(starts, trigrams) + (np.arange(total, dtype=np.int64) - first[rows])
        b = data.astype(np.uint64)
        codes = (b[pos] << np.uint64(16)) | (b[pos + 1] << np.uint64(8)) | b[pos + 2]
        # multiplicative (Fibonacci) hashing: stable across processes and runs
        hashed = (codes * np.uint64(0x9E3779B1)) & np.uint64(0xFFFFFFFF)
        shift = np.uint64(32 - (self.buckets.bit_length() - 1))
        bucket = (hashed >> shift).astype(np.int64)
        counts = np.bincount(rows * self.buckets + bucket, minlength=n * self.buckets)
        counts = counts.reshape(n, self.buckets).astype(np.float32)
        vectors = counts @ self._projection
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        np.divide(vectors, norms, out=vectors, where=norms > 0)
        return vectors


# --- the sample table ----------------------------------------------------------

_WORDS = (
    "lance table column fragment vector embedding query index shard batch arrow "
    "python rust worker queue commit version schema field row value model text "
    "search scan filter store cloud lake fast small large quick brown fox jumps "
    "over lazy dog alpha beta gamma delta ocean river mountain forest city"
).split()


def sample_texts(rows: int, seed: int = 7) -> pa.Array:
    """Deterministic short sentences, every 97th row null."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 16, size=rows)
    words = rng.integers(0, len(_WORDS), size=int(lengths.sum()))
    texts: List[Optional[str]] = []
    at = 0
    for i, k in enumerate(lengths):
        texts.append(None if i % 97 == 96 else " ".join(_WORDS[w] for w in words[at : at + k]))
        at += k
    return pa.array(texts, type=pa.utf8())


def create_table(uri: str, rows: int, fragments: int = 8) -> None:
    import lance

    table = pa.table({"id": pa.array(np.arange(rows, dtype=np.int64)), "text": sample_texts(rows)})
    lance.write_dataset(table, uri, max_rows_per_file=max(1, -(-rows // fragments)))


# --- end to end ----------------------------------------------------------------


def verify(uri: str, column: str, embedder: HashedTrigramEmbedder) -> int:
    """Checks every row of `column` against `embedder` applied locally; returns the row count."""
    import lance

    dataset = lance.dataset(uri)
    if dataset.schema.field(column).type != EMBEDDING_TYPE:
        raise SystemExit(f"{column} is {dataset.schema.field(column).type}, not {EMBEDDING_TYPE}")
    checked = 0
    for batch in dataset.to_batches(columns=[embedder.column, column], batch_size=8192):
        got = batch.column(1)
        want = embedder(batch.select([embedder.column]))
        ok = check_embeddings(got, want)
        if ok is not None:
            raise SystemExit(f"row {checked + ok}: stored embedding differs from the function's")
        checked += batch.num_rows
    return checked


def check_embeddings(got: pa.Array, want: pa.Array) -> Optional[int]:
    """Index of the first row where `got` and `want` differ (nulls included), or None."""
    got_null = got.is_null().to_numpy(zero_copy_only=False)
    want_null = want.is_null().to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(got_null != want_null)
    if bad.size:
        return int(bad[0])
    keep = ~want_null
    g = _matrix(got)[keep]
    w = _matrix(want)[keep]
    close = np.isclose(g, w, rtol=1e-5, atol=1e-6).all(axis=1)
    if not close.all():
        return int(np.flatnonzero(keep)[np.flatnonzero(~close)[0]])
    return None


def _matrix(array: pa.Array) -> np.ndarray:
    """A fixed_size_list array as an (n, size) matrix; null rows hold whatever is stored."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    size = array.type.list_size
    values = array.values.slice(array.offset * size, len(array) * size)
    matrix = values.to_numpy(zero_copy_only=False).astype(np.float32)
    return matrix.reshape(len(array), size)


def main(argv: Optional[List[str]] = None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lance_backfill_client import Client, LanceBackfillError, udf_column

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="lance-backfill base URL")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("LANCE_BACKFILL_API_KEY"),
        help="x-api-key (default: $LANCE_BACKFILL_API_KEY)",
    )
    parser.add_argument("--table", default="docs", help="table name (no namespace)")
    parser.add_argument(
        "--root", default="./tables", help="the service's --root: the table is <root>/<table>.lance"
    )
    parser.add_argument("--rows", type=int, default=100_000, help="rows of a new sample table")
    parser.add_argument("--column", default="embedding", help="the embedding column's name")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the job")
    parser.add_argument("--concurrency", type=int, default=None, help="backfill concurrency")
    args = parser.parse_args(argv)

    uri = f"{args.root.rstrip('/')}/{args.table}.lance"
    import lance

    try:
        dataset = lance.dataset(uri)
    except (FileNotFoundError, ValueError, OSError):
        print(f"creating {uri} with {args.rows} rows")
        create_table(uri, args.rows)
        dataset = lance.dataset(uri)
    rows = dataset.count_rows()

    embedder = HashedTrigramEmbedder(column="text")
    client = Client(args.url, api_key=args.api_key)
    if args.column in dataset.schema.names:
        print(f"{args.table} already has '{args.column}': refilling it")
    else:
        entry = udf_column(
            embedder,
            input_columns=["text"],
            output=EMBEDDING_TYPE,
            name=args.column,
            udf_name="hashed_trigram_embedding",
            udf_version="1",
        )
        try:
            client.add_columns(args.table, [entry])
        except LanceBackfillError as e:
            raise SystemExit(f"add_columns failed: {e}") from None
        print(f"declared '{args.column}' {EMBEDDING_TYPE} on {args.table}")

    started = time.monotonic()
    job_id = client.backfill(args.table, args.column, concurrency=args.concurrency)
    print(f"job {job_id}")
    last = [""]

    def progress(job: Dict[str, Any]) -> None:
        done = job.get("metrics", {}).get("rows_committed", {})
        line = (
            f"  {job.get('state')}: {done.get('done', 0)}/{done.get('total', '?')} rows committed"
        )
        if line != last[0]:
            print(line, flush=True)
            last[0] = line

    job = client.wait(job_id, timeout=args.timeout, on_progress=progress)
    elapsed = time.monotonic() - started
    print(f"job {job['state']} in {elapsed:.1f} s: {rows / elapsed:,.0f} rows/s")

    checked = verify(uri, args.column, embedder)
    if checked != rows:
        raise SystemExit(f"read {checked} rows, expected {rows}")
    print(f"verified all {checked} rows against the function applied locally")
    return 0


if __name__ == "__main__":
    sys.exit(main())
