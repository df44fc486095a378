"""The rows of a query stage whose outcome the cache already holds, settled on the driver.

A rerun of a finished teacher stage, or a method asking what another method already
asked, would otherwise start a pool of actors (seconds each) only to read answers back.
Each row is walked through exactly the attempts an actor would make (`run_row`, one copy
of that logic), against the cache alone: a row whose outcome needs no live call is
settled here; the first attempt that would go to the endpoint sends the whole row to the
actors, which repeat its cached attempts from the cache, so counts come out the same.
"""
from __future__ import annotations

import asyncio
from collections.abc import Sequence

from distill_ray.client.actor import Plan, requests_for, run_row
from distill_ray.client.cache import CALLS_TABLE, CallCache
from distill_ray.client.requests import LLMRequest, LLMResponse

LOOKUP_ROWS = 512  # rows per cache query (each brings up to max_tries keys)


class _LiveCallNeeded(Exception):
    pass


async def _cache_only(request: LLMRequest, counters) -> LLMResponse:
    raise _LiveCallNeeded


async def _settle(plan: Plan, row: dict, reqs, cached: dict[str, LLMResponse]) -> dict | None:
    try:
        return await run_row(plan, row, reqs, cached, _cache_only)
    except _LiveCallNeeded:
        return None


def replay_cached(rows: Sequence[dict], plan: Plan, cache_uri: str,
                  cache_table: str = CALLS_TABLE) -> tuple[list[dict], list[dict]]:
    """(output rows settled from the cache, input rows still to ask), each in input order."""
    cache = CallCache(cache_uri, cache_table)

    async def settle_all() -> list[dict | None]:
        out: list[dict | None] = []
        for start in range(0, len(rows), LOOKUP_ROWS):
            part = rows[start:start + LOOKUP_ROWS]
            plans = [requests_for(plan, row) for row in part]
            keys = [r.key() for reqs in plans if isinstance(reqs, list) for r in reqs]
            cached = cache.lookup(keys) if keys else {}
            out.extend(await asyncio.gather(*(_settle(plan, row, reqs, cached) for row, reqs in zip(part, plans))))
        return out

    settled = asyncio.run(settle_all())
    done = [s for s in settled if s is not None]
    to_ask = [row for row, s in zip(rows, settled) if s is None]
    return done, to_ask
