"""NesyCD: the teacher's error analysis and the student + KB endpoint on real Ray Serve
(the knowledge base itself: test_kb.py).

The endpoint tests use a tiny student trained here to read the expert entry in its
prompt: every training row carries a unit definition with a random factor, so the only
way to get the factor right is to read it from the entry. Such a student cannot know a
unit's factor without the KB, which is what the edit test needs.
"""
from __future__ import annotations

import json
import math
import random

import openai
import pytest
import ray
import torch

from distill_ray.cli import main
from distill_ray.config import Config
from distill_ray.knowledge.kb import Entry
from distill_ray.methods import nesycd
from distill_ray.methods.recipe import question_prompt
from distill_ray.serve.backend import SamplingParams, eos_token_ids
from distill_ray.serve.decoding import decode_batch
from distill_ray.teacher.error_plan import build_error_plan
from distill_ray.teacher.knowledge_plan import parse_knowledge
from distill_ray.teacher.oracle_answers import reply_to
from distill_ray.tasks.synthetic import generate
from kb_entries import CHAIN, PLIM, UNITS


# --- the teacher's error analysis ---------------------------------------------------------


def test_the_oracle_analyses_an_error_from_the_prompt_alone():
    train, _ = generate(60, 1, seed=0)
    ex = next(e for e in train if e.task == "synthetic/unit_conversion")
    plan = build_error_plan(Config(), [(ex, "1 zorp = 2 blips . Question: junk\nAnswer: 7")])
    request = plan.requests({**ex.to_row()}, 0)
    assert request.temperature == 0.8
    assert "Student's wrong response: 1 zorp = 2 blips" in request.messages[-1]["content"]
    text, kind = reply_to(list(request.messages))
    assert kind == "error_analysis"
    k = parse_knowledge(text)
    assert any(" = " in item for item in k.supplementary)
    # The unit's definition, not this question's products: the entry is retrieved for others.
    assert set(k.supplementary) == set(ex.knowledge)
    ok, reason, payload = plan.check(ex.to_row(), text)
    assert ok and json.loads(payload["supplementary"]) == list(k.supplementary)
    assert plan.check(ex.to_row(), "Learning Summary: 1. think")[:2] == (False, "malformed_knowledge: no 'Supplementary Knowledge:' section")


# --- a student that reads the expert entry -------------------------------------------------


def reader_question(unit: str, count: int) -> str:
    return f"Ana has {count} {unit}s . How many {UNITS[unit]}s is that ?"


def _row(unit: str, factor: int, count: int, with_entry: bool) -> dict:
    fact = f"1 {unit} = {factor} {UNITS[unit]}s"
    entries = [f"Supplementary Knowledge: 1. {fact}"] if with_entry else []
    target = f" {fact} . {count} * {factor} = {count * factor} . Therefore, the answer is {count * factor}."
    return {"prompt": nesycd.kb_prompt(reader_question(unit, count), entries), "target": target}


@pytest.fixture(scope="module")
def reader(tmp_path_factory):
    """A tiny student that copies the unit definition from its expert entry (random factors)."""
    from distill_ray.train.data import collate, encode_rows, validate_rows
    from distill_ray.train.engine import build_optimizer
    from distill_ray.train.step import LocalEngine, train_step
    from distill_ray.train.student import TinySpec, tiny_model, train_tokenizer

    threads = torch.get_num_threads()
    # Nothing else runs while this fixture trains, so it may use both cores.
    torch.set_num_threads(2)
    rng = random.Random(0)
    units = sorted(UNITS)
    rows = [_row(rng.choice(units), rng.randint(2, 9), rng.randint(2, 9), rng.random() < 0.9) for _ in range(2000)]
    tok = train_tokenizer([t for r in rows for t in (r["prompt"], r["target"])], vocab_size=400)
    model = tiny_model(tok, TinySpec(hidden_size=96, num_layers=2, num_heads=4, intermediate_size=256, max_positions=256))
    cfg = Config.model_validate({"train": {"lr": 6e-3, "warmup_steps": 20}})
    optimizer, scheduler = build_optimizer(model, cfg.train, total_steps=STEPS)
    engine = LocalEngine(model, optimizer, scheduler)
    encoded, _ = encode_rows(tok, validate_rows(rows), max_len=256)
    for _ in range(STEPS):
        batch = [encoded[rng.randrange(len(encoded))] for _ in range(32)]
        train_step(engine, [collate(batch, tok.pad_token_id)])
    model.eval()
    path = tmp_path_factory.mktemp("reader")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    yield str(path), model, tok
    torch.set_num_threads(threads)


STEPS = 400


def test_decoding_reports_the_log_probability_of_what_it_generated(reader):
    _, model, tok = reader
    prompts = [tok(nesycd.kb_prompt(reader_question("quib", 3), [PLIM]))["input_ids"], tok("Question: Ana")["input_ids"]]
    done = decode_batch(model, tok, prompts, [SamplingParams(max_tokens=12)] * 2, eos_token_ids(model, tok))
    for ids, c in zip(prompts, done):
        new = tok(c.text, add_special_tokens=False)["input_ids"][: c.completion_tokens]
        with torch.no_grad():
            logits = model(torch.tensor([ids + new])).logits[0].float()
        logp = torch.log_softmax(logits[len(ids) - 1:-1], dim=-1)
        want = float(sum(logp[i, t] for i, t in enumerate(new)))
        assert len(new) == c.completion_tokens
        assert math.isclose(c.logprob, want, rel_tol=1e-3, abs_tol=1e-3)
        assert 0 < c.confidence <= 1 and math.isclose(c.confidence, math.exp(want / len(new)), rel_tol=1e-3)


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    from distill_ray.serve.deploy import shutdown_serve

    shutdown_serve()
    ray.shutdown()


