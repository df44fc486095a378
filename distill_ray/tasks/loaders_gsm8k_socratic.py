"""GSM8K's gold Socratic format: a decomposition per problem.

Each `answer` is one `sub-question ** solution` line per step, the solutions carrying
calculator annotations `<<expr=val>>`, then `#### N`:

    How many eggs does Janet sell? ** Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.
    How much does Janet make at the farmers' market? ** She makes 9 * 2 = $<<9*2=18>>18 every day ...
    #### 18

Every step becomes a `Step` (annotations removed: they are for the annotators' tool, not
prose), and the rationale is the steps' solutions followed by the answer sentence.
The file does not always end on a step whose value is the final answer (the last
solution may state it in words, or in another unit: "$0.25" for "#### 25" cents), so
each record says in `meta` what its last step concludes and whether that agrees with
`####`: `last_step_value`, `last_step_agrees`; a step with an empty solution is left
out and listed in `empty_solution_steps`. Nothing else is dropped or repaired here;
whoever trains on the steps decides.
"""
from __future__ import annotations

from pathlib import Path

from distill_ray.tasks.answers import ANSWER_TRIGGER
from distill_ray.tasks.loaders import remove_calculator_notes, split_final_answer
from distill_ray.tasks.loaders_io import read_jsonl, require_str
from distill_ray.tasks.record import Example, Step

STEP_SEPARATOR = " ** "


def parse_socratic_answer(text: str, where: str) -> tuple[tuple[Step, ...], str, list[int]]:
    """(steps, canonical final answer, numbers of the steps left out for an empty solution).

    A step whose solution is empty (two such lines in the test file) cannot be trained
    on; it is left out and its number reported. Anything else malformed is a ValueError.
    """
    body, answer = split_final_answer(text, where)
    steps, empty = [], []
    for n, line in enumerate((line for line in body.split("\n") if line.strip()), start=1):
        if line.count(STEP_SEPARATOR) != 1:
            raise ValueError(f"{where}: step {n} must be 'sub-question ** solution', got {line.strip()[:80]!r}")
        question, solution = (part.strip() for part in line.split(STEP_SEPARATOR))
        solution = " ".join(remove_calculator_notes(solution).split())
        if not question:
            raise ValueError(f"{where}: step {n} has an empty sub-question")
        if not solution:
            empty.append(n)
            continue
        steps.append(Step(question, solution))
    if not steps:
        raise ValueError(f"{where}: no 'sub-question ** solution' step with a solution before '####'")
    return tuple(steps), answer, empty


def load_gsm8k_socratic(path: str | Path, split: str | None = None) -> list[Example]:
    """GSM8K Socratic jsonl {question, answer}; ids gsm8k/<split>/<row> like `load_gsm8k`.

    The split defaults to the file stem without its `_socratic` suffix, so a problem has
    the same id in `test.jsonl` and `test_socratic.jsonl`.
    """
    from distill_ray.methods.socratic_format import step_value

    path = Path(path)
    split = split or path.stem.removesuffix("_socratic")
    out = []
    for i, (lineno, row) in enumerate(read_jsonl(path, "GSM8K Socratic")):
        where = f"{path}: line {lineno}"
        question = require_str(row, "question", where)
        steps, answer, empty = parse_socratic_answer(require_str(row, "answer", where), where)
        last_value = step_value(steps[-1].answer)
        out.append(
            Example(
                id=f"gsm8k/{split}/{i}",
                task="gsm8k",
                question=question.strip(),
                answer=answer,
                answer_type="number",
                rationale="\n".join(s.answer for s in steps) + f"\n{ANSWER_TRIGGER} {answer}.",
                decomposition=steps,
                meta={"last_step_value": last_value, "last_step_agrees": last_value == answer,
                      "empty_solution_steps": empty},
            )
        )
    return out
