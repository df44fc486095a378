"""Embeddings by content hash, in the LanceDB table `embeddings` beside the teacher-call cache.

A row's key hashes (model identity, text). The identity is a SHA-256 over the bytes of
every file the model loads from, so two models never share a key, even two fine-tunes
of one architecture whose files have equal sizes, while the same model installed
elsewhere does (hashing MiniLM's 90 MB takes ~0.2 s, once per process). Rows also
carry `model_id`, '<dir>@<digest>', for people reading the table.

Only the process that owns an `EmbeddingCache` commits, in bulk (`put`: one append per
chunk); Ray workers never write here. Concurrent runs append independently: Lance
rebases an append onto any commit that landed meanwhile, so nothing is lost or
corrupted. Two runs embedding the same text at once may both append it; the duplicate
row holds the same vector (same model bytes, same text) and a lookup takes any one.
A merge-insert would avoid the duplicate but rewrites existing rows, and concurrent
rewrites conflict where appends never do.

One table per vector width: a LanceDB vector column has one fixed size, so the 384-d
MiniLM vectors live in `embeddings` and another width `d` in `embeddings_<d>`.
"""
from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from distill_ray.knowledge.embed import EMBED_DIM, model_dim, resolve_model, vector_array
from distill_ray.store import open_db, open_or_create, table_exists, table_names

EMBEDDINGS = "embeddings"
PUT_CHUNK_ROWS = 20_000  # rows per commit: ~30 MB of 384-d vectors
# How a vector is made from the model (unit-normalised sentence-transformers output);
# part of every key, so changing that recipe never serves vectors made the old way.
VECTOR_RECIPE = "st-normalized-v1"
_SKIPPED_DIRS = {"onnx", "openvino"}  # other runtimes' copies of the weights; encode() never reads them


def table_for(dim: int) -> str:
    return EMBEDDINGS if dim == EMBED_DIM else f"{EMBEDDINGS}_{dim}"


def cache_schema(dim: int) -> pa.Schema:
    return pa.schema([
        pa.field("key", pa.string(), nullable=False),
        pa.field("model", pa.string()),  # as configured (a name or a path), for people reading the table
        pa.field("model_id", pa.string()),
        pa.field("dim", pa.int32()),
        pa.field("vector", pa.list_(pa.float32(), dim)),
    ])


def _model_files(path: Path) -> list[Path]:
    files = []
    for f in sorted(path.rglob("*")):
        rel = f.relative_to(path).parts
        if f.is_file() and not any(p.startswith(".") for p in rel) and rel[0] not in _SKIPPED_DIRS:
            files.append(f)
    if not files:
        raise ValueError(f"embedding model directory {str(path)!r} holds no files")
    return files


