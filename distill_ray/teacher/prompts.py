"""Teacher prompts in the house format: Std-CoT rationales and SKIntern knowledge.

    Question: <exemplar question>
    Answer: <exemplar rationale> Therefore, the answer is X.

    ... (k exemplars) ...

    Question: <target question>
    Answer:

The last "Question: ..." block is always the target, so anything reading the prompt
(the oracle teacher, a log reader) can recover the question with `last_question`.
Chat requests carry a short system instruction and one user message holding all of it.

Knowledge prompts use the same blocks with the gold answer filled in and the knowledge
(K) after it; the target block ends after its answer, and the reply is K:

    Question: <q>
    Answer: <gold answer>
    Learning Summary:
    1. ...
    Supplementary Knowledge:
    1. ...
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

# Starts with other words than COT_SYSTEM: the oracle tells the kinds apart by them.
KNOWLEDGE_SYSTEM = (
    "Write the knowledge a student needs for the last question, whose correct answer is given. "
    "Reply with 'Learning Summary:' and a numbered list of general lessons for solving this kind "
    "of problem, then 'Supplementary Knowledge:' and a numbered list of the specific facts, "
    "definitions and rules it relies on. Do not solve the question."
)
# NesyCD: the teacher reads a wrong student reply and writes what the student lacked.
ERROR_SYSTEM = (
    "Analyse the student's wrong response to the last question, whose correct answer is given. "
    "Reply with 'Learning Summary:' and a numbered list of general lessons the student should learn "
    "from this mistake, then 'Supplementary Knowledge:' and a numbered list of the specific facts, "
    "definitions and rules the student was missing. Do not solve the question."
)
SUMMARY_HEADING = "Learning Summary:"
SUPPLEMENTARY_HEADING = "Supplementary Knowledge:"

Exemplar = tuple[str, str]  # (question, rationale ending with the answer sentence)
KnowledgeExemplar = tuple[str, str, str]  # (question, gold answer, knowledge text)

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


def _numbered(items: Sequence[str], what: str) -> list[str]:
    if isinstance(items, str) or not items:
        raise ValueError(f"{what} must be a non-empty list of texts, got {items!r}")
    out = []
    for i, item in enumerate(items, start=1):
        if not isinstance(item, str) or not item.strip() or "\n" in item.strip():
            raise ValueError(f"{what} item {i} must be non-empty text on one line, got {item!r}")
        out.append(f"{i}. {item.strip()}")
    return out


def render_knowledge(summary: Sequence[str], supplementary: Sequence[str], *, inline: bool = False) -> str:
    """K as the teacher writes it (one item a line), or `inline` on one line for student inputs."""
    parts = [SUMMARY_HEADING, *_numbered(summary, "learning summary"),
             SUPPLEMENTARY_HEADING, *_numbered(supplementary, "supplementary knowledge")]
    return " ".join(parts) if inline else "\n".join(parts)


def _qa_block(question: str, answer: str, what: str) -> str:
    return f"Question: {_check_text(f'{what} question', question)}\nAnswer: {_check_text(f'{what} answer', answer)}"


def knowledge_prompt(question: str, answer: str, exemplars: Sequence[KnowledgeExemplar] = (),
                     preamble: str = "") -> str:
    """Worked (question, answer, knowledge) blocks, then the target question and its gold answer."""
    blocks = [preamble.strip()] if preamble and preamble.strip() else []
    for i, triple in enumerate(exemplars):
        if not isinstance(triple, (tuple, list)) or len(triple) != 3:
            raise ValueError(f"knowledge exemplar {i} must be a (question, answer, knowledge) triple, got {triple!r}")
        q, a, k = triple
        what = f"knowledge exemplar {i}"
        blocks.append(f"{_qa_block(q, a, what)}\n{_check_text(f'{what} knowledge', k)}")
    blocks.append(_qa_block(question, answer, "target"))
    return "\n\n".join(blocks)


def knowledge_messages(question: str, answer: str, exemplars: Sequence[KnowledgeExemplar] = (),
                       preamble: str = "") -> tuple[dict, ...]:
    return (
        {"role": "system", "content": KNOWLEDGE_SYSTEM},
        {"role": "user", "content": knowledge_prompt(question, answer, exemplars, preamble)},
    )


def error_prompt(question: str, answer: str, student_response: str,
                 exemplars: Sequence[KnowledgeExemplar] = (), preamble: str = "") -> str:
    """The knowledge prompt's blocks, with the student's wrong response after the gold answer."""
    response = " ".join(str(student_response).split()) or "(no response)"
    # On one line and without "Question:"/"Answer:" markers, so it cannot end the block early.
    response = response.replace("Question:", "Question -").replace("Answer:", "Answer -")
    return f"{knowledge_prompt(question, answer, exemplars, preamble)}\nStudent's wrong response: {response}"


def error_messages(question: str, answer: str, student_response: str,
                   exemplars: Sequence[KnowledgeExemplar] = (), preamble: str = "") -> tuple[dict, ...]:
    return (
        {"role": "system", "content": ERROR_SYSTEM},
        {"role": "user", "content": error_prompt(question, answer, student_response, exemplars, preamble)},
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
