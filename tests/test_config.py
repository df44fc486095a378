"""Config errors end in one line naming the key and exit code 2; secrets stay out of the config."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from distill_ray.config import Config, ConfigError, load_config
from distill_ray.tracking import free_port

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "distill_ray.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=120, env=env
    )


def test_default_config_loads_and_overrides_apply():
    cfg = load_config(overrides=["train.lr=0.01", "tasks.synthetic.train_size=50", "teacher.temperatures=[0.1, 0.9]"])
    assert cfg.train.lr == 0.01 and isinstance(cfg.train.lr, float)
    assert cfg.tasks["synthetic"].train_size == 50
    assert cfg.teacher.temperatures == [0.1, 0.9]
    assert cfg == load_config(REPO / "ray_config.yaml", ["train.lr=0.01", "tasks.synthetic.train_size=50",
                                                           "teacher.temperatures=[0.1, 0.9]"])


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.nope=1", "train.nope: unknown key"),
        ("nosuchsection.x=1", "nosuchsection: unknown key"),
        ("train.lr=fast", "train.lr: Input should be a valid number"),
        ("tasks.synthetic.train_size=-3", "tasks.synthetic.train_size: Input should be greater than or equal to 1"),
        ("tasks.synthetic.long_tail=201", "tasks.synthetic.long_tail: must be at most 200"),
        ("train.zero_stage=5", "train.zero_stage:"),
        ("teacher.kind=openai", "teacher.base_url: required when teacher.kind is 'openai'"),
        ("noequals", "expected section.key=value"),
    ],
)
def test_config_errors_name_the_key(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_cli_exit_code_2_with_one_line_for_each_problem(tmp_path):
    cases = [
        (["config", "--set", "student.lora.rank=4"], "student.lora.rank: unknown key"),
        (["config", "--set", "method.name=nonsense"], "unknown method 'nonsense'"),
        (["config", "-c", str(tmp_path / "missing.yaml")], "config file not found"),
        (["collect", "--set", "tasks.real.kind=gsm8k", "--set", "tasks.real.path=/nonexistent/x.jsonl"],
         "/nonexistent/x.jsonl"),
    ]
    for args, expected in cases:
        out = cli(*args)
        assert out.returncode == 2, (args, out.stderr)
        lines = [line for line in out.stderr.strip().splitlines() if line]
        assert len(lines) == 1 and expected in lines[0], (args, out.stderr)


def test_unreachable_teacher_is_exit_2_before_any_work():
    port = free_port()  # nothing listens there
    out = cli("collect", "--set", "teacher.kind=openai", "--set", f"teacher.base_url=http://127.0.0.1:{port}/v1",
              "--set", "tasks.synthetic.train_size=20", "--set", "tasks.synthetic.test_size=5")
    assert out.returncode == 2, out.stderr
    assert f"127.0.0.1:{port}/v1 is unreachable" in out.stderr
    assert "Traceback" not in out.stderr


def test_api_key_comes_from_the_named_env_var_only(monkeypatch):
    cfg = Config.model_validate({"teacher": {"kind": "openai", "base_url": "http://x/v1", "api_key_env": "DR_TEST_KEY"}})
    monkeypatch.delenv("DR_TEST_KEY", raising=False)
    with pytest.raises(ConfigError, match="DR_TEST_KEY is not set"):
        cfg.teacher_api_key()
    monkeypatch.setenv("DR_TEST_KEY", "sk-secret-123")
    assert cfg.teacher_api_key() == "sk-secret-123"
    assert "sk-secret-123" not in cfg.model_dump_json()
    with pytest.raises(ConfigError, match="teacher.api_key: unknown key"):
        load_config(overrides=["teacher.api_key=sk-inline"])
