"""Every teacher call, keyed by the content hash of its request, in LanceDB `teacher_calls`.

Workers only read (one query per batch of keys); the records of new calls travel back
to the driver inside the output rows and the driver appends them in bulk (`CallWriter`),
one commit per chunk, so concurrent workers never race on commits and a driver killed
mid-stage keeps every chunk it already committed. The key hashes the request without the endpoint
address or the API key, and the API key is never part of a record.
"""
from __future__ import annotations

import json
import logging
import queue
import threading
from datetime import datetime, timezone

import pyarrow as pa

from distill_ray.client.requests import LLMRequest, LLMResponse
from distill_ray.store import open_db, sql_string, table_exists, write_table

log = logging.getLogger(__name__)

CALLS_TABLE = "teacher_calls"

CALLS_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("model", pa.string()),
        pa.field("request", pa.string()),
        pa.field("response", pa.string()),
        pa.field("prompt_tokens", pa.int64()),
        pa.field("completion_tokens", pa.int64()),
        pa.field("latency_s", pa.float64()),
        pa.field("finish_reason", pa.string()),
        pa.field("created_at", pa.timestamp("us", tz="UTC")),
    ]
)

_LOOKUP_COLUMNS = ["key", "response", "prompt_tokens", "completion_tokens", "finish_reason"]


def call_record(request: LLMRequest, response: LLMResponse) -> dict:
    """A JSON-safe record of one answered call (created_at as ISO text until written)."""
    return {
        "key": request.key(),
        "model": request.model,
        "request": request.to_json(),
        "response": response.text,
        "prompt_tokens": int(response.prompt_tokens),
        "completion_tokens": int(response.completion_tokens),
        "latency_s": float(response.latency_s),
        "finish_reason": response.finish_reason,
        "created_at": datetime.now(timezone.utc).isoformat(),
    }


def _as_row(record: dict) -> dict:
    missing = [f.name for f in CALLS_SCHEMA if f.name not in record]
    if missing:
        raise ValueError(f"teacher call record lacks {missing}")
    row = {f.name: record[f.name] for f in CALLS_SCHEMA}
    if isinstance(row["created_at"], str):
        row["created_at"] = datetime.fromisoformat(row["created_at"])
    return row


def write_calls(db, records: list[dict], table: str = CALLS_TABLE) -> int | None:
    """Append records in one commit (duplicate keys in the chunk kept once); the new version."""
    seen: set[str] = set()
    rows = []
    for rec in records:
        if rec["key"] not in seen:
            seen.add(rec["key"])
            rows.append(_as_row(rec))
    if not rows:
        return None
    return write_table(db, table, rows, "append", schema=CALLS_SCHEMA)


class CallCache:
    """Read side, one per worker. Opens the table lazily: it may appear mid-run."""

    def __init__(self, uri: str, table: str = CALLS_TABLE) -> None:
        self._uri = uri
        self._table_name = table
        self._db = None
        self._table = None
        self._warned = False

    def _open(self):
        if self._table is None:
            if self._db is None:
                self._db = open_db(self._uri)
            if table_exists(self._db, self._table_name):
                try:
                    self._table = self._db.open_table(self._table_name)
                except Exception as e:
                    # The driver may be committing the table's first version right now
                    # (its directory exists before its manifest): a miss, not an error.
                    if not self._warned:
                        log.warning("cache table %s not readable yet (%s); asking instead", self._table_name, e)
                        self._warned = True
        return self._table

    def lookup(self, keys: list[str]) -> dict[str, LLMResponse]:
        """One query for a whole batch of keys; absent keys are simply not in the result."""
        wanted = sorted(set(keys))
        table = self._open() if wanted else None
        if table is None:
            return {}
        # Commits made by the driver since we opened (earlier chunks of this run) count too.
        table.checkout_latest()
        where = f"key IN ({', '.join(sql_string(k) for k in wanted)})"
        found = table.to_lance().to_table(filter=where, columns=_LOOKUP_COLUMNS).to_pylist()
        out: dict[str, LLMResponse] = {}
        for row in found:
            out.setdefault(
                row["key"],
                LLMResponse(
                    text=row["response"],
                    prompt_tokens=row["prompt_tokens"] or 0,
                    completion_tokens=row["completion_tokens"] or 0,
                    finish_reason=row["finish_reason"],
                    cached=True,
                ),
            )
        return out


def decode_calls(column_value: str | None) -> list[dict]:
    """The `calls` column of an output row back into records."""
    if not column_value:
        return []
    records = json.loads(column_value)
    if not isinstance(records, list):
        raise ValueError("calls column must hold a JSON list of call records")
    return records


class CallWriter:
    """Driver side: appends chunks of call records from one background thread.

    The thread keeps LanceDB commits off the loop that consumes Ray Data's output (a
    consumer stalled in I/O back-pressures the whole pipeline), while a single writer
    keeps commits sequential: one commit per chunk, never two racing.
    """

    def __init__(self, db, table: str = CALLS_TABLE) -> None:
        self._db, self._table = db, table
        self._queue: queue.Queue[list[dict] | None] = queue.Queue()
        self._error: BaseException | None = None
        self.version: int | None = None
        self.committed = 0
        self._thread = threading.Thread(target=self._run, name="teacher-calls-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (records := self._queue.get()) is not None:
            if self._error is not None:
                continue  # keep draining so close() never blocks
            try:
                self.version = write_calls(self._db, records, self._table) or self.version
                self.committed += len(records)
            except BaseException as e:  # reported to the driver on its next submit/close
                self._error = e

    def submit(self, records: list[dict]) -> None:
        if self._error is not None:
            raise RuntimeError(f"writing {self._table} failed: {self._error}") from self._error
        if records:
            self._queue.put(list(records))

    def close(self) -> int | None:
        """Wait for every submitted chunk to be committed; the table's latest version."""
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise RuntimeError(f"writing {self._table} failed: {self._error}") from self._error
        return self.version
