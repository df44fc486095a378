"""SKIntern's curriculum: schedule arithmetic, the generic vector search, demonstration
selection, the stage row format, and a 3-stage curriculum on 2 Ray Train workers whose
driver is SIGKILLed mid-stage and resumed."""
from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from distill_ray.config import Config
from distill_ray.curriculum.demos import select_neighbours, stage_demos
from distill_ray.curriculum.format import Demo, stage_prompt
from distill_ray.curriculum.schedule import linear_decay, split_steps
from distill_ray.knowledge.search import nearest_neighbours
from distill_ray.methods import get_recipe
from distill_ray.methods.recipe import MethodContext, TrainJob, question_prompt
from distill_ray.store import open_db, write_table
from distill_ray.tasks.record import Example

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


def test_demonstration_search_is_bulk_fast(tmp_path):
    # The embedded default's size: 8,000 questions, MiniLM's 384 dimensions.
    n, dim = 8000, 384
    vectors = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [f"x{i}" for i in range(n)]
    questions = {i: f"q{i}" for i in ids}
    table = pa.table({"id": ids, "question": [questions[i] for i in ids],
                      "question_vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), dim)})
    write_table(open_db(str(tmp_path / "db")), "big", table)
    start = time.monotonic()
    got = select_neighbours(str(tmp_path / "db"), "big", ids, questions, 3, set(ids))
    elapsed = time.monotonic() - start
    assert all(len(v) == 3 and k not in v for k, v in got.items())
    # Spot-check against exact cosine neighbours.
    for i in (0, 4321, 7999):
        sims = vectors @ vectors[i]
        sims[i] = -np.inf
        assert got[ids[i]] == [ids[j] for j in np.argsort(-sims)[:3]]
    assert elapsed < 60, f"{n} questions took {elapsed:.1f}s"


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
    import torch.distributed as dist

    from distill_ray.train.checkpoint import continue_from_checkpoint, save_checkpoint
    from distill_ray.train.data import collate, encode_rows, validate_rows
    from distill_ray.train.engine import build_engine, warmup_cosine
    from distill_ray.train.prebuild import prebuild
    from distill_ray.train.step import train_step
    from distill_ray.train.student import train_tokenizer
    from rows import arithmetic_rows

    prebuild()
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(_free_port())}.items():
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
    finally:
        dist.destroy_process_group()


# -- the curriculum end to end: 3 stages, 2 workers, a killed driver ---------------------------

RUN_NAME = "skintern-curriculum-test"
STAGE_STEPS = 16
KILL_STAGE = 1  # stage index 1 of 0, 1, 2: the middle stage, whose K is compressed by stage 0's student

_DRIVER = """
import pickle, sys
import ray
ray.init(address=sys.argv[2], log_to_driver=True)
from distill_ray.curriculum.run import run_curriculum
run_curriculum(pickle.load(open(sys.argv[1], "rb")))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster():
    from distill_ray.train.prebuild import prebuild

    prebuild()  # DeepSpeed's comm op, built once (minutes) rather than inside a test
    import ray

    ray.init(num_cpus=4, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def mlflow_uri(ray_cluster, tmp_path_factory):
    # After Ray is up (both starting at once can starve Ray's agents on 2 busy cores);
    # it migrates its database (~30 s) while the test builds its K table.
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    proc = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "mlflow"), "server", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
         "--default-artifact-root", str(root / "artifacts")],
        stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT,
    )
    uri = f"http://127.0.0.1:{port}"
    yield uri, proc
    proc.terminate()
    proc.wait(timeout=30)


def _wait_healthy(uri: str, proc, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "mlflow server exited"
        try:
            if urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200:
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"mlflow server at {uri} not healthy after {timeout}s")


def _bag_of_words(texts: list[str], dim: int = 384) -> np.ndarray:
    """Known vectors: hashed word counts, unit length (questions sharing words are near)."""
    import hashlib

    out = np.zeros((len(texts), dim), dtype=np.float32)
    for row, text in enumerate(texts):
        for word in text.lower().split():
            out[row, int.from_bytes(hashlib.blake2b(word.encode(), digest_size=4).digest(), "little") % dim] += 1
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def _knowledge_table(uri: str, name: str, examples: list[Example], without_k: set[str]) -> dict[str, dict]:
    """K as the oracle teacher writes it, in the knowledge need's shape; `without_k` got none."""
    from distill_ray.teacher.oracle_answers import synthetic_knowledge
    from distill_ray.teacher.prompts import render_knowledge

    rows = {ex.id: {"id": ex.id, "task": ex.task, "question": ex.question, "answer": ex.answer,
                    "text": render_knowledge(*synthetic_knowledge(ex.question), inline=True)} for ex in examples}
    table = pa.Table.from_pylist(list(rows.values()))
    vectors = _bag_of_words(table.column("question").to_pylist())
    table = table.append_column("question_vector", pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), 384))
    write_table(open_db(uri), name, table, mode="overwrite")
    # The table keeps every question's vector (demonstrations are searched there); the
    # teacher's K is missing for some, whose prompts then carry demonstrations only.
    return {i: r for i, r in rows.items() if i not in without_k}


