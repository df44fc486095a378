"""SKIntern's curriculum: schedule arithmetic, the generic vector search, demonstration
selection, the stage row format, state restore and checkpoint chaining (the killed-driver
run is in test_curriculum_resume.py)."""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pytest

from distill_ray.config import Config
from distill_ray.curriculum.demos import select_neighbours, stage_demos
from distill_ray.curriculum.format import Demo, stage_prompt
from distill_ray.curriculum.schedule import linear_decay, split_steps
from distill_ray.knowledge.search import nearest_neighbours
from distill_ray.methods import get_recipe
from distill_ray.methods.recipe import MethodContext, question_prompt
from distill_ray.store import open_db, write_table
from distill_ray.tasks.record import Example
from distill_ray.tracking import free_port

# -- schedule ------------------------------------------------------------------------------


def _plan(schedule):
    return [(s.keep_ratio, s.examples) for s in schedule.stages]


def test_linear_decay_schedule():
    assert _plan(linear_decay(2, 1.0, 3)) == [(1.0, 3), (0.0, 0)]
    four = linear_decay(4, 1.0, 3)
    assert [s.examples for s in four.stages] == [3, 2, 1, 0]
    assert np.allclose([s.keep_ratio for s in four.stages], [1.0, 2 / 3, 1 / 3, 0.0])
    assert four[3].question_only and not four[2].question_only
    # 1.5 rounds half up; counts never increase, and reach 0 only at the last stage here.
    assert [s.examples for s in linear_decay(3, 1.0, 3).stages] == [3, 2, 0]
    assert [s.examples for s in linear_decay(5, 0.6, 2).stages] == [2, 2, 1, 1, 0]
    assert np.allclose([s.keep_ratio for s in linear_decay(5, 0.6, 2).stages], [0.6, 0.45, 0.3, 0.15, 0.0])
    assert [s.examples for s in linear_decay(4, 0.5, 0).stages] == [0, 0, 0, 0]
    for T in range(2, 9):
        for k0 in range(0, 8):
            ks = [s.examples for s in linear_decay(T, 1.0, k0).stages]
            assert ks[0] == k0 and ks[-1] == 0 and all(a >= b for a, b in zip(ks, ks[1:]))


def test_schedule_and_budget_reject_bad_input():
    with pytest.raises(ValueError, match="method.skintern.stages must be >= 2, got 1"):
        linear_decay(1, 1.0, 3)
    with pytest.raises(ValueError, match=r"keep_ratio_start must lie in \(0, 1\], got 0"):
        linear_decay(3, 0.0, 3)
    with pytest.raises(ValueError, match=r"keep_ratio_start must lie in \(0, 1\], got 1.5"):
        linear_decay(3, 1.5, 3)
    with pytest.raises(ValueError, match="examples_start must be >= 0, got -1"):
        linear_decay(3, 1.0, -1)
    with pytest.raises(ValueError, match="examples_start must be an integer, got 2.5"):
        linear_decay(3, 1.0, 2.5)
    assert split_steps(10, 3) == [4, 3, 3] and sum(split_steps(751, 4)) == 751 and split_steps(3, 3) == [1, 1, 1]
    with pytest.raises(ValueError, match="a budget of 2 steps cannot be split over 3 curriculum stages"):
        split_steps(2, 3)


# -- stage rows ------------------------------------------------------------------------------


