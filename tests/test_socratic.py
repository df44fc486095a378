"""Socratic CoT: the GSM8K Socratic importer on the real file, the decomposition stage, the
multiplexed adapters (one base, loaded once) and the dialogue endpoint with its step limit,
and evaluation through that endpoint.

Real components throughout: the oracle subprocess, a local Ray, LanceDB in tmp_path, Ray
Serve over HTTP with the stock openai client, a tiny Llama and two PEFT LoRA adapters
built here. Every served answer is checked against the same model run here, unserved.
"""
from __future__ import annotations

import dataclasses
import json

import httpx
import openai
import pytest
import ray
import torch

from distill_ray.config import Config, FaultConfig, ServeConfig
from distill_ray.methods import get_recipe
from distill_ray.methods.recipe import MethodContext, question_prompt
from distill_ray.methods.socratic import role_rows
from distill_ray.methods.socratic_format import (
    DECOMPOSER,
    SOLVER,
    STEP_LIMIT_NOTE,
    count_steps,
    decomposer_prompt,
    final_answer,
    is_done,
    one_line,
    reply_text,
    solver_prompt,
    step_value,
)
from distill_ray.tasks.loaders import load_gsm8k
from distill_ray.tasks.loaders_gsm8k_socratic import load_gsm8k_socratic, parse_socratic_answer
from distill_ray.tasks.record import Step
from distill_ray.tasks.synthetic import generate
from distill_ray.teacher.decompose_plan import DECOMPOSITIONS_SCHEMA, build_decomposition_plan, steps_of
from distill_ray.teacher.decompose_prompts import parse_decomposition, render_decomposition
from distill_ray.teacher.oracle import start_oracle

# Rows of test_socratic.jsonl whose last step does not conclude the '####' answer (a
# value in dollars for an answer in cents, "1600 > 1200", ...): the file's own anomalies.
GSM8K_LAST_STEP_DISAGREES = [226, 266, 493, 505, 593, 607, 635, 669, 853, 1038, 1243]
GSM8K_EMPTY_SOLUTION = {"gsm8k/test/1042": [4], "gsm8k/test/1284": [2]}


# --- formats and the importer, no Ray -----------------------------------------------------


def test_step_value_and_trail_formats():
    assert step_value("15 - 4 = 11") == "11"
    assert step_value("She makes 9 * 2 = $18 every day at the market.") == "18"
    assert step_value("80,000*1.5=120,000") == "120000"
    assert step_value("1 vask = 5 blips . 4 * 5 = 20") == "20"
    assert step_value("Janet sells 9 duck eggs") == "9" and step_value("no number here") is None
    assert final_answer([Step("Is it?", "yes.")]) == "yes" and final_answer([]) is None
    steps = [Step("How many in the boxes ?", "3 * 5 = 15"), Step("How many left ?", "15 - 4 = 11")]
    assert decomposer_prompt("Q ?", steps[:1]) == "Question: Q ?\nSub-question 1: How many in the boxes ?\nSub-answer 1: 3 * 5 = 15\nSub-question 2:"
    assert solver_prompt("Q ?", [], "How  many\nin the boxes ?").endswith("Sub-question 1: How many in the boxes ?\nSub-answer 1:")
    reply = reply_text(steps, limit_hit=False)
    assert reply.endswith("\nTherefore, the answer is 11.") and count_steps(reply) == 2
    assert STEP_LIMIT_NOTE in reply_text(steps, limit_hit=True)
    assert is_done(" [done] ") and not is_done("How many ?")