def _job(tmp_path: Path) -> TrainJob:
    """The job the pipeline would hand the recipe, MLflow target still to be set."""
    from distill_ray.tasks.synthetic import generate

    cfg = Config.model_validate({
        "run_name": RUN_NAME,
        "method": {"name": "skintern", "skintern": {"stages": 3, "keep_ratio_start": 1.0, "examples_start": 2,
                                                    "compress_actors": 1, "compress_cpus": 0.5}},
        "student": {"tiny": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64,
                             "vocab_size": 512, "max_positions": 512}},
        "train": {"num_workers": 2, "cpus_per_worker": 1, "batch_size": 8, "micro_batch_size": 4, "lr": 5e-3,
                  "warmup_steps": 2, "max_seq_len": 448, "log_every": 4, "checkpoint_every": 4,
                  "max_steps": 3 * STAGE_STEPS},
        "storage": {"root": str(tmp_path / "runs")},
    })
    train, _ = generate(160, 30, seed=11)
    # Not every rationale is kept, and not every question got K: both happen in real runs.
    rationales = {ex.id: {"rationale": ex.rationale} for n, ex in enumerate(train) if n % 15 != 7}
    k_rows = _knowledge_table(cfg.lancedb_uri, f"knowledge_{RUN_NAME}", train,
                              without_k={ex.id for n, ex in enumerate(train) if n % 40 == 3})
    ctx = MethodContext(cfg, {"rationales": rationales, "knowledge": k_rows},
                        {"rationales": f"rationales_{RUN_NAME}", "knowledge": f"knowledge_{RUN_NAME}"})
    return TrainJob(ctx, train, str(tmp_path / "runs" / RUN_NAME / "train"))


def _snapshot_step(stage_dir: Path) -> int:
    """The step of the newest checkpoint Ray Train has registered for a run (0 if none)."""
    path = stage_dir / "checkpoint_manager_snapshot.json"
    if not path.is_file():
        return 0
    try:
        latest = json.loads(path.read_text()).get("latest_checkpoint_result") or {}
    except ValueError:  # caught mid-write
        return 0
    return int((latest.get("metrics") or {}).get("step", 0))


def _checkpoints(stage_dir: Path) -> list[str]:
    return sorted(p.name for p in stage_dir.glob("checkpoint_*"))


