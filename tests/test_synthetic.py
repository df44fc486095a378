"""The synthetic suite: determinism, split hygiene, rare knowledge, and the oracle solver."""
import re
from collections import Counter

import pytest

from distill_ray.tasks.answers import ANSWER_TRIGGER, extract_answer
from distill_ray.tasks.record import Example
from distill_ray.tasks.synthetic import FAMILIES, RARE_UNITS, demonstrations, generate, solve
from distill_ray.tasks.synthetic_units import RARE_TRAIN_ITEMS, TAIL_UNITS, UNIT_TABLE, UNITS, is_rare


@pytest.fixture(scope="module")
def suite() -> tuple[list[Example], list[Example]]:
    return generate(3000, 600, seed=0)


def _word_tokens(text: str) -> int:
    """Tokens under a word-level tokenizer that splits every digit and punctuation mark."""
    return len(re.findall(r"\d|[A-Za-z]+|[^\w\s]", text))


def test_deterministic_and_seed_dependent(suite):
    again = generate(3000, 600, seed=0)
    assert [e.to_row() for e in again[0]] == [e.to_row() for e in suite[0]]
    assert [e.to_row() for e in again[1]] == [e.to_row() for e in suite[1]]
    other = generate(3000, 600, seed=1)
    assert [e.question for e in other[0]] != [e.question for e in suite[0]]


def test_sizes_ids_and_family_mix(suite):
    train, test = suite
    assert len(train) == 3000 and len(test) == 600
    ids = [e.id for e in train + test]
    assert len(set(ids)) == len(ids)
    assert train[0].id == "synthetic/mul_sub/0/train/0" and test[1].id == "synthetic/unit_conversion/0/test/0"
    assert Counter(e.task for e in train) == {f"synthetic/{f}": 1000 for f in FAMILIES}
    # Round-robin: every window of len(FAMILIES) holds each family once.
    assert {e.task for e in train[:3]} == {f"synthetic/{f}" for f in FAMILIES}
    uneven, _ = generate(7, 0, seed=3)
    assert [e.meta["family"] for e in uneven].count("mul_sub") == 3


def test_train_and_test_never_share_a_question(suite):
    train, test = suite
    assert not {e.question for e in train} & {e.question for e in test}
    assert len({e.question for e in train}) == len(train)


def test_test_split_does_not_depend_on_train_size(suite):
    _, test_small = generate(30, 600, seed=0)
    assert [e.question for e in test_small] == [e.question for e in suite[1]]


def test_examples_are_well_formed(suite):
    for ex in suite[0] + suite[1]:
        assert ex.answer_type == "number" and ex.task.startswith("synthetic/")
        assert ex.rationale.endswith(f"{ANSWER_TRIGGER} {ex.answer}.")
        assert extract_answer(ex.rationale, "number") == ex.answer
        assert 2 <= len(ex.decomposition) <= 4
        # Each sub-answer is an equation whose result is its value; the last one is the answer.
        assert extract_answer(ex.decomposition[-1].answer, "number") == ex.answer
        assert 0 <= int(ex.answer) <= 99
        assert _word_tokens(ex.question + " " + ex.rationale) <= 70
        assert Example.from_row(ex.to_row()) == ex


def test_steps_per_family(suite):
    steps = {f: Counter() for f in FAMILIES}
    for ex in suite[0]:
        steps[ex.meta["family"]][len(ex.decomposition)] += 1
    assert set(steps["mul_sub"]) == {2}
    assert set(steps["unit_conversion"]) == {2, 3}
    assert set(steps["chain"]) == {3, 4}


def test_answers_are_not_guessable(suite):
    # Families whose answers take few values show no benefit from reasoning; these must not.
    for family in FAMILIES:
        answers = Counter(e.answer for e in suite[0] if e.meta["family"] == family)
        assert len(answers) >= 40, family
        assert answers.most_common(1)[0][1] / sum(answers.values()) < 0.1, family


def test_unit_definitions_are_knowledge_not_question(suite):
    for ex in suite[0] + suite[1]:
        if ex.meta["family"] != "unit_conversion":
            continue
        assert ex.knowledge == tuple(UNITS[u].fact for u in ex.meta["units"])
        for fact in ex.knowledge:
            assert fact not in ex.question and fact in ex.rationale


def test_rare_units_are_rare_in_train_and_present_in_test(suite):
    train, test = suite
    train_units = Counter(u for e in train if e.meta["family"] == "unit_conversion" for u in e.meta["units"])
    test_units = Counter(u for e in test if e.meta["family"] == "unit_conversion" for u in e.meta["units"])
    for unit in RARE_UNITS:
        assert train_units[unit] == RARE_TRAIN_ITEMS
        assert test_units[unit] >= 5
    common = [c for u, c in train_units.items() if u not in RARE_UNITS]
    assert min(common) > 5 * RARE_TRAIN_ITEMS
    # Zipf-like: the most common unit is several times the least common of the common ones.
    assert max(common) > 3 * min(common)


