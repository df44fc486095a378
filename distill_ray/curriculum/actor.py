"""The curriculum actor: owns SKIntern's schedule and the current stage.

A named Ray actor ("curriculum-<run_name>" in the configured namespace) that
  - builds stage t's training rows with Ray Data: K compressed to r_t (compress.py, the
    scorer being the student as trained so far), the first k_t of each question's
    demonstrations (demos.py, found once for k_0), formatted by format.py, and written
    to the run's storage so a resumed stage trains on exactly the same rows;
  - says what the trainer runs next (stage, step budget, the checkpoint to continue);
  - advances when a stage's training has finished.
Its state is written to `<train dir>/curriculum/state.json` at every transition and is
also carried into every training checkpoint (run_training's `checkpoint_state`), so a
new actor -- after the driver, and with it this actor, was killed -- picks up at the
same stage; with the state file gone it recovers from the newest stage checkpoint.

The actor is not detached: it lives and dies with the driver that owns the run.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from distill_ray.config import Config
from distill_ray.curriculum import storage
from distill_ray.curriculum.compress import compress_column
from distill_ray.curriculum.demos import select_neighbours
from distill_ray.curriculum.format import Demo, stage_prompt, target
from distill_ray.curriculum.schedule import linear_decay, split_steps
from distill_ray.train.data import planned_steps

STATE_VERSION = 1
ROW_COLUMNS = ["prompt", "target", "weight"]
BLOCK_ROWS = 256


@dataclass
class CurriculumInputs:
    """What the stages are made of, for the examples whose teacher rationale was kept."""

    questions: dict[str, str]  # example id -> question
    rationales: dict[str, str]  # example id -> kept teacher rationale (ends in the answer)
    knowledge: dict[str, str] = field(default_factory=dict)  # example id -> K text ("" or absent: none)
    knowledge_table: str | None = None  # LanceDB table with `question_vector`, for demonstrations
    lancedb_uri: str | None = None

    def __post_init__(self) -> None:
        missing = [i for i in self.rationales if i not in self.questions]
        if missing:
            raise ValueError(f"curriculum: rationale(s) for unknown example id(s) {missing[:5]}")
        if not self.rationales:
            raise ValueError("curriculum: no example has a kept teacher rationale, so there is nothing to train on")

    @property
    def ids(self) -> list[str]:
        return sorted(self.rationales)

    def fingerprint(self) -> str:
        h = hashlib.blake2b(digest_size=16)
        for i in self.ids:
            h.update(f"{i}\x00{self.questions[i]}\x00{self.rationales[i]}\x00{self.knowledge.get(i) or ''}\x01".encode())
        h.update(f"{self.knowledge_table}".encode())
        return h.hexdigest()


def actor_name(cfg: Config) -> str:
    return f"curriculum-{cfg.run_name}"


def stage_config(cfg: Config, steps: int, time_budget_s: float | None) -> Config:
    """The run's config with one stage's share of the step and time budget."""
    c = cfg.model_copy(deep=True)
    c.train.max_steps = steps
    c.train.time_budget_s = time_budget_s
    return c


class Curriculum:
    """The actor's body; a plain class, so it also runs in-process."""

    def __init__(self, cfg: dict, inputs: CurriculumInputs, train_dir: str):
        # Nothing here may fail: an actor whose constructor raises only says it died.
        # The work is in open(), whose errors reach the caller as they are.
        self._args = (cfg, inputs, train_dir)
        self.state: dict | None = None

    def open(self) -> dict:
        """Restores (or starts) the curriculum; returns its state. Idempotent."""
        if self.state is None:
            cfg, inputs, train_dir = self._args
            self.cfg = Config.model_validate(cfg)
            self.inputs = inputs
            self.train_dir = train_dir
            self.dir = storage.curriculum_dir(train_dir)
            sk = self.cfg.method.skintern
            self.schedule = linear_decay(sk.stages, sk.keep_ratio_start, sk.examples_start)
            self.fingerprint = self._fingerprint()
            state = self._restore() or self._fresh()
            self.state = state
            self._save()
        return self.get_state()

    # -- state -------------------------------------------------------------------------

    def _fingerprint(self) -> str:
        sk, tc = self.cfg.method.skintern, self.cfg.train
        setup = json.dumps([self.inputs.fingerprint(), self.schedule.as_dict(), sk.compressor_model, tc.epochs,
                            tc.max_steps, tc.time_budget_s, tc.batch_size, sk.lr_schedule], sort_keys=True)
        return hashlib.blake2b(setup.encode(), digest_size=16).hexdigest()

    def _fresh(self) -> dict:
        tc = self.cfg.train
        # The budget a single run on the last stage's rows would get, split over the stages.
        total = planned_steps(len(self.inputs.rationales), tc.batch_size, tc.epochs, tc.max_steps)
        steps = split_steps(total, len(self.schedule))
        per_stage_time = tc.time_budget_s / len(self.schedule) if tc.time_budget_s else None
        return {
            "version": STATE_VERSION,
            "fingerprint": self.fingerprint,
            "schedule": self.schedule.as_dict(),
            "budget": {"total_steps": total, "stage_steps": steps, "stage_time_budget_s": per_stage_time},
            "stage": 0,
            "stages": {},
            "restored_from": None,
        }

    def _check(self, state: dict, where: str) -> dict:
        if state.get("version") != STATE_VERSION or state.get("fingerprint") != self.fingerprint:
            raise ValueError(
                f"curriculum state in {where} belongs to a different setup (teacher outputs, schedule or "
                f"budget changed); use another run_name or delete {self.train_dir} to start over"
            )
        return state

    def _restore(self) -> dict | None:
        path = storage.join(self.dir, "state.json")
        saved = storage.read_json(path)
        if saved is not None:
            state = self._check(saved, path)
            state["restored_from"] = "state.json"
            return state
        # No state file (lost, or storage was copied without it): the newest stage
        # checkpoint carries the state as it was when that checkpoint was written.
        for t in reversed(range(len(self.schedule))):
            train_state = storage.latest_checkpoint_state(storage.join(self.train_dir, f"stage{t}"))
            carried = ((train_state or {}).get("checkpoint_state") or {}).get("curriculum")
            if carried:
                state = self._check(carried, f"the stage{t} checkpoint")
                state["restored_from"] = f"stage{t} checkpoint"
                return state
        return None

    def _save(self) -> None:
        storage.write_json(storage.join(self.dir, "state.json"), self.state)

    def get_state(self) -> dict:
        if self.state is None:
            return self.open()
        return json.loads(json.dumps(self.state))

    def stage(self) -> int:
        self.open()
        return int(self.state["stage"])

    def checkpoint_state(self) -> dict:
        """What every checkpoint of the current stage carries."""
        return {"curriculum": self.get_state()}

    # -- stages ------------------------------------------------------------------------

    def _expect(self, t: int) -> None:
        self.open()
        if t != self.stage():
            raise ValueError(f"curriculum is at stage {self.stage()}, not {t}")

    def plan(self, t: int) -> dict:
        """Stage t's schedule, budget and starting point, as the driver needs them."""
        self.open()
        p = self.schedule[t]
        previous = self.state["stages"].get(str(t - 1), {}).get("result") if t > 0 else None
        budget = self.state["budget"]
        steps = budget["stage_steps"]
        continuous = self.cfg.method.skintern.lr_schedule == "continuous"
        return {
            "stage": t, "stages": len(self.schedule), "keep_ratio": p.keep_ratio, "examples": p.examples,
            "steps": steps[t], "time_budget_s": budget["stage_time_budget_s"],
            "init_from": previous["checkpoint_path"] if previous else None,
            "lr_window": [sum(steps[:t]), sum(steps)] if continuous else None,
        }

    def _compressor(self, t: int) -> str | None:
        sk = self.cfg.method.skintern
        if sk.compressor_model:
            return sk.compressor_model
        if t > 0:
            return self.state["stages"][str(t - 1)]["result"]["model_dir"]
        if self.cfg.student.model:
            return self.cfg.student.model
        raise ValueError(
            f"method.skintern.keep_ratio_start={sk.keep_ratio_start} compresses K at stage 0, before the student "
            "has been trained: set method.skintern.compressor_model (a causal LM dir), or keep_ratio_start=1"
        )

    def _neighbours(self) -> dict[str, list[str]]:
        path = storage.join(self.dir, "demos.json")
        k0 = self.schedule.max_examples
        saved = storage.read_json(path)
        if saved is not None and saved.get("k") == k0:
            return saved["neighbours"]
        if not self.inputs.knowledge_table or not self.inputs.lancedb_uri:
            raise ValueError("method.skintern.examples_start > 0 needs the knowledge table (its question vectors)")
        from distill_ray.knowledge.embed import embed_texts

        model = self.cfg.knowledge.embedding_model
        neighbours = select_neighbours(
            self.inputs.lancedb_uri, self.inputs.knowledge_table, self.inputs.ids, self.inputs.questions, k0,
            set(self.inputs.rationales),
            embed=lambda texts: embed_texts(texts, model, cache=self.inputs.lancedb_uri),
        )
        storage.write_json(path, {"k": k0, "neighbours": neighbours})
        return neighbours

    def _base_table(self, with_demos: bool) -> pa.Table:
        inp = self.inputs
        ids = inp.ids
        neighbours = self._neighbours() if with_demos else {}
        demo_q = [[inp.questions[n] for n in neighbours.get(i, [])] for i in ids]
        demo_r = [[inp.rationales[n] for n in neighbours.get(i, [])] for i in ids]
        return pa.table({
            "id": ids,
            "question": [inp.questions[i] for i in ids],
            "knowledge": [inp.knowledge.get(i) or "" for i in ids],
            "rationale": [inp.rationales[i] for i in ids],
            "demo_questions": pa.array(demo_q, type=pa.list_(pa.string())),
            "demo_rationales": pa.array(demo_r, type=pa.list_(pa.string())),
        })

    def build_stage(self, t: int) -> dict:
        """Stage t's rows in storage (built once); returns where they are and what they hold."""
        self._expect(t)
        info = self.state["stages"].get(str(t))
        if info and storage.exists(info["rows_path"]):
            return {**info, "built": False}
        import ray.data

        sk, p = self.cfg.method.skintern, self.schedule[t]
        base = self._base_table(with_demos=p.examples > 0)
        blocks = [base.slice(i, BLOCK_ROWS) for i in range(0, base.num_rows, BLOCK_ROWS)]
        ds = ray.data.from_arrow(blocks)
        compressor = self._compressor(t) if 0 < p.keep_ratio < 1 else None
        ds = compress_column(ds, "knowledge", p.keep_ratio, model_dir=compressor, actors=sk.compress_actors,
                             cpus=sk.compress_cpus, out_column="knowledge_t")
        ds = ds.map_batches(format_batch, fn_kwargs={"examples": p.examples}, batch_format="pyarrow")
        table = pa.concat_tables(list(ds.iter_batches(batch_size=None, batch_format="pyarrow")))
        rows_path = storage.join(self.dir, f"stage{t}.parquet")
        storage.write_table(rows_path, table.select(["id", *ROW_COLUMNS]))
        info = {
            "rows_path": rows_path,
            "rows": table.num_rows,
            "keep_ratio": p.keep_ratio,
            "keep_ratio_achieved": _achieved(table, p.keep_ratio),
            "examples": p.examples,
            "demos_per_row": float(np.mean(table.column("demos").to_numpy())) if table.num_rows else 0.0,
            "compressor": compressor,
            "mlflow_run_id": None,
            "result": None,
        }
        self.state["stages"][str(t)] = info
        self._save()
        return {**info, "built": True}

    def start_stage(self, t: int, mlflow_run_id: str | None = None) -> dict:
        """Marks stage t as training; returns the state its checkpoints carry."""
        self._expect(t)
        info = self.state["stages"][str(t)]
        if mlflow_run_id:
            info["mlflow_run_id"] = mlflow_run_id
        self._save()
        return self.checkpoint_state()

    def finish_stage(self, t: int, result: Mapping) -> dict:
        """Records stage t's training result and moves on to stage t + 1."""
        self._expect(t)
        needed = {"checkpoint_path", "model_dir", "steps"}
        if not needed <= set(result):
            raise ValueError(f"stage {t} result lacks {sorted(needed - set(result))}")
        self.state["stages"][str(t)]["result"] = json.loads(json.dumps(dict(result)))
        self.state["stage"] = t + 1
        self._save()
        return self.get_state()

    def done(self) -> bool:
        return self.stage() >= len(self.schedule)


