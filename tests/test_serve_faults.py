"""The student server survives losing a replica: real Ray Serve, real HTTP, a real process kill.

A replica's process is SIGKILLed (what the OOM killer or a segfault does) while a steady
stream of requests runs. Every HTTP exchange must end promptly, either as a well-formed
completion or as a clean 5xx the client can retry; the stock openai client's retries must
turn every call into a success; and Serve must replace the dead replica by itself.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait

import openai
import pytest
import ray
from ray import serve

from distill_ray.config import Config, ServeConfig
from distill_ray.serve import deploy_student, shutdown_serve
from distill_ray.train.student import TinySpec
from tiny import addition_student

APP = "student"
DEPLOYMENT = "StudentServer"
REPLICAS = 2
MAX_TOKENS = 6
THREADS = 4
REQUESTS_PER_THREAD = 12
KILL_AFTER = 8  # completed calls before the kill: the stream is well under way
CALL_BOUND_S = 30.0  # a call slower than this counts as hung
LOAD_BOUND_S = 120.0  # the whole stream, retries and their back-off included
RECOVERY_BOUND_S = 120.0
# Serve's own answers to a request lost with its replica; a 4xx would blame the client.
SERVER_FAILURES = {500, 503}
PROMPTS = [f"Q: what is {a} plus {b}? A:" for a, b in [(3, 4), (12, 9), (27, 1), (8, 16), (35, 20), (5, 5)]]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tmp_path_factory.mktemp("student")
    # Trained a little, so answers differ by prompt and a mixed-up body would show.
    addition_student(path, TinySpec(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, max_positions=128))

    ray.init(num_cpus=2, include_dashboard=False)
    # A long batch window keeps each request inside its replica for half a second, so one
    # seen there is still in flight when the kill lands.
    cfg = Config(serve=ServeConfig(port=0, num_replicas=REPLICAS, replica_cpus=0.5, max_new_tokens=MAX_TOKENS, batch_wait_timeout_s=0.5))
    try:
        yield deploy_student(cfg, str(path), app_name=APP)
    finally:
        shutdown_serve()
        ray.shutdown()


def replica_names() -> set[str]:
    prefix = f"SERVE_REPLICA::{APP}#{DEPLOYMENT}#"
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == "serve" and a["name"].startswith(prefix)}


def identity(name: str) -> tuple[int, str]:
    """(pid, actor id) of a live replica, asked of the replica process itself."""
    actor = ray.get_actor(name, namespace="serve")
    return ray.get(actor.__ray_call__.remote(lambda _: (os.getpid(), ray.get_runtime_context().get_actor_id())), timeout=30)


def _plain(status) -> str:
    return str(getattr(status, "value", status))


def deployment_state() -> tuple[str, dict[str, int]]:
    app = serve.status().applications.get(APP)
    if app is None or DEPLOYMENT not in app.deployments:
        return "MISSING", {}
    return _plain(app.status), {_plain(k): v for k, v in app.deployments[DEPLOYMENT].replica_states.items()}


def kill_a_busy_replica(names: set[str], identities: dict[str, tuple[int, str]]) -> tuple[str, int, float]:
    """SIGKILL the first replica seen holding accepted requests; (its name, how many, when).

    Without this the kill may land on an idle replica and test nothing: routing is free to
    put a whole wave of requests on one replica. The count comes from the replica actor
    itself (the one Serve's router probes); the kill follows it within milliseconds, while
    the requests still sit in the half-second batch window.
    """
    actors = {name: ray.get_actor(name, namespace="serve") for name in sorted(names)}
    deadline = time.monotonic() + CALL_BOUND_S
    while time.monotonic() < deadline:
        for name, actor in actors.items():
            ongoing = ray.get(actor.get_num_ongoing_requests.remote(), timeout=10)
            if ongoing:
                killed_at = time.monotonic()
                os.kill(identities[name][0], signal.SIGKILL)
                return name, ongoing, killed_at
    raise AssertionError(f"no replica held a request for {CALL_BOUND_S:.0f} s of steady load")


def check_completion_body(body: dict, prompt: str, want: str) -> None:
    assert body["object"] == "text_completion" and body["model"] == APP, body
    [choice] = body["choices"]
    assert choice["text"] == want and choice["finish_reason"] in ("stop", "length"), (prompt, body)
    usage = body["usage"]
    assert 0 < usage["completion_tokens"] <= MAX_TOKENS and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"], body


@pytest.mark.timeout(300)
def test_a_killed_replica_loses_no_request_and_is_replaced(server):
    healthy = openai.OpenAI(base_url=server, api_key="x", max_retries=0, timeout=CALL_BOUND_S)
    baseline = healthy.completions.create(model=APP, prompt=PROMPTS, max_tokens=MAX_TOKENS, temperature=0)
    want = {PROMPTS[c.index]: c.text for c in baseline.choices}
    assert len(set(want.values())) > 1, f"every prompt gets the same answer, so a mixed-up body would pass: {want}"

    before = replica_names()
    assert len(before) == REPLICAS and deployment_state() == ("RUNNING", {"RUNNING": REPLICAS})
    identities = {name: identity(name) for name in before}

    # Every HTTP exchange, retries included: (time, status, body, the prompt it carried).
    exchanges: list[tuple[float, int, bytes, str]] = []

    def record(response) -> None:
        response.read()
        exchanges.append((time.monotonic(), response.status_code, response.content, json.loads(response.request.content)["prompt"]))

    client = openai.OpenAI(base_url=server, api_key="x", max_retries=3, timeout=CALL_BOUND_S,
                           http_client=openai.DefaultHttpxClient(event_hooks={"response": [record]}))
    completed = threading.Semaphore(0)

    def stream(k: int) -> list[tuple[str, float, object]]:
        calls = []
        for i in range(REQUESTS_PER_THREAD):
            prompt = PROMPTS[(k + i) % len(PROMPTS)]
            start = time.monotonic()
            try:
                outcome: object = client.completions.create(model=APP, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
            except openai.OpenAIError as e:
                outcome = e
            calls.append((prompt, time.monotonic() - start, outcome))
            completed.release()
        return calls

    pool = ThreadPoolExecutor(THREADS)
    try:
        futures = [pool.submit(stream, k) for k in range(THREADS)]
        for _ in range(KILL_AFTER):
            assert completed.acquire(timeout=CALL_BOUND_S), "the stream stalled before the kill"
        victim, in_flight, killed_at = kill_a_busy_replica(before, identities)
        _, hung = wait(futures, timeout=LOAD_BOUND_S)
        assert not hung, "a request thread never finished"
        calls = [call for f in futures for call in f.result()]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    load_s = time.monotonic() - killed_at

    # Every exchange: a correct completion, or a clean server-side failure - nothing in between.
    failures = []
    for at, status, body, prompt in exchanges:
        if status == 200:
            check_completion_body(json.loads(body), prompt, want[prompt])
        else:
            assert status in SERVER_FAILURES, (status, body)
            assert at >= killed_at, f"HTTP {status} before any replica was killed: {body!r}"
            failures.append((status, body.decode()))

    # Every call: done in bounded time, and the client's retries made it a success.
    assert len(calls) == THREADS * REQUESTS_PER_THREAD
    slowest = max(seconds for _, seconds, _ in calls)
    assert slowest < CALL_BOUND_S, f"a call took {slowest:.1f} s"
    errors = [(prompt, repr(outcome)) for prompt, _, outcome in calls if isinstance(outcome, Exception)]
    assert not errors, errors
    for prompt, _, outcome in calls:
        assert outcome.choices[0].text == want[prompt] and outcome.usage.completion_tokens > 0, (prompt, outcome)

    # Serve notices on its own health-check cadence and reports RUNNING meanwhile; only a
    # new replica under a new name, up and running, is recovery.
    deadline = killed_at + RECOVERY_BOUND_S
    while True:
        names, state = replica_names(), deployment_state()
        if victim not in names and len(names) == REPLICAS and state == ("RUNNING", {"RUNNING": REPLICAS}):
            break
        assert time.monotonic() < deadline, f"not recovered {RECOVERY_BOUND_S:.0f} s after the kill: {state}, replicas {sorted(names)}"
        time.sleep(0.25)
    recovery_s = time.monotonic() - killed_at

    [replacement] = names - before
    victim_pid, victim_id = identities[victim]
    new_pid, new_id = identity(replacement)
    assert new_pid != victim_pid and new_id != victim_id
    [survivor] = before - {victim}
    assert identity(survivor) == identities[survivor], "the kill took down more than its one replica"
    with pytest.raises(ProcessLookupError):
        os.kill(victim_pid, 0)

    # Recovered means no retries needed: a fresh burst all succeeds on the first try.
    with ThreadPoolExecutor(THREADS) as burst:
        fresh = list(burst.map(lambda p: healthy.completions.create(model=APP, prompt=p, max_tokens=MAX_TOKENS, temperature=0), PROMPTS))
    assert [out.choices[0].text for out in fresh] == [want[p] for p in PROMPTS]

    print(f"\nkill: {in_flight} requests in flight on the victim; {len(failures)} of {len(exchanges)} exchanges failed ({sorted({s for s, _ in failures})}, "
          f"bodies {sorted({b for _, b in failures})}); all {len(calls)} calls succeeded, slowest {slowest:.2f} s; "
          f"load finished {load_s:.1f} s after the kill; recovered {recovery_s:.1f} s after it")
