"""The Std-CoT query plan: what to ask the teacher per example, and which replies to keep.

A reply is kept only when it commits to an answer with the answer sentence and that
answer equals the gold one; anything else is re-asked at the next, higher temperature
(the reference resamples 0.2 -> 1.5 until a reply is well formed and right).
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from distill_ray.client.requests import LLMRequest
from distill_ray.tasks.answers import cut_at_next_question, score
from distill_ray.tasks.record import Example
from distill_ray.teacher.prompts import Exemplar, cot_messages, cot_prompt, synthetic_exemplars

# Same trigger family answers.py reads ("Therefore, the answer is" / "So the answer is").
_TRIGGER_RE = re.compile(r"\bthe\s+answer\s+is\b", re.IGNORECASE)


def check_reasks(temperatures: tuple[float, ...], max_tries: int) -> None:
    if not temperatures:
        raise ValueError("teacher.temperatures: at least one temperature is required")
    if max_tries < 1:
        raise ValueError(f"teacher.max_tries must be >= 1, got {max_tries}")


def reask_sampling(temperatures: tuple[float, ...], attempt: int) -> tuple[float, int | None]:
    """(temperature, seed) of an attempt: rising temperatures, then the last one with a seed.

    Past the end of the temperature list the request would repeat an earlier one (and hit
    its cached reply); a seed makes each further attempt a new request.
    """
    temperature = temperatures[min(attempt, len(temperatures) - 1)]
    return temperature, (attempt if attempt >= len(temperatures) else None)


@dataclass(frozen=True)
class FewShot:
    exemplars: tuple[Exemplar, ...] = ()
    preamble: str = ""


@dataclass(frozen=True)
class StdCotPlan:
    model: str
    temperatures: tuple[float, ...]
    max_tries: int
    max_tokens: int
    shots: Mapping[str, FewShot] = field(default_factory=dict)  # by task name
    kind: str = "chat"
    payload_fields: tuple[str, ...] = ("pred", "rationale")

    def __post_init__(self) -> None:
        check_reasks(self.temperatures, self.max_tries)

    def requests(self, row: dict, attempt: int) -> LLMRequest:
        shot = self.shots.get(row["task"], FewShot())
        temperature, seed = reask_sampling(self.temperatures, attempt)
        common = dict(model=self.model, temperature=temperature, max_tokens=self.max_tokens, seed=seed)
        if self.kind == "completion":
            return LLMRequest("completion", prompt=cot_prompt(row["question"], shot.exemplars, shot.preamble), **common)
        return LLMRequest("chat", messages=cot_messages(row["question"], shot.exemplars, shot.preamble), **common)

    def check(self, row: dict, response_text: str) -> tuple[bool, str, dict]:
        rationale = cut_at_next_question(response_text).strip()
        pred, ok = score(rationale, Example.from_row(row))
        payload = {"pred": pred, "rationale": rationale}
        if not _TRIGGER_RE.search(rationale) or pred is None:
            return False, "no_answer", payload
        return ok, "" if ok else "wrong_answer", payload


def per_synthetic_task(examples: Sequence[Example], k: int, make) -> dict[str, list]:
    """`make(k, family)` demonstrations for each synthetic task (mixed when the family is unknown)."""
    out: dict[str, list] = {}
    for task in sorted({ex.task for ex in examples}):
        if task.startswith("synthetic/") and k > 0:
            family = task.split("/", 1)[1]
            try:
                out[task] = make(k, family)
            except ValueError:  # a family the suite does not know: mixed demonstrations
                out[task] = make(k)
    return out


def default_shots(examples: Sequence[Example], k: int) -> dict[str, FewShot]:
    """Fixed synthetic demonstrations for synthetic tasks (of the same family when possible)."""
    return {task: FewShot(tuple(pairs)) for task, pairs in per_synthetic_task(examples, k, synthetic_exemplars).items()}


def build_plan(
    teacher_cfg,
    examples: Sequence[Example],
    exemplars: Mapping[str, Sequence[Exemplar] | FewShot] | None = None,
) -> StdCotPlan:
    """The plan for `examples`; `exemplars` (by task) overrides the synthetic defaults."""
    shots = default_shots(examples, teacher_cfg.few_shot)
    for task, given in (exemplars or {}).items():
        shots[task] = given if isinstance(given, FewShot) else FewShot(tuple((q, r) for q, r in given))
    return StdCotPlan(
        model=teacher_cfg.model,
        temperatures=tuple(float(t) for t in teacher_cfg.temperatures),
        max_tries=teacher_cfg.max_tries,
        max_tokens=teacher_cfg.max_tokens,
        shots=shots,
    )