def format_batch(batch: pa.Table, examples: int) -> pa.Table:
    """Ray Data UDF: one stage's {id, prompt, target, weight} from the base columns."""
    prompts, targets, shown = [], [], []
    cols = {name: batch.column(name).to_pylist() for name in
            ("question", "knowledge_t", "rationale", "demo_questions", "demo_rationales")}
    for q, k, r, dq, dr in zip(*cols.values()):
        demos = [Demo(a, b) for a, b in zip((dq or [])[:examples], (dr or [])[:examples])]
        prompts.append(stage_prompt(q, k or "", demos))
        targets.append(target(r))
        shown.append(len(demos))
    out = {
        "id": batch.column("id"),
        "prompt": pa.array(prompts, type=pa.string()),
        "target": pa.array(targets, type=pa.string()),
        "weight": pa.array(np.ones(len(prompts)), type=pa.float64()),
        "demos": pa.array(shown, type=pa.int64()),
    }
    for extra in ("knowledge_t_tokens", "knowledge_t_kept"):
        if extra in batch.column_names:
            out[extra] = batch.column(extra)
    return pa.table(out)


def _achieved(table: pa.Table, nominal: float) -> float:
    """Kept / total K tokens over the stage (the nominal ratio where nothing was scored)."""
    if "knowledge_t_tokens" not in table.column_names:
        return nominal
    tokens = table.column("knowledge_t_tokens").to_numpy()
    kept = table.column("knowledge_t_kept").to_numpy()
    scored = tokens > 0
    return float(kept[scored].sum() / tokens[scored].sum()) if scored.any() else nominal


