"""Loaders over the real reference files (read-only) and the generic loader on temp files."""
import json
import re
import warnings

import pytest

from distill_ray.tasks.answers import ANSWER_TRIGGER, extract_answer, is_correct
from distill_ray.tasks.loaders import (
    bbh_tasks,
    load_arc,
    load_bbh,
    load_bbh_cot_prompt,
    load_generic,
    load_gsm8k,
    load_strategyqa,
    split_examples,
)
from distill_ray.tasks.record import Example

BBH_TYPES = {
    "boolean_expressions": "text",
    "causal_judgement": "yes_no",
    "formal_fallacies": "text",
    "multistep_arithmetic_two": "number",
    "navigate": "yes_no",
    "object_counting": "number",
}


def _load_bbh_quietly(data_dir, task):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_bbh(data_dir, task)


# ---------------------------------------------------------------- GSM8K


@pytest.mark.parametrize(("split", "count"), [("train", 7473), ("test", 1319)])
def test_gsm8k_gold_answers_extract_to_their_final_line(shared_data, split, count):
    path = shared_data / "gsm8k" / f"{split}.jsonl"
    raw = [json.loads(line) for line in path.read_text().splitlines()]
    examples = load_gsm8k(path)
    assert len(raw) == len(examples) == count
    assert examples[17].id == f"gsm8k/{split}/17" and examples[17].task == "gsm8k"
    for row, ex in zip(raw, examples):
        final = row["answer"].split("####")[-1].strip().replace(",", "")
        assert extract_answer(row["answer"].replace("####", ANSWER_TRIGGER), "number") == final
        assert ex.answer == final and ex.question == row["question"].strip()
        assert "<<" not in ex.rationale and "####" not in ex.rationale
        assert extract_answer(ex.rationale, "number") == final


def test_gsm8k_rationale_drops_calculator_marks(shared_data):
    first = load_gsm8k(shared_data / "gsm8k" / "train.jsonl")[0]
    assert first.rationale == (
        "Natalia sold 48/2 = 24 clips in May.\n"
        "Natalia sold 48+24 = 72 clips altogether in April and May.\n"
        "Therefore, the answer is 72."
    )


def test_gsm8k_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q?", "answer": "4\\n#### 4"}\n{"question": "q?", "answer": "no final line"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 2: answer must contain exactly one"):
        load_gsm8k(bad)
    with pytest.raises(FileNotFoundError, match="GSM8K file not found"):
        load_gsm8k(tmp_path / "missing.jsonl")


# ---------------------------------------------------------------- BBH


def test_bbh_tasks_lists_all_twenty(shared_data):
    tasks = bbh_tasks(shared_data / "bbh")
    assert len(tasks) == 20 and "navigate" in tasks and "LICENSE" not in tasks


def test_every_bbh_target_scores_correct_against_itself(shared_data):
    data_dir = shared_data / "bbh"
    for task in bbh_tasks(data_dir):
        raw = json.loads((data_dir / f"{task}.json").read_text())["examples"]
        examples = {ex.id: ex for ex in _load_bbh_quietly(data_dir, task)}
        assert len(examples) >= len(raw) - 1, task
        expected_type = BBH_TYPES.get(task, "choice")
        for i, row in enumerate(raw):
            ex = examples.get(f"bbh/{task}/{i}")
            if ex is None:
                continue
            assert ex.answer_type == expected_type, task
            output = f"Let's think step by step. ... {ANSWER_TRIGGER} {row['target']}."
            assert is_correct(output, row["target"], ex.answer_type, ex.choices), (task, i)
            if ex.answer_type == "choice":
                assert len(ex.choices) >= 2 and ex.answer < chr(ord("A") + len(ex.choices))


def test_bbh_skips_the_upstream_defect_with_a_warning(shared_data):
    with pytest.warns(UserWarning, match=r"movie_recommendation\.json: example 163 skipped"):
        examples = load_bbh(shared_data / "bbh", "movie_recommendation")
    assert len(examples) == 249 and "bbh/movie_recommendation/163" not in {e.id for e in examples}


def test_bbh_choices_parsed_from_options(shared_data):
    ex = load_bbh(shared_data / "bbh", "date_understanding")[0]
    assert ex.choices == ("12/11/1937", "12/25/1937", "01/04/1938", "12/04/1937", "12/25/2006", "07/25/1937")
    assert ex.answer == "B" and "Options:" in ex.question
    assert is_correct("So the answer is 12/25/1937.", ex.answer, "choice", ex.choices)


