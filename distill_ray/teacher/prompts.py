"""Std-CoT teacher prompts: few-shot chain of thought in the house format.

    Question: <exemplar question>
    Answer: <exemplar rationale> Therefore, the answer is X.

    ... (k exemplars) ...

    Question: <target question>
    Answer:

The last "Question: ..." block is always the target, so anything reading the prompt
(the oracle teacher, a log reader) can recover the question with `last_question`.
Chat requests carry a short system instruction and one user message holding all of it.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

from distill_ray.tasks.answers import ANSWER_TRIGGER

# Prompt kinds are told apart by their system instruction's first words (the oracle
# dispatches on them), so each kind's instruction must start differently.
COT_SYSTEM = (
    "Solve the last question step by step, in the same style as the worked examples, "
    f"and finish with the sentence '{ANSWER_TRIGGER} X.' where X is the final answer."
)

Exemplar = tuple[str, str]  # (question, rationale ending with the answer sentence)

_QA_BLOCK_RE = re.compile(r"(?:^|\n\n)Q:\s*(.*?)\nA:\s*(.*?)(?=\n\nQ:|\Z)", re.DOTALL)
_BBH_TRIGGER_RE = re.compile(r"So the answer is", re.IGNORECASE)


def _check_text(what: str, text: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{what} must be non-empty text, got {text!r}")
    if "\nAnswer:" in text or "\nQuestion:" in text or text.lstrip().startswith("Question:"):
        # It would end the block early and the target question could not be recovered.
        raise ValueError(f"{what} must not contain a 'Question:'/'Answer:' line: {text[:80]!r}")
    return text.strip()


def format_exemplar(question: str, rationale: str) -> str:
    q = _check_text("exemplar question", question)
    return f"Question: {q}\nAnswer: {_check_text('exemplar rationale', rationale)}"


def cot_prompt(question: str, exemplars: Sequence[Exemplar] = (), preamble: str = "") -> str:
    """The few-shot block followed by the target question and an open "Answer:"."""
    blocks = [preamble.strip()] if preamble and preamble.strip() else []
    for i, pair in enumerate(exemplars):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"exemplar {i} must be a (question, rationale) pair, got {pair!r}")
        blocks.append(format_exemplar(*pair))
    blocks.append(f"Question: {_check_text('question', question)}\nAnswer:")
    return "\n\n".join(blocks)


def cot_messages(question: str, exemplars: Sequence[Exemplar] = (), preamble: str = "") -> tuple[dict, ...]:
    return (
        {"role": "system", "content": COT_SYSTEM},
        {"role": "user", "content": cot_prompt(question, exemplars, preamble)},
    )


def last_question(prompt: str) -> str | None:
    """The target question of a prompt built here (the last "Question:" block).

    Plain string search, not a regex: the oracle runs this on every request.
    """
    start = prompt.rfind("\nQuestion:")
    start = start + 1 if start >= 0 else (0 if prompt.startswith("Question:") else -1)
    if start < 0:
        return None
    body_start = start + len("Question:")
    end = prompt.find("\nAnswer:", body_start)
    question = prompt[body_start:end if end >= 0 else None].strip()
    return question or None


def synthetic_exemplars(k: int, family: str | None = None) -> list[Exemplar]:
    """k fixed demonstrations of the synthetic suite (never equal to a generated question)."""
    from distill_ray.tasks.synthetic import demonstrations

    return [(ex.question, ex.rationale or "") for ex in demonstrations(k, family)]


def pairs_from_qa_prompt(text: str) -> tuple[str, list[Exemplar]]:
    """(preamble, exemplars) from a "Q: ...\\nA: ..." few-shot file such as BBH's cot-prompts.

    The final "So the answer is X." becomes the house "Therefore, the answer is X." so the
    teacher answers in the one format every stage reads.
    """
    head, sep, _ = text.partition("Q:")
    if not sep:
        raise ValueError("few-shot prompt has no 'Q:' exemplar")
    pairs = []
    for q, a in _QA_BLOCK_RE.findall(text[len(head.rstrip()):] if head.strip() else text):
        a = a.strip()
        matches = list(_BBH_TRIGGER_RE.finditer(a))
        if matches:
            m = matches[-1]
            a = a[: m.start()] + ANSWER_TRIGGER + a[m.end():]
        pairs.append((q.strip(), a))
    if not pairs:
        raise ValueError("few-shot prompt has no complete 'Q: ... A: ...' exemplar")
    return head.strip(), pairs
