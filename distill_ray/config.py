"""Typed configuration: `ray_config.yaml` + `--set section.key=value` overrides.

Every mistake a user can make here (unknown key, wrong type, missing file) becomes one
`ConfigError` line naming the offending key; the CLI turns it into exit code 2.
Secrets never live in the config: `teacher.api_key_env` names an environment variable.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "ray_config.yaml"


class ConfigError(Exception):
    """A configuration problem, phrased for the user in one line."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ClusterConfig(Section):
    address: str | None = None  # None: start a local Ray; "auto" or "ray://host:10001" to join one
    num_cpus: int | None = None  # local Ray only
    namespace: str = "distill-ray"


class SyntheticTask(Section):
    kind: Literal["synthetic"] = "synthetic"
    train_size: int = Field(8000, ge=1)
    test_size: int = Field(600, ge=1)
    families: list[str] | None = None
    long_tail: int = Field(0, ge=0)  # extra rare made-up units in unit_conversion (tasks/synthetic_units.py)
    seed: int = 0

    @field_validator("long_tail")
    @classmethod
    def _tail_exists(cls, n: int) -> int:
        from distill_ray.tasks.synthetic_units import TAIL_UNITS

        if n > len(TAIL_UNITS):
            raise ValueError(f"must be at most {len(TAIL_UNITS)}, the tail units the suite has")
        return n


class FileTask(Section):
    """A real benchmark read from disk; `kind` picks the loader."""

    kind: Literal["gsm8k", "bbh", "strategyqa", "arc", "generic"]
    path: str
    train_path: str | None = None  # when the source ships its own train split
    subtask: str | None = None  # BBH task name / ARC subset
    answer_type: Literal["number", "yes_no", "choice", "text"] | None = None  # generic only
    fields: dict[str, str] | None = None  # generic only: our name -> file key
    test_fraction: float = Field(0.2, gt=0, lt=1)
    limit: int | None = Field(None, ge=1)
    seed: int = 0


TaskSpec = Annotated[Union[SyntheticTask, FileTask], Field(discriminator="kind")]


class FaultConfig(Section):
    """What the oracle teacher injects; used by tests and benchmarks."""

    latency_s: float = Field(0.0, ge=0)
    p_5xx: float = Field(0.0, ge=0, le=1)
    p_429: float = Field(0.0, ge=0, le=1)
    p_timeout: float = Field(0.0, ge=0, le=1)
    p_malformed: float = Field(0.0, ge=0, le=1)
    p_wrong: float = Field(0.0, ge=0, le=1)  # a well-formed but wrong rationale (exercises re-asking)
    timeout_hang_s: float = Field(30.0, ge=0)
    seed: int = 0


class TeacherConfig(Section):
    kind: Literal["oracle", "openai"] = "oracle"
    base_url: str | None = None  # oracle: filled in when it starts
    model: str = "oracle"
    api_key_env: str | None = None  # name of the env var holding the key; never the key itself
    num_actors: int = Field(2, ge=1)
    actor_cpus: float = Field(0.5, gt=0)
    max_in_flight: int = Field(32, ge=1)  # per actor
    qps: float | None = Field(None, gt=0)  # cluster-wide; None = unlimited
    max_retries: int = Field(4, ge=0)  # transport retries (429/5xx/timeouts) per call
    timeout_s: float = Field(20.0, gt=0)
    max_tries: int = Field(4, ge=1)  # re-asks for a wrong or ill-formed rationale
    temperatures: list[float] = [0.0, 0.7, 1.0, 1.5]
    max_tokens: int = Field(256, ge=1)
    few_shot: int = Field(3, ge=0)
    cache: bool = True  # reuse answers recorded in LanceDB `teacher_calls` (False: always ask)
    oracle: FaultConfig = FaultConfig()


class SkinternConfig(Section):
    """SKIntern's linear-decay curriculum (METHODS.md): stage t keeps r_t of K and k_t examples."""

    stages: int = Field(4, ge=2)  # T; the last stage trains on the question alone
    keep_ratio_start: float = Field(1.0, gt=0, le=1)  # r_0, decaying linearly to 0 at stage T-1
    examples_start: int = Field(3, ge=0)  # k_0, decaying linearly to 0 at stage T-1
    compressor_model: str | None = None  # causal LM scoring token self-information; None = the student so far
    # "continuous": the stages are segments of one warm-up + cosine schedule over the whole
    # budget; "per_stage": each stage warms up again and decays to zero on its own.
    lr_schedule: Literal["continuous", "per_stage"] = "continuous"
    compress_actors: int = Field(1, ge=1)
    compress_cpus: float = Field(0.5, gt=0)


