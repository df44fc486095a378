"""SKIntern's knowledge K: the parser, the oracle's K, the stage under faults, the table and its embeddings.

Real components throughout: the oracle subprocess, a local Ray, LanceDB in tmp_path and
the packaged all-MiniLM-L6-v2.
"""
from __future__ import annotations

import dataclasses
import random

import numpy as np
import pyarrow as pa
import pytest
import ray

from distill_ray.config import Config, FaultConfig
from distill_ray.knowledge.embed import EMBED_DIM, embed_table, embed_texts, resolve_model
from distill_ray.knowledge.table import KNOWLEDGE_SCHEMA, ROW_COLUMNS
from distill_ray.tasks.synthetic import FAMILIES, RARE_UNITS, generate
from distill_ray.teacher.knowledge_plan import (
    KnowledgeFormatError,
    build_knowledge_plan,
    parse_knowledge,
)
from distill_ray.teacher.oracle import start_oracle
from distill_ray.teacher.oracle_answers import NON_ANSWER, corrupt, reply_to
from distill_ray.teacher.prompts import COT_SYSTEM, KNOWLEDGE_SYSTEM, cot_messages, render_knowledge

pytestmark = pytest.mark.timeout(300)

GOOD = """Learning Summary:
1. convert every amount to the base unit
2. add the converted amounts
Supplementary Knowledge:
1. 1 vask = 5 blips
2. 3 * 5 = 15"""


@pytest.fixture(scope="module")
def ray_runtime():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _reason(text: str) -> str:
    with pytest.raises(KnowledgeFormatError) as info:
        parse_knowledge(text)
    return info.value.reason


# ------------------------------------------------------------------ the parser


def test_parser_reads_both_layouts_and_round_trips():
    k = parse_knowledge(GOOD)
    assert k.summary == ("convert every amount to the base unit", "add the converted amounts")
    assert k.supplementary == ("1 vask = 5 blips", "3 * 5 = 15")
    assert k.text == ("Learning Summary: 1. convert every amount to the base unit 2. add the converted amounts "
                      "Supplementary Knowledge: 1. 1 vask = 5 blips 2. 3 * 5 = 15")
    assert parse_knowledge(k.text) == k  # the one-line form stored for students reads back the same
    assert parse_knowledge(render_knowledge(k.summary, k.supplementary)) == k
    # What chat models add unasked: a preface, markdown headings, wrapped items, "1)" markers.
    chatty = ("Sure, here it is.\n\n**Learning Summary:**\n1) convert every amount\n   to the base unit\n"
              "2) add the converted amounts\n\n**Supplementary Knowledge:**\n1) 1 vask = 5 blips\n2) 3 * 5 = 15\n")
    assert parse_knowledge(chatty).summary[0] == "convert every amount to the base unit"
    assert parse_knowledge(chatty).supplementary == k.supplementary
    # A number inside an item is not the next marker unless it is the next number.
    inline = "Learning Summary: 1. count in 2 steps 2. add Supplementary Knowledge: 1. 1 plim = 9 blips"
    assert parse_knowledge(inline).summary == ("count in 2 steps", "add")


@pytest.mark.parametrize("text, reason", [
    ("", "empty_knowledge"),
    ("   \n ", "empty_knowledge"),
    (NON_ANSWER, "malformed_knowledge: no 'Learning Summary:' section"),
    (GOOD.split("Supplementary")[0], "malformed_knowledge: no 'Supplementary Knowledge:' section"),
    ("Supplementary Knowledge:\n1. 1 vask = 5 blips", "malformed_knowledge: no 'Learning Summary:' section"),
    (GOOD.replace("1. convert", "convert"), "malformed_knowledge: 'Learning Summary:' does not start"),
    (GOOD.replace("2. 3 * 5 = 15", "2."), "malformed_knowledge: 'Supplementary Knowledge:' item 2 is empty"),
    (GOOD.replace("2. add", "3. add"), "malformed_knowledge: 'Learning Summary:' item 2 is numbered 3"),
    (GOOD.replace("1. 1 vask = 5 blips\n2. 3 * 5 = 15", ""), "malformed_knowledge: 'Supplementary Knowledge:' has no"),
    ("Learning Summary: Supplementary Knowledge: 1. x", "malformed_knowledge: 'Learning Summary:' has no items"),
    ("Learning Summary: add them Supplementary Knowledge: 1. x", "malformed_knowledge: 'Learning Summary:' is not"),
    (GOOD + "\nLearning Summary:\n1. again", "malformed_knowledge: 'Learning Summary:' appears more than once"),
])
def test_parser_rejects_what_is_not_knowledge(text, reason):
    assert _reason(text).startswith(reason)


