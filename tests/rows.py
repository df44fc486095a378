"""Tiny training rows shared by the training tests."""
from __future__ import annotations

import random


def arithmetic_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 12), rng.randint(0, 12)
        rows.append({"prompt": f"Question: {a} * {b} = ?\nAnswer:",
                     "target": f" {a} * {b} = {a * b} . Therefore, the answer is {a * b}."})
    return rows