def test_gsm8k_socratic_importer_reads_the_real_file(shared_data):
    path = shared_data / "gsm8k" / "test_socratic.jsonl"
    records = load_gsm8k_socratic(path)
    plain = load_gsm8k(shared_data / "gsm8k" / "test.jsonl")
    assert len(records) == len(plain) == 1319
    # The same problems under the same ids as the plain file, in the same order.
    assert [(r.id, r.question, r.answer) for r in records] == [(p.id, p.question, p.answer) for p in plain]
    for r in records:
        assert r.decomposition and all(s.question.strip() and s.answer.strip() for s in r.decomposition)
        assert not any("<<" in s.answer or ">>" in s.answer for s in r.decomposition)
        assert r.rationale.endswith(f"Therefore, the answer is {r.answer}.")
    assert sum(len(r.decomposition) for r in records) == 4819
    # Anomalies are reported, never hidden: the last step disagrees with '####' on exactly
    # these rows, and two steps with an empty solution are left out and named.
    disagree = sorted(int(r.id.rsplit("/", 1)[1]) for r in records if not r.meta["last_step_agrees"])
    assert disagree == GSM8K_LAST_STEP_DISAGREES
    assert {r.id: r.meta["empty_solution_steps"] for r in records if r.meta["empty_solution_steps"]} == GSM8K_EMPTY_SOLUTION
    janet = records[0]
    assert janet.decomposition[0] == Step("How many eggs does Janet sell?", "Janet sells 16 - 3 - 4 = 9 duck eggs a day.")
    assert janet.meta["last_step_value"] == "18" == janet.answer
    row = janet.to_row()
    assert janet.from_row(row).decomposition == janet.decomposition


def test_gsm8k_socratic_importer_names_what_is_wrong():
    with pytest.raises(ValueError, match="line 7: step 2 must be 'sub-question \\*\\* solution'"):
        parse_socratic_answer("A? ** 1 + 1 = 2\nno separator here\n#### 2", "line 7")
    with pytest.raises(ValueError, match="exactly one '#### N'"):
        parse_socratic_answer("A? ** 2", "line 1")
    with pytest.raises(ValueError, match="no 'sub-question \\*\\* solution' step"):
        parse_socratic_answer("A? ** <<1+1=2>>\n#### 2", "line 1")


def test_decomposition_plan_keeps_only_chains_that_end_on_the_gold_answer():
    train, _ = generate(6, 0, seed=4)
    plan = build_decomposition_plan(Config().teacher, train)
    ex = train[0]
    row = ex.to_row()
    good = render_decomposition(ex.decomposition, ex.answer)
    assert parse_decomposition(good) == (ex.decomposition, f"Therefore, the answer is {ex.answer}.")
    ok, reason, payload = plan.check(row, good)
    assert ok and [Step(**s) for s in json.loads(payload["decomposition"])] == list(ex.decomposition)
    wrong_last = render_decomposition(ex.decomposition[:-1], ex.answer)
    assert plan.check(row, wrong_last)[:2] == (False, "last_step_disagrees")
    assert plan.check(row, good.replace(f"is {ex.answer}.", "is 1234."))[:2] == (False, "wrong_answer")
    assert plan.check(row, good.replace(" ** ", " ", 1))[1].startswith("malformed_decomposition")
    assert plan.check(row, good.rsplit("\n", 1)[0])[1] == "no_answer: the reply does not end with the answer sentence"
    # Few-shot demonstrations of the same family, in the reply format.
    shots = plan.shots[ex.task].exemplars
    assert len(shots) == 3 and all(" ** " in r and r.endswith(".") for _, r in shots)


