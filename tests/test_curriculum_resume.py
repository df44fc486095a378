"""SKIntern's curriculum end to end: 3 stages on 2 Ray Train workers, the driver killed mid-curriculum, resumed."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from distill_ray.config import Config
from distill_ray.methods import get_recipe
from distill_ray.methods.recipe import MethodContext, TrainJob, question_prompt
from distill_ray.store import open_db, write_table
from distill_ray.tasks.record import Example

# -- schedule ------------------------------------------------------------------------------

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


@pytest.fixture(scope="module")
def ray_cluster():
    from distill_ray.train.prebuild import prebuild

    prebuild()  # DeepSpeed's comm op, built once (minutes) rather than inside a test
    import ray

    ray.init(num_cpus=4, include_dashboard=False)
    yield ray
    ray.shutdown()


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
def test_three_stage_curriculum_resumes_after_driver_is_killed(tmp_path, ray_cluster, mlflow_server, capfd):
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
        uri = mlflow_server.uri
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
