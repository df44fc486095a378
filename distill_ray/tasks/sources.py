"""Turn the `tasks:` section of the config into train and test example lists."""
from __future__ import annotations

from pathlib import Path

from ..config import Config, FileTask, SyntheticTask
from . import loaders, synthetic
from .record import Example


def _from_file(name: str, spec: FileTask) -> tuple[list[Example], list[Example]]:
    path = Path(spec.path)
    if spec.kind == "gsm8k":
        test = loaders.load_gsm8k(path)
        train = loaders.load_gsm8k(Path(spec.train_path)) if spec.train_path else None
    elif spec.kind == "bbh":
        if not spec.subtask:
            raise ValueError(f"tasks.{name}.subtask: required for kind bbh (a task name such as 'navigate')")
        test, train = loaders.load_bbh(path, spec.subtask), None
    elif spec.kind == "strategyqa":
        test, train = loaders.load_strategyqa(path), None
    elif spec.kind == "arc":
        test, train = loaders.load_arc(path, spec.subtask or name), None
    else:
        if not spec.answer_type:
            raise ValueError(f"tasks.{name}.answer_type: required for kind generic")
        test = loaders.load_generic(path, task=name, answer_type=spec.answer_type, fields=spec.fields)
        train = (
            loaders.load_generic(Path(spec.train_path), task=name, answer_type=spec.answer_type, fields=spec.fields)
            if spec.train_path
            else None
        )
    if spec.limit:
        test = test[: spec.limit]
        train = train[: spec.limit] if train is not None else None
    if train is None:
        train, test = loaders.split_examples(test, spec.test_fraction, spec.seed)
    return train, test


def load_tasks(cfg: Config) -> tuple[list[Example], list[Example]]:
    """All configured tasks, concatenated; ids are unique across tasks."""
    train: list[Example] = []
    test: list[Example] = []
    for name, spec in cfg.tasks.items():
        if isinstance(spec, SyntheticTask):
            tr, te = synthetic.generate(spec.train_size, spec.test_size, seed=spec.seed, families=spec.families,
                                        long_tail=spec.long_tail)
        else:
            tr, te = _from_file(name, spec)
        train += tr
        test += te
    ids = [e.id for e in train + test]
    if len(ids) != len(set(ids)):
        raise ValueError("tasks: two configured tasks produce the same example ids; give each a distinct source")
    return train, test