def test_render_refuses_empty_or_multiline_items():
    with pytest.raises(ValueError, match="learning summary must be a non-empty list"):
        render_knowledge([], ["x"])
    with pytest.raises(ValueError, match="supplementary knowledge item 2"):
        render_knowledge(["a"], ["x", " "])
    with pytest.raises(ValueError, match="learning summary item 1"):
        render_knowledge(["a\nb"], ["x"])


def test_plan_keeps_parsed_knowledge_and_reasks_at_rising_temperature():
    train, _ = generate(3, 0, seed=41)
    plan = build_knowledge_plan(Config().teacher, train)
    row = train[0].to_row()
    requests = [plan.requests(row, a) for a in range(plan.max_tries)]
    assert [r.temperature for r in requests] == [0.0, 0.7, 1.0, 1.5]
    system, user = requests[0].messages
    assert system["content"] == KNOWLEDGE_SYSTEM and KNOWLEDGE_SYSTEM[:40] != COT_SYSTEM[:40]
    # The gold answer is given; the worked examples come from the same family.
    assert user["content"].endswith(f"Question: {train[0].question}\nAnswer: {train[0].answer}")
    assert user["content"].count("Learning Summary:") == 3
    ok, reason, payload = plan.check(row, GOOD)
    assert ok and reason == "" and payload["knowledge"] == parse_knowledge(GOOD).text
    ok, _, payload = plan.check(row, GOOD + "\n\nQuestion: Eli has 2 vasks and 3 blips . How many blips is that ?")
    assert ok and payload["supplementary"] == '["1 vask = 5 blips", "3 * 5 = 15"]'
    ok, reason, payload = plan.check(row, NON_ANSWER)
    assert not ok and reason.startswith("malformed_knowledge") and payload == {}


# ------------------------------------------------------------------ the oracle's K


def _oracle_knowledge(ex) -> tuple[str, str]:
    plan = build_knowledge_plan(Config().teacher, [ex])
    return reply_to(messages=list(plan.requests(ex.to_row(), 0).messages))


def test_oracle_writes_the_questions_facts_for_every_family():
    train, test = generate(45, 60, seed=42)
    rare_seen = set()
    for ex in train + test:
        text, kind = _oracle_knowledge(ex)
        assert kind == "knowledge"
        k = parse_knowledge(text)
        assert set(ex.knowledge) <= set(k.supplementary), (ex.question, text)
        family = ex.meta["family"]
        if family == "unit_conversion":
            for unit in ex.meta["units"]:
                assert any(f.startswith(f"1 {unit} = ") for f in k.supplementary), text
            rare_seen |= set(ex.meta["units"]) & set(RARE_UNITS)
        if family == "chain":
            assert any("means" in f for f in k.supplementary)
        assert "answer is" not in text  # knowledge, not a worked solution
    assert rare_seen and {ex.meta["family"] for ex in train} == set(FAMILIES)
    # Same family, same learning summary; another family, another one.
    by_family = {ex.meta["family"]: parse_knowledge(_oracle_knowledge(ex)[0]).summary for ex in train}
    assert len(set(by_family.values())) == len(FAMILIES)
    # A CoT prompt is still answered with a rationale, an unknown question with a non-answer.
    assert reply_to(messages=list(cot_messages(train[0].question))) == (train[0].rationale, "cot")
    odd = dataclasses.replace(train[0], question="What is the capital of France?")
    text, _ = _oracle_knowledge(odd)
    assert text == NON_ANSWER and _reason(text).startswith("malformed_knowledge")