@functools.lru_cache(maxsize=8)
def _digest(path: str, signature: tuple) -> str:
    # `signature` (names, sizes, mtimes) only keys this memo: a file rewritten in place is hashed again.
    h = hashlib.sha256()
    root = Path(path)
    for rel, _, _ in signature:
        h.update(rel.encode() + b"\0")
        with open(root / rel, "rb") as fh:
            h.update(hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()


def model_identity(name_or_path: str) -> tuple[str, str]:
    """(digest, label): a SHA-256 over the files the model loads, which alone keys vectors (a
    byte-identical copy elsewhere is the same model), and '<parent dir>/<model dir>' for people
    reading the table."""
    path = resolve_model(name_or_path).resolve()
    signature = tuple((str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns) for f in _model_files(path))
    return _digest(str(path), signature)[:32], f"{path.parent.name}/{path.name}"


class EmbeddingCache:
    """Vectors of one model in one LanceDB database; counts what it served (`hits`, `new`)."""

    def __init__(self, uri: str, model: str) -> None:
        self.uri, self.model = uri, model
        self.digest, label = model_identity(model)
        self.model_id = f"{label}@{self.digest}"
        self.dim = model_dim(model)
        self.table = table_for(self.dim)
        self.schema = cache_schema(self.dim)
        try:
            self._db = open_db(uri)
            table_names(self._db)  # a local path that is a file, or an unknown scheme, fails here
        except (OSError, ValueError) as e:
            raise ValueError(f"embedding cache {uri!r}: not a usable LanceDB database ({type(e).__name__}: {e})") \
                from None
        self.hits = 0  # texts answered from the table
        self.new = 0  # distinct texts embedded and added

    def key(self, text: str) -> str:
        return hashlib.sha256(f"{VECTOR_RECIPE}\0{self.digest}\0{text}".encode()).hexdigest()

    def lookup(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """Key -> vector for the keys present; one scan of the key column, one take of the hits."""
        wanted = pa.array(sorted(set(keys)), type=pa.string())
        if len(wanted) == 0 or not table_exists(self._db, self.table):
            return {}
        try:
            tbl = self._db.open_table(self.table)
        except ValueError:
            return {}  # another process is committing the table's first version: all misses
        tbl.checkout_latest()  # see what other runs committed since this process connected
        ds = tbl.to_lance()  # one pinned version: the positions found below are taken from it
        present = ds.to_table(columns=["key"], scan_in_order=True).column("key")
        rows = pc.indices_nonzero(pc.is_in(present, value_set=wanted))
        if len(rows) == 0:
            return {}
        found = ds.take(rows, columns=["key", "vector"])
        vectors = found.column("vector").combine_chunks()
        matrix = vectors.flatten().to_numpy(zero_copy_only=False).reshape(-1, self.dim)
        out: dict[str, np.ndarray] = {}
        for k, v in zip(found.column("key").to_pylist(), matrix):
            out.setdefault(k, v)  # a duplicate key (two runs racing) holds the same vector
        return out

    def put(self, keys: Sequence[str], vectors: np.ndarray) -> int | None:
        """Append new vectors, one commit per `PUT_CHUNK_ROWS`; the table's version after, None if nothing."""
        if vectors.shape != (len(keys), self.dim):
            raise ValueError(f"embedding cache: {len(keys)} keys but vectors of shape {vectors.shape} "
                             f"(expected ({len(keys)}, {self.dim}))")
        version = None
        for i in range(0, len(keys), PUT_CHUNK_ROWS):
            n = len(keys[i:i + PUT_CHUNK_ROWS])
            chunk = pa.Table.from_arrays([
                pa.array(keys[i:i + n], type=pa.string()),
                pa.array([self.model] * n, type=pa.string()),
                pa.array([self.model_id] * n, type=pa.string()),
                pa.array([self.dim] * n, type=pa.int32()),
                vector_array(vectors[i:i + n]),
            ], schema=self.schema)
            version = self._append(chunk)
        return version

    def _append(self, chunk: pa.Table) -> int:
        tbl = open_or_create(self._db, self.table, self.schema)
        if tbl.schema != self.schema:
            raise ValueError(f"embedding cache table {self.table!r} in {self.uri!r} has columns {tbl.schema}, "
                             f"expected {self.schema}")
        tbl.add(chunk)
        return tbl.version

    def embed(self, texts: Sequence[str], encode: Callable[[list[str]], np.ndarray]) -> np.ndarray:
        """(len(texts), dim) float32: cached rows looked up, the rest encoded once per distinct text and stored."""
        keys = [self.key(t) for t in texts]
        found = self.lookup(keys)
        missing: dict[str, str] = {}  # key -> text, in first-seen order
        for k, t in zip(keys, texts):
            if k not in found:
                missing.setdefault(k, t)
        if missing:
            new = np.ascontiguousarray(encode(list(missing.values())), dtype=np.float32)
            self.put(list(missing), new)
            found.update(zip(missing, new))
        self.hits += sum(k not in missing for k in keys)
        self.new += len(missing)
        if not keys:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([found[k] for k in keys]).astype(np.float32, copy=False)

    def stats(self) -> dict[str, int]:
        return {"embed_cache_hits": self.hits, "embed_new": self.new}


def as_cache(cache: EmbeddingCache | str, model: str) -> EmbeddingCache:
    """An open cache for `model`, from a LanceDB uri or an `EmbeddingCache` (which must be for `model`)."""
    if isinstance(cache, EmbeddingCache):
        if cache.digest != model_identity(model)[0]:
            raise ValueError(f"embedding cache was opened for {cache.model!r}, not for {model!r}")
        return cache
    if not isinstance(cache, str) or not cache.strip():
        raise ValueError(f"embedding cache: expected a LanceDB uri or an EmbeddingCache, got {cache!r}")
    return EmbeddingCache(cache, model)