# --- the teacher stage ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_runtime():
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_decomposition_stage_under_faults_then_from_cache(tmp_path, ray_runtime):
    from distill_ray.store import open_db, read_rows, table_names
    from distill_ray.teacher.needs import collect_need

    train, _ = generate(30, 0, seed=8)
    odd = dataclasses.replace(train[0], id="odd/0", question="Why is the sky blue ?")
    examples = [*train, odd]
    cfg = Config(run_name="soc test")
    cfg.storage.root = str(tmp_path / "runs")
    t = cfg.teacher
    t.num_actors, t.actor_cpus, t.max_in_flight, t.max_retries, t.max_tries = 2, 0.25, 8, 6, 4
    with start_oracle(FaultConfig(p_5xx=0.1, p_wrong=0.3, seed=5)) as oracle:
        t.base_url = oracle.base_url
        first = collect_need("decompositions", cfg, examples)
        served = oracle.stats()
        again = collect_need("decompositions", cfg, examples)
        after = oracle.stats()

    assert first.table == "decompositions_soc_test"
    db = open_db(cfg.lancedb_uri)
    assert {"decompositions_soc_test", "decomposition_failures_soc_test"} <= set(table_names(db))
    assert "teacher_failures_soc_test" not in table_names(db)
    failed = {r["id"]: r for r in read_rows(db, "decomposition_failures_soc_test")}
    assert set(first.by_id) | set(failed) == {ex.id for ex in examples} and not set(first.by_id) & set(failed)
    assert failed["odd/0"]["reason"] == "no_answer: the reply does not end with the answer sentence"
    assert len(first.by_id) >= 0.8 * len(train)
    gold = {ex.id: ex for ex in train}
    for i, row in first.by_id.items():
        assert set(row) == set(DECOMPOSITIONS_SCHEMA.names)
        assert steps_of(row) == gold[i].decomposition and row["steps"] == len(gold[i].decomposition)
    s = first.stats
    assert s["reasks"] > 0 and s["transport_retries"] > 0 and served["kind_decomposition"] > 0
    # A rerun asks the teacher nothing and keeps the same chains.
    assert after["requests"] == served["requests"] and again.stats["cache_hits"] > 0
    assert {i: r["decomposition"] for i, r in again.by_id.items()} == {i: r["decomposition"] for i, r in first.by_id.items()}


# --- the pair: a tiny base and two adapters --------------------------------------------------

CONTEXT = 256
STEP_TOKENS = 12


def _teacher_rows(examples) -> dict[str, dict]:
    return {ex.id: {"decomposition": json.dumps([dataclasses.asdict(s) for s in ex.decomposition])} for ex in examples}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny base trained briefly on both roles' rows, plus two LoRA adapters with random
    (non-zero) weights, so the two students answer the same prompt differently."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from distill_ray.serve.multiplex import write_adapters
    from distill_ray.train.student import TinySpec, tiny_model, train_tokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    train, test = generate(90, 6, seed=2)
    ctx = MethodContext(Config(), {"decompositions": _teacher_rows(train)})
    decomposer, solver = role_rows(train, ctx)
    texts = [r.prompt + r.target for r in decomposer + solver]
    tok = train_tokenizer(texts + [question_prompt(ex.question) for ex in test])
    model = tiny_model(tok, TinySpec(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, max_positions=CONTEXT))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        batch = [texts[i] + tok.eos_token for i in torch.randint(len(texts), (32,), generator=gen).tolist()]
        enc = tok(batch, return_tensors="pt", padding=True)
        loss = model(**enc, labels=enc.input_ids.masked_fill(enc.attention_mask == 0, -100)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    root = tmp_path_factory.mktemp("pair")
    model.save_pretrained(root)
    tok.save_pretrained(root)
    adapters = {}
    for seed, name in enumerate((DECOMPOSER, SOLVER)):
        torch.manual_seed(100 + seed)
        lora = get_peft_model(type(model)(model.config), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                   init_lora_weights=False))
        adapters[name] = str(root / "adapters" / name)
        lora.save_pretrained(adapters[name])
    write_adapters(str(root), adapters)
    local = PeftModel.from_pretrained(model, adapters[DECOMPOSER], adapter_name=DECOMPOSER)
    local.load_adapter(adapters[SOLVER], adapter_name=SOLVER)
    local.eval()
    yield {"dir": str(root), "model": local, "tok": tok, "train": train, "test": test}
    torch.set_num_threads(threads)