def test_oracle_wrong_knowledge_is_always_rejected():
    (ex,), _ = generate(1, 0, seed=43)
    text, kind = _oracle_knowledge(ex)
    ways = {"no 'Supplementary Knowledge:' section": "cut", "is empty": "blank item", "does not start": "unnumbered"}
    seen = set()
    for seed in range(30):
        reason = _reason(corrupt(text, random.Random(seed), kind))
        seen |= {name for part, name in ways.items() if part in reason}
    assert seen == set(ways.values())
    with pytest.raises(ValueError, match="unknown oracle prompt kind 'essay'"):
        corrupt(text, random.Random(0), "essay")


# ------------------------------------------------------------------ embeddings


def test_embeddings_are_unit_float32_and_semantically_sensible():
    texts = [
        "Ana has 3 vasks and 4 blips . How many blips is that ?",
        "Ben has 7 vasks and 2 trells . How many blips is that ?",
        "Cal has 2 boxes of 8 beads and gives away 2 . How many beads are left ?",
        "1 vask = 5 blips",
    ]
    v = embed_texts(texts)
    assert v.dtype == np.float32 and v.shape == (4, EMBED_DIM)
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    sim = v @ v.T
    assert sim[0, 1] > sim[0, 2] + 0.2  # same rare unit: closer than an unrelated question
    assert sim[3, 0] > sim[3, 2] and sim[3, 1] > sim[3, 2]  # the unit's definition is nearer its questions
    assert np.allclose(embed_texts(texts[:1]), v[:1], atol=1e-5)  # batching does not change a vector
    with pytest.raises(ValueError, match="one string"):
        embed_texts("a single string")
    with pytest.raises(ValueError, match="item 1 is ''"):
        embed_texts(["fine", ""])
    with pytest.raises(ValueError, match="not a sentence-transformers directory"):
        resolve_model("/nonexistent/model")


def test_ray_data_stage_matches_driver_embeddings(ray_runtime):
    cfg = Config()
    cfg.knowledge.batch_size = 4  # several batches through the one actor
    questions = [ex.question for ex in generate(10, 0, seed=44)[0]]
    table = pa.table({"id": [str(i) for i in range(10)], "question": questions})
    out = embed_table(table, cfg.knowledge, {"question": "question_vector"})
    assert out.num_rows == 10 and out.schema.field("question_vector").type == pa.list_(pa.float32(), EMBED_DIM)
    got = {r["id"]: r["question_vector"] for r in out.to_pylist()}
    want = embed_texts(questions)
    for i in range(10):
        assert np.allclose(got[str(i)], want[i], atol=1e-4)
    with pytest.raises(ValueError, match="no column 'text'"):
        embed_table(table, cfg.knowledge, {"text": "vector"})


# ------------------------------------------------------------------ the stage