def test_stage_prompt_format_and_last_stage_is_the_inference_prompt():
    q = "Ann has 3 boxes of 4 pens . How many pens ?"
    demos = [Demo("Bo has 2 bags of 5 nuts . How many nuts ?", "2 * 5 = 10 . Therefore, the answer is 10.")]
    assert stage_prompt(q) == question_prompt(q)
    full = stage_prompt(q, "Learning Summary: 1. multiply", demos)
    assert full == (
        "Question: Bo has 2 bags of 5 nuts . How many nuts ?\nAnswer: 2 * 5 = 10 . Therefore, the answer is 10.\n\n"
        "Knowledge: Learning Summary: 1. multiply\n"
        "Question: Ann has 3 boxes of 4 pens . How many pens ?\nAnswer:"
    )
    assert stage_prompt(q, "   ", []) == question_prompt(q)  # K compressed to nothing: no empty block
    with pytest.raises(ValueError, match="the question must be non-empty"):
        stage_prompt("  ")

    recipe = get_recipe("skintern")
    assert recipe.needs == ("rationales", "knowledge") and recipe.train is not None
    ex = [Example(f"e{i}", "t", f"{i} + 1 = ?", str(i + 1), "number") for i in range(3)]
    teacher = {"rationales": {"e0": {"rationale": "0 + 1 = 1 . Therefore, the answer is 1."},
                              "e2": {"rationale": "2 + 1 = 3 . Therefore, the answer is 3."}}}
    ctx = MethodContext(Config(), teacher)
    rows = [r.as_dict() for r in recipe.train_rows(ex, ctx)]
    assert rows == [r.as_dict() for r in get_recipe("std_cot").train_rows(ex, ctx)]  # the last stage = Std-CoT
    assert recipe.prompt(ex[1], {}) == question_prompt(ex[1].question)


# -- vector search and demonstrations --------------------------------------------------------

DIM = 8


def _unit(v) -> list[float]:
    v = np.asarray(v, dtype=np.float32)
    return list(v / np.linalg.norm(v))


def _table(db, name: str, rows: list[tuple[str, str, list[float]]]) -> None:
    schema = pa.schema([("id", pa.string()), ("question", pa.string()),
                        ("question_vector", pa.list_(pa.float32(), DIM))])
    write_table(db, name, [{"id": i, "question": q, "question_vector": v} for i, q, v in rows], mode="overwrite",
                schema=schema)


def _angle(deg: float) -> list[float]:
    v = np.zeros(DIM)
    v[0], v[1] = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    return _unit(v)


def test_nearest_neighbours_exclusions_duplicates_and_errors(tmp_path):
    db = open_db(str(tmp_path / "db"))
    # Points on a circle: the order of neighbours is known from the angles alone.
    rows = [(f"p{d}", f"q{d}", _angle(d)) for d in (0, 10, 20, 30, 40, 90)]
    rows.append(("p10", "q10 again", _angle(11)))  # the same id twice: it may come back only once
    _table(db, "pts", rows)
    queries = np.array([_angle(0), _angle(31), _angle(89)], dtype=np.float32)
    found = nearest_neighbours(db, "pts", queries, 3, vector_column="question_vector",
                               exclude_ids=[{"p0"}, set(), {"p90", "p40"}])
    ids = [[r["id"] for r in hits] for hits in found]
    assert ids == [["p10", "p20", "p30"], ["p30", "p40", "p20"], ["p30", "p20", "p10"]]
    assert all(hits[0]["_distance"] <= hits[-1]["_distance"] for hits in found)
    assert set(found[0][0]) == {"id", "question", "_distance"}  # every column but the vector
    # A SQL prefilter, a uri instead of a handle, and k larger than what is left.
    found = nearest_neighbours(str(tmp_path / "db"), "pts", queries[:1], 10, vector_column="question_vector",
                               where="id NOT IN ('p10', 'p20')", columns=["id"])
    assert [r["id"] for r in found[0]] == ["p0", "p30", "p40", "p90"]
    assert nearest_neighbours(db, "pts", queries, 0, vector_column="question_vector") == [[], [], []]
    with pytest.raises(ValueError, match="does not exist"):
        nearest_neighbours(db, "nope", queries, 1)
    with pytest.raises(ValueError, match="query vectors have 3 dims, the table's column has 8"):
        nearest_neighbours(db, "pts", np.ones((2, 3)), 1, vector_column="question_vector")
    with pytest.raises(ValueError, match="2 exclusion sets for 3 queries"):
        nearest_neighbours(db, "pts", queries, 1, vector_column="question_vector", exclude_ids=[set(), set()])
    with pytest.raises(ValueError, match="the table has no column 'vector'"):
        nearest_neighbours(db, "pts", queries, 1)
    with pytest.raises(ValueError, match="k must be an int >= 0"):
        nearest_neighbours(db, "pts", queries, -1, vector_column="question_vector")