def local_complete(pair, adapter: str, prompt: str, max_tokens: int) -> tuple[str, int, int]:
    """(text, prompt tokens, completion tokens): greedy `generate` with `adapter`, cut at a newline."""
    model, tok = pair["model"], pair["tok"]
    model.set_adapter(adapter)
    ids = tok(prompt)["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=max_tokens, pad_token_id=tok.pad_token_id)
    new = out[0, len(ids):].tolist()
    for k in range(1, len(new) + 1):
        text = tok.decode(new[:k], skip_special_tokens=True)
        if "\n" in text:
            return text[: text.index("\n")], len(ids), k
        if new[k - 1] == tok.eos_token_id:
            return text, len(ids), k
    return tok.decode(new, skip_special_tokens=True), len(ids), len(new)


def local_dialogue(pair, question: str, max_steps: int) -> tuple[str, list[tuple[str, int, int]]]:
    """The dialogue written out by hand: (reply text, (model, prompt, completion tokens) per call)."""
    steps, calls = [], []
    for _ in range(max_steps):
        asked, p, c = local_complete(pair, DECOMPOSER, decomposer_prompt(question, steps), STEP_TOKENS)
        calls.append((DECOMPOSER, p, c))
        if is_done(asked) or not one_line(asked):
            return reply_text(steps, limit_hit=False), calls
        answered, p, c = local_complete(pair, SOLVER, solver_prompt(question, steps, asked), STEP_TOKENS)
        calls.append((SOLVER, p, c))
        steps.append(Step(one_line(asked), one_line(answered)))
    return reply_text(steps, limit_hit=True), calls


@pytest.fixture(scope="module")
def server(pair, ray_runtime):
    from distill_ray.serve import deploy_student, shutdown_serve

    cfg = Config(serve=ServeConfig(port=0, max_batch_size=8, max_new_tokens=STEP_TOKENS))
    cfg.method.name = "socratic"
    cfg.method.socratic.max_steps = 3
    cfg.method.socratic.step_max_tokens = STEP_TOKENS
    url = deploy_student(cfg, pair["dir"], app=get_recipe("socratic").serve_app)
    yield cfg, url
    shutdown_serve()


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server[1], api_key="x", max_retries=0, timeout=120)


def test_models_lists_the_pair_and_both_adapters(server):
    reply = httpx.get(f"{server[1]}/models", timeout=30).json()
    assert [m["id"] for m in reply["data"]] == ["student", DECOMPOSER, SOLVER]
    assert {m["max_model_len"] for m in reply["data"]} == {CONTEXT}


def test_two_adapters_on_one_base_loaded_once(pair, server, client):
    prompt = decomposer_prompt(pair["test"][0].question, [])
    got = {}
    for adapter in (DECOMPOSER, SOLVER, DECOMPOSER):  # back and forth: no reload, same answers
        r = client.completions.create(model=adapter, prompt=prompt, max_tokens=STEP_TOKENS, temperature=0, stop=["\n"])
        text, p, c = local_complete(pair, adapter, prompt, STEP_TOKENS)
        assert (r.choices[0].text, r.usage.prompt_tokens, r.usage.completion_tokens) == (text, p, c)
        got.setdefault(adapter, set()).add(r.choices[0].text)
    assert got[DECOMPOSER] != got[SOLVER] and len(got[DECOMPOSER]) == 1  # the request's model picks the adapter
    chat = client.chat.completions.create(model=SOLVER, messages=[{"role": "user", "content": prompt}],
                                          max_tokens=STEP_TOKENS, temperature=0, stop=["\n"])
    assert chat.choices[0].message.content == local_complete(pair, SOLVER, prompt, STEP_TOKENS)[0]
    stats = httpx.get(server[1].removesuffix("/v1") + "/debug/adapters", timeout=30).json()
    assert stats["base_loads"] == 1 and stats["adapters"] == [DECOMPOSER, SOLVER]
    assert set(stats["adapter_base_ids"].values()) == {stats["base_id"]}


def test_dialogue_alternates_the_students_and_sums_usage(pair, server):
    question = pair["test"][1].question
    body = {"model": "student", "prompt": question_prompt(question), "temperature": 0, "max_tokens": 40}
    reply = httpx.post(f"{server[1]}/completions", json=body, timeout=120).json()
    want_text, want_calls = local_dialogue(pair, question, max_steps=3)
    text = reply["choices"][0]["text"]
    assert text == want_text
    usage = reply["usage"]
    assert [(c["model"], c["prompt_tokens"], c["completion_tokens"]) for c in usage["calls"]] == want_calls
    assert usage["prompt_tokens"] == sum(p for _, p, _ in want_calls)
    assert usage["completion_tokens"] == sum(c for _, _, c in want_calls)
    # Guard the test's own strength: the dialogue took steps and asked both students.
    assert count_steps(text) >= 1 and {m for m, _, _ in want_calls} == {DECOMPOSER, SOLVER}


