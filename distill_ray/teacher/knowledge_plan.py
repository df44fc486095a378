"""The knowledge query plan (SKIntern step 1): the teacher writes K for each question.

Given the question, its gold answer and a few worked examples, the teacher replies with
a numbered "Learning Summary:" list (how to approach this kind of problem) and a numbered
"Supplementary Knowledge:" list (the facts, definitions and rules it needs). A reply is
kept only when both sections are there and each is a non-empty numbered list of
non-empty items; anything else is re-asked at the next, higher temperature.
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial

from distill_ray.client.requests import LLMRequest
from distill_ray.tasks.answers import cut_at_next_question
from distill_ray.tasks.record import Example
from distill_ray.teacher.cot_plan import check_reasks, per_synthetic_task, reask_sampling
from distill_ray.teacher.prompts import KnowledgeExemplar, knowledge_messages, render_knowledge

SUMMARY, SUPPLEMENTARY = "Learning Summary", "Supplementary Knowledge"

# Headings as written, or wrapped in markdown emphasis ("**Learning Summary:**"), which
# chat models add unasked; the colon is required so prose mentioning a summary is no heading.
_HEADING_RE = re.compile(
    r"(?:\*\*|__)?\b(?P<name>learning\s+summary|supplementary\s+knowledge)\b\s*(?:\*\*|__)?\s*:\s*(?:\*\*|__)?",
    re.IGNORECASE,
)
_LINE_ITEM_RE = re.compile(r"\s*(?P<n>\d+)[.)](?:\s+(?P<text>.*))?\s*$")


class KnowledgeFormatError(ValueError):
    """A reply that is not well-formed knowledge; `reason` is what the failures table records."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Knowledge:
    summary: tuple[str, ...]
    supplementary: tuple[str, ...]

    @property
    def text(self) -> str:
        """One line, as it goes into a student's input."""
        return render_knowledge(self.summary, self.supplementary, inline=True)


def _malformed(detail: str) -> KnowledgeFormatError:
    return KnowledgeFormatError(f"malformed_knowledge: {detail}")


def _line_items(body: str, section: str) -> list[str]:
    items: list[str] = []
    for line in body.splitlines():
        if not line.strip():
            continue
        m = _LINE_ITEM_RE.fullmatch(line)
        if m is None:
            if not items:
                raise _malformed(f"'{section}:' does not start with a numbered item: {line.strip()[:60]!r}")
            items[-1] = f"{items[-1]} {line.strip()}".strip()  # a wrapped item goes on
            continue
        n = int(m["n"])
        if n != len(items) + 1:
            raise _malformed(f"'{section}:' item {len(items) + 1} is numbered {n}")
        items.append((m["text"] or "").strip())
    return items


def _inline_items(body: str, section: str) -> list[str]:
    """"1. a 2. b 3. c" on one line: each marker is the next number, so "in 2 steps" never splits."""
    first = re.match(r"1[.)](?=\s|$)", body)
    if first is None:
        raise _malformed(f"'{section}:' is not a numbered list: {body[:60]!r}")
    items, start, n = [], first.end(), 2
    while True:
        nxt = re.compile(rf"(?<=\s){n}[.)](?=\s|$)").search(body, start)
        if nxt is None:
            items.append(body[start:].strip())
            return items
        items.append(body[start:nxt.start()].strip())
        start, n = nxt.end(), n + 1


def _items(body: str, section: str) -> tuple[str, ...]:
    body = body.strip()
    if not body:
        raise _malformed(f"'{section}:' has no items")
    items = _line_items(body, section) if "\n" in body else _inline_items(body, section)
    empty = [i for i, item in enumerate(items, start=1) if not item]
    if empty:
        raise _malformed(f"'{section}:' item {empty[0]} is empty")
    return tuple(items)


def parse_knowledge(text: str) -> Knowledge:
    """Both sections out of a reply (teacher layout or the one-line form); KnowledgeFormatError if not K."""
    if not isinstance(text, str) or not text.strip():
        raise KnowledgeFormatError("empty_knowledge: the reply is empty")
    heads: dict[str, re.Match] = {}
    for m in _HEADING_RE.finditer(text):
        name = SUMMARY if m["name"].lower().startswith("learning") else SUPPLEMENTARY
        if name in heads:
            raise _malformed(f"'{name}:' appears more than once")
        heads[name] = m
    for name in (SUMMARY, SUPPLEMENTARY):
        if name not in heads:
            raise _malformed(f"no '{name}:' section")
    # Either order is accepted; a preface before the first heading is not part of K.
    first, second = sorted(heads, key=lambda name: heads[name].start())
    bodies = {first: text[heads[first].end():heads[second].start()], second: text[heads[second].end():]}
    return Knowledge(_items(bodies[SUMMARY], SUMMARY), _items(bodies[SUPPLEMENTARY], SUPPLEMENTARY))


