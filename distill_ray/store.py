"""The small LanceDB helper every stage uses.

LanceDB is the system of record. Each write here is one commit (one table version), so
callers batch rows and never write row by row from many workers: concurrent small
commits conflict. Connect after `ray.init()`: LanceDB's runtime must not be
started before Ray starts its workers, so `lancedb` is imported on first use, not here.
"""
from __future__ import annotations

import fcntl
from collections.abc import Sequence
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import pyarrow as pa

if TYPE_CHECKING:
    import lancedb

WriteMode = Literal["append", "overwrite", "create"]


def open_db(uri: str, *, read_consistency_s: float | None = None) -> lancedb.DBConnection:
    """Connect to a LanceDB directory or object-store URI (created on first write).

    `read_consistency_s`: how stale a table handle may be before it looks for commits
    made by other processes; None (LanceDB's default) never looks.
    """
    if not uri or not isinstance(uri, str):
        raise ValueError(f"LanceDB uri must be a non-empty string, got {uri!r}")
    import lancedb

    interval = timedelta(seconds=read_consistency_s) if read_consistency_s is not None else None
    return lancedb.connect(uri, read_consistency_interval=interval)


def table_names(db: lancedb.DBConnection) -> list[str]:
    names: list[str] = []
    token = None
    while True:
        page = db.list_tables(page_token=token)
        names.extend(page.tables)
        token = page.page_token
        if not token:
            return names


def table_exists(db: lancedb.DBConnection, name: str) -> bool:
    return name in table_names(db)


def _to_arrow(name: str, data: pa.Table | Sequence[dict], schema: pa.Schema | None) -> pa.Table:
    if isinstance(data, pa.Table):
        return data.cast(schema) if schema is not None and data.schema != schema else data
    rows = list(data)
    bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
    if bad is not None:
        raise TypeError(f"table {name!r}: row {bad} is {type(rows[bad]).__name__}, expected a dict")
    if not rows and schema is None:
        raise ValueError(f"table {name!r}: no rows and no schema, so no columns to write")
    try:
        return pa.Table.from_pylist(rows, schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, KeyError) as e:
        raise ValueError(f"table {name!r}: rows do not fit the table's columns ({e})") from None


@contextmanager
def _creation_lock(db: lancedb.DBConnection, name: str):
    """Serialise creators of one table on a local (or mounted) filesystem.

    Lance treats a second concurrent create as an overwrite, which silently drops rows
    another writer appended in between, so creation must not race. Object-store URIs get
    no lock here: create such shared tables from one driver before writers fan out.
    """
    uri = str(db.uri)
    if "://" in uri and not uri.startswith("file://"):
        yield
        return
    root = Path(uri.removeprefix("file://"))
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.create.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def open_or_create(db: lancedb.DBConnection, name: str, schema: pa.Schema):
    """The table, created empty with `schema` when missing; safe when writers race to create it."""
    if table_exists(db, name):
        try:
            return db.open_table(name)
        except Exception:  # noqa: BLE001 -- listed before its first commit: wait for its creator below
            pass
    with _creation_lock(db, name):
        if table_exists(db, name):
            return db.open_table(name)
        return db.create_table(name, schema=schema, mode="create")


def write_table(
    db: lancedb.DBConnection,
    name: str,
    data: pa.Table | Sequence[dict],
    mode: WriteMode = "append",
    *,
    schema: pa.Schema | None = None,
) -> int:
    """Write all of `data` in one commit; returns the table version it produced.

    append: adds to the table, creating it when missing (an empty append is a no-op).
    overwrite: replaces the contents (a new version; older ones stay readable).
    create: fails when the table already exists.
    """
    if mode not in ("append", "overwrite", "create"):
        raise ValueError(f"table {name!r}: write mode must be append, overwrite or create, got {mode!r}")
    table = _to_arrow(name, data, schema)
    exists = table_exists(db, name)
    if mode == "create" and exists:
        raise ValueError(f"table {name!r} already exists")
    if mode == "append" and exists:
        tbl = db.open_table(name)
        if table.num_rows == 0:
            return tbl.version
        try:
            tbl.add(table)
        except Exception as e:  # lancedb raises bare ValueError/RuntimeError on schema drift
            raise ValueError(f"table {name!r}: append rejected ({type(e).__name__}: {e})") from None
        return tbl.version
    tbl = db.create_table(name, data=table, mode="overwrite" if exists else "create")
    return tbl.version


def table_version(db: lancedb.DBConnection, name: str) -> int | None:
    """The latest version of a table, None when it does not exist."""
    if not table_exists(db, name):
        return None
    try:
        return db.open_table(name).version
    except ValueError:
        # Another process is creating it: the directory is listed before its first commit lands.
        return None


def read_table(
    db: lancedb.DBConnection,
    name: str,
    *,
    version: int | None = None,
    where: str | None = None,
    columns: list[str] | None = None,
) -> pa.Table:
    """A whole table (or the rows matching a SQL `where`), at `version` when given."""
    if not table_exists(db, name):
        raise ValueError(f"LanceDB table {name!r} does not exist in this database")
    tbl = db.open_table(name, version=version) if version is not None else db.open_table(name)
    return tbl.to_lance().to_table(filter=where, columns=columns)


def read_rows(db: lancedb.DBConnection, name: str, **kwargs) -> list[dict]:
    return read_table(db, name, **kwargs).to_pylist()


def sql_string(value: str) -> str:
    """A SQL string literal for `where` filters (single quotes doubled)."""
    return "'" + value.replace("'", "''") + "'"
