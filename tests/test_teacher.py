"""The teacher stage end to end: real Ray, the oracle subprocess with faults, LanceDB in tmp_path."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray

from distill_ray.config import Config, FaultConfig
from distill_ray.tasks.answers import is_correct
from distill_ray.tasks.synthetic import generate
from distill_ray.teacher.oracle import start_oracle

pytestmark = pytest.mark.timeout(300)

SECRET = "sk-distill-test-4f1c2b9e7d"
KEY_ENV = "DISTILL_TEST_TEACHER_KEY"
FAILURE_REASONS = {
    "http_5xx", "http_429", "timeout", "malformed", "connection", "wrong_answer", "no_answer", "bad_example"
}


@pytest.fixture(scope="module", autouse=True)
def ray_runtime():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _config(tmp_path: Path, base_url: str, **teacher) -> Config:
    cfg = Config()
    cfg.storage.root = str(tmp_path / "runs")
    t = cfg.teacher
    t.base_url, t.api_key_env = base_url, KEY_ENV
    t.num_actors, t.actor_cpus, t.max_in_flight = 2, 0.25, 16
    for k, v in teacher.items():
        setattr(t, k, v)
    return cfg


def _all_table_text(db) -> str:
    from distill_ray.store import read_table, table_names

    return "\n".join(json.dumps(read_table(db, name).to_pylist(), default=str) for name in table_names(db))


def test_stage_under_faults_then_rerun_from_cache(tmp_path, monkeypatch):
    from distill_ray.store import open_db, read_rows
    from distill_ray.teacher.stage import collect_rationales

    monkeypatch.setenv(KEY_ENV, SECRET)
    train, _ = generate(80, 0, seed=21)
    # One example whose gold answer is not a number: it must fail alone, named, not stop the run.
    (other,), _ = generate(1, 0, seed=99)
    assert other.question not in {ex.question for ex in train}
    bad = dataclasses.replace(other, id="bad/0", answer="many")
    examples = [*train, bad]
    faults = FaultConfig(
        p_5xx=0.10, p_429=0.05, p_timeout=0.03, timeout_hang_s=3.0, p_malformed=0.05, p_wrong=0.25, seed=5
    )
    with start_oracle(faults, api_key_env=KEY_ENV) as oracle:
        cfg = _config(tmp_path, oracle.base_url, max_retries=6, timeout_s=0.5, max_tries=4)
        first = collect_rationales(cfg, examples, run_tag="t1", progress=False)
        served = oracle.stats()
        again = collect_rationales(cfg, examples, run_tag="t1", progress=False)
        after = oracle.stats()

    s = first.stats
    db = open_db(cfg.lancedb_uri)
    kept = read_rows(db, first.rationales_table, version=first.table_versions[first.rationales_table])
    failed = read_rows(db, first.failures_table, version=first.table_versions[first.failures_table])
    kept_ids, failed_ids = [r["id"] for r in kept], [r["id"] for r in failed]
    # Every example ends exactly once, kept or failed.
    assert len(kept_ids) == len(set(kept_ids)) and len(failed_ids) == len(set(failed_ids))
    assert not set(kept_ids) & set(failed_ids)
    assert set(kept_ids) | set(failed_ids) == {ex.id for ex in examples}
    assert s["kept"] == len(kept) and s["failed"] == len(failed) and s["examples"] == len(examples)
    # Kept rationales are right; failures are never stored as rationales.
    gold = {ex.id: ex for ex in examples}
    for r in kept:
        assert is_correct(r["rationale"], gold[r["id"]].answer, "number"), r
        assert r["teacher_model"] == "oracle" and 1 <= r["attempts"] <= 4
    assert "bad/0" in failed_ids and "bad/0" not in kept_ids
    bad_row = next(r for r in failed if r["id"] == "bad/0")
    assert bad_row["reason"].startswith("bad_example") and "many" in bad_row["reason"]
    assert {r["reason"].split(":")[0] for r in failed} <= FAILURE_REASONS
    assert len(kept) >= 0.9 * len(train)
    # The faults happened and were absorbed where they should be.
    assert s["transport_retries"] > 0 and s["malformed_retries"] > 0 and s["reasks"] > 0
    assert s["http_requests"] == served["requests"] - served.get("unauthorized", 0)
    assert served.get("unauthorized", 0) == 0  # the key from the env var was sent
    assert s["prompt_tokens"] > 0 and s["completion_tokens"] > 0
    calls = read_rows(db, "teacher_calls")
    transport_failed = sum(s.get(f"failed_{r}", 0) for r in ("http_5xx", "http_429", "timeout", "malformed"))
    assert len(calls) == s["teacher_calls"] - transport_failed  # every answered call is cached

    # A rerun asks the teacher nothing: every answer comes from the cache.
    assert after["requests"] == served["requests"]
    assert again.stats["http_requests"] == 0 and again.stats["teacher_calls"] == 0
    assert again.stats["cache_hits"] == len(calls)
    # ... and settles every example on the driver, with no actor pool to start.
    assert first.stats["settled_from_cache"] == 0 and again.stats["settled_from_cache"] == len(examples)
    assert again.stats["kept"] == s["kept"]
    rerun_kept = read_rows(db, again.rationales_table)
    assert {(r["id"], r["rationale"]) for r in rerun_kept} == {(r["id"], r["rationale"]) for r in kept}
    assert again.table_versions[again.rationales_table] == first.table_versions[first.rationales_table] + 1

    # The API key is nowhere in what the stage stored or reported.
    assert SECRET not in _all_table_text(db)
    assert SECRET not in json.dumps(s) + json.dumps(again.stats) + repr(first) + repr(again)
    for path in Path(cfg.lancedb_uri).rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_bad_input_fails_before_any_work(tmp_path, monkeypatch):
    from distill_ray.config import ConfigError
    from distill_ray.teacher.stage import collect_rationales

    train, _ = generate(3, 0, seed=22)
    cfg = _config(tmp_path, "http://127.0.0.1:9/v1")
    monkeypatch.setenv(KEY_ENV, SECRET)
    with pytest.raises(ValueError, match="duplicate example ids"):
        collect_rationales(cfg, [train[0], train[1], train[0]], progress=False)
    with pytest.raises(ValueError, match="no examples"):
        collect_rationales(cfg, [], progress=False)
    too_big = _config(tmp_path, "http://127.0.0.1:9/v1", num_actors=5, actor_cpus=1.0)
    with pytest.raises(ValueError, match=r"teacher.num_actors x teacher.actor_cpus = 5 x 1.0 = 5 CPUs"):
        collect_rationales(too_big, train, progress=False)
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(ConfigError, match=KEY_ENV):
        collect_rationales(cfg, train, progress=False)


def test_qps_limit_holds_across_actors(tmp_path, monkeypatch):
    from distill_ray.teacher.stage import collect_rationales

    monkeypatch.setenv(KEY_ENV, SECRET)
    train, _ = generate(40, 0, seed=23)
    with start_oracle(FaultConfig()) as oracle:
        cfg = _config(tmp_path, oracle.base_url, qps=10.0, cache=False)
        result = collect_rationales(cfg, train, progress=False)
        served = oracle.stats()
    span = served["last_reply_at"] - served["first_request_at"]
    assert result.stats["kept"] == len(train) and served["requests"] == len(train)
    # 40 requests at 10/s: at least ~3.5 s even with a small initial burst.
    assert span >= 3.3 and len(train) / span <= 12.0, span


_KILLED_DRIVER = """
import sys
import ray
from distill_ray.config import Config
from distill_ray.tasks.synthetic import generate
from distill_ray.teacher import stage