def test_a_prompt_list_runs_one_dialogue_per_prompt(pair, server, client):
    questions = [pair["test"][3].question, pair["test"][4].question]
    r = client.completions.create(model="student", prompt=[question_prompt(q) for q in questions], temperature=0)
    want = [local_dialogue(pair, q, max_steps=3) for q in questions]
    assert [c.text for c in r.choices] == [text for text, _ in want]
    assert len(r.usage.model_extra["calls"]) == sum(len(calls) for _, calls in want)


def test_step_limit_cuts_the_dialogue(pair, server, client):
    question = pair["test"][2].question
    want_text, want_calls = local_dialogue(pair, question, max_steps=1)
    assert STEP_LIMIT_NOTE in want_text, "the decomposer finished within one step; the limit was not exercised"
    r = client.completions.create(model="student", prompt=question_prompt(question), temperature=0,
                                  extra_body={"max_steps": 1})
    assert r.choices[0].text == want_text and r.choices[0].finish_reason == "length"
    assert count_steps(r.choices[0].text) == 1 and len(r.usage.model_extra["calls"]) == 2
    # The configured limit (3) applies without the override.
    full = client.completions.create(model="student", prompt=question_prompt(question), temperature=0)
    assert count_steps(full.choices[0].text) <= 3 and len(full.usage.model_extra["calls"]) <= 7


def test_bad_requests_get_openai_errors(server, client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="nope", prompt="Question: x ?\nAnswer:")
    with pytest.raises(openai.BadRequestError, match="max_steps must be a positive integer"):
        client.completions.create(model="student", prompt="Question: x ?\nAnswer:", extra_body={"max_steps": 0})
    with pytest.raises(openai.BadRequestError, match="n=2"):
        client.completions.create(model="student", prompt="Question: x ?\nAnswer:", n=2)


def test_evaluation_counts_steps_calls_and_flops_of_both_models(pair, server):
    from distill_ray.evaluate.flops import flops_model
    from distill_ray.evaluate.stage import evaluate_endpoint

    cfg, url = server
    examples = pair["test"][:4]
    report = evaluate_endpoint(cfg, examples, get_recipe("socratic"), url, pair["dir"], progress=False)
    fm = flops_model(pair["dir"])
    assert len(report.predictions) == 4
    for p, ex in zip(sorted(report.predictions, key=lambda p: p["id"]), sorted(examples, key=lambda e: e.id)):
        text, calls = local_dialogue(pair, ex.question, max_steps=3)
        assert p["status"] == "kept" and p["output"] == text
        assert p["steps"] == count_steps(text) == p.get(f"calls.{SOLVER}", 0)
        assert p["calls"] == len(calls) == p[f"calls.{DECOMPOSER}"] + p.get(f"calls.{SOLVER}", 0)
        # Every call priced at its own context: not the summed tokens priced as one call.
        per_call = [fm.example(pt, ct)["flops_total"] for _, pt, ct in calls]
        assert p["flops_total"] == pytest.approx(sum(per_call))
        assert p["flops_total"] < fm.example(p["prompt_tokens"], p["completion_tokens"])["flops_total"] or p["calls"] == 1
        by_model = p[f"flops_total.{DECOMPOSER}"] + p.get(f"flops_total.{SOLVER}", 0.0)
        assert by_model == pytest.approx(p["flops_total"])
    assert any(p["calls"] > 1 for p in report.predictions)
    m = report.metrics
    assert m["steps_mean"] == pytest.approx(sum(p["steps"] for p in report.predictions) / 4)
    assert {f"calls.{DECOMPOSER}_mean", f"flops_total.{SOLVER}_mean"} <= set(m)
