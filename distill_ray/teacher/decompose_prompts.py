"""Decomposition prompts (Socratic CoT) and the reply format, GSM8K Socratic style.

The prompt is the house few-shot layout of `prompts.cot_prompt` (so `last_question`
recovers the target), each worked answer a decomposition: one `sub-question ** sub-answer`
line per step, then the answer sentence:

    Question: <q>
    Answer: How many cards are in the boxes ? ** 3 * 5 = 15
    How many cards are left ? ** 15 - 4 = 11
    Therefore, the answer is 11.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

from distill_ray.tasks.answers import ANSWER_TRIGGER, cut_at_next_question
from distill_ray.tasks.record import Step
from distill_ray.teacher.prompts import Exemplar, cot_prompt

# Starts with other words than the other kinds' instructions: the oracle tells kinds apart by them.
DECOMPOSE_SYSTEM = (
    "Break the last question into simple sub-questions, in the same style as the worked examples. "
    "Write one line per step: the sub-question, then ' ** ', then its short worked answer. "
    "The last step's answer must be the final result. "
    f"Finish with the sentence '{ANSWER_TRIGGER} X.' where X is the final answer."
)
STEP_SEPARATOR = " ** "
# Chat models wrap the separator in spaces inconsistently; markdown bold ("**Q?**") never
# has a space on both sides, so it is not mistaken for one.
_SEPARATOR_RE = re.compile(r"\s\*\*\s")
_TRIGGER_LINE_RE = re.compile(r"\bthe\s+answer\s+is\b", re.IGNORECASE)


class DecompositionFormatError(ValueError):
    """A reply that is not a decomposition; `reason` is what the failures table records."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def render_decomposition(steps: Sequence[Step], answer: str) -> str:
    """A decomposition as the teacher writes it (the reply format above)."""
    if not steps:
        raise ValueError("a decomposition needs at least one step")
    lines = []
    for i, step in enumerate(steps, start=1):
        q, a = " ".join(step.question.split()), " ".join(step.answer.split())
        if not q or not a or "**" in q:
            raise ValueError(f"decomposition step {i}: needs a sub-question without '**' and an answer, got {step!r}")
        lines.append(f"{q}{STEP_SEPARATOR}{a}")
    return "\n".join([*lines, f"{ANSWER_TRIGGER} {answer}."])


def decompose_messages(question: str, exemplars: Sequence[Exemplar] = (), preamble: str = "") -> tuple[dict, ...]:
    """`exemplars`: (question, rendered decomposition) pairs."""
    return (
        {"role": "system", "content": DECOMPOSE_SYSTEM},
        {"role": "user", "content": cot_prompt(question, exemplars, preamble)},
    )


def parse_decomposition(text: str) -> tuple[tuple[Step, ...], str]:
    """(steps, the answer sentence's line) out of a reply; DecompositionFormatError if it is none."""
    if not isinstance(text, str) or not text.strip():
        raise DecompositionFormatError("empty_decomposition: the reply is empty")
    lines = [line.strip() for line in cut_at_next_question(text).strip().splitlines() if line.strip()]
    if not _TRIGGER_LINE_RE.search(lines[-1]):
        raise DecompositionFormatError("no_answer: the reply does not end with the answer sentence")
    steps = []
    for n, line in enumerate(lines[:-1], start=1):
        parts = _SEPARATOR_RE.split(line)
        if len(parts) != 2:
            raise DecompositionFormatError(f"malformed_decomposition: line {n} is not 'sub-question ** answer': {line[:60]!r}")
        q, a = (p.strip() for p in parts)
        if not q or not a:
            raise DecompositionFormatError(f"malformed_decomposition: line {n} has an empty {'sub-question' if not q else 'answer'}")
        steps.append(Step(q, a))
    if not steps:
        raise DecompositionFormatError("malformed_decomposition: no step before the answer sentence")
    return tuple(steps), lines[-1]
