"""The baseline recipes (MT-CoT, CasCoD, KARD), NesyCD end to end, and `distill-ray compare` across them.

Row building is checked directly; then the CLI compares the baselines end to end on a
tiny config — real oracle, Ray Train + DeepSpeed, Ray Serve, MLflow server — with the
same step budget for each, and the table, plot and per-call costs are read back.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from distill_ray.config import Config, load_config
from distill_ray.methods import get_recipe, nesycd
from distill_ray.methods.recipe import MethodContext, question_prompt
from distill_ray.tasks.answers import score, without_answer_sentence
from distill_ray.tasks.synthetic import generate

REPO = Path(__file__).resolve().parents[1]


def _ctx(examples, cfg=None):
    cfg = cfg or load_config()
    kept = {ex.id: {"rationale": ex.rationale} for ex in examples[:-1]}  # the last one failed at the teacher
    return MethodContext(cfg, {"rationales": kept})


def test_without_answer_sentence():
    assert without_answer_sentence("3 * 4 = 12 . Therefore, the answer is 12.") == "3 * 4 = 12 ."
    assert without_answer_sentence("so the answer is (B).") == "so"
    assert without_answer_sentence("no answer sentence here") == "no answer sentence here"
    # Only the last answer sentence goes: an earlier one is part of the reasoning.
    text = "Therefore, the answer is 2 for part one . 2 + 3 = 5 . Therefore, the answer is 5."
    assert without_answer_sentence(text) == "Therefore, the answer is 2 for part one . 2 + 3 = 5 ."


def test_mt_cot_rows_weights_and_prompt():
    train, _ = generate(6, 3, seed=1)
    cfg = load_config(overrides=["method.mt_cot.rationale_weight=0.6", "method.mt_cot.answer_weight=0.4"])
    recipe = get_recipe("mt_cot")
    rows = recipe.train_rows(train, _ctx(train, cfg))
    assert len(rows) == 2 * (len(train) - 1)
    explain, predict = rows[0], rows[1]
    assert explain.prompt.startswith("[Explanation Generation] ") and explain.weight == 0.6
    assert explain.target.strip() == train[0].rationale
    assert predict.prompt.startswith("[Answer Prediction] ") and predict.weight == 0.4
    assert score(predict.target, train[0]) == (train[0].answer, True)
    assert recipe.prompt(train[0], {}) == predict.prompt


def test_cascod_rows_and_follow_up():
    train, _ = generate(6, 3, seed=2)
    recipe = get_recipe("cascod")
    rows = recipe.train_rows(train, _ctx(train))
    assert len(rows) == 2 * (len(train) - 1)
    first, second = rows[0], rows[1]
    assert first.prompt == question_prompt(train[0].question)
    assert "answer is" not in first.target and first.target.strip()
    assert second.prompt == f"{first.prompt}{first.target}"
    assert score(second.target, train[0]) == (train[0].answer, True)
    # The second call reads the first reply back without any answer sentence it carried.
    reply = f"{first.target} Therefore, the answer is 7."
    assert recipe.follow_up(train[0], {}, reply) == second.prompt
    assert recipe.prompt(train[0], {}) == question_prompt(train[0].question)


def test_kard_retrieves_others_knowledge_into_prompts(tmp_path):
    """Real MiniLM vectors in a real LanceDB table: a question never retrieves its own K."""
    import pyarrow as pa

    from distill_ray.knowledge.embed import embed_texts, vector_array
    from distill_ray.store import open_db
    from distill_ray.teacher.oracle_answers import synthetic_knowledge
    from distill_ray.teacher.prompts import render_knowledge

    train, test = generate(30, 9, seed=3, families=["unit_conversion"])
    texts = [render_knowledge(*synthetic_knowledge(ex.question), inline=True) for ex in train]
    db = open_db(str(tmp_path / "db"))
    db.create_table("knowledge_t", pa.table({
        "id": [ex.id for ex in train], "text": texts,
        "vector": vector_array(embed_texts(texts)),
    }))
    cfg = load_config(overrides=[f"storage.lancedb_uri={tmp_path / 'db'}", "method.kard.top_k=2"])
    kept = {ex.id: {"rationale": ex.rationale} for ex in train}
    ctx = MethodContext(cfg, {"rationales": kept}, {"knowledge": "knowledge_t"})
    recipe = get_recipe("kard")

    own = dict(zip((ex.id for ex in train), texts))
    rows = recipe.train_rows(train, ctx)
    assert len(rows) == len(train)
    for ex, row in zip(train, rows):
        assert row.prompt.startswith("Knowledge:\n- ") and row.prompt.endswith(question_prompt(ex.question))
        assert row.prompt.count("\n- ") == 2 and own[ex.id] not in row.prompt
        assert row.target.strip() == ex.rationale

    extras = recipe.annotate(test, ctx)
    hits = 0
    for ex in test:
        entries = extras[ex.id]["knowledge"]
        assert len(entries) == 2 and len(set(entries)) == 2
        # Retrieval is by meaning: most test questions find K naming one of their own units.
        hits += any(f"1 {u} =" in " ".join(entries) for u in ex.meta["units"] if u not in ("blip", "dram"))
        assert recipe.prompt(ex, extras[ex.id]).count("\n- ") == 2
    assert hits >= len(test) // 2


TINY = [
    "--set", "tasks.synthetic.train_size=240", "--set", "tasks.synthetic.test_size=30",
    "--set", "train.max_steps=12", "--set", "train.checkpoint_every=6", "--set", "train.batch_size=16",
    "--set", "eval.max_new_tokens=40", "--set", "run_name=cmp",
    # The recipes are under test here, not distribution (test_train, test_multinode): one
    # worker per fit spares five worker start-ups.
    "--set", "train.num_workers=1",
]


def test_compare_baselines_end_to_end(tmp_path, mlflow_server):
    methods = ["mt_cot", "cascod", "kard", "nesycd"]
    out = subprocess.run(
        [sys.executable, "-m", "distill_ray.cli", "compare", "--methods", ",".join(methods), *TINY,
         "--set", "method.nesycd.probe_size=40",
         "--set", f"storage.root={tmp_path}", "--set", f"tracking.uri={mlflow_server.uri}",
         "--set", "tracking.experiment=compare-test"],
        cwd=REPO, capture_output=True, text=True, timeout=1200,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    assert "FLOPs/ex" in out.stdout and all(m in out.stdout for m in methods)

    rows = {r["method"]: r for r in json.loads((tmp_path / "cmp" / "compare" / "comparison.json").read_text())}
    assert set(rows) == set(methods)
    assert {r["steps"] for r in rows.values()} == {12}, "every method trains for the same step budget"
    png = tmp_path / "cmp" / "compare" / "accuracy_vs_flops.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    client = mlflow.MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("compare-test")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert {"cmp-mt_cot", "cmp-cascod", "cmp/compare"} <= set(runs)
    cmp_run = runs["cmp/compare"]
    assert {a.path for a in client.list_artifacts(cmp_run.info.run_id)} >= {"accuracy_vs_flops.png", "comparison.json"}
    assert cmp_run.data.metrics["cascod.flops_mean"] == pytest.approx(rows["cascod"]["flops_mean"])

    # CasCoD pays for two calls per question; MT-CoT for one short answer.
    preds = {}
    for m in methods:
        parent = runs[f"cmp-{m}"]
        ev = next(r for r in client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
                  if r.data.tags.get("stage") == "eval")
        path = client.download_artifacts(ev.info.run_id, "predictions.jsonl", str(tmp_path / m))
        preds[m] = [json.loads(line) for line in Path(path).read_text().splitlines()]
        assert len(preds[m]) == 30
    assert {p["calls"] for p in preds["cascod"]} == {2}
    assert {p["calls"] for p in preds["mt_cot"]} == {1}
    assert all("\n--\n" in p["output"] for p in preds["cascod"])
    assert rows["cascod"]["prompt_tokens_mean"] > rows["mt_cot"]["prompt_tokens_mean"]
    # KARD pays for the retrieved knowledge in every prompt.
    assert rows["kard"]["prompt_tokens_mean"] > 2 * rows["mt_cot"]["prompt_tokens_mean"]
    assert {p["calls"] for p in preds["kard"]} == {1}
    # NesyCD: the general student's errors became a KB, the eval run records the version it read.
    assert "[nesycd] 2/4 probe: the general student answered 40 training questions" in out.stdout
    kb = nesycd.knowledge_base(Config.model_validate({"run_name": "cmp-nesycd", "storage": {"root": str(tmp_path)}}))
    stats = kb.stats()
    assert stats["entries"] >= 1 and stats["by_origin"] == {"teacher": stats["entries"]}
    assert 1 <= stats["entries"] <= stats["sources"] <= 40
    parent = runs["cmp-nesycd"]
    ev = next(r for r in client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
              if r.data.tags.get("stage") == "eval")
    assert ev.data.tags["kb.version"] == str(stats["version"])
    train_run = next(r for r in client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
                     if r.data.tags.get("stage") == "train")
    assert train_run.data.metrics["final_probe_errors"] == stats["sources"]
