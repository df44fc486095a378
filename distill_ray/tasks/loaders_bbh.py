"""BIG-Bench Hard: <task>.json {"examples": [{"input", "target"}]} and cot-prompts/<task>.txt."""
from __future__ import annotations

import re
import warnings
from collections import Counter
from pathlib import Path

from distill_ray.tasks.answers import normalize_answer
from distill_ray.tasks.loaders_io import existing_file, letters, parse_options, read_json, require_str
from distill_ray.tasks.record import Example

# The answer type a task has is the type most of its targets have; rows that disagree
# are upstream defects (movie_recommendation has a target "Monsters, Inc" whose options
# split it into "(A) Monsters" and "(B) Inc"). Below this share we refuse to guess.
_MIN_TYPE_SHARE = 0.95


def bbh_tasks(data_dir: str | Path) -> list[str]:
    """Task names (file stems) of the BBH json files in data_dir, sorted."""
    d = Path(data_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"BBH data directory not found: {d}")
    return sorted(p.stem for p in d.glob("*.json"))


def _target_type(target: str) -> str:
    if re.fullmatch(r"\([A-Z]\)", target):
        return "choice"
    if target in ("Yes", "No"):
        return "yes_no"
    if re.fullmatch(r"-?\d+", target):
        return "number"
    # True/False, valid/invalid, dyck closings, sorted words: compared as text.
    return "text"


def _task_file(data_dir: str | Path, task: str, suffix: str, what: str) -> Path:
    if not task or "/" in task or "\\" in task:
        raise ValueError(f"BBH task must be a bare name like 'navigate', got {task!r}")
    path = Path(data_dir) / suffix.format(task=task)
    if not path.is_file():
        known = bbh_tasks(data_dir) if Path(data_dir).is_dir() else []
        raise FileNotFoundError(f"{what} file not found: {path} (tasks in {data_dir}: {known})")
    return path


def load_bbh(data_dir: str | Path, task: str) -> list[Example]:
    """Examples of one BBH task; ids bbh/<task>/<row>, answer type inferred from the targets."""
    path = _task_file(data_dir, task, "{task}.json", "BBH task")
    data = read_json(path, "BBH task")
    rows = data.get("examples") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{path}: expected a non-empty 'examples' list")
    pairs = []
    for i, row in enumerate(rows):
        where = f"{path}: example {i}"
        pairs.append((require_str(row, "input", where).strip(), require_str(row, "target", where).strip()))
    kinds = Counter(_target_type(t) for _, t in pairs)
    answer_type, count = kinds.most_common(1)[0]
    if count / len(pairs) < _MIN_TYPE_SHARE:
        raise ValueError(f"{path}: cannot infer one answer type from targets: {dict(kinds)}")
    out = []
    for i, (question, target) in enumerate(pairs):
        choices = None
        if answer_type == "choice":
            options = parse_options(question)
            if options is not None:
                choices = tuple(options[1])
            target = _choice_target(target, choices)
            if target is None or (choices is not None and target not in letters(len(choices))):
                warnings.warn(f"{path}: example {i} skipped, its target is not one of its options", stacklevel=2)
                continue
        elif _target_type(target) != answer_type:
            warnings.warn(f"{path}: example {i} skipped, target {target!r} is not a {answer_type}", stacklevel=2)
            continue
        out.append(
            Example(
                id=f"bbh/{task}/{i}",
                task=f"bbh/{task}",
                question=question,
                answer=normalize_answer(target, answer_type),
                answer_type=answer_type,
                choices=choices,
            )
        )
    return out


def _choice_target(target: str, choices: tuple[str, ...] | None) -> str | None:
    """The option letter a target names: "(C)", or an option's exact text."""
    m = re.fullmatch(r"\(([A-Z])\)", target)
    if m:
        return m.group(1)
    if choices and target in choices:
        return letters(len(choices))[choices.index(target)]
    return None


def load_bbh_cot_prompt(data_dir: str | Path, task: str) -> str:
    """The task's few-shot CoT prompt, without the canary line and "-----" separator."""
    path = _task_file(data_dir, task, "cot-prompts/{task}.txt", "BBH CoT prompt")
    text = existing_file(path, "BBH CoT prompt").read_text(encoding="utf-8")
    head, sep, rest = text.partition("\nQ:")
    if not sep:
        raise ValueError(f"{path}: no 'Q:' exemplar found")
    kept = [
        line for line in head.splitlines() if "canary" not in line.lower() and not re.fullmatch(r"-{3,}", line.strip())
    ]
    return ("\n".join(kept).strip() + "\n\nQ:" + rest).strip()
