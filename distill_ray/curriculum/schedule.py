"""SKIntern's predefined linear-decay schedule, and how a step budget splits over it.

Stage t of T keeps r_t = r_0 * (T-1-t)/(T-1) of the knowledge K and shows
k_t = round(k_0 * (T-1-t)/(T-1)) examples: both reach 0 at the last stage, which is
therefore the question alone, as at inference. Exact fractions, so that k_0 = 3 over
T = 3 gives 3, 2, 0 (1.5 rounds half up) on every platform, and k_t never increases.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from fractions import Fraction


@dataclass(frozen=True)
class StagePlan:
    index: int
    keep_ratio: float  # r_t: fraction of K's tokens kept
    examples: int  # k_t: demonstrations shown before the question

    @property
    def question_only(self) -> bool:
        return self.keep_ratio == 0 and self.examples == 0


@dataclass(frozen=True)
class Schedule:
    stages: tuple[StagePlan, ...]

    def __len__(self) -> int:
        return len(self.stages)

    def __getitem__(self, t: int) -> StagePlan:
        return self.stages[t]

    @property
    def max_examples(self) -> int:
        return max(s.examples for s in self.stages)

    def as_dict(self) -> dict:
        return {"stages": [asdict(s) for s in self.stages]}

    @classmethod
    def from_dict(cls, data: dict) -> "Schedule":
        return cls(tuple(StagePlan(**s) for s in data["stages"]))


def _check_int(name: str, value, lowest: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < lowest:
        raise ValueError(f"{name} must be >= {lowest}, got {value}")
    return value


def linear_decay(stages: int, keep_ratio_start: float, examples_start: int) -> Schedule:
    """T = `stages` stages, from (r_0, k_0) at stage 0 down to (0, 0) at stage T-1."""
    T = _check_int("method.skintern.stages", stages, 2)
    k0 = _check_int("method.skintern.examples_start", examples_start, 0)
    if isinstance(keep_ratio_start, bool) or not isinstance(keep_ratio_start, (int, float)):
        raise ValueError(f"method.skintern.keep_ratio_start must be a number, got {keep_ratio_start!r}")
    if not (0 < keep_ratio_start <= 1) or math.isnan(keep_ratio_start):
        raise ValueError(f"method.skintern.keep_ratio_start must lie in (0, 1], got {keep_ratio_start}")
    r0 = Fraction(keep_ratio_start)
    plans = []
    for t in range(T):
        left = Fraction(T - 1 - t, T - 1)
        plans.append(StagePlan(t, float(r0 * left), math.floor(k0 * left + Fraction(1, 2))))
    return Schedule(tuple(plans))


def split_steps(total_steps: int, stages: int) -> list[int]:
    """`total_steps` over `stages` as evenly as integers allow (earlier stages get the remainder)."""
    total = _check_int("total steps", total_steps, 1)
    T = _check_int("stages", stages, 1)
    if total < T:
        raise ValueError(f"a budget of {total} steps cannot be split over {T} curriculum stages (each needs one)")
    base, rest = divmod(total, T)
    return [base + (1 if t < rest else 0) for t in range(T)]
