"""Reading a final answer out of model text, canonicalising gold answers, scoring.

Convention: a reply ends with `Therefore, the answer is X.` The BBH few-shot prompts end
their worked answers with `So the answer is X.`, and teachers prompted with them copy
that, so both phrasings (and a bare `The answer is`) count as the trigger. Text after the
first "\\nQuestion:" / "\\nQ:" is dropped: small models ramble on into a new problem.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import Decimal

from distill_ray.tasks.record import ANSWER_TYPES, Example

ANSWER_TRIGGER = "Therefore, the answer is"

_TRIGGER_RE = re.compile(r"\bthe\s+answer\s+is\b\s*:?", re.IGNORECASE)
_NEXT_QUESTION_RE = re.compile(r"\n\s*(?:Question|Q)\s*:")

# A sign or "$" only counts when glued to the digits, and a number never starts right
# after a word character or inside another number: "3-5" reads as 5, "21 - 5" as 21 and
# 5, "x = -3" as -3, "B12" as nothing.
_NUMBER_RE = re.compile(
    r"(?<![\w.,])(?P<sign>[-+\u2212])?\$?"
    r"(?P<num>(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?!\d)"
)
_LETTER_PAREN_RE = re.compile(r"\(([A-Z])\)")
_LETTER_BARE_RE = re.compile(r"(?<![\w'])([A-Z])(?![\w'])")
_YES_NO_TRUE_FALSE_RE = re.compile(r"\b(yes|no|true|false)\b", re.IGNORECASE)
_YES_NO_RE = re.compile(r"\b(yes|no)\b", re.IGNORECASE)
# The end of the answer sentence: a period followed by whitespace or the end of text
# (a decimal point is followed by a digit, so it never matches).
_SENTENCE_END_RE = re.compile(r"\.(?=\s|$)")
_QUOTES = "\"'`\u201c\u201d\u2018\u2019"


def cut_at_next_question(text: str) -> str:
    """Drop everything from the first line that starts a new question."""
    m = _NEXT_QUESTION_RE.search(text)
    return text[: m.start()] if m else text


def _after_last_trigger(text: str) -> str | None:
    last = None
    for last in _TRIGGER_RE.finditer(text):
        pass
    return text[last.end():] if last else None


def without_answer_sentence(text: str) -> str:
    """The reasoning of a rationale, its closing "Therefore, the answer is X." removed."""
    i = text.rfind(ANSWER_TRIGGER)
    if i < 0:
        last = None
        for last in _TRIGGER_RE.finditer(text):
            pass
        i = last.start() if last else len(text)
    return text[:i].rstrip()


def _canonical_number(sign: str | None, digits: str) -> str:
    value = Decimal(digits.replace(",", ""))
    if sign in ("-", "\u2212"):
        value = -value
    if value == value.to_integral_value():
        return str(int(value))
    # normalize() drops trailing zeros; format "f" keeps it out of exponent notation.
    return format(value.normalize(), "f")


def _numbers(text: str) -> list[str]:
    return [_canonical_number(m["sign"], m["num"]) for m in _NUMBER_RE.finditer(text)]


def _first_sentence(text: str) -> str:
    line = text.strip().split("\n", 1)[0]
    m = _SENTENCE_END_RE.search(line)
    return line[: m.start()] if m else line


def _letter_in_range(letter: str, choices: Sequence[str] | None) -> str | None:
    if choices is not None and ord(letter) - ord("A") >= len(choices):
        return None
    return letter


def _letter_in_range_or_raise(letter: str, choices: Sequence[str]) -> None:
    if _letter_in_range(letter, choices) is None:
        raise ValueError(f"gold answer {letter!r} is outside the {len(choices)} choices")


def _normalize_text(text: str, case_sensitive: bool) -> str:
    text = " ".join(text.split()).rstrip(".").strip()
    while len(text) >= 2 and text[0] in _QUOTES and text[-1] in _QUOTES:
        text = text[1:-1].strip()
    return text if case_sensitive else text.casefold()


def _check_type(answer_type: str) -> None:
    if answer_type not in ANSWER_TYPES:
        raise ValueError(f"answer_type {answer_type!r} not in {ANSWER_TYPES}")


def _read_choice(tail: str, choices: Sequence[str] | None) -> str | None:
    sentence = _first_sentence(tail)
    m = _LETTER_PAREN_RE.search(sentence) or _LETTER_BARE_RE.search(sentence)
    if m:
        return _letter_in_range(m.group(1), choices)
    # A reply may name the option by its text ("the answer is 12/25/1937").
    if choices:
        wanted = _normalize_text(sentence, case_sensitive=False)
        for i, choice in enumerate(choices):
            if _normalize_text(choice, case_sensitive=False) == wanted:
                return chr(ord("A") + i)
    return None


def extract_answer(
    text: str,
    answer_type: str,
    choices: Sequence[str] | None = None,
    *,
    case_sensitive: bool = False,
) -> str | None:
    """The canonical answer the text commits to, or None when none can be read.

    Reads after the last trigger. Without a trigger it falls back to the last number
    (number), the last standalone yes/no (yes_no) or the last "(X)" (choice); free text
    has no fallback. A trigger followed by nothing readable gives None, not a guess.
    """
    _check_type(answer_type)
    text = cut_at_next_question(text)
    tail = _after_last_trigger(text)
    if answer_type == "number":
        found = _numbers(_first_sentence(tail)) if tail is not None else _numbers(text)[-1:]
        return found[0] if found else None
    if answer_type == "yes_no":
        if tail is not None:
            m = _YES_NO_TRUE_FALSE_RE.search(_first_sentence(tail))
            word = m.group(1) if m else None
        else:
            hits = _YES_NO_RE.findall(text)
            word = hits[-1] if hits else None
        if word is None:
            return None
        return "yes" if word.lower() in ("yes", "true") else "no"
    if answer_type == "choice":
        if tail is not None:
            return _read_choice(tail, choices)
        hits = _LETTER_PAREN_RE.findall(text)
        return _letter_in_range(hits[-1], choices) if hits else None
    if tail is None:
        return None
    answer = _normalize_text(_first_sentence(tail), case_sensitive)
    return answer or None


def normalize_answer(answer: str, answer_type: str, *, case_sensitive: bool = False) -> str:
    """Canonical form of a gold answer; ValueError when it is not a valid `answer_type`."""
    _check_type(answer_type)
    raw = str(answer).strip()
    if answer_type == "number":
        m = _NUMBER_RE.fullmatch(raw.rstrip(".%").strip())
        if not m:
            raise ValueError(f"gold answer {answer!r} is not a number")
        return _canonical_number(m["sign"], m["num"])
    if answer_type == "yes_no":
        word = raw.rstrip(".").strip().lower()
        if word in ("yes", "true"):
            return "yes"
        if word in ("no", "false"):
            return "no"
        raise ValueError(f"gold answer {answer!r} is not yes/no")
    if answer_type == "choice":
        m = re.fullmatch(r"\(?([A-Za-z])\)?\.?", raw)
        if not m:
            raise ValueError(f"gold answer {answer!r} is not an option letter like 'C' or '(C)'")
        return m.group(1).upper()
    text = _normalize_text(raw, case_sensitive)
    if not text:
        raise ValueError("gold answer is empty")
    return text


def is_correct(
    output_text: str,
    gold: str,
    answer_type: str,
    choices: Sequence[str] | None = None,
    *,
    case_sensitive: bool = False,
) -> bool:
    """True when the answer read from `output_text` equals the canonical gold answer."""
    gold_norm = normalize_answer(gold, answer_type, case_sensitive=case_sensitive)
    if answer_type == "choice" and choices is not None:
        _letter_in_range_or_raise(gold_norm, choices)
    pred = extract_answer(output_text, answer_type, choices, case_sensitive=case_sensitive)
    return pred is not None and pred == gold_norm


def score(output_text: str, example: Example) -> tuple[str | None, bool]:
    """(prediction read from the output, whether it matches the example's gold answer).

    `example.meta["case_sensitive"]` marks free-text tasks whose answers differ by case.
    """
    case_sensitive = bool(example.meta.get("case_sensitive", False))
    pred = extract_answer(output_text, example.answer_type, example.choices, case_sensitive=case_sensitive)
    gold = normalize_answer(example.answer, example.answer_type, case_sensitive=case_sensitive)
    return pred, pred is not None and pred == gold