def test_demonstrations_exclude_self_never_repeat_and_need_a_rationale(tmp_path):
    uri = str(tmp_path / "db")
    # Growing gaps between angles: no two distances tie, so the nearest are known exactly.
    angles = {f"e{i}": 5 * i + 0.3 * i * i for i in range(12)}
    questions = {i: f"question {i}" for i in angles}
    questions["e3"] = questions["e4"] = "the same question"  # a duplicate text is never a demonstration of itself
    _table(open_db(uri), "k", [(i, questions[i], _angle(a)) for i, a in angles.items() if i != "e11"])
    eligible = set(angles) - {"e6"}  # e6's rationale was not kept
    called = []

    def embed(texts):  # e11 is not in the table: its question is embedded instead
        called.append(list(texts))
        return np.array([_angle(angles["e11"])], dtype=np.float32)

    got = select_neighbours(uri, "k", list(angles), questions, 3, eligible, embed=embed)
    assert called == [[questions["e11"]]]

    def brute_force(i):
        seen, out = {questions[i]}, []
        for j in sorted((j for j in angles if j != "e11"), key=lambda j: abs(angles[j] - angles[i])):
            if j != i and j in eligible and questions[j] not in seen:
                seen.add(questions[j])
                out.append(j)
        return out[:3]

    for i, demos in got.items():
        assert demos == brute_force(i), i
        assert i not in demos and "e6" not in demos and len(set(questions[d] for d in demos)) == 3
    assert got["e0"] == ["e1", "e2", "e3"]
    assert got["e5"] == ["e4", "e7", "e2"]  # e6 is nearer but has no rationale; e3 is e4's text again
    assert got["e4"] == ["e5", "e2", "e1"]  # e3 is the same question as e4
    # Stage t takes the first k_t, with the full rationale of each.
    rationales = {i: f"rationale {i}" for i in angles}
    demos = stage_demos(got["e0"], 2, questions, rationales)
    assert demos == [Demo("question e1", "rationale e1"), Demo("question e2", "rationale e2")]
    assert stage_demos(got["e0"], 0, questions, rationales) == []
    assert select_neighbours(uri, "k", ["e0"], questions, 0, eligible) == {"e0": []}
    without_embedder = select_neighbours(uri, "k", ["e0", "e11"], questions, 2, eligible)
    assert without_embedder == {"e0": ["e1", "e2"], "e11": []}
    with pytest.raises(ValueError, match=r"no question for example id\(s\) \['zz'\]"):
        select_neighbours(uri, "k", ["zz"], questions, 2, eligible)


