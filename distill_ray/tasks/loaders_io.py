"""Reading benchmark files with errors that name the file and the row at fault."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

_OPTION_LINE_RE = re.compile(r"^\(([A-Z0-9])\)\s*(.*)$")


def existing_file(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} file not found: {p}")
    return p


def read_json(path: str | Path, what: str) -> Any:
    p = existing_file(path, what)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON ({e})") from e


def read_jsonl(path: str | Path, what: str) -> list[tuple[int, Any]]:
    """(1-based line number, parsed object) for each non-blank line."""
    p = existing_file(path, what)
    rows = []
    for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((lineno, json.loads(line)))
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: line {lineno} is not valid JSON ({e})") from e
    return rows


def require_str(row: Any, key: str, where: str) -> str:
    """row[key] as a non-empty string, or a ValueError saying which row lacks it."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if key not in row:
        raise ValueError(f"{where}: missing key {key!r}")
    value = row[key]
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: key {key!r} must be a non-empty string, got {value!r}")
    return value


def parse_options(text: str) -> tuple[list[str], list[str]] | None:
    """(labels, texts) of the "(A) ..." lines after "Options:", or None when there are none."""
    _, sep, block = text.partition("Options:")
    if not sep:
        return None
    labels, texts = [], []
    for line in block.strip().splitlines():
        m = _OPTION_LINE_RE.match(line.strip())
        if not m:
            break
        labels.append(m.group(1))
        texts.append(m.group(2).strip())
    return (labels, texts) if labels else None


def letters(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


def format_options(choices: list[str] | tuple[str, ...]) -> str:
    """The "Options:" block BBH and ARC put in the question text."""
    return "Options:\n" + "\n".join(f"({label}) {text}" for label, text in zip(letters(len(choices)), choices))
