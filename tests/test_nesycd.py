"""NesyCD: the knowledge base (real LanceDB, real MiniLM), its retrieval modes, `distill-ray kb`,
the teacher's error analysis, and the student + KB endpoint on real Ray Serve.

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
from distill_ray.knowledge.kb import Entry, KBError, KnowledgeBase
from distill_ray.knowledge.kb_search import search
from distill_ray.methods import nesycd
from distill_ray.methods.recipe import question_prompt
from distill_ray.serve.backend import SamplingParams, eos_token_ids
from distill_ray.serve.decoding import decode_batch
from distill_ray.teacher.error_plan import build_error_plan
from distill_ray.teacher.knowledge_plan import parse_knowledge
from distill_ray.teacher.oracle_answers import reply_to
from distill_ray.tasks.synthetic import generate

UNITS = {"zorp": "blip", "gorn": "dram", "quib": "blip", "snib": "dram", "fent": "blip", "wub": "dram"}
PLIM = "Supplementary Knowledge: 1. 1 plim = 9 blips"
NURL = "Supplementary Knowledge: 1. 1 nurl = 5 drams"
CHAIN = "Learning Summary: 1. apply each change in the order it is told Supplementary Knowledge: 1. doubling means multiplying by 2"


def unit_question(unit: str, c1: int, c2: int) -> str:
    base = UNITS.get(unit, "blip")
    return f"Ana has {c1} {unit}s and {c2} {base}s . How many {base}s is that ?"


def make_kb(tmp_path, texts=(PLIM, NURL, CHAIN), **kw) -> KnowledgeBase:
    kb = KnowledgeBase(str(tmp_path / "lancedb"), "kb_test", "all-MiniLM-L6-v2", **kw)
    kb.add([Entry(t, "synthetic/unit_conversion", sources=(f"e{i}",), origin="teacher") for i, t in enumerate(texts)])
    return kb


# --- the knowledge base -----------------------------------------------------------------


def test_near_duplicates_merge_and_every_change_is_a_version(tmp_path):
    kb = make_kb(tmp_path)
    v0 = kb.version
    assert [r["sources"] for r in sorted(kb.rows(), key=lambda r: r["sources"])] == [["e0"], ["e1"], ["e2"]]
    # Same fact in other words' spacing: merged into the existing entry, its source recorded there.
    report = kb.add([Entry("Supplementary  Knowledge: 1. 1 plim = 9 blips", "synthetic/unit_conversion",
                           sources=("e9",), origin="teacher")])
    assert report.added == [] and len(report.merged) == 1
    plim = next(r for r in kb.rows() if "plim" in r["text"])
    assert plim["sources"] == ["e0", "e9"]
    assert kb.version > v0
    # Identical analyses of three errors: one entry, the other two merged into it, all three sources kept.
    same = "Supplementary Knowledge: 1. 1 zorb = 4 quibs"
    report = kb.add([Entry(same, "synthetic/unit_conversion", sources=(f"z{i}",), origin="teacher") for i in range(3)])
    assert len(report.added) == 1 and [t for _, t in report.merged] == [report.added[0]] * 2
    assert next(r for r in kb.rows() if r["id"] == report.added[0])["sources"] == ["z0", "z1", "z2"]
    kb.remove(report.added)
    # A shared learning summary makes two analyses embed almost alike; the units they define
    # differ, so merging would lose one: both stay.
    summary = ("Learning Summary: 1. recall how many base units one of each unit is worth 2. multiply each count "
               "by the size of its unit in base units 3. a count already in the base unit stays as it is 4. add "
               "the converted amounts to get the total Supplementary Knowledge: 1. 1 zorp = 4 blips 2. ")
    facts = ("1 quib = 6 blips 3. 5 * 4 = 20 4. 3 * 6 = 18 5. 20 + 18 = 38",
             "1 trell = 8 blips 3. 5 * 4 = 20 4. 3 * 8 = 24 5. 20 + 24 = 44")
    pair = [Entry(summary + fact, "synthetic/unit_conversion", sources=(f"u{i}",), origin="teacher")
            for i, fact in enumerate(facts)]
    a, b = kb._embed([e.text for e in pair])
    assert float(a @ b) >= kb.dedup_threshold
    report = kb.add(pair)
    assert len(report.added) == 2 and report.merged == []
    kb.remove(report.added)
    # Another task is never merged into, however similar.
    report = kb.add([Entry(PLIM, "synthetic/chain", origin="user")])
    assert len(report.added) == 1
    # Old versions stay readable: the KB as the first run saw it.
    assert len(kb.rows(version=v0)) == 3 and len(kb.rows()) == 4
    removed_at = kb.remove([report.added[0]])
    assert removed_at == kb.version and len(kb.rows()) == 3
    with pytest.raises(KBError, match="no entry with id 'nope' in knowledge base 'kb_test'; nothing deleted"):
        kb.remove(["nope", plim["id"]])
    assert len(kb.rows()) == 3
    assert "FTS" in kb.stats()["indices"]


def test_export_import_round_trip_and_a_bad_import_changes_nothing(tmp_path):
    kb = make_kb(tmp_path)
    out = tmp_path / "kb.jsonl"
    assert kb.export_jsonl(out) == 3
    copy = KnowledgeBase(kb.uri, "kb_copy", kb.model)
    copy.import_jsonl(out)
    assert sorted(r["text"] for r in copy.rows()) == sorted(r["text"] for r in kb.rows())
    assert {r["id"] for r in copy.rows()} == {r["id"] for r in kb.rows()}

    version, rows = kb.version, kb.rows()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "1 hoff = 8 drams"}) + "\n" + json.dumps({"text": "  "}) + "\n")
    with pytest.raises(KBError, match="line 2: 'text' must be non-empty"):
        kb.import_jsonl(bad)
    bad.write_text(json.dumps({"text": "1 hoff = 8 drams"}) + "\n{not json\n")
    with pytest.raises(KBError, match="line 2: not JSON"):
        kb.import_jsonl(bad)
    bad.write_text(json.dumps({"text": "x", "colour": "red"}) + "\n")
    with pytest.raises(KBError, match=r"line 1: unknown field\(s\) \['colour'\]"):
        kb.import_jsonl(bad)
    with pytest.raises(KBError, match="already in knowledge base"):
        kb.import_jsonl(out)  # the same ids again
    assert kb.version == version and kb.rows() == rows


@pytest.mark.parametrize("mode", ["bm25", "dense", "hybrid"])
def test_each_retrieval_mode_finds_the_entry_about_the_question(tmp_path, mode):
    kb = make_kb(tmp_path)
    plim, nurl = (unit_question("plim", 3, 5), "Bo has 4 nurls and 2 drams . How many drams is that ?")
    hits = search(kb, [plim, nurl], mode=mode, k=2)
    assert [h[0].text for h in hits] == [PLIM, NURL]
    assert all(len(h) == 2 for h in hits)
    top, second = hits[0]
    assert top.similarity > second.similarity and top.similarity >= 0.3
    # A question never retrieves the analysis of its own error.
    excluded = search(kb, [plim], mode=mode, k=3, exclude_sources=[{"e0"}])[0]
    assert PLIM not in [h.text for h in excluded]


def test_a_training_question_skips_only_entries_about_its_own_error_alone(tmp_path):
    kb = make_kb(tmp_path)
    q = unit_question("plim", 3, 5)
    # e9's analysis states the same fact: the entry stays in the KB without e0's error.
    assert len(kb.add([Entry(PLIM, "synthetic/unit_conversion", sources=("e9",), origin="teacher")]).merged) == 1
    assert search(kb, [q], mode="hybrid", k=1, exclude_sources=[{"e0"}])[0][0].text == PLIM
    assert PLIM not in [h.text for h in search(kb, [q], mode="hybrid", k=3, exclude_sources=[{"e0", "e9"}])[0]]
    # An entry people wrote has no source error and is never excluded.
    kb.add([Entry("Supplementary Knowledge: 1. 1 plim = 9 blips , always", "synthetic/unit_conversion", origin="user")])
    texts = [h.text for h in search(kb, [q], mode="bm25", k=4, exclude_sources=[{"e0", "e9"}])[0]]
    assert "Supplementary Knowledge: 1. 1 plim = 9 blips , always" in texts


def test_one_question_searches_without_writing_to_the_embedding_cache(tmp_path):
    """A served request embeds its one query in memory: a cache miss would commit a table
    version per request (about 350 in one evaluation of 600 questions, ever slower)."""
    from distill_ray.knowledge.embed_cache import as_cache
    from distill_ray.store import open_db

    kb = make_kb(tmp_path)
    cache = as_cache(kb.uri, kb.model)
    table = open_db(kb.uri).open_table(cache.table)
    before = table.version
    search(kb, [unit_question("plim", 3, 5)], mode="dense", k=1)
    table.checkout_latest()
    assert table.version == before
    search(kb, [unit_question("plim", 3, 5)], mode="dense", k=1, cache_queries=True)  # bulk: cached
    table.checkout_latest()
    assert table.version == before + 1


def test_hybrid_fuses_by_reciprocal_rank(tmp_path):
    kb = make_kb(tmp_path)
    q = unit_question("plim", 3, 5)
    bm25 = search(kb, [q], mode="bm25", k=3)[0]
    dense = search(kb, [q], mode="dense", k=3)[0]
    hybrid = search(kb, [q], mode="hybrid", k=3)[0]
    rank = lambda hits: {h.id: r for r, h in enumerate(hits, start=1)}  # noqa: E731
    rb, rd = rank(bm25), rank(dense)
    for h in hybrid:
        want = sum(1 / (60 + r[h.id]) for r in (rb, rd) if h.id in r)
        assert math.isclose(h.score, want, rel_tol=1e-9)


def test_kb_command_line(tmp_path, capsys):
    base = ["-c", "ray_config.yaml", "--set", f"storage.root={tmp_path}", "--set", "run_name=cli"]

    def kb(*args: str) -> tuple[int, str, str]:
        code = main(["kb", *base, *args])
        out = capsys.readouterr()
        return code, out.out, out.err

    code, _, err = kb("stats")
    assert code == 2 and "does not exist" in err
    code, out, _ = kb("add", PLIM, "--task", "synthetic/unit_conversion")
    assert code == 0 and "added user-" in out
    entry_id = out.split()[1].rstrip(";")
    assert kb("add", NURL)[0] == 0
    code, out, _ = kb("search", unit_question("plim", 2, 2), "--mode", "bm25", "-k", "1")
    assert code == 0 and entry_id in out and "plim" in out
    code, out, _ = kb("show", entry_id)
    assert json.loads(out)["text"] == PLIM
    code, out, _ = kb("stats")
    assert json.loads(out)["entries"] == 2
    export = tmp_path / "out.jsonl"
    assert kb("export", str(export))[0] == 0 and len(export.read_text().splitlines()) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "1 hoff = 8 drams", "origin": "robot"}) + "\n")
    version = json.loads(kb("stats")[1])["version"]
    code, _, err = kb("import", str(bad))
    assert code == 2 and "line 1: 'origin' must be one of" in err
    assert json.loads(kb("stats")[1])["version"] == version
    code, _, err = kb("rm", "user-nope")
    assert code == 2 and "no entry with id 'user-nope'" in err
    assert kb("rm", entry_id)[0] == 0
    assert json.loads(kb("stats")[1])["entries"] == 1
    code, _, err = kb("show", entry_id)
    assert code == 2 and "no entry" in err
    # Options may also follow the action, as the README writes them.
    assert main(["kb", "stats", "-c", "ray_config.yaml", "--set", f"storage.root={tmp_path}", "--set", "run_name=cli"]) == 0
    assert json.loads(capsys.readouterr().out)["entries"] == 1
    assert main(["kb", "--set", f"storage.root={tmp_path}", "stats", "--set", "run_name=other"]) == 2
    assert "kb_other" in capsys.readouterr().err


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
    torch.set_num_threads(1)
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

    from distill_ray.serve.deploy import deploy_student

    questions = [reader_question(u, c) for u, c in [("quib", 3), ("zorp", 5), ("gorn", 2), ("fent", 7)]]
    cfg = _cfg(tmp_path, gate_confidence=1e-6)
    nesycd.knowledge_base(cfg).add([Entry("Supplementary Knowledge: 1. 1 quib = 8 blips", "synthetic/unit_conversion")])
    url = deploy_student(cfg, reader[0], app=nesycd.serve_app, app_name="gated", route_prefix="/gated")
    client = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=120)
    always_sure = client.completions.create(model="student", prompt=[question_prompt(q) for q in questions], max_tokens=48, temperature=0)
    assert always_sure.model_extra["retrieval_skipped"] == [True] * 4
    assert always_sure.model_extra["knowledge"] == [[]] * 4
    confidences = always_sure.model_extra["confidence"]
    serve.delete("gated")
    # A threshold between the questions' confidences: the sure ones skip the KB, the others use it.
    threshold = sorted(confidences)[2]
    url = deploy_student(_cfg(tmp_path, gate_confidence=threshold), reader[0], app=nesycd.serve_app,
                         app_name="gated", route_prefix="/gated")
    client = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=120)
    gated = client.completions.create(model="student", prompt=[question_prompt(q) for q in questions], max_tokens=48, temperature=0)
    skipped = gated.model_extra["retrieval_skipped"]
    assert skipped == [c >= threshold for c in confidences] and 0 < sum(skipped) < 4
    retrieved = [k for k, s in zip(gated.model_extra["knowledge"], skipped) if not s]
    assert any(k and "quib" in k[0]["text"] for k in retrieved) or "quib" not in " ".join(
        q for q, s in zip(questions, skipped) if not s)
    # Usage counts both calls where the gate let retrieval happen, and lists each call.
    assert gated.usage.prompt_tokens > always_sure.usage.prompt_tokens
    calls = gated.usage.model_extra["calls"]
    assert len(calls) == sum(1 if s else 2 for s in skipped)
    assert sum(c["prompt_tokens"] for c in calls) == gated.usage.prompt_tokens
    serve.delete("gated")