def test_every_bbh_cot_prompt_has_readable_worked_answers(shared_data):
    data_dir = shared_data / "bbh"
    for task in bbh_tasks(data_dir):
        prompt = load_bbh_cot_prompt(data_dir, task)
        assert "canary" not in prompt.lower() and not prompt.startswith("-")
        answer_type = _load_bbh_quietly(data_dir, task)[0].answer_type
        shots = re.split(r"\n\s*\nQ: ", prompt)
        assert len(shots) == 4, task  # the task description, then three exemplars
        for shot in shots[1:]:
            _, _, worked = shot.partition("\nA: ")
            assert worked, task
            assert extract_answer(worked, answer_type) is not None, (task, worked[-80:])


def test_bbh_unknown_task_names_the_file(shared_data):
    with pytest.raises(FileNotFoundError, match=r"nope\.json"):
        load_bbh(shared_data / "bbh", "nope")
    with pytest.raises(ValueError, match="bare name"):
        load_bbh(shared_data / "bbh", "../bbh/navigate")


def test_bbh_malformed_row_names_file_and_row(tmp_path):
    (tmp_path / "toy.json").write_text(json.dumps({"examples": [{"input": "q", "target": "Yes"}, {"input": "q"}]}))
    with pytest.raises(ValueError, match=r"toy\.json: example 1: missing key 'target'"):
        load_bbh(tmp_path, "toy")


def test_bbh_refuses_to_guess_a_mixed_type(tmp_path):
    rows = [{"input": "q", "target": t} for t in ("Yes", "No", "(A)", "12")]
    (tmp_path / "mixed.json").write_text(json.dumps({"examples": rows}))
    with pytest.raises(ValueError, match="cannot infer one answer type"):
        load_bbh(tmp_path, "mixed")


# ---------------------------------------------------------------- StrategyQA, ARC


def test_strategyqa(shared_data):
    examples = load_strategyqa(shared_data / "strategyqa" / "task.json")
    assert len(examples) == 2290
    assert {e.answer for e in examples} == {"yes", "no"}
    assert sum(e.answer == "yes" for e in examples) == 1071
    first = examples[0]
    assert first.id == "strategyqa/0" and first.answer == "yes" and first.answer_type == "yes_no"
    assert first.knowledge[0].startswith("College commencement ceremonies")
    assert all(e.knowledge for e in examples)


def test_strategyqa_disagreeing_scores_raise(tmp_path):
    row = {"input": "Is it?", "target": "Yes. Because.", "target_scores": {"Yes": 0, "No": 1}}
    (tmp_path / "task.json").write_text(json.dumps({"examples": [row]}))
    with pytest.raises(ValueError, match=r"task\.json: example 0: target says 'Yes'"):
        load_strategyqa(tmp_path / "task.json")


@pytest.mark.parametrize(("name", "count"), [("arc_challenge", 1172), ("arc_easy", 2376)])
def test_arc(shared_data, name, count):
    examples = load_arc(shared_data / "arc" / f"{name}_test.json", name)
    assert len(examples) == count
    assert examples[0].id == f"{name}/0" and examples[0].task == name
    for ex in examples:
        assert ex.answer_type == "choice" and not ex.question.startswith("Question:")
        letters = [chr(ord("A") + i) for i in range(len(ex.choices))]
        assert ex.answer in letters
        # Numbered options (1)-(4) are relabelled to letters, in the text too.
        assert re.findall(r"(?m)^\((\w)\)", ex.question) == letters
        assert is_correct(f"{ANSWER_TRIGGER} ({ex.answer}).", ex.answer, "choice", ex.choices)


def test_arc_target_outside_options_raises(tmp_path):
    rows = [{"input": "Question: q?\nOptions:\n(A) x\n(B) y", "target": "(C)"}]
    (tmp_path / "arc.json").write_text(json.dumps(rows))
    with pytest.raises(ValueError, match=r"arc\.json: example 0: target '\(C\)' is not one of the options"):
        load_arc(tmp_path / "arc.json", "arc_toy")


# ---------------------------------------------------------------- generic


def test_generic_svamp_style_json_with_joined_fields(tmp_path):
    rows = [
        {"ID": "chal-1", "Body": "Ana had 5 apples.", "Question": "How many now?", "Answer": 8.0, "Equation": "5+3"},
        {"ID": "chal-2", "Body": "Ben had 2.", "Question": "How many?", "Answer": 2.5, "Equation": "x"},
    ]
    path = tmp_path / "svamp.json"
    path.write_text(json.dumps(rows))
    fields = {"id": "ID", "question": ["Body", "Question"], "answer": "Answer", "rationale": "Equation"}
    examples = load_generic(path, task="svamp", answer_type="number", fields=fields)
    assert [e.id for e in examples] == ["svamp/chal-1", "svamp/chal-2"]
    assert examples[0].question == "Ana had 5 apples. How many now?"
    assert [e.answer for e in examples] == ["8", "2.5"] and examples[0].rationale == "5+3"


