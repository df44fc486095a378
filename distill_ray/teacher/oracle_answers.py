"""What the oracle teacher says: a small dispatch table of prompt kinds.

A prompt kind is recognised by the first words of its system instruction (chat) and
answered from the prompt text alone. Kinds today: Std-CoT rationales, SKIntern
knowledge, NesyCD error analyses and Socratic CoT decompositions; a new prompt kind is one more row of `PROMPT_KINDS`.
Each kind also says how to spoil a reply (`p_wrong`) so that its plan rejects it.
"""
from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from distill_ray.tasks.answers import ANSWER_TRIGGER
from distill_ray.tasks.synthetic import solve
from distill_ray.teacher.decompose_prompts import DECOMPOSE_SYSTEM
from distill_ray.teacher.oracle_decompose import answer_decomposition, corrupt_decomposition
from distill_ray.teacher.prompts import (
    COT_SYSTEM,
    ERROR_SYSTEM,
    KNOWLEDGE_SYSTEM,
    SUMMARY_HEADING,
    SUPPLEMENTARY_HEADING,
    last_question,
    render_knowledge,
)

NON_ANSWER = "I am sorry, I cannot work out an answer to this question."

_ANSWER_SENTENCE_RE = re.compile(re.escape(ANSWER_TRIGGER) + r"\s+(?P<ans>[^\n]*?)\.?\s*$")


# How to approach each synthetic family: the oracle's learning summaries. Items are
# written in the suite's space-separated style, since students read K as input.
_FAMILY_SUMMARIES: dict[str, tuple[str, ...]] = {
    "unit_conversion": (
        "recall how many base units one of each unit is worth",
        "multiply each count by the size of its unit in base units",
        "a count already in the base unit stays as it is",
        "add the converted amounts to get the total",
    ),
    "mul_sub": (
        "multiply the number of boxes by the number in each box to get the total",
        "subtract what is given away from the total",
    ),
    "chain": (
        "start from the first amount",
        "apply each change in the order it is told , one at a time",
        "the amount after the last change is the answer",
    ),
}
# What each chain phrase means, as a rule the student can reuse.
_CHAIN_RULES = (
    (re.compile(r"gets (\d) more"), "getting {} more means adding {}"),
    (re.compile(r"loses (\d)"), "losing {} means subtracting {}"),
    (re.compile(r"doubles them"), "doubling means multiplying by 2"),
    (re.compile(r"triples them"), "tripling means multiplying by 3"),
)


@dataclass(frozen=True)
class PromptKind:
    name: str
    system_prefix: str  # how a chat request announces this kind
    answer: Callable[[str], str]  # last user message (or completion prompt) -> reply
    corrupt: Callable[[str, random.Random], str]  # a reply its plan must reject (p_wrong)


def answer_cot(user_text: str) -> str:
    question = last_question(user_text)
    solution = solve(question) if question else None
    return solution.rationale if solution is not None else NON_ANSWER


def _facts(question: str, solution) -> list[str]:
    """The facts, definitions and rules a question relies on: the suite's own `knowledge`
    (unit definitions, the products mul_sub and chain need) and what each chain step means."""
    facts: list[str] = []
    if solution.family == "chain":
        for regex, rule in _CHAIN_RULES:
            facts.extend(rule.format(*m.groups(), *m.groups()) for m in regex.finditer(question))
    facts.extend(solution.knowledge)
    return facts


def synthetic_knowledge(question: str) -> tuple[list[str], list[str]] | None:
    """(learning summary, supplementary knowledge) for a suite question; None if it is not one.

    Supplementary: the question's facts plus every product its steps compute (SKIntern's
    and KARD's K), never the whole worked solution.
    """
    solution = solve(question)
    if solution is None:
        return None
    facts = _facts(question, solution)
    for step in solution.decomposition:
        facts.extend(part for part in step.answer.split(" . ") if " * " in part)
    return list(_FAMILY_SUMMARIES[solution.family]), list(dict.fromkeys(facts))


def analysis_knowledge(question: str) -> tuple[list[str], list[str]] | None:
    """What an error analysis supplies: the question's facts alone, none of its working.

    The analysis prompt asks for the facts, definitions and rules the student was missing
    and says not to solve the question. The entries are retrieved for other questions,
    where this question's products (a unit question's "9 * 7 = 63") are wrong numbers to copy.
    """
    solution = solve(question)
    if solution is None:
        return None
    return list(_FAMILY_SUMMARIES[solution.family]), list(dict.fromkeys(_facts(question, solution)))


def _knowledge_reply(user_text: str, knowledge_of: Callable[[str], tuple[list[str], list[str]] | None]) -> str:
    question = last_question(user_text)
    knowledge = knowledge_of(question) if question else None
    return render_knowledge(*knowledge) if knowledge is not None else NON_ANSWER


def answer_knowledge(user_text: str) -> str:
    return _knowledge_reply(user_text, synthetic_knowledge)


def answer_error_analysis(user_text: str) -> str:
    return _knowledge_reply(user_text, analysis_knowledge)


def corrupt_cot(reply: str, rng: random.Random) -> str:
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


def corrupt_knowledge(reply: str, rng: random.Random) -> str:
    """Knowledge a careless teacher might send: a section cut off, an empty item, no numbering."""
    cut = reply.find(SUPPLEMENTARY_HEADING)
    if cut < 0 or not reply.startswith(SUMMARY_HEADING):
        return reply  # a non-answer is rejected as it is
    r = rng.random()
    if r < 1 / 3:
        return reply[:cut].rstrip()
    if r < 2 / 3:
        return re.sub(r"(?m)^(\d+\.) .*\Z", r"\1", reply)  # the last item left blank
    return re.sub(r"(?m)^\d+\. ", "- ", reply)


PROMPT_KINDS: tuple[PromptKind, ...] = (
    PromptKind("cot", COT_SYSTEM[:40], answer_cot, corrupt_cot),
    PromptKind("knowledge", KNOWLEDGE_SYSTEM[:40], answer_knowledge, corrupt_knowledge),
    # An error analysis names what the question needs; the wrong response changes nothing
    # about which facts those are.
    PromptKind("error_analysis", ERROR_SYSTEM[:40], answer_error_analysis, corrupt_knowledge),
    PromptKind("decomposition", DECOMPOSE_SYSTEM[:40], answer_decomposition, corrupt_decomposition),
)
DEFAULT_KIND = PROMPT_KINDS[0]
_KINDS_BY_NAME = {kind.name: kind for kind in PROMPT_KINDS}
if len({kind.system_prefix for kind in PROMPT_KINDS}) != len(PROMPT_KINDS):
    raise RuntimeError("two oracle prompt kinds share a system prefix; they could not be told apart")


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


def corrupt(reply: str, rng: random.Random, kind: str = DEFAULT_KIND.name) -> str:
    """A reply of prompt kind `kind` spoiled so that its plan rejects it."""
    try:
        return _KINDS_BY_NAME[kind].corrupt(reply, rng)
    except KeyError:
        raise ValueError(f"unknown oracle prompt kind {kind!r} (known: {', '.join(_KINDS_BY_NAME)})") from None
