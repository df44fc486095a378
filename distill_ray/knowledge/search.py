"""Nearest neighbours in a LanceDB table for many query vectors at once.

Generic on purpose: SKIntern picks similar training questions as demonstrations, KARD
retrieves knowledge passages; both are (table, vector column, query vectors, k, ids to
leave out per query) -> the k nearest rows per query.

Queries go to LanceDB in chunks of multi-vector searches (one scan answers a whole
chunk, ~1 ms per query on a flat 8k x 384 table, so 8,000 queries take seconds); a
table with an ANN index is searched through it. Exclusions cannot be pushed into the
search per query, so each query over-fetches by the size of its exclusion set and,
when filtering still leaves it short (duplicates), is asked again with a larger limit.
"""
from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:
    import lancedb

DISTANCE = "_distance"
QUERY_INDEX = "query_index"


def _open(db: "str | lancedb.DBConnection", table: str):
    from distill_ray.store import open_db, table_exists

    conn = open_db(db) if isinstance(db, str) else db
    if not table_exists(conn, table):
        raise ValueError(f"vector search: LanceDB table {table!r} does not exist")
    return conn.open_table(table)


def _query_matrix(query_vectors, dim: int | None) -> np.ndarray:
    q = np.asarray(query_vectors, dtype=np.float32)
    if q.ndim == 1 and q.size == 0:
        q = q.reshape(0, dim or 0)
    if q.ndim != 2:
        raise ValueError(f"vector search: query_vectors must be a (queries, dim) matrix, got shape {q.shape}")
    if dim is not None and q.shape[1] != dim:
        raise ValueError(f"vector search: query vectors have {q.shape[1]} dims, the table's column has {dim}")
    if not np.isfinite(q).all():
        raise ValueError("vector search: query vectors contain NaN or infinite values")
    return q


def _vector_dim(schema: pa.Schema, column: str) -> int | None:
    if column not in schema.names:
        raise ValueError(f"vector search: the table has no column {column!r} (columns: {schema.names})")
    t = schema.field(column).type
    if pa.types.is_fixed_size_list(t):
        return t.list_size
    raise ValueError(f"vector search: column {column!r} is {t}, not a fixed-size vector column")


def nearest_neighbours(
    db: "str | lancedb.DBConnection",
    table: str,
    query_vectors: np.ndarray | Sequence[Sequence[float]],
    k: int,
    *,
    vector_column: str = "vector",
    exclude_ids: Sequence[Collection[str]] | None = None,
    id_column: str = "id",
    columns: Sequence[str] | None = None,
    where: str | None = None,
    distance_type: str = "cosine",
    chunk_size: int = 512,
) -> list[list[dict]]:
    """The `k` nearest rows of `table` for each query vector, nearest first.

    db             a LanceDB uri or an open connection
    exclude_ids    per query, ids that must not come back (e.g. the query's own row)
    columns        columns to return besides `id_column` and `_distance` (default: all
                   but the vector column)
    where          a SQL filter applied before the search (rows every query may return)
    Each query gets at most `k` rows, never one id twice; fewer only when the (filtered)
    table holds fewer eligible rows.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"vector search: k must be an int >= 0, got {k!r}")
    if chunk_size < 1:
        raise ValueError(f"vector search: chunk_size must be >= 1, got {chunk_size}")
    tbl = _open(db, table)
    schema = tbl.schema
    dim = _vector_dim(schema, vector_column)
    q = _query_matrix(query_vectors, dim)
    if id_column not in schema.names:
        raise ValueError(f"vector search: the table has no id column {id_column!r}")
    if exclude_ids is not None and len(exclude_ids) != len(q):
        raise ValueError(f"vector search: {len(exclude_ids)} exclusion sets for {len(q)} queries")
    wanted = list(columns) if columns is not None else [c for c in schema.names if c != vector_column]
    unknown = [c for c in wanted if c not in schema.names]
    if unknown:
        raise ValueError(f"vector search: the table has no column(s) {unknown}")
    select = list(dict.fromkeys([id_column, *wanted, DISTANCE]))
    excluded = [set(e) for e in exclude_ids] if exclude_ids is not None else [set() for _ in range(len(q))]

    out: list[list[dict]] = [[] for _ in range(len(q))]
    if k == 0 or len(q) == 0:
        return out
    total_rows = tbl.count_rows(where) if where else tbl.count_rows()
    pending = list(range(len(q)))
    extra = 0
    while pending:
        short: list[int] = []
        for start in range(0, len(pending), chunk_size):
            chunk = pending[start : start + chunk_size]
            limit = min(total_rows, k + max(len(excluded[i]) for i in chunk) + extra)
            hits = _search(tbl, q[chunk], limit, vector_column, select, where, distance_type)
            for local, rows in enumerate(hits):
                i = chunk[local]
                out[i] = _filter(rows, excluded[i], id_column, k)
                if len(out[i]) < k and len(rows) == limit and limit < total_rows:
                    short.append(i)  # filtering ate into the k: there is more to fetch
        pending = short
        extra = max(2 * extra, k)  # grows geometrically: duplicates are rare, this ends fast
    return out


def _search(tbl, vectors: np.ndarray, limit: int, column: str, select: list[str], where: str | None,
            distance_type: str) -> list[list[dict]]:
    if limit <= 0:
        return [[] for _ in range(len(vectors))]
    query = tbl.search(list(vectors), vector_column_name=column).distance_type(distance_type)
    if where:
        query = query.where(where, prefilter=True)
    result = query.limit(limit).select(select).to_arrow()
    per_query: list[list[dict]] = [[] for _ in range(len(vectors))]
    if len(vectors) == 1 and QUERY_INDEX not in result.column_names:
        per_query[0] = result.to_pylist()
        return per_query
    for row in result.to_pylist():
        per_query[row.pop(QUERY_INDEX)].append(row)
    for rows in per_query:
        rows.sort(key=lambda r: r[DISTANCE])
    return per_query


def _filter(rows: list[dict], excluded: set[str], id_column: str, k: int) -> list[dict]:
    kept, seen = [], set()
    for row in rows:
        rid = row[id_column]
        if rid in excluded or rid in seen:
            continue
        seen.add(rid)
        kept.append(row)
        if len(kept) == k:
            break
    return kept