def test_a_long_tail_adds_rare_units_the_oracle_knows(suite):
    train, test = generate(3000, 600, seed=0, families=["unit_conversion"], long_tail=30)
    tail = {u.name for u in TAIL_UNITS[:30]}
    assert not tail & {u.name for u in UNIT_TABLE} and all(re.fullmatch(r"[a-z]{4}", u) for u in tail)
    train_units = Counter(u for e in train for u in e.meta["units"])
    assert all(train_units[u] == RARE_TRAIN_ITEMS for u in (*tail, *RARE_UNITS))
    assert not {u for e in train + test for u in e.meta["units"]} - tail - {u.name for u in UNIT_TABLE}
    # Test draws every unit alike, so most test questions now need a rare fact.
    assert sum(e.meta["rare"] for e in test) > 0.6 * len(test)
    assert all(e.meta["rare"] == any(is_rare(u) for u in e.meta["units"]) for e in test)
    for ex in train[:50] + test[:50]:
        assert solve(ex.question).answer == ex.answer
    # Without a tail the unit questions are the default suite's, word for word.
    default = [e.question for e in suite[1] if e.meta["family"] == "unit_conversion"]
    assert [e.question for e in generate(3000, 600, seed=0, long_tail=0)[1]
            if e.meta["family"] == "unit_conversion"] == default
    with pytest.raises(ValueError, match="long_tail must be an int from 0 to 200"):
        generate(10, 5, long_tail=201)


def test_solve_round_trips_every_example(suite):
    for ex in suite[0] + suite[1] + demonstrations(30):
        sol = solve(ex.question)
        assert sol is not None, ex.question
        assert (sol.family, sol.answer, sol.rationale, sol.knowledge, sol.decomposition) == (
            ex.meta["family"],
            ex.answer,
            ex.rationale,
            ex.knowledge,
            ex.decomposition,
        )


@pytest.mark.parametrize(
    "question",
    [
        "What is the capital of France?",
        "Ana has 3 zorps and 5 blips . How many drams is that ?",  # wrong base unit
        "Ana has 3 glorbs and 5 blips . How many blips is that ?",  # unknown unit
        "Ana has 3 boxes of 7 coins and gives away 5 . How many apples are left ?",
        "Ana has 4 coins , gets 3 more . How many coins does Ana have now ?",  # one step only
        "Ana has 4 coins , gets 12 more , loses 1 , doubles them . How many coins does Ana have now ?",
    ],
)
def test_solve_rejects_unknown_text(question):
    assert solve(question) is None


def test_solve_tolerates_whitespace():
    question = "Ana has 3 zorps and 5 blips .\n How many blips is that ?  "
    sol = solve(question)
    assert sol is not None and sol.answer == "17"
    assert sol.rationale == "1 zorp = 4 blips . 3 * 4 = 12 . 12 + 5 = 17 . Therefore, the answer is 17."


def test_demonstrations_are_fixed_and_disjoint_from_any_split():
    demos = demonstrations(9)
    assert [d.id for d in demos] == [d.id for d in demonstrations(9)]
    assert Counter(d.meta["family"] for d in demos) == {f: 3 for f in FAMILIES}
    assert all(d.meta["family"] == "chain" for d in demonstrations(4, family="chain"))
    demo_questions = {d.question for d in demonstrations(60)}
    for seed in range(3):
        train, test = generate(600, 150, seed=seed)
        assert not demo_questions & {e.question for e in train + test}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"train_size": 10, "test_size": 5, "families": ["mul_sub", "division"]}, "unknown synthetic families"),
        ({"train_size": 10, "test_size": 5, "families": "chain"}, "sequence of names"),
        ({"train_size": 10, "test_size": 5, "families": ["chain", "chain"]}, "without repeats"),
        ({"train_size": -1, "test_size": 5}, "train_size"),
        ({"train_size": 10, "test_size": 2.5}, "test_size"),
        ({"train_size": 10**9, "test_size": 5, "families": ["mul_sub"]}, "at most"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(**kwargs)


def test_size_that_sampling_cannot_fill_raises():
    # mul_sub's loose bound is 36,864 questions but only 35,648 exist; sampling must
    # notice it has run dry and say so instead of spinning for ever.
    with pytest.raises(ValueError, match="found only"):
        generate(36_000, 0, families=["mul_sub"])


def test_unknown_demo_family_raises():
    with pytest.raises(ValueError, match="unknown synthetic families"):
        demonstrations(3, family="nope")