def _nll(model_dir: str, pairs: list[tuple[str, str]]) -> float:
    """Mean loss per target token of `target` after `prompt`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    total = count = 0.0
    with torch.no_grad():
        for prompt, target in pairs:
            p = tok(prompt)["input_ids"]
            t = tok(target, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([p + t])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
            total -= float(sum(logp[len(p) - 1 + j, t[j]] for j in range(len(t))))
            count += len(t)
    return total / count


@pytest.mark.timeout(900)
def test_three_stage_curriculum_resumes_after_driver_is_killed(tmp_path, ray_cluster, mlflow_uri, capfd):
    import dataclasses

    import mlflow

    from distill_ray.curriculum import storage
    from distill_ray.curriculum.actor import actor_name
    from distill_ray.curriculum.run import run_curriculum
    from distill_ray.tasks.synthetic import generate
    from distill_ray.train.checkpoint import read_checkpoint_state, read_state

    ray = ray_cluster
    driver = None
    try:
        job = _job(tmp_path)
        uri, proc = mlflow_uri
        _wait_healthy(uri, proc)
        client = mlflow.MlflowClient(uri)
        train_run = client.create_run(client.create_experiment("curriculum-test"), run_name=RUN_NAME).info.run_id
        job = dataclasses.replace(job, mlflow_target=(uri, train_run))
        train_dir = Path(job.output_dir)
        job_file = tmp_path / "job.pkl"
        job_file.write_bytes(pickle.dumps(job))

        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        driver = subprocess.Popen([sys.executable, "-c", _DRIVER, str(job_file), ray.get_runtime_context().gcs_address],
                                  env=env)
        killed_stage_dir = train_dir / f"stage{KILL_STAGE}"
        deadline = time.monotonic() + 600
        while _snapshot_step(killed_stage_dir) < 4:  # the stage's first checkpoint is registered
            assert driver.poll() is None, "the driver ended before it could be killed"
            assert time.monotonic() < deadline, f"no stage{KILL_STAGE} checkpoint within 600 s"
            time.sleep(0.05)
        driver.send_signal(signal.SIGKILL)  # no cleanup, as when the head pod dies
        driver.wait()

        # The driver's actors (the curriculum, Ray Train's controller and workers) die with it.
        deadline = time.monotonic() + 120
        while True:
            try:
                ray.get_actor(actor_name(job.ctx.cfg), namespace=job.ctx.cfg.cluster.namespace)
                alive = True
            except ValueError:
                alive = False
            if not alive and ray.available_resources().get("CPU", 0) >= 4:
                break
            assert time.monotonic() < deadline, "the killed driver's actors did not go away within 120 s"
            time.sleep(0.5)
        resume_step = _snapshot_step(killed_stage_dir)
        assert 4 <= resume_step < STAGE_STEPS, "the stage must have been killed mid-way"
        before = storage.read_json(str(train_dir / "curriculum" / "state.json"))
        assert before["stage"] == KILL_STAGE and before["stages"]["0"]["result"]["steps"] == STAGE_STEPS
        stage0_checkpoints = _checkpoints(train_dir / "stage0")
        capfd.readouterr()

        # The same command again: it resumes at stage 2/3, at the step of its last checkpoint.
        result = run_curriculum(job)
        out = capfd.readouterr().out
        assert f"[curriculum] resuming at stage {KILL_STAGE + 1}/3" in out
        assert "[curriculum] stage 1/3:" not in out  # stage 0 was not built or trained again
        assert f"resumed at step {resume_step}" in out
        assert _checkpoints(train_dir / "stage0") == stage0_checkpoints

        state = storage.read_json(str(train_dir / "curriculum" / "state.json"))
        assert state["stage"] == 3 and state["restored_from"] == "state.json"
        assert state["stages"]["0"] == before["stages"]["0"]
        assert state["stages"][str(KILL_STAGE)]["result"]["resumed_from"] == resume_step
        assert [state["stages"][str(t)]["result"]["steps"] for t in range(3)] == [STAGE_STEPS] * 3
        assert result.steps == 3 * STAGE_STEPS == state["budget"]["total_steps"]  # a single run's budget
        # Each stage continued from the one before, and its checkpoints carry the curriculum's stage.
        for t in (1, 2):
            final = read_state(state["stages"][str(t)]["result"]["checkpoint_path"])
            assert final["continued_from"]["checkpoint"] == state["stages"][str(t - 1)]["result"]["checkpoint_path"]
            assert read_checkpoint_state(state["stages"][str(t)]["result"]["checkpoint_path"])["curriculum"]["stage"] == t

        # What each stage trained on: K and 2 -> 1 -> 0 demos, K kept 1 -> 0.5 -> 0, then the question alone.
        questions = {ex.id: ex.question for ex in job.examples}
        rows = [storage.read_table(state["stages"][str(t)]["rows_path"]).to_pylist() for t in range(3)]
        kept = job.ctx.teacher["rationales"]
        assert all(len(r) == len(kept) for r in rows)
        assert sum(r["prompt"].count("\nAnswer: ") for r in rows[0]) == 2 * len(kept)
        with_k = {r["id"] for r in rows[0] if "\nKnowledge: Learning Summary: 1." in r["prompt"]}
        assert with_k == set(kept) & set(job.ctx.teacher["knowledge"])
        assert all(r["prompt"].count("\nAnswer: ") == 1 for r in rows[1])
        assert all(r["prompt"] == question_prompt(questions[r["id"]]) for r in rows[2])
        assert all(r["target"] == " " + kept[r["id"]]["rationale"] for r in rows[2])
        # Demonstrations: similar questions (here: the same problem family), never the question
        # itself, never twice, always with a kept rationale.
        neighbours = storage.read_json(str(train_dir / "curriculum" / "demos.json"))["neighbours"]
        family = {ex.id: ex.task for ex in job.examples}
        assert set(neighbours) == set(kept) and all(len(v) == 2 for v in neighbours.values())
        assert all(i not in v and len(set(v)) == 2 and set(v) <= set(kept) for i, v in neighbours.items())
        same = np.mean([family[d] == family[i] for i, v in neighbours.items() for d in v])
        assert same > 0.8, same
        s1 = state["stages"]["1"]
        assert s1["keep_ratio"] == 0.5 and abs(s1["keep_ratio_achieved"] - 0.5) <= 0.01
        assert s1["compressor"] == state["stages"]["0"]["result"]["model_dir"]
        assert result.model_dir == state["stages"]["2"]["result"]["model_dir"]

        # The driver logged the schedule to the train run; each stage trained into its own child run.
        history = {m.step: m.value for m in client.get_metric_history(train_run, "curriculum_keep_ratio")}
        assert history == {0: 1.0, 1: 0.5, 2: 0.0}
        assert {m.step: m.value for m in client.get_metric_history(train_run, "curriculum_examples")} == {0: 2, 1: 1, 2: 0}
        children = {t: state["stages"][str(t)]["mlflow_run_id"] for t in range(3)}
        assert len(set(children.values())) == 3
        for t, run_id in children.items():
            assert client.get_run(run_id).data.tags["mlflow.parentRunId"] == train_run
            assert client.get_metric_history(run_id, "loss"), t

        # The final student is asked the question alone, as at inference, and does better there
        # than the stage-0 student that always saw K and demonstrations.
        _, test = generate(160, 30, seed=11)
        recipe = get_recipe("skintern")
        pairs = [(recipe.prompt(ex, {}), " " + ex.rationale) for ex in test]
        assert all(p == question_prompt(ex.question) for (p, _), ex in zip(pairs, test))
        assert _nll(result.model_dir, pairs) < _nll(state["stages"]["0"]["result"]["model_dir"], pairs)
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()
            driver.wait()
