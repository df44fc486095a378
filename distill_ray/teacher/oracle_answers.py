"""What the oracle teacher says: a small dispatch table of prompt kinds.

A prompt kind is recognised by the first words of its system instruction (chat) and
answered from the prompt text alone. Std-CoT is the only kind today; knowledge writing,
error analysis and decomposition prompts plug in as new rows of `PROMPT_KINDS`.
"""
from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from distill_ray.tasks.answers import ANSWER_TRIGGER
from distill_ray.tasks.synthetic import solve
from distill_ray.teacher.prompts import COT_SYSTEM, last_question

NON_ANSWER = "I am sorry, I cannot work out an answer to this question."

_ANSWER_SENTENCE_RE = re.compile(re.escape(ANSWER_TRIGGER) + r"\s+(?P<ans>[^\n]*?)\.?\s*$")


@dataclass(frozen=True)
class PromptKind:
    name: str
    system_prefix: str  # how a chat request announces this kind
    answer: Callable[[str], str]  # last user message (or completion prompt) -> reply


def answer_cot(user_text: str) -> str:
    question = last_question(user_text)
    solution = solve(question) if question else None
    return solution.rationale if solution is not None else NON_ANSWER


PROMPT_KINDS: tuple[PromptKind, ...] = (
    PromptKind("cot", COT_SYSTEM[:40], answer_cot),
)
DEFAULT_KIND = PROMPT_KINDS[0]


def kind_of(messages: list[dict] | None) -> PromptKind:
    system = next((m.get("content", "") for m in messages or () if m.get("role") == "system"), "")
    for kind in PROMPT_KINDS:
        if isinstance(system, str) and system.startswith(kind.system_prefix):
            return kind
    return DEFAULT_KIND


def reply_to(messages: list[dict] | None = None, prompt: str | None = None) -> tuple[str, str]:
    """(reply text, prompt kind name) for a chat conversation or a completion prompt."""
    if prompt is not None:
        return DEFAULT_KIND.answer(prompt), DEFAULT_KIND.name
    kind = kind_of(messages)
    users = [m.get("content") for m in messages or () if m.get("role") == "user"]
    text = users[-1] if users and isinstance(users[-1], str) else ""
    return kind.answer(text), kind.name


def corrupt(reply: str, rng: random.Random) -> str:
    """A well-formed but wrong reply: another final number, or no answer sentence at all."""
    m = _ANSWER_SENTENCE_RE.search(reply)
    if m is None:
        return reply
    if rng.random() < 0.5:
        # The rationale stops before committing to an answer (ill-formed for Std-CoT).
        return reply[: m.start()].rstrip()
    ans = m["ans"].strip()
    try:
        wrong = str(int(ans) + rng.randint(1, 9))
    except ValueError:
        wrong = "none of these"
    return f"{reply[: m.start()]}{ANSWER_TRIGGER} {wrong}."
