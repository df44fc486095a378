"""What a trained student gets wrong, found through the real serving path.

The student is deployed like any other (its own Serve app and route, so an app already
serving is untouched), the eval machinery asks it the questions, and every scored-wrong
answer comes back with the student's own response: the raw material of NesyCD's
knowledge base.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import Config
from ..methods.recipe import Recipe
from ..tasks.record import Example

PROBE_APP = "probe"


@dataclass
class Probe:
    errors: list[tuple[Example, str]]  # (example, the student's wrong response)
    asked: int
    accuracy: float
    failed: int  # requests that got no answer at all (not counted as errors)


def find_errors(cfg: Config, model_dir: str, examples: list[Example], recipe: Recipe) -> Probe:
    from ..serve.deploy import deploy_student, remove_student
    from .stage import evaluate_endpoint

    if not examples:
        raise ValueError("error probe: no examples to ask")
    probe_cfg = cfg.model_copy(deep=True)
    probe_cfg.eval.limit = None  # the eval limit trims the test split, not this probe
    url = deploy_student(probe_cfg, model_dir, app_name=PROBE_APP, route_prefix=f"/{PROBE_APP}")
    try:
        report = evaluate_endpoint(probe_cfg, examples, recipe, url, model_dir)
    finally:
        remove_student(PROBE_APP)
    by_id = {ex.id: ex for ex in examples}
    errors = [(by_id[p["id"]], p["output"] or "") for p in report.predictions
              if p["status"] == "kept" and not p["correct"]]
    errors.sort(key=lambda e: e[0].id)  # the teacher stage's input order, whatever order the pool answered in
    return Probe(errors, len(examples), report.metrics["accuracy"], int(report.metrics["failed"]))
