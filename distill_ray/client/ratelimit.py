"""A cluster-wide requests-per-second limit for one endpoint.

One named Ray actor per endpoint owns the schedule; every client actor, on any node,
asks it for a *chunk* of send slots at a time (one round-trip per chunk, not per
request) and spaces the slots locally. The actor hands out slot start times as delays
relative to "now", so clocks on different nodes never need to agree.

The actor is job-scoped (not detached): it dies with the driver that created it, so a
crashed run leaves nothing behind, and every client in the job shares it by name.
"""
from __future__ import annotations

import asyncio
import hashlib
import time
from collections import deque

import ray


@ray.remote(num_cpus=0)
class TokenBucket:
    """Virtual-time token bucket: `burst` slots may accumulate while idle, then `qps`."""

    def __init__(self, qps: float, burst: int) -> None:
        self.configure(qps, burst)
        self._next_free = time.monotonic()

    def configure(self, qps: float, burst: int) -> None:
        if qps <= 0:
            raise ValueError(f"qps must be > 0, got {qps}")
        self._qps = float(qps)
        self._burst = max(1, int(burst))

    def reserve(self, n: int) -> float:
        """Reserve n consecutive slots; returns seconds from now until the first one."""
        now = time.monotonic()
        start = max(self._next_free, now - self._burst / self._qps)
        self._next_free = start + n / self._qps
        return max(0.0, start - now)

    def qps(self) -> float:
        return self._qps


def limiter_name(base_url: str, model: str) -> str:
    # Hash, not the URL itself: actor names show up in the dashboard and URLs can carry tokens.
    digest = hashlib.sha256(f"{base_url}|{model}".encode()).hexdigest()[:16]
    return f"qps-limiter-{digest}"


def chunk_for(qps: float) -> int:
    """About a quarter second of slots per round-trip, 1..32."""
    return max(1, min(32, int(qps / 4)))


def get_limiter(name: str, qps: float | None):
    """The named bucket for an endpoint (created on first use); None when qps is None."""
    if qps is None:
        return None
    handle = TokenBucket.options(name=name, get_if_exists=True, lifetime=None).remote(qps, chunk_for(qps))
    # get_if_exists returns a running actor with its old rate; the latest config wins.
    ray.get(handle.configure.remote(qps, chunk_for(qps)))
    return handle


class RateGate:
    """Per-process side of the limiter: takes slots in chunks, waits for each slot."""

    def __init__(self, handle, qps: float) -> None:
        self._handle = handle
        self._qps = qps
        self._chunk = chunk_for(qps)
        self._slots: deque[float] = deque()
        self._lock: asyncio.Lock | None = None  # made inside the running loop

    async def acquire(self) -> None:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            # Slots left unused for a while are dropped: spending them now would be a burst.
            stale = time.monotonic() - 0.5
            while self._slots and self._slots[0] < stale:
                self._slots.popleft()
            if not self._slots:
                delay = await self._handle.reserve.remote(self._chunk)
                first = time.monotonic() + delay
                self._slots.extend(first + i / self._qps for i in range(self._chunk))
            slot = self._slots.popleft()
        wait = slot - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