class KardConfig(Section):
    top_k: int = Field(3, ge=1)  # knowledge entries retrieved into every prompt


class MtCotConfig(Section):
    rationale_weight: float = Field(0.7, ge=0)
    answer_weight: float = Field(0.3, ge=0)


class NesycdConfig(Section):
    """NesyCD (METHODS.md): a general Std-CoT student, its errors analysed by the teacher into a
    knowledge base (LanceDB `kb_<run>`), then fine-tuning on KB-augmented inputs."""

    general_fraction: float = Field(0.5, gt=0, lt=1)  # share of the step budget for the general student
    probe_size: int | None = Field(1000, ge=1)  # training questions the general student answers to find its errors; None = all
    retrieval: Literal["bm25", "dense", "hybrid"] = "hybrid"
    top_k: int = Field(3, ge=1)  # entries retrieved per question ...
    use: int = Field(1, ge=1)  # ... of which the best `use` go into the prompt
    min_similarity: float = Field(0.3, ge=-1, le=1)  # cosine floor: a weaker best entry is no entry
    gate_confidence: float | None = Field(None, gt=0, le=1)  # answer without the KB when the student is this sure; None: always retrieve
    dedup_threshold: float = Field(0.95, gt=0, le=1)  # cosine at which a new entry merges into an existing one


class SocraticConfig(Section):
    """Socratic CoT (METHODS.md): a decomposer and a solver, two LoRA adapters on one base."""

    base_training: Literal["auto", "union", "none"] = "auto"  # auto: union for a from-scratch student, none for a pretrained one
    base_fraction: float = Field(0.5, gt=0, lt=1)  # share of the step budget for the base (union of both roles' rows)
    adapter_rank: int = Field(8, ge=1)  # LoRA r of each adapter
    adapter_alpha: int = Field(16, ge=1)
    adapter_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    adapter_lr: float | None = Field(None, gt=0)  # None: train.lr
    max_steps: int = Field(8, ge=1)  # inference: sub-questions answered before the dialogue is cut
    step_max_tokens: int = Field(48, ge=1)  # inference: tokens per sub-question or sub-answer


class MethodConfig(Section):
    name: str = "std_cot"
    skintern: SkinternConfig = SkinternConfig()
    kard: KardConfig = KardConfig()
    mt_cot: MtCotConfig = MtCotConfig()
    nesycd: NesycdConfig = NesycdConfig()
    socratic: SocraticConfig = SocraticConfig()


class KnowledgeConfig(Section):
    """Embeddings for knowledge, demonstrations and retrieval (offline MiniLM by default)."""

    embedding_model: str = "all-MiniLM-L6-v2"  # a sentence-transformers dir, or the packaged MiniLM
    # Two half-CPU actors: Ray gives a fractional actor one torch thread, so one actor
    # would use a single core of a 2-core box. They start after the teacher's pool is gone.
    embed_actors: int = Field(2, ge=1)
    embed_cpus: float = Field(0.5, gt=0)
    # Fewer uncached texts than this are embedded in the calling process instead (0: always the pool).
    pool_min_texts: int = Field(1024, ge=0)
    batch_size: int = Field(128, ge=1)


class LoraConfig(Section):
    enabled: bool = False
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]


class TinyStudent(Section):
    hidden_size: int = Field(128, ge=8)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    intermediate_size: int = Field(512, ge=8)
    max_positions: int = Field(512, ge=16)
    vocab_size: int = Field(512, ge=300)


class StudentConfig(Section):
    model: str | None = None  # HF path or hub id; None = tiny model from `tiny`
    tiny: TinyStudent = TinyStudent()
    lora: LoraConfig = LoraConfig()
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class TrainConfig(Section):
    num_workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool = False
    # How Ray places the workers: PACK keeps them on few nodes (cheap all-reduce), SPREAD
    # puts them on as many as it can (a lost node takes fewer workers with it).
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    batch_size: int = Field(32, ge=1)  # global, per optimizer step
    micro_batch_size: int | None = Field(None, ge=1)  # per worker per forward; None = batch_size / num_workers
    grad_clip: float | None = Field(1.0, gt=0)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(30, ge=0)
    max_steps: int | None = Field(None, ge=1)
    epochs: float = Field(2.0, gt=0)
    time_budget_s: float | None = Field(None, gt=0)  # stop early (same schedule) when exceeded
    max_seq_len: int = Field(256, ge=16)
    checkpoint_every: int = Field(100, ge=1)
    log_every: int = Field(10, ge=1)
    max_failures: int = Field(0, ge=0)
    inject_failure_at_step: int | None = Field(None, ge=1)  # fault drill: raise once at this step, then resume
    seed: int = 0