ray.init(address=sys.argv[2], log_to_driver=False)
stage.CALL_FLUSH_RECORDS = 8
train, _ = generate(int(sys.argv[3]), 0, seed=24)
stage.collect_rationales(Config.model_validate_json(open(sys.argv[1]).read()), train, progress=False)
"""


def _wait_quiet(oracle, quiet_s: float = 1.5) -> int:
    """The oracle's request count once no new request has come in for `quiet_s`."""
    last, since = oracle.stats()["requests"], time.monotonic()
    while time.monotonic() - since < quiet_s:
        time.sleep(0.25)
        now = oracle.stats()["requests"]
        if now != last:
            last, since = now, time.monotonic()
    return last


def test_driver_killed_mid_stage_keeps_committed_calls(tmp_path, monkeypatch):
    from distill_ray.store import open_db, read_rows, table_version
    from distill_ray.teacher.stage import collect_rationales

    monkeypatch.setenv(KEY_ENV, SECRET)
    n = 40
    train, _ = generate(n, 0, seed=24)
    with start_oracle(FaultConfig(latency_s=0.4)) as oracle:
        cfg = _config(tmp_path, oracle.base_url, max_in_flight=4)
        cfg_path = tmp_path / "cfg.json"
        cfg_path.write_text(cfg.model_dump_json())
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        driver = subprocess.Popen(
            [sys.executable, "-c", _KILLED_DRIVER, str(cfg_path), ray.get_runtime_context().gcs_address, str(n)],
            env=env,
        )
        try:
            deadline = time.monotonic() + 120
            while (table_version(open_db(cfg.lancedb_uri), "teacher_calls") or 0) < 2:
                assert driver.poll() is None, "the driver ended before it could be killed"
                assert time.monotonic() < deadline, "no commit to teacher_calls within 120 s"
                time.sleep(0.1)
        finally:
            driver.kill()  # SIGKILL: no cleanup, as when a node dies
            driver.wait()
        asked_before = _wait_quiet(oracle)
        saved = read_rows(open_db(cfg.lancedb_uri), "teacher_calls")
        assert 8 <= len(saved) < n  # committed while streaming, before the end
        again = collect_rationales(cfg, train, progress=False)
        assert again.stats["cache_hits"] == len(saved) and again.stats["kept"] == n
        asked = oracle.stats()["requests"]
        assert asked - asked_before == n - len(saved)
        # Finished now: one more run is answered from the cache alone, one hit per example.
        third = collect_rationales(cfg, train, progress=False)
        assert third.stats["cache_hits"] == n and third.stats["http_requests"] == 0
        assert oracle.stats()["requests"] == asked