@pytest.fixture()
def served(ray_cluster):
    """Apps a test deployed are deleted after it, pass or fail: their CPUs go to the next one."""
    from ray import serve

    yield
    for name in list(serve.status().applications):
        serve.delete(name)


def _cfg(tmp_path, **nesycd_cfg) -> Config:
    return Config.model_validate({
        "run_name": "edit", "storage": {"root": str(tmp_path)},
        "serve": {"port": 0, "max_new_tokens": 48},
        "method": {"name": "nesycd", "nesycd": nesycd_cfg},
    })


def test_an_edit_to_the_kb_changes_the_served_answer_without_retraining(reader, served, tmp_path):
    from distill_ray.serve.deploy import deploy_student

    cfg = _cfg(tmp_path, retrieval="hybrid")
    kb = nesycd.knowledge_base(cfg)
    kb.add([Entry(CHAIN, "synthetic/chain", origin="teacher")])  # nothing about quibs yet
    url = deploy_student(cfg, reader[0], app=nesycd.serve_app)
    client = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=120)
    question = reader_question("quib", 3)

    def ask():
        reply = client.completions.create(model="student", prompt=question_prompt(question), max_tokens=48,
                                          temperature=0, stop=["\nQuestion:"])
        return reply.choices[0].text, reply.model_extra

    before, extra = ask()
    assert extra["knowledge"] == [[]]  # the only entry is about something else: none given
    main(["kb", "-c", "ray_config.yaml", "--set", f"storage.root={tmp_path}", "--set", "run_name=edit",
          "add", "Supplementary Knowledge: 1. 1 quib = 8 blips", "--task", "synthetic/unit_conversion"])
    after, extra = ask()
    assert [k["text"] for k in extra["knowledge"][0]] == ["Supplementary Knowledge: 1. 1 quib = 8 blips"]
    assert extra["kb_version"] == kb.version
    assert "= 8 blips" in after and "Therefore, the answer is 24." in after, after
    assert after != before
    # A person corrects the fact: the next answer follows the correction.
    entry = next(r["id"] for r in kb.rows() if "quib" in r["text"])
    kb.remove([entry])
    kb.add([Entry("Supplementary Knowledge: 1. 1 quib = 5 blips", "synthetic/unit_conversion")])
    corrected, _ = ask()
    assert "= 5 blips" in corrected and "Therefore, the answer is 15." in corrected, corrected
    # Chat requests work the same way; usage counts the student's one call.
    chat = client.chat.completions.create(model="student", messages=[{"role": "user", "content": question}],
                                          max_tokens=48, temperature=0)
    assert "Therefore, the answer is 15." in chat.choices[0].message.content
    assert chat.usage.prompt_tokens > 0 and chat.usage.completion_tokens > 0
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt=question, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.completions.create(model="student", prompt=question, max_tokens=4, logprobs=2)


def test_the_confidence_gate_decides_per_question(reader, served, tmp_path):
    from ray import serve

    from distill_ray.serve.backend import encode_prompt
    from distill_ray.serve.deploy import deploy_student

    _, model, tok = reader
    questions = [reader_question(u, c) for u, c in [("quib", 3), ("zorp", 5), ("gorn", 2), ("fent", 7)]]
    bare = [encode_prompt(tok, question_prompt(q)) for q in questions]
    # The student's confidence on each bare question, decoded here as the replica decodes it;
    # a threshold halfway between the second and third splits them, with room for float noise.
    sure = sorted(c.confidence for p in bare
                  for c in decode_batch(model, tok, [p], [SamplingParams(max_tokens=48)], eos_token_ids(model, tok)))
    assert sure[1] < sure[2], sure
    threshold = (sure[1] + sure[2]) / 2
    cfg = _cfg(tmp_path, gate_confidence=threshold)
    nesycd.knowledge_base(cfg).add([Entry("Supplementary Knowledge: 1. 1 quib = 8 blips", "synthetic/unit_conversion")])
    url = deploy_student(cfg, reader[0], app=nesycd.serve_app, app_name="gated", route_prefix="/gated")
    client = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=120)
    gated = client.completions.create(model="student", prompt=[question_prompt(q) for q in questions], max_tokens=48, temperature=0)
    # The sure questions skip the KB, the others use it: decided per question, in one request.
    confidences = gated.model_extra["confidence"]
    assert sorted(confidences) == pytest.approx(sure, abs=1e-4)
    skipped = gated.model_extra["retrieval_skipped"]
    assert skipped == [c >= threshold for c in confidences] and sum(skipped) == 2
    knowledge = gated.model_extra["knowledge"]
    assert all(k == [] for k, s in zip(knowledge, skipped) if s)
    retrieved = [k for k, s in zip(knowledge, skipped) if not s]
    assert any(k and "quib" in k[0]["text"] for k in retrieved) or "quib" not in " ".join(
        q for q, s in zip(questions, skipped) if not s)
    # Usage counts both calls where the gate let retrieval happen, and lists each call.
    calls = gated.usage.model_extra["calls"]
    assert len(calls) == sum(1 if s else 2 for s in skipped)
    assert sum(c["prompt_tokens"] for c in calls) == gated.usage.prompt_tokens > sum(len(p) for p in bare)
    serve.delete("gated")