class ServeConfig(Section):
    backend: Literal["transformers", "vllm"] = "transformers"
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    route_prefix: str = "/"
    num_replicas: int = Field(1, ge=1)
    replica_cpus: float = Field(1.0, gt=0)
    replica_gpus: float = Field(0.0, ge=0)  # the vllm backend needs 1 (or its tensor_parallel_size)
    max_batch_size: int = Field(32, ge=1)
    batch_wait_timeout_s: float = Field(0.02, ge=0)
    max_new_tokens: int = Field(128, ge=1)
    model_name: str = "student"
    # Constructor failures before a deploy is declared failed (Ray Serve counts at most 3
    # per replica): a student that cannot load fails in one load, not after twenty.
    start_attempts: int = Field(3, ge=1)
    vllm: dict[str, Any] = {}  # extra vLLM engine args


class EvalConfig(Section):
    max_in_flight: int = Field(32, ge=1)
    num_actors: int = Field(1, ge=1)
    max_new_tokens: int = Field(96, ge=1)
    temperature: float = Field(0.0, ge=0)
    limit: int | None = Field(None, ge=1)


class TrackingConfig(Section):
    uri: str | None = None  # None: start a local `mlflow server` under the run dir
    experiment: str = "distill-ray"
    port: int = Field(0, ge=0, le=65535)  # 0: pick a free port


class StorageConfig(Section):
    root: str = "runs"  # local dir or URI; relative paths are relative to the working dir
    lancedb_uri: str | None = None  # default: <root>/lancedb (shared across runs: it holds the teacher cache)


class Config(Section):
    run_name: str = "std_cot-synthetic"
    seed: int = 0
    cluster: ClusterConfig = ClusterConfig()
    tasks: dict[str, TaskSpec] = {"synthetic": SyntheticTask()}
    teacher: TeacherConfig = TeacherConfig()
    method: MethodConfig = MethodConfig()
    knowledge: KnowledgeConfig = KnowledgeConfig()
    student: StudentConfig = StudentConfig()
    train: TrainConfig = TrainConfig()
    serve: ServeConfig = ServeConfig()
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()
    storage: StorageConfig = StorageConfig()

    @model_validator(mode="after")
    def _check(self) -> "Config":
        if not self.tasks:
            raise ValueError("tasks: at least one task is required")
        if self.teacher.kind == "openai" and not self.teacher.base_url:
            raise ValueError("teacher.base_url: required when teacher.kind is 'openai'")
        return self

    # Paths every stage agrees on.
    @property
    def run_dir(self) -> str:
        return f"{self.storage.root.rstrip('/')}/{self.run_name}"

    @property
    def lancedb_uri(self) -> str:
        return self.storage.lancedb_uri or f"{self.storage.root.rstrip('/')}/lancedb"

    def teacher_api_key(self) -> str:
        """The key from the environment; the oracle needs none. Never log the result."""
        name = self.teacher.api_key_env
        if not name:
            return "no-key"
        value = os.environ.get(name)
        if not value:
            raise ConfigError(f"teacher.api_key_env: environment variable {name} is not set")
        return value


def _parse_value(raw: str) -> Any:
    # YAML scalars give users the types they expect: 3 -> int, 0.5 -> float, true, null, [a, b].
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def apply_override(data: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected section.key=value")
    dotted, raw = assignment.split("=", 1)
    keys = [k for k in dotted.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"--set {assignment!r}: empty key")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {k} is not a section")
    node[keys[-1]] = _parse_value(raw)


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = [str(p) for p in first["loc"]]
    # A discriminated union repeats the tag in the path: tasks.synthetic.synthetic.train_size.
    loc = [p for i, p in enumerate(loc) if not (i > 0 and p == loc[i - 1])]
    where = ".".join(loc)
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        return f"{where}: unknown key"
    if not where:
        return msg  # model-level checks already name their key
    value = first.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    return f"{where}: {msg}{shown}"


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load and validate; raise ConfigError with one readable line on any problem."""
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e.__class__.__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    for assignment in overrides:
        apply_override(data, assignment)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(e)) from None
