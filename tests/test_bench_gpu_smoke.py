"""bench/gpu_train.py in its CPU smoke mode: the GPU check must still run when a GPU is lent.

It measures nothing here; it proves the script builds every variant's engine through the
project's own code (the DeepSpeed one through `train.engine.build_engine`) and trains.
"""
from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(300)
def test_gpu_bench_smoke_runs_every_engine_on_cpu():
    out = subprocess.run([sys.executable, "bench/gpu_train.py", "--smoke", "--variants", "eager,bf16,deepspeed"],
                         cwd=REPO, capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = {m.group(1): m for m in re.finditer(r"^(eager|bf16|deepspeed)\s+2\s+([\d,]+)\s+n/a\s+\S+\s+([\d.]+)$",
                                               out.stdout, re.M)}
    assert set(rows) == {"eager", "bf16", "deepspeed"}, out.stdout
    for m in rows.values():
        assert float(m.group(2).replace(",", "")) > 0
        assert math.isclose(float(m.group(3)), math.log(512), rel_tol=0.1)  # random init: loss ≈ ln(vocab)


def test_gpu_bench_refuses_to_run_without_a_gpu_unless_smoke():
    out = subprocess.run([sys.executable, "bench/gpu_train.py"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "run with --smoke" in out.stderr
