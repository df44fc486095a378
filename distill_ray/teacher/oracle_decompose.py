"""What the oracle teacher answers to a decomposition prompt, and how it spoils one (`p_wrong`).

The synthetic solver already splits every suite question into (sub-question, sub-answer)
steps; the oracle writes them in the reply format of `decompose_prompts`.
"""
from __future__ import annotations

import random

from distill_ray.tasks.synthetic import solve
from distill_ray.teacher.decompose_prompts import STEP_SEPARATOR, render_decomposition
from distill_ray.teacher.prompts import last_question

NON_ANSWER = "I am sorry, I cannot break this question into steps."


def answer_decomposition(user_text: str) -> str:
    question = last_question(user_text)
    solution = solve(question) if question else None
    if solution is None or not solution.decomposition:
        return NON_ANSWER
    return render_decomposition(solution.decomposition, solution.answer)


def corrupt_decomposition(reply: str, rng: random.Random) -> str:
    """A reply the plan must reject: another final number, a line without its separator,
    or the last step dropped (the chain then ends before the answer)."""
    lines = reply.split("\n")
    if len(lines) < 2:
        return reply  # a non-answer is rejected as it is
    r = rng.random()
    if r < 1 / 3:
        head, _, _ = lines[-1].rpartition(" ")
        return "\n".join([*lines[:-1], f"{head} {rng.randint(100, 999)}."])
    if r < 2 / 3:
        return "\n".join([lines[0].replace(STEP_SEPARATOR, " "), *lines[1:]])
    if len(lines) > 2:
        return "\n".join([*lines[:-2], lines[-1]])
    return lines[0]  # a single step and no answer sentence
