"""The OpenAI-compatible client: request hashing, sending with retries, the LanceDB cache.

Real oracle subprocesses on 127.0.0.1, the stock `openai` client, real LanceDB in tmp_path.
"""
from __future__ import annotations

import asyncio
import socket

import pyarrow as pa
import pytest

from distill_ray.client.cache import CallCache, call_record, write_calls
from distill_ray.client.openai_client import ClientSettings, LLMCallError, Secret, make_client, send
from distill_ray.client.requests import LLMRequest, LLMResponse
from distill_ray.config import FaultConfig
from distill_ray.store import open_db, read_rows, table_version, write_table
from distill_ray.tasks.synthetic import generate
from distill_ray.teacher.oracle import start_oracle
from distill_ray.teacher.prompts import cot_messages, synthetic_exemplars

pytestmark = pytest.mark.timeout(120)


def _chat(question: str, temperature: float = 0.0) -> LLMRequest:
    messages = cot_messages(question, synthetic_exemplars(2))
    return LLMRequest("chat", "oracle", messages=messages, temperature=temperature)


def _send(base_url: str, requests: list[LLMRequest], *, max_retries=0, timeout_s=10.0, malformed_retries=0):
    """Send each request; returns a list of LLMResponse or LLMCallError."""

    async def go():
        client = make_client(ClientSettings(base_url, Secret("sk-test"), max_retries, timeout_s))
        try:
            out = []
            for req in requests:
                try:
                    out.append(await send(client, req, malformed_retries=malformed_retries))
                except LLMCallError as e:
                    out.append(e)
            return out
        finally:
            await client.close()

    return asyncio.run(go())