def test_demonstration_search_at_the_default_size_matches_exact_neighbours(tmp_path):
    # The embedded default's size: 8,000 questions, MiniLM's 384 dimensions (a search per
    # question, rather than in bulk, would show here as minutes added to the suite).
    n, dim = 8000, 384
    vectors = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [f"x{i}" for i in range(n)]
    questions = {i: f"q{i}" for i in ids}
    table = pa.table({"id": ids, "question": [questions[i] for i in ids],
                      "question_vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), dim)})
    write_table(open_db(str(tmp_path / "db")), "big", table)
    got = select_neighbours(str(tmp_path / "db"), "big", ids, questions, 3, set(ids))
    assert all(len(v) == 3 and k not in v for k, v in got.items())
    # Spot-check against exact cosine neighbours.
    for i in (0, 4321, 7999):
        sims = vectors @ vectors[i]
        sims[i] = -np.inf
        assert got[ids[i]] == [ids[j] for j in np.argsort(-sims)[:3]]


def test_curriculum_state_is_restored_from_its_file_or_a_stage_checkpoint(tmp_path):
    from distill_ray.curriculum import storage
    from distill_ray.curriculum.actor import Curriculum, inputs_from

    cfg = Config.model_validate({"method": {"skintern": {"stages": 3, "keep_ratio_start": 1.0, "examples_start": 0}},
                                 "train": {"batch_size": 16, "epochs": 2.0}})
    questions = {f"e{i}": f"q{i}" for i in range(41)}
    inputs = inputs_from(questions, {i: f"r {i}" for i in list(questions)[:40]})
    train_dir = str(tmp_path / "train")
    first = Curriculum(cfg.model_dump(), inputs, train_dir)
    state = first.open()
    # 40 kept rows x 2 epochs / 16 = 5 steps for a single run, split over the 3 stages.
    assert state["stage"] == 0 and state["budget"]["total_steps"] == 5 and state["budget"]["stage_steps"] == [2, 2, 1]
    first.state["stages"]["0"] = {"rows_path": "x", "mlflow_run_id": None, "result": None}
    carried = first.start_stage(0, "run-0")
    assert carried["curriculum"]["stage"] == 0 and carried["curriculum"]["stages"]["0"]["mlflow_run_id"] == "run-0"

    # The state file is gone; stage 0's newest checkpoint still carries the curriculum state.
    ckpt = tmp_path / "train" / "stage0" / "checkpoint_2026-01-01_00-00-01.000000"
    ckpt.mkdir(parents=True)
    (ckpt / "train_state.json").write_text(json.dumps({"step": 2, "checkpoint_state": carried}))
    (tmp_path / "train" / "stage0" / "checkpoint_2026-01-01_00-00-00.000000").mkdir()  # older, no state
    os.remove(storage.join(storage.curriculum_dir(train_dir), "state.json"))
    again = Curriculum(cfg.model_dump(), inputs, train_dir)
    assert again.open()["restored_from"] == "stage0 checkpoint" and again.stage() == 0
    again.finish_stage(0, {"checkpoint_path": str(ckpt), "model_dir": str(ckpt / "model"), "steps": 2})
    assert again.plan(1)["init_from"] == str(ckpt) and again.plan(1)["steps"] == 2
    # One LR schedule over the 5 steps: stage 1 is its steps 2..3, stage 2 its step 4.
    assert [again.plan(t)["lr_window"] for t in range(3)] == [[0, 5], [2, 5], [4, 5]]
    per_stage = cfg.model_copy(deep=True)
    per_stage.method.skintern.lr_schedule = "per_stage"
    assert Curriculum(per_stage.model_dump(), inputs, str(tmp_path / "other")).plan(0)["lr_window"] is None
    third = Curriculum(cfg.model_dump(), inputs, train_dir)
    assert third.open()["restored_from"] == "state.json" and third.stage() == 1
    with pytest.raises(ValueError, match="curriculum is at stage 1, not 2"):
        third.finish_stage(2, {"checkpoint_path": "c", "model_dir": "m", "steps": 1})
    with pytest.raises(ValueError, match=r"stage 1 result lacks \['model_dir'\]"):
        third.finish_stage(1, {"checkpoint_path": "c", "steps": 1})

    # Another schedule over the same storage is refused, not mixed in.
    other = cfg.model_copy(deep=True)
    other.method.skintern.stages = 4
    with pytest.raises(ValueError, match="belongs to a different setup"):
        Curriculum(other.model_dump(), inputs, train_dir).open()
    with pytest.raises(ValueError, match="no example has a kept teacher rationale"):
        inputs_from(questions, {})


def test_continuing_from_a_checkpoint_restores_weights_adapter_and_optimizer(tmp_path, monkeypatch):
    """What chains two curriculum stages, in one process: DeepSpeed ZeRO-2 with LoRA."""
    import deepspeed
    import torch

    from distill_ray.train.checkpoint import continue_from_checkpoint, save_checkpoint
    from distill_ray.train.data import collate, encode_rows, validate_rows
    from distill_ray.train.engine import build_engine, warmup_cosine
    from distill_ray.train.prebuild import prebuild
    from distill_ray.train.step import train_step
    from distill_ray.train.student import train_tokenizer
    from rows import arithmetic_rows

    prebuild()
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(k, v)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    try:
        rows = validate_rows(arithmetic_rows(16))
        tok = train_tokenizer([t for r in rows for t in (r["prompt"], r["target"])], vocab_size=320)
        cfg = Config.model_validate({
            "train": {"num_workers": 1, "batch_size": 4, "zero_stage": 2, "lr": 1e-2, "warmup_steps": 2,
                      "max_seq_len": 64},
            "student": {"tiny": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64,
                                 "vocab_size": 320}, "lora": {"enabled": True, "target_modules": ["q_proj", "v_proj"]}},
        })
        encoded, _ = encode_rows(tok, rows, 64)
        batches = [collate(encoded[i:i + 4], tok.pad_token_id) for i in range(0, 16, 4)]
        first = build_engine(cfg, tok, 1, total_steps=6).engine
        for batch in batches[:3]:
            train_step(first, [batch])
        trained = {k: v.clone() for k, v in first.module.state_dict().items()}
        moments = [{k: v.clone() for k, v in s.items() if torch.is_tensor(v)}
                   for s in first.optimizer.optimizer.state.values()]
        ckpt = str(tmp_path / "ckpt")
        save_checkpoint(first, tok, ckpt, {"step": 3}, final=True)
        # The final export merges the adapter into a copy, never into the weights being trained.
        assert all(torch.equal(trained[k], v) for k, v in first.module.state_dict().items())

        second = build_engine(cfg, tok, 1, total_steps=10, architecture_from=f"{ckpt}/model").engine
        assert not all(torch.equal(trained[k], v) for k, v in second.module.state_dict().items())
        assert continue_from_checkpoint(second, ckpt) == {"step": 3}
        now = second.module.state_dict()
        assert list(now) == list(trained) and all(torch.equal(trained[k], now[k]) for k in trained)
        assert any("lora_B" in k and v.abs().sum() > 0 for k, v in now.items())  # the adapter came along
        state = list(second.optimizer.optimizer.state.values())
        assert len(state) == len(moments) > 0
        for saved, loaded in zip(moments, state):
            assert torch.equal(saved["exp_avg"], loaded["exp_avg"]) and torch.equal(saved["exp_avg_sq"], loaded["exp_avg_sq"])
        # Its own schedule from its first step, and its own step count.
        assert second.get_lr()[0] == pytest.approx(1e-2 * warmup_cosine(2, 10)(0))
        assert second.global_steps == 0
        assert np.isfinite(train_step(second, [batches[3]]).loss) and second.global_steps == 1

        # As the segment after steps 0..2 of one 10-step schedule, it goes on from step 3's
        # LR instead of warming up again.
        third = build_engine(cfg, tok, 1, total_steps=7, architecture_from=f"{ckpt}/model", lr_window=(3, 10)).engine
        continue_from_checkpoint(third, ckpt)
        assert third.get_lr()[0] == pytest.approx(1e-2 * warmup_cosine(2, 10)(3))
        train_step(third, [batches[3]])
        assert third.get_lr()[0] == pytest.approx(1e-2 * warmup_cosine(2, 10)(4))
    finally:
        import deepspeed.comm

        # DeepSpeed's own teardown: plain torch's would leave it holding this world's groups.
        deepspeed.comm.destroy_process_group()


# -- the curriculum end to end: 3 stages, 2 workers, a killed driver ---------------------------