def test_knowledge_stage_under_faults_then_from_cache(tmp_path, ray_runtime):
    from distill_ray.store import open_db, read_rows, read_table, table_names
    from distill_ray.teacher.needs import collect_need, run_tag
    from distill_ray.teacher.stage import collect_knowledge

    train, _ = generate(36, 0, seed=45)
    # A question the oracle does not know: re-asked, then failed, never stored as knowledge.
    odd = dataclasses.replace(train[0], id="odd/0", question="Why is the sky blue ?")
    examples = [*train, odd]
    faults = FaultConfig(p_5xx=0.15, p_malformed=0.1, p_wrong=0.3, seed=3)
    cfg = Config(run_name="kn test")
    cfg.storage.root = str(tmp_path / "runs")
    t = cfg.teacher
    t.num_actors, t.actor_cpus, t.max_in_flight, t.max_retries, t.max_tries = 2, 0.25, 8, 6, 4
    with start_oracle(faults) as oracle:
        t.base_url = oracle.base_url
        first = collect_knowledge(cfg, examples, run_tag=run_tag(cfg), progress=False)
        served = oracle.stats()
        need = collect_need("knowledge", cfg, examples)  # the rerun, through the recipe-facing door
        after = oracle.stats()

    assert first.table == "knowledge_kn_test" and first.failures_table == "knowledge_failures_kn_test"
    db = open_db(cfg.lancedb_uri)
    assert "teacher_failures_kn_test" not in table_names(db)  # knowledge failures never mix with rationale ones
    kept = read_table(db, first.table, version=first.table_versions[first.table])
    failed = read_rows(db, first.failures_table, version=first.table_versions[first.failures_table])
    kept_ids, failed_ids = kept.column("id").to_pylist(), [r["id"] for r in failed]
    assert len(kept_ids) == len(set(kept_ids)) and len(failed_ids) == len(set(failed_ids))
    assert not set(kept_ids) & set(failed_ids) and set(kept_ids) | set(failed_ids) == {ex.id for ex in examples}
    odd_row = next(r for r in failed if r["id"] == "odd/0")
    assert odd_row["reason"].startswith("malformed_knowledge") and odd_row["attempts"] == 4
    assert {r["reason"].split(":")[0] for r in failed} <= {"http_5xx", "malformed", "malformed_knowledge",
                                                           "empty_knowledge"}
    assert len(kept_ids) >= 0.8 * len(train)

    # The table: fixed schema, K that parses, the question's facts, unit vectors of both texts.
    assert kept.schema == KNOWLEDGE_SCHEMA
    gold = {ex.id: ex for ex in train}
    rows = kept.to_pylist()
    for r in rows:
        k = parse_knowledge(r["text"])
        assert list(k.summary) == r["summary"] and list(k.supplementary) == r["supplementary"]
        assert set(gold[r["id"]].knowledge) <= set(r["supplementary"])
        assert r["teacher_model"] == "oracle" and 1 <= r["attempts"] <= 4
    for column in ("question_vector", "vector"):
        vectors = np.array(kept.column(column).to_pylist(), dtype=np.float32)
        assert vectors.shape == (len(rows), EMBED_DIM)
        assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert np.allclose(rows[0]["question_vector"], embed_texts([rows[0]["question"]])[0], atol=1e-4)
    assert np.allclose(rows[0]["vector"], embed_texts([rows[0]["text"]])[0], atol=1e-4)

    s = first.stats
    assert s["kept"] == len(rows) and s["failed"] == len(failed) and s["examples"] == len(examples)
    assert s["transport_retries"] > 0 and s["malformed_retries"] > 0 and s["reasks"] > 0
    assert s["failed_malformed_knowledge"] >= 1 and s["embed_s"] > 0
    # Fewer new texts than knowledge.pool_min_texts: embedded in this process, no actor pool.
    assert 0 < s["embed_new"] < cfg.knowledge.pool_min_texts and s["embed_pool_texts"] == 0
    assert s["http_requests"] == served["requests"] and served["kind_knowledge"] > 0
    assert s["prompt_tokens"] > 0 and s["completion_tokens"] > 0

    # The rerun asks the teacher nothing; the recipe gets K without the vectors.
    assert after["requests"] == served["requests"]
    assert need.stats["http_requests"] == 0 and need.stats["cache_hits"] > 0
    assert need.table == first.table and set(need.by_id) == set(kept_ids)
    assert need.versions[first.table] == first.table_versions[first.table] + 1
    some = need.by_id[kept_ids[0]]
    assert set(some) == set(ROW_COLUMNS) and some["text"].startswith("Learning Summary: 1. ")


def test_knowledge_stage_refuses_bad_input_before_any_work(tmp_path, ray_runtime):
    from distill_ray.teacher.stage import collect_knowledge

    train, _ = generate(3, 0, seed=46)
    cfg = Config()
    cfg.storage.root = str(tmp_path / "runs")
    cfg.teacher.base_url = "http://127.0.0.1:9/v1"
    with pytest.raises(ValueError, match="duplicate example ids"):
        collect_knowledge(cfg, [train[0], train[0]], progress=False)
    with pytest.raises(ValueError, match="run_tag 'a b'"):
        collect_knowledge(cfg, train, run_tag="a b", progress=False)
    cfg.knowledge.embedding_model = str(tmp_path / "no-model")
    with pytest.raises(ValueError, match="knowledge.embedding_model .*no-model"):
        collect_knowledge(cfg, train, progress=False)
    cfg.knowledge.embedding_model = "all-MiniLM-L6-v2"
    cfg.knowledge.embed_actors, cfg.knowledge.embed_cpus = 3, 1.0
    with pytest.raises(ValueError, match=r"knowledge.embed_actors x knowledge.embed_cpus = 3 x 1.0 = 3 CPUs"):
        collect_knowledge(cfg, train, progress=False)