def test_request_key_covers_what_determines_the_reply():
    q = "Ana has 2 boxes of 3 pens and gives away 1 . How many pens are left ?"
    a, same = _chat(q), _chat(q)
    assert a.key() == same.key() and len(a.key()) == 64
    assert a.key() != _chat("Ana has 2 boxes of 3 pens and gives away 2 . How many pens are left ?").key()
    assert a.key() != _chat(q, temperature=0.7).key()
    # Integral temperatures hash like their float spelling.
    assert LLMRequest("completion", "m", prompt="p", temperature=1).key() == LLMRequest(
        "completion", "m", prompt="p", temperature=1.0
    ).key()
    assert LLMRequest.from_json(a.to_json()) == a


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(kind="chat", model="m", prompt="x"), "needs messages"),
        (dict(kind="completion", model="m", messages=({"role": "user", "content": "x"},)), "needs a prompt"),
        (dict(kind="chat", model="m", messages=({"role": "user"},)), "'role' and 'content'"),
        (dict(kind="embed", model="m", prompt="x"), "kind must be"),
        (dict(kind="completion", model="", prompt="x"), "model"),
    ],
)
def test_bad_requests_are_named(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        LLMRequest(**kwargs)


def test_secret_never_prints():
    s = ClientSettings("http://127.0.0.1:1/v1", Secret("sk-very-secret"))
    assert "sk-very-secret" not in repr(s) and "sk-very-secret" not in str(s.api_key)


def test_answers_and_token_counts():
    train, _ = generate(6, 0, seed=3)
    with start_oracle(FaultConfig()) as oracle:
        replies = _send(oracle.base_url, [_chat(ex.question) for ex in train])
    for ex, reply in zip(train, replies):
        assert isinstance(reply, LLMResponse)
        assert reply.text == ex.rationale
        assert reply.prompt_tokens > 50 and reply.completion_tokens == len(ex.rationale.split())
        assert reply.retries == 0 and reply.malformed == 0 and not reply.cached


def test_malformed_bodies_are_resent_then_given_up():
    train, _ = generate(20, 0, seed=4)
    reqs = [_chat(ex.question) for ex in train]
    with start_oracle(FaultConfig(p_malformed=0.5, seed=1)) as oracle:
        replies = _send(oracle.base_url, reqs, malformed_retries=6)
        resent = sum(r.malformed for r in replies)
        assert all(isinstance(r, LLMResponse) for r in replies)
        assert resent > 0 and oracle.stats()["requests"] == len(reqs) + resent
    with start_oracle(FaultConfig(p_malformed=1.0)) as oracle:
        (err,) = _send(oracle.base_url, reqs[:1], malformed_retries=2)
        assert isinstance(err, LLMCallError) and err.status == "malformed" and err.malformed == 2
        assert oracle.stats()["requests"] == 3


@pytest.mark.parametrize(
    "faults, status",
    [
        (FaultConfig(p_5xx=1.0), "http_5xx"),
        (FaultConfig(p_429=1.0), "http_429"),
        (FaultConfig(p_timeout=1.0, timeout_hang_s=5.0), "timeout"),
    ],
)
def test_transport_failures_use_the_clients_retries(faults, status):
    with start_oracle(faults) as oracle:
        question = "Ana has 2 boxes of 3 pens and gives away 1 . How many pens are left ?"
        (err,) = _send(oracle.base_url, [_chat(question)], max_retries=2, timeout_s=0.5)
        assert isinstance(err, LLMCallError) and err.status == status
        assert err.retries == 2 and oracle.stats()["requests"] == 3
        assert "sk-test" not in str(err)


def test_transient_faults_are_retried_to_success():
    train, _ = generate(30, 0, seed=5)
    with start_oracle(FaultConfig(p_5xx=0.2, p_429=0.1, seed=2)) as oracle:
        replies = _send(oracle.base_url, [_chat(ex.question) for ex in train], max_retries=8)
        assert all(isinstance(r, LLMResponse) for r in replies)
        retries = sum(r.retries for r in replies)
        assert retries > 0 and oracle.stats()["requests"] == len(train) + retries


def test_connection_refused_is_its_own_status():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again before use: nothing listens there
    (err,) = _send(f"http://127.0.0.1:{port}/v1", [LLMRequest("completion", "m", prompt="hi")], max_retries=1)
    assert isinstance(err, LLMCallError) and err.status == "connection" and err.retries == 1


def test_cache_round_trip_in_one_query(tmp_path):
    uri = str(tmp_path / "db")
    reqs = [LLMRequest("completion", "oracle", prompt=f"Question: {i}\nAnswer:") for i in range(5)]
    cache = CallCache(uri)
    assert cache.lookup([r.key() for r in reqs]) == {}  # no table yet
    records = [
        call_record(r, LLMResponse(text=f"reply {i}", prompt_tokens=3, completion_tokens=2)) for i, r in enumerate(reqs)
    ]
    db = open_db(uri)
    write_calls(db, records[:3] + records[:1])  # a duplicate in the chunk is kept once
    found = cache.lookup([r.key() for r in reqs])
    assert set(found) == {r.key() for r in reqs[:3]}
    assert found[reqs[1].key()].text == "reply 1" and found[reqs[1].key()].cached
    write_calls(db, records[3:])  # a later commit is seen by the same reader
    assert len(cache.lookup([r.key() for r in reqs])) == 5
    assert table_version(db, "teacher_calls") == 2
    rows = read_rows(db, "teacher_calls")
    assert len(rows) == 5 and all(r["request"] and r["created_at"] for r in rows)


def test_store_names_bad_input(tmp_path):
    db = open_db(str(tmp_path / "db"))
    v1 = write_table(db, "t", [{"a": 1, "b": "x"}])
    v2 = write_table(db, "t", [{"a": 2, "b": "y"}], "append")
    assert v2 == v1 + 1 and len(read_rows(db, "t")) == 2
    assert len(read_rows(db, "t", version=v1)) == 1
    with pytest.raises(TypeError, match="row 1 is str"):
        write_table(db, "t", [{"a": 3, "b": "z"}, "oops"], "append")
    with pytest.raises(ValueError, match="table 't'"):
        schema = pa.schema([("a", pa.int64()), ("b", pa.string())])
        write_table(db, "t", [{"a": "not a number", "b": 1}], "append", schema=schema)
    with pytest.raises(ValueError, match="already exists"):
        write_table(db, "t", [{"a": 1, "b": "x"}], "create")
    with pytest.raises(ValueError, match="does not exist"):
        read_rows(db, "missing")
    assert len(read_rows(db, "t")) == 2  # nothing was lost on the way


def test_replay_settles_exactly_the_rows_the_cache_decides(tmp_path):
    """A row settles on the driver when its attempts up to an outcome are all cached; the first
    attempt that would need the endpoint sends the whole row to the actors, untouched."""
    from distill_ray.client.replay import replay_cached
    from distill_ray.config import Config
    from distill_ray.teacher.cot_plan import build_plan

    train, _ = generate(4, 0, seed=3)
    teacher = Config.model_validate({"teacher": {"temperatures": [0.0, 0.7], "max_tries": 2, "few_shot": 1}}).teacher
    plan = build_plan(teacher, train)
    rows = [ex.to_row() for ex in train] + [{**train[0].to_row(), "id": "bad", "question": None}]
    right = [ex.rationale for ex in train]
    wrong = "1 + 1 = 2 . Therefore, the answer is 123456."

    def reply(text: str) -> LLMResponse:
        return LLMResponse(text=text, prompt_tokens=5, completion_tokens=7)

    write_calls(open_db(str(tmp_path / "db")), [
        call_record(plan.requests(rows[0], 0), reply(right[0])),  # settled: kept at attempt 1
        call_record(plan.requests(rows[1], 0), reply(wrong)),  # settled: wrong, then right at attempt 2
        call_record(plan.requests(rows[1], 1), reply(right[1])),
        call_record(plan.requests(rows[2], 0), reply(wrong)),  # to ask: attempt 2 is not cached
        # rows[3]: nothing cached, to ask
    ])
    done, to_ask = replay_cached(rows, plan, str(tmp_path / "db"))

    assert [r["id"] for r in to_ask] == [rows[2]["id"], rows[3]["id"]] and to_ask == [rows[2], rows[3]]
    by_id = {r["id"]: r for r in done}
    assert set(by_id) == {rows[0]["id"], rows[1]["id"], "bad"}
    first, second = by_id[rows[0]["id"]], by_id[rows[1]["id"]]
    assert (first["status"], first["attempts"], first["n_cache_hits"], first["n_http"]) == ("kept", 1, 1, 0)
    assert (second["status"], second["attempts"], second["n_cache_hits"]) == ("kept", 2, 2)
    assert second["rationale"] == right[1] and second["calls"] == "[]" and second["prompt_tokens"] == 10
    # A row whose requests cannot be built fails here, as it would in an actor, without a call.
    assert by_id["bad"]["status"] == "failed" and by_id["bad"]["reason"].startswith("bad_request")
    # No cache table at all: everything well-formed is still to ask.
    assert replay_cached(rows[:4], plan, str(tmp_path / "empty")) == ([], rows[:4])
