"""The Ray Data map stage that asks a model about every row: `QueryActor`, `query_rows`.

A *plan* says what to ask and what counts as a good reply:
  - `requests(row, attempt) -> LLMRequest` (attempt 0, 1, ... e.g. with rising temperature),
  - `check(row, text) -> (ok, reason, payload)`,
  - `max_tries` and `payload_fields` (the payload columns every output row carries).
Each input row yields exactly one output row: the input columns plus `status` ("kept" |
"failed"), `reason`, `attempts`, `output`, the payload fields, per-row counters, and
`calls` (JSON list of the new call records, for the driver to append to the cache) and
`call_usage` (JSON list of [model, prompt tokens, completion tokens] per model call: one per
reply, or each call a composed endpoint reports in `usage.calls`). `run_row` is that
per-row logic; `client/replay.py` also runs it, on the driver, against the cache alone.

Throughput: each actor runs several tasks (batches) at once, and the rows of all of them
share the actor's event loop and one semaphore of `max_in_flight`, so an actor keeps
that many requests in flight across rows and batches instead of waiting on the slowest
row of each batch before starting the next.
"""
from __future__ import annotations

import asyncio
import json
import math
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import pyarrow as pa

from distill_ray.client.cache import CALLS_TABLE, CallCache, call_record
from distill_ray.client.openai_client import ClientSettings, LLMCallError, make_client, send
from distill_ray.client.ratelimit import RateGate
from distill_ray.client.requests import LLMRequest, LLMResponse

ACTOR_START_TIMEOUT_S = 600

OUTPUT_COLUMNS = (
    "status", "reason", "attempts", "output", "calls",
    "n_calls", "n_http", "n_cache_hits", "n_retries", "n_malformed", "prompt_tokens", "completion_tokens",
    "call_usage",
)


class Plan(Protocol):
    max_tries: int
    payload_fields: tuple[str, ...]

    def requests(self, row: dict, attempt: int) -> LLMRequest: ...

    def check(self, row: dict, response_text: str) -> tuple[bool, str, dict]: ...


@dataclass(frozen=True)
class QueryOptions:
    """How one actor talks to the endpoint (picklable; built on the driver)."""

    client: ClientSettings
    max_in_flight: int = 32
    malformed_retries: int = 4
    cache_uri: str | None = None  # None: no cache lookups
    cache_table: str = CALLS_TABLE
    limiter: Any = None  # a TokenBucket actor handle, or None for no qps limit
    qps: float | None = None


@dataclass
class _Counters:
    calls: int = 0
    http: int = 0
    cache_hits: int = 0
    retries: int = 0
    malformed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    call_usage: list = field(default_factory=list)  # [model, prompt, completion] per model call

    def add(self, response: LLMResponse, model: str) -> None:
        self.prompt_tokens += response.prompt_tokens
        self.completion_tokens += response.completion_tokens
        calls = response.call_usage or ((model, response.prompt_tokens, response.completion_tokens),)
        self.call_usage.extend([m, p, c] for m, p, c in calls)


def requests_for(plan: Plan, row: dict) -> list[LLMRequest] | str:
    """All attempts' requests up front (one cache query per batch); a reason on bad input."""
    try:
        return [plan.requests(row, a) for a in range(plan.max_tries)]
    except (ValueError, KeyError, TypeError) as e:
        return f"bad_request: {type(e).__name__}: {e}"


Ask = Callable[[LLMRequest, _Counters], Awaitable[LLMResponse]]


async def run_row(plan: Plan, row: dict, reqs: list[LLMRequest] | str, cached: dict[str, LLMResponse], ask: Ask) -> dict:
    """One row's attempts: a cached reply where there is one, else `ask`; stops at the first accepted."""
    counters = _Counters()
    calls: list[dict] = []
    if isinstance(reqs, str):
        return _result(plan, row, "failed", reqs, 0, None, {}, calls, counters)
    reason = ""
    for attempt, req in enumerate(reqs, start=1):
        response = cached.get(req.key())
        if response is not None:
            counters.cache_hits += 1
        else:
            try:
                response = await ask(req, counters)
            except LLMCallError as e:
                # Transport budget spent: asking again at another temperature will not
                # fix the endpoint, so the row fails with the transport status.
                return _result(plan, row, "failed", e.status, attempt, None, {}, calls, counters)
            calls.append(call_record(req, response))
        counters.add(response, req.model)
        try:
            ok, reason, payload = plan.check(row, response.text)
        except (ValueError, KeyError, TypeError) as e:
            return _result(plan, row, "failed", f"bad_example: {e}", attempt, None, {}, calls, counters)
        if ok:
            return _result(plan, row, "kept", "", attempt, response.text, payload, calls, counters)
    return _result(plan, row, "failed", reason or "rejected", len(reqs), None, {}, calls, counters)


def _result(plan: Plan, row, status, reason, attempts, output, payload, calls, c: _Counters) -> dict:
    out = dict(row)
    out.update(status=status, reason=reason, attempts=attempts, output=output)
    for name in plan.payload_fields:
        out[name] = payload.get(name)
    out.update(
        calls=json.dumps(calls, ensure_ascii=False),
        n_calls=c.calls,
        n_http=c.http,
        n_cache_hits=c.cache_hits,
        n_retries=c.retries,
        n_malformed=c.malformed,
        prompt_tokens=c.prompt_tokens,
        completion_tokens=c.completion_tokens,
        call_usage=json.dumps(c.call_usage, ensure_ascii=False),
    )
    return out


def _new_loop() -> asyncio.AbstractEventLoop:
    try:  # uvloop (a uvicorn extra) makes the HTTP client's socket work cheaper
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()