def curriculum_actor(cfg: Config, inputs: CurriculumInputs, train_dir: str, *, wait_s: float = 60.0):
    """The run's named curriculum actor: the live one, or a new one restored from storage.

    A driver killed a moment ago may still own a dying actor under the name; that one is
    waited out (up to `wait_s`) rather than handed back.
    """
    import time

    import ray
    from ray.exceptions import RayActorError

    remote = ray.remote(Curriculum)
    deadline = time.monotonic() + wait_s
    while True:
        actor = remote.options(
            name=actor_name(cfg), namespace=cfg.cluster.namespace, get_if_exists=True,
            num_cpus=0,  # it coordinates; the CPUs are for the stages it starts
            max_restarts=0,
        ).remote(cfg.model_dump(), inputs, train_dir)
        try:
            ray.get(actor.open.remote())
            return actor
        except RayActorError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def inputs_from(
    questions: Mapping[str, str],
    rationales: Mapping[str, str],
    knowledge: Mapping[str, str] | None = None,
    knowledge_table: str | None = None,
    lancedb_uri: str | None = None,
    ids: Sequence[str] | None = None,
) -> CurriculumInputs:
    """Inputs restricted to `ids` (default: all) that have a kept rationale."""
    keep = [i for i in (ids if ids is not None else questions) if i in rationales]
    return CurriculumInputs(
        questions={i: questions[i] for i in keep},
        rationales={i: rationales[i] for i in keep},
        knowledge={i: (knowledge or {}).get(i) or "" for i in keep},
        knowledge_table=knowledge_table,
        lancedb_uri=lancedb_uri,
    )
