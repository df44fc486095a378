"""Answer extraction, gold canonicalisation and scoring."""
import pytest

from distill_ray.tasks.answers import (
    ANSWER_TRIGGER,
    cut_at_next_question,
    extract_answer,
    is_correct,
    normalize_answer,
    score,
)
from distill_ray.tasks.record import Example


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Therefore, the answer is 1,234.50.", "1234.5"),
        ("Therefore, the answer is -3.", "-3"),
        ("Therefore, the answer is 0.5", "0.5"),
        ("Therefore, the answer is $1,000,000.", "1000000"),
        ("Therefore, the answer is 12.75 dollars.", "12.75"),
        ("Therefore, the answer is 40%.", "40"),
        ("Therefore, the answer is .25.", "0.25"),
        ("Therefore, the answer is 7.0.", "7"),
        ("Therefore, the answer is \u22124.", "-4"),
        ("Therefore, the answer is: 18", "18"),
        # The last trigger wins, and the first number after it.
        ("Therefore, the answer is 3. Wait. Therefore, the answer is 4 apples and 5 pears.", "4"),
        ("So the answer is 21.", "21"),
        # No trigger: the last number (GSM8K convention); signs glued to words don't count.
        ("3 * 7 = 21 . 21 - 5 = 16 .", "16"),
        ("between 3-5", "5"),
        ("x = -3.", "-3"),
        ("B12 and 7", "7"),
        # Trailing junk after the next question is cut off.
        ("Therefore, the answer is 16.\nQuestion: What is 99 + 1? Therefore, the answer is 100.", "16"),
        ("It is 16.\nQ: what is 5?", "16"),
    ],
)
def test_extract_number(text, expected):
    assert extract_answer(text, "number") == expected


@pytest.mark.parametrize(
    "text",
    ["Therefore, the answer is twelve.", "no digits here", "", "I am not sure.\nQuestion: what is 7?"],
)
def test_extract_number_missing_gives_none(text):
    assert extract_answer(text, "number") is None


def test_trigger_with_nothing_readable_does_not_fall_back():
    # Earlier numbers are work, not the answer: a committed-but-unreadable answer is None.
    assert extract_answer("3 + 4 = 7. Therefore, the answer is unknown.", "number") is None


@pytest.mark.parametrize(
    ("text", "choices", "expected"),
    [
        ("So the answer is (C).", ("a", "b", "c"), "C"),
        ("Therefore, the answer is C.", ("a", "b", "c"), "C"),
        ("Therefore, the answer is (D).", ("a", "b", "c"), None),
        ("Therefore, the answer is 12/25/1937.", ("12/11/1937", "12/25/1937"), "B"),
        ("I first thought (B), then (A).", None, "A"),
        ("Therefore, the answer is (K).", None, "K"),
        ("no letter at all", None, None),
    ],
)
def test_extract_choice(text, choices, expected):
    assert extract_answer(text, "choice", choices) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("So the answer is Yes.", "yes"),
        ("Therefore, the answer is no.", "no"),
        ("Therefore, the answer is True.", "yes"),
        ("Therefore, the answer is false", "no"),
        ("Yes at first, but no.", "no"),
        ("Therefore, the answer is maybe.", None),
        ("nothing to see", None),
    ],
)
def test_extract_yes_no(text, expected):
    assert extract_answer(text, "yes_no") == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("So the answer is valid.", "valid"),
        ("So the answer is invalid. The premises do not entail it.", "invalid"),
        ("Therefore, the answer is True.", "true"),
        ('So the answer is "] ) }".', "] ) }"),
        ("So the answer is   apple  banana\tcherry.", "apple banana cherry"),
        ("no trigger means no guess", None),
    ],
)
def test_extract_text(text, expected):
    assert extract_answer(text, "text") == expected


def test_text_case_sensitivity_is_opt_in():
    assert extract_answer("Therefore, the answer is ABC.", "text", case_sensitive=True) == "ABC"
    assert not is_correct("Therefore, the answer is abc.", "ABC", "text", case_sensitive=True)
    assert is_correct("Therefore, the answer is abc.", "ABC", "text")


def test_normalize_gold():
    assert normalize_answer("1,200", "number") == "1200"
    assert normalize_answer(" -10 ", "number") == "-10"
    assert normalize_answer("$3.50", "number") == "3.5"
    assert normalize_answer("(C)", "choice") == "C"
    assert normalize_answer("c", "choice") == "C"
    assert normalize_answer("Yes", "yes_no") == "yes"
    assert normalize_answer("False", "yes_no") == "no"
    assert normalize_answer("  'Valid'. ", "text") == "valid"


@pytest.mark.parametrize(
    ("gold", "answer_type", "message"),
    [
        ("abc", "number", "not a number"),
        ("1 2", "number", "not a number"),
        ("maybe", "yes_no", "yes/no"),
        ("(AB)", "choice", "option letter"),
        ("  ", "text", "empty"),
        ("1", "float", "answer_type"),
    ],
)
def test_normalize_rejects_bad_gold(gold, answer_type, message):
    with pytest.raises(ValueError, match=message):
        normalize_answer(gold, answer_type)


def test_is_correct():
    assert is_correct("21 - 5 = 16 . Therefore, the answer is 16.", "16", "number")
    assert is_correct("Therefore, the answer is 1,234.50.", "1234.5", "number")
    assert not is_correct("Therefore, the answer is 1234.", "1234.5", "number")  # no truncation
    assert not is_correct("I do not know.", "16", "number")
    assert is_correct("Therefore, the answer is (D).", "(D)", "choice", ("a", "b", "c", "d"))
    assert not is_correct("Therefore, the answer is (E).", "(D)", "choice", ("a", "b", "c", "d"))
    with pytest.raises(ValueError, match="outside the 3 choices"):
        is_correct("Therefore, the answer is (D).", "(D)", "choice", ("a", "b", "c"))


def test_score_reports_prediction_and_verdict():
    ex = Example(id="t/0", task="t", question="q?", answer="16", answer_type="number")
    assert score(f"3 * 7 = 21 . 21 - 5 = 16 . {ANSWER_TRIGGER} 16.", ex) == ("16", True)
    assert score(f"{ANSWER_TRIGGER} 17.", ex) == ("17", False)
    assert score("no idea", ex) == (None, False)
    choice = Example(id="t/1", task="t", question="q?", answer="B", answer_type="choice", choices=("x", "y"))
    assert score("So the answer is (C).", choice) == (None, False)
    assert score("So the answer is (B).", choice) == ("B", True)


def test_cut_at_next_question():
    assert cut_at_next_question("A.\nQuestion: next one") == "A."
    assert cut_at_next_question("A.\n\nQ: next one") == "A."
    assert cut_at_next_question("The Question: stays when not on a new line") == (
        "The Question: stays when not on a new line"
    )