class QueryActor:
    """One per Ray actor: its own event loop thread holds the client and the in-flight semaphore.

    `__call__` is synchronous and runs on one of the actor's task threads (several
    tasks run at once): it builds the requests, looks the batch up in the cache, hands
    the rows to the loop and waits. Keeping the loop ours, rather than Ray Data's async
    UDF loop, means Ray's block fetching and output back-pressure never stall it while
    hundreds of requests are in flight.
    """

    def __init__(self, plan: Plan, options: QueryOptions) -> None:
        if plan.max_tries < 1:
            raise ValueError(f"plan.max_tries must be >= 1, got {plan.max_tries}")
        self._plan = plan
        self._opts = options
        self._cache = CallCache(options.cache_uri, options.cache_table) if options.cache_uri else None
        self._cache_lock = threading.Lock()
        self._loop = _new_loop()
        threading.Thread(target=self._loop.run_forever, name="query-loop", daemon=True).start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result()

    async def _start(self) -> None:
        gate = RateGate(self._opts.limiter, self._opts.qps) if self._opts.limiter is not None else None
        self._client = make_client(self._opts.client, before_send=gate.acquire if gate else None)
        self._sem = asyncio.Semaphore(self._opts.max_in_flight)

    def __del__(self) -> None:
        # Ray Data drops the UDF when the actor exits: close the HTTP pool on its loop so
        # aiohttp neither warns about nor leaks open connections.
        loop = getattr(self, "_loop", None)
        if loop is None or not loop.is_running():
            return
        try:
            asyncio.run_coroutine_threadsafe(self._client.close(), loop).result(timeout=5)
        except Exception:
            pass
        loop.call_soon_threadsafe(loop.stop)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        clash = set(OUTPUT_COLUMNS + tuple(self._plan.payload_fields)) & set(batch.column_names)
        if clash:
            raise ValueError(f"input rows already have columns {sorted(clash)} that the query stage writes")
        plans = [requests_for(self._plan, row) for row in rows]
        keys = [r.key() for reqs in plans if isinstance(reqs, list) for r in reqs]
        cached: dict[str, LLMResponse] = {}
        if self._cache is not None and keys:
            with self._cache_lock:
                cached = self._cache.lookup(keys)
        out = asyncio.run_coroutine_threadsafe(self._run_rows(rows, plans, cached), self._loop).result()
        return pa.Table.from_pylist(out)

    async def _run_rows(self, rows: list[dict], plans: list, cached: dict[str, LLMResponse]) -> list[dict]:
        return await asyncio.gather(*(run_row(self._plan, row, reqs, cached, self._ask) for row, reqs in zip(rows, plans)))

    async def _ask(self, req: LLMRequest, counters: _Counters) -> LLMResponse:
        async with self._sem:
            counters.calls += 1
            try:
                response = await send(self._client, req, malformed_retries=self._opts.malformed_retries)
            except LLMCallError as e:
                counters.http += 1 + e.retries + e.malformed
                counters.retries += e.retries
                counters.malformed += e.malformed
                raise
            except Exception as e:  # anything else the HTTP stack throws fails this row only
                counters.http += 1
                raise LLMCallError("error", type(e).__name__) from None
        counters.http += 1 + response.retries + response.malformed
        counters.retries += response.retries
        counters.malformed += response.malformed
        return response


def query_rows(rows: list[dict], plan: Plan, options: QueryOptions, *, num_actors: int, actor_cpus: float):
    """The query stage over in-memory rows, with blocks sized for it (see `query_dataset`).

    One block = one batch = one Ray task of twice an actor's in-flight budget, and never
    so large that an actor is left without a block.
    """
    import ray

    if not rows:
        raise ValueError("query stage: no rows to send")
    batch = max(1, min(2 * options.max_in_flight, math.ceil(len(rows) / num_actors)))
    ds = ray.data.from_items(rows, override_num_blocks=math.ceil(len(rows) / batch))
    return query_dataset(ds, plan, options, num_actors=num_actors, actor_cpus=actor_cpus, batch_size=batch)


def query_dataset(
    ds, plan: Plan, options: QueryOptions, *, num_actors: int, actor_cpus: float, batch_size: int | None = None
):
    """`ds.map_batches(QueryActor, ...)` sized so each actor keeps `max_in_flight` busy.

    Batches are large (twice the in-flight budget) and three run at once per actor, so
    an actor's loop always has rows waiting for a free slot: a slow row (a timeout, a
    retry chain) never leaves slots idle while its batch finishes, and Ray Data
    dispatches a task only every few seconds of work, so its scheduling latency (which
    grows badly on a busy node) stays off the request path. Two more tasks wait queued
    per actor. Measured on 2 busy cores: batches of half the budget, one task each,
    left actors idle for seconds between tasks; Ray Data's own async-UDF loop stalls
    while it blocks on its output queue, hence the actor's private loop.
    """
    import ray

    concurrent = 3
    out = ds.map_batches(
        QueryActor,
        fn_constructor_kwargs={"plan": plan, "options": options},
        batch_size=batch_size or 2 * options.max_in_flight,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(
            size=num_actors,
            max_concurrent_calls_per_actor=concurrent,
            max_tasks_in_flight_per_actor=concurrent + 2,
            enable_true_multi_threading=True,  # else Ray Data runs one UDF call at a time
        ),
        num_cpus=actor_cpus,
    )
    # Start sending only once every actor is up: otherwise the first one takes the early
    # blocks alone and the pool runs at a fraction of its budget for the first seconds.
    # The wait is bounded, so a cluster without room for the pool fails with a timeout.
    out.context.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
    return out
