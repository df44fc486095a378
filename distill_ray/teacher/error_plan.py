"""NesyCD step 3: the teacher analyses each of the student's errors.

For every training question the student got wrong, the teacher sees the question, the
gold answer and the student's wrong response, and replies with a learning summary and
supplementary knowledge, the same two numbered sections as SKIntern's K (so the same
parser validates them). Malformed replies are re-asked; the first ask runs at 0.8 as in
the paper, re-asks climb the configured temperatures. Analyses land in
`error_analyses_<run>` (failures in `error_analysis_failures_<run>`), cached like every
teacher call: the cache key includes the student's response, so a retrained student's
new errors are asked about afresh while unchanged ones cost nothing.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from distill_ray.client.requests import LLMRequest
from distill_ray.config import Config
from distill_ray.tasks.record import Example
from distill_ray.teacher.cot_plan import check_reasks, reask_sampling
from distill_ray.teacher.knowledge_plan import KnowledgeShots, check_knowledge_reply, default_knowledge_shots
from distill_ray.teacher.prompts import error_messages

ANALYSES = "error_analyses"
ANALYSIS_FAILURES = "error_analysis_failures"
FIRST_TEMPERATURE = 0.8  # NesyCD's sampling temperature for the analysis


@dataclass(frozen=True)
class ErrorAnalysisPlan:
    model: str
    temperatures: tuple[float, ...]
    max_tries: int
    max_tokens: int
    responses: Mapping[str, str]  # example id -> the student's wrong response
    shots: Mapping[str, KnowledgeShots] = field(default_factory=dict)
    payload_fields: tuple[str, ...] = ("summary", "supplementary", "knowledge")

    def __post_init__(self) -> None:
        check_reasks(self.temperatures, self.max_tries)

    def requests(self, row: dict, attempt: int) -> LLMRequest:
        shot = self.shots.get(row["task"], KnowledgeShots())
        temperature, seed = reask_sampling(self.temperatures, attempt)
        messages = error_messages(row["question"], row["answer"], self.responses[row["id"]],
                                  shot.exemplars, shot.preamble)
        return LLMRequest("chat", model=self.model, messages=messages, temperature=temperature,
                          max_tokens=self.max_tokens, seed=seed)

    def check(self, row: dict, response_text: str) -> tuple[bool, str, dict]:
        return check_knowledge_reply(response_text)


def build_error_plan(cfg: Config, errors: Sequence[tuple[Example, str]]) -> ErrorAnalysisPlan:
    t = cfg.teacher
    # Re-asks go on up the configured ladder (past its end, seeded: see reask_sampling).
    temperatures = (FIRST_TEMPERATURE, *(x for x in t.temperatures if x > FIRST_TEMPERATURE))
    return ErrorAnalysisPlan(
        model=t.model, temperatures=tuple(float(x) for x in temperatures), max_tries=t.max_tries,
        max_tokens=t.max_tokens, responses={ex.id: response for ex, response in errors},
        shots=default_knowledge_shots([ex for ex, _ in errors], t.few_shot, analysis=True),
    )


def collect_error_analyses(cfg: Config, errors: Sequence[tuple[Example, str]], *, run_tag: str = "",
                           progress: bool = True):
    """Teacher analyses of (example, wrong student response) pairs -> `error_analyses_<run_tag>`."""
    from distill_ray.knowledge.table import knowledge_row, knowledge_schema
    from distill_ray.teacher.stage import StageOutput, run_plan

    if not errors:
        raise ValueError("error analysis: no errors to analyse")
    plan = build_error_plan(cfg, errors)
    output = StageOutput("error analyses", ANALYSES, knowledge_schema(vectors=False), knowledge_row, ANALYSIS_FAILURES)
    return run_plan(cfg, [ex for ex, _ in errors], plan, output, run_tag=run_tag, progress=progress)