def test_generic_mmlu_style_jsonl_with_index_answer(tmp_path):
    path = tmp_path / "mmlu.jsonl"
    rows = [{"question": "2+2?", "choices": ["3", "4", "5"], "answer": 1}, {"question": "1+1?", "choices": ["2", "0"], "answer": 0}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    examples = load_generic(path, task="mmlu", answer_type="choice")
    assert [e.answer for e in examples] == ["B", "A"] and examples[0].id == "mmlu/0"
    assert examples[0].choices == ("3", "4", "5")
    assert examples[0].question == "2+2?\nOptions:\n(A) 3\n(B) 4\n(C) 5"


def test_generic_agieval_style_examples_object(tmp_path):
    path = tmp_path / "agieval.json"
    rows = [{"passage": "P.", "question": "Q?", "options": ["(A)red", "(B)blue"], "label": "B"}]
    path.write_text(json.dumps({"examples": rows}))
    ex = load_generic(path, task="agieval", answer_type="choice", fields={"choices": "options", "answer": "label"})[0]
    assert ex.choices == ("red", "blue") and ex.answer == "B"
    assert is_correct("So the answer is (B).", ex.answer, "choice", ex.choices)


@pytest.mark.parametrize(
    ("content", "fields", "answer_type", "message"),
    [
        ('[{"question": "q?", "answer": "1"}, {"question": "q?"}]', None, "number", r"row 1: missing key 'answer'"),
        ('[{"q": "q?", "a": "1", "id": 3}]', {"question": "q", "answer": "a", "id": "uid"}, "number", "missing key 'uid'"),
        ('[{"question": "q?", "answer": "one"}]', None, "number", r"row 0: gold answer 'one' is not a number"),
        ('[{"question": "q?", "answer": "(C)", "choices": ["a", "b"]}]', None, "choice", "outside the 2 choices"),
        ('[{"question": "q?", "answer": 5, "choices": ["a", "b"]}]', None, "choice", "answer index 5"),
        ('[{"question": "", "answer": "1"}]', None, "number", "question must be a non-empty string"),
        ('[{"question": "q?", "answer": "1"}, {"question": "q?", "answer": "1", "id": "0"}]', {"id": "id"}, "number", "missing key 'id'"),
        ('[{"id": 1, "question": "q?", "answer": "1"}, {"id": 1, "question": "r?", "answer": "2"}]', None, "number", "repeated ids"),
        ('{"rows": []}', None, "number", "expected a JSON list"),
        ("[1, 2]", None, "number", "row 0: expected a JSON object"),
        ('[{"question": "q?", "answer": "1"}', None, "number", "not valid JSON"),
        ('[{"question": "q?", "answer": "1"}]', {"label": "x"}, "number", "unknown name 'label'"),
        ('[{"question": "q?", "answer": "1"}]', None, "float", "answer_type"),
    ],
)
def test_generic_malformed_inputs_raise_clearly(tmp_path, content, fields, answer_type, message):
    path = tmp_path / "bench.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        load_generic(path, task="bench", answer_type=answer_type, fields=fields)
    if answer_type in ("number", "choice") and fields != {"label": "x"}:
        assert "bench.json" in str(info.value)


def test_generic_malformed_jsonl_line_is_named(tmp_path):
    path = tmp_path / "bench.jsonl"
    path.write_text('{"question": "q?", "answer": "1"}\n{oops\n')
    with pytest.raises(ValueError, match=r"bench\.jsonl: line 2 is not valid JSON"):
        load_generic(path, task="bench", answer_type="number")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_generic(tmp_path / "missing.json", task="bench", answer_type="number")


# ---------------------------------------------------------------- split


def _toy(n: int) -> list[Example]:
    return [Example(id=f"toy/{i}", task="toy", question=f"q{i}?", answer=str(i), answer_type="number") for i in range(n)]


def test_split_is_deterministic_exact_and_order_independent():
    examples = _toy(100)
    train, test = split_examples(examples, 0.2, seed=7)
    assert len(test) == 20 and len(train) == 80
    assert not {e.id for e in train} & {e.id for e in test}
    assert split_examples(examples, 0.2, seed=7) == (train, test)
    _, test_reversed = split_examples(examples[::-1], 0.2, seed=7)
    assert {e.id for e in test_reversed} == {e.id for e in test}
    assert [e.id for e in test] == sorted((e.id for e in test), key=lambda i: int(i.split("/")[1]))
    _, other = split_examples(examples, 0.2, seed=8)
    assert {e.id for e in other} != {e.id for e in test}


def test_split_rejects_bad_input():
    with pytest.raises(ValueError, match="test_fraction"):
        split_examples(_toy(3), 1.5, seed=0)
    with pytest.raises(ValueError, match="unique ids"):
        split_examples(_toy(3) + _toy(1), 0.5, seed=0)