def knowledge_payload(k: Knowledge) -> dict:
    """A kept reply's payload; lists travel as JSON text (see KnowledgePlan.payload_fields)."""
    return {"summary": json.dumps(list(k.summary), ensure_ascii=False),
            "supplementary": json.dumps(list(k.supplementary), ensure_ascii=False),
            "knowledge": k.text}


def check_knowledge_reply(response_text: str) -> tuple[bool, str, dict]:
    """A plan's verdict on a reply that should be K: (kept, reason, payload)."""
    try:
        # A chat model that writes on into an invented next "Question:" block has said its K.
        k = parse_knowledge(cut_at_next_question(response_text))
    except KnowledgeFormatError as e:
        return False, e.reason, {}
    return True, "", knowledge_payload(k)


@dataclass(frozen=True)
class KnowledgeShots:
    exemplars: tuple[KnowledgeExemplar, ...] = ()
    preamble: str = ""


@dataclass(frozen=True)
class KnowledgePlan:
    model: str
    temperatures: tuple[float, ...]
    max_tries: int
    max_tokens: int
    shots: Mapping[str, KnowledgeShots] = field(default_factory=dict)  # by task name
    # Lists travel as JSON text: a failed row's payload is null, and Ray Data blocks of
    # only-null list columns do not concatenate with list<string> ones.
    payload_fields: tuple[str, ...] = ("summary", "supplementary", "knowledge")

    def __post_init__(self) -> None:
        check_reasks(self.temperatures, self.max_tries)

    def requests(self, row: dict, attempt: int) -> LLMRequest:
        shot = self.shots.get(row["task"], KnowledgeShots())
        temperature, seed = reask_sampling(self.temperatures, attempt)
        messages = knowledge_messages(row["question"], row["answer"], shot.exemplars, shot.preamble)
        return LLMRequest("chat", model=self.model, messages=messages, temperature=temperature,
                          max_tokens=self.max_tokens, seed=seed)

    def check(self, row: dict, response_text: str) -> tuple[bool, str, dict]:
        return check_knowledge_reply(response_text)


def synthetic_knowledge_exemplars(k: int, family: str | None = None, *,
                                  analysis: bool = False) -> list[KnowledgeExemplar]:
    """k fixed synthetic demonstrations with the knowledge the oracle writes for them
    (`analysis`: as it writes it in an error analysis)."""
    from distill_ray.tasks.synthetic import demonstrations
    from distill_ray.teacher.oracle_answers import analysis_knowledge, synthetic_knowledge

    knowledge_of = analysis_knowledge if analysis else synthetic_knowledge
    out = []
    for ex in demonstrations(k, family):
        summary, supplementary = knowledge_of(ex.question)
        out.append((ex.question, ex.answer, render_knowledge(summary, supplementary)))
    return out


def default_knowledge_shots(examples: Sequence[Example], k: int, *,
                            analysis: bool = False) -> dict[str, KnowledgeShots]:
    made = per_synthetic_task(examples, k, partial(synthetic_knowledge_exemplars, analysis=analysis))
    return {task: KnowledgeShots(tuple(triples)) for task, triples in made.items()}


def build_knowledge_plan(
    teacher_cfg,
    examples: Sequence[Example],
    exemplars: Mapping[str, Sequence[KnowledgeExemplar] | KnowledgeShots] | None = None,
) -> KnowledgePlan:
    """The plan for `examples`; `exemplars` (by task) overrides the synthetic defaults."""
    shots = default_knowledge_shots(examples, teacher_cfg.few_shot)
    for task, given in (exemplars or {}).items():
        shots[task] = given if isinstance(given, KnowledgeShots) else KnowledgeShots(tuple(tuple(t) for t in given))
    return KnowledgePlan(
        model=teacher_cfg.model,
        temperatures=tuple(float(t) for t in teacher_cfg.temperatures),
        max_tries=teacher_cfg.max_tries,
        max_tokens=teacher_cfg.max_tokens,
        shots=shots,
    )
