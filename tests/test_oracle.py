"""The oracle teacher through the stock `openai` client, and the Std-CoT prompts it reads."""
from __future__ import annotations

import openai
import pytest

from distill_ray.config import FaultConfig
from distill_ray.tasks.answers import extract_answer, is_correct
from distill_ray.tasks.synthetic import FAMILIES, generate
from distill_ray.teacher.oracle import start_oracle
from distill_ray.teacher.oracle_answers import NON_ANSWER
from distill_ray.teacher.prompts import (
    COT_SYSTEM,
    cot_messages,
    cot_prompt,
    last_question,
    pairs_from_qa_prompt,
    synthetic_exemplars,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def oracle():
    with start_oracle(FaultConfig()) as handle:
        yield handle


@pytest.fixture(scope="module")
def client(oracle):
    with openai.OpenAI(base_url=oracle.base_url, api_key="unused", max_retries=0) as c:
        yield c


def test_answers_generated_questions_through_the_stock_client(client):
    train, test = generate(30, 15, seed=11)
    shots = synthetic_exemplars(3)
    for ex in train + test:
        reply = client.chat.completions.create(
            model="oracle", messages=list(cot_messages(ex.question, shots)), temperature=0.0, max_tokens=256
        )
        text = reply.choices[0].message.content
        assert text.endswith(f"Therefore, the answer is {ex.answer}.")
        assert is_correct(text, ex.answer, ex.answer_type)
        assert reply.usage.prompt_tokens > 50 and reply.usage.completion_tokens == len(text.split())
        assert reply.choices[0].finish_reason == "stop"
    assert {ex.task for ex in train} == {f"synthetic/{f}" for f in FAMILIES}


def test_completions_models_and_non_answers(client, oracle):
    (ex,), _ = generate(1, 0, seed=12)
    done = client.completions.create(model="oracle", prompt=cot_prompt(ex.question), max_tokens=256)
    assert done.choices[0].text == ex.rationale
    assert [m.id for m in client.models.list().data] == ["oracle"]
    odd = client.chat.completions.create(model="oracle", messages=list(cot_messages("What is the capital of France?")))
    assert odd.choices[0].message.content == NON_ANSWER
    assert extract_answer(NON_ANSWER, "number") is None
    short = client.chat.completions.create(model="oracle", messages=list(cot_messages(ex.question)), max_tokens=3)
    assert short.choices[0].finish_reason == "length" and len(short.choices[0].message.content.split()) == 3
    with pytest.raises(openai.BadRequestError):
        client.post("/chat/completions", cast_to=dict, body={"model": "oracle"})  # no messages
    assert oracle.stats()["requests"] >= 4


def test_wrong_answers_are_well_formed_but_wrong():
    train, _ = generate(20, 0, seed=13)
    with start_oracle(FaultConfig(p_wrong=1.0)) as oracle, openai.OpenAI(
        base_url=oracle.base_url, api_key="x", max_retries=0
    ) as c:
        kinds = set()
        for ex in train:
            reply = c.chat.completions.create(model="oracle", messages=list(cot_messages(ex.question)))
            text = reply.choices[0].message.content
            assert text.split(" . ")[0] == ex.rationale.split(" . ")[0]  # the reasoning itself is intact
            if "answer is" in text:
                assert not is_correct(text, ex.answer, ex.answer_type)
                kinds.add("wrong")
            else:
                kinds.add("no answer sentence")
        assert kinds == {"wrong", "no answer sentence"}


def _statuses(oracle, bodies) -> list[int]:
    with openai.OpenAI(base_url=oracle.base_url, api_key="x", max_retries=0, timeout=0.5) as c:
        out = []
        for body in bodies:
            try:
                c.post("/chat/completions", cast_to=dict, body=body)
                out.append(200)
            except openai.APIStatusError as e:
                out.append(e.status_code)
            except openai.APITimeoutError:
                out.append(-1)
        return out


def test_faults_are_seeded_by_request_content():
    train, _ = generate(60, 0, seed=14)
    bodies = [{"model": "oracle", "messages": list(cot_messages(ex.question))} for ex in train]
    faults = FaultConfig(p_5xx=0.2, p_429=0.2, p_timeout=0.05, timeout_hang_s=2.0, seed=7)
    with start_oracle(faults) as a:
        first = _statuses(a, bodies)
    with start_oracle(faults) as b:
        again = _statuses(b, list(reversed(bodies)))[::-1]
    assert first == again  # same fate per request, whatever the order
    assert 200 in first and 503 in first and 429 in first
    assert 0.2 < first.count(200) / len(first) < 0.85


def test_bad_fault_config_fails_to_start():
    with pytest.raises(RuntimeError, match="exited with code 2"):
        start_oracle(FaultConfig(p_5xx=0.6, p_429=0.6), ready_timeout_s=30)


def test_required_api_key(monkeypatch):
    monkeypatch.setenv("ORACLE_TEST_KEY", "sk-oracle-test")
    with start_oracle(FaultConfig(), api_key_env="ORACLE_TEST_KEY") as oracle:
        with openai.OpenAI(base_url=oracle.base_url, api_key="wrong", max_retries=0) as c:
            with pytest.raises(openai.AuthenticationError):
                c.models.list()
        with openai.OpenAI(base_url=oracle.base_url, api_key="sk-oracle-test", max_retries=0) as c:
            assert c.models.list().data[0].id == "oracle"


def test_prompt_keeps_the_target_question_recoverable():
    shots = synthetic_exemplars(3)
    q = "Ana has 2 boxes of 3 pens and gives away 1 . How many pens are left ?"
    prompt = cot_prompt(q, shots, preamble="Solve these.")
    assert prompt.startswith("Solve these.\n\nQuestion: ")
    assert prompt.endswith(f"Question: {q}\nAnswer:")
    assert prompt.count("Question:") == 4 and last_question(prompt) == q
    system, user = cot_messages(q, shots)
    assert system == {"role": "system", "content": COT_SYSTEM} and user["role"] == "user"
    assert last_question("Question: multi\nline (A) x\nAnswer:") == "multi\nline (A) x"
    assert last_question("no question here") is None
    for bad in ["", "x\nAnswer: y", "Question: nested"]:
        with pytest.raises(ValueError, match="question"):
            cot_prompt(bad)
    with pytest.raises(ValueError, match="exemplar 0"):
        cot_prompt(q, [("only one part",)])


def test_bbh_cot_prompt_becomes_exemplars(shared_data):
    from distill_ray.tasks import load_bbh_cot_prompt

    preamble, pairs = pairs_from_qa_prompt(load_bbh_cot_prompt(shared_data / "bbh", "date_understanding"))
    assert preamble == "Infer the date from context." and len(pairs) == 3
    for question, rationale in pairs:
        assert "Options:" in question and rationale.startswith("Let's think step by step.")
        assert "Therefore, the answer is (" in rationale and "So the answer is" not in rationale
    prompt = cot_prompt("Today is 1/1/2000. What is the date tomorrow?", pairs, preamble)
    assert last_question(prompt) == "Today is 1/1/2000. What is the date tomorrow?"
    with pytest.raises(ValueError, match="no 'Q:'"):
        pairs_from_qa_prompt("just text")
