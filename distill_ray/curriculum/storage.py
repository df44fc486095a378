"""The curriculum's files under the run's training dir, on local disk or an object store.

    <train dir>/curriculum/state.json          the actor's state (stage, schedule, results)
    <train dir>/curriculum/demos.json          demonstration ids per example, for k_0
    <train dir>/curriculum/stage<t>.parquet    stage t's training rows
    <train dir>/stage<t>/checkpoint_*/         Ray Train's checkpoints of stage t

Every file is written whole to a temporary name and then moved into place, so a driver
killed mid-write leaves the previous version (or nothing), never half a file.
"""
from __future__ import annotations

import json
import os
import uuid

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from distill_ray.train.checkpoint import STATE_FILE

CURRICULUM_DIR = "curriculum"


def _fs(uri: str) -> tuple[pafs.FileSystem, str]:
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def curriculum_dir(train_dir: str) -> str:
    return join(train_dir, CURRICULUM_DIR)


def exists(uri: str) -> bool:
    fs, path = _fs(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def _replace(uri: str, write) -> None:
    fs, path = _fs(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    write(fs, tmp)
    fs.move(tmp, path)


def write_json(uri: str, data: dict) -> None:
    payload = json.dumps(data, indent=2, sort_keys=True).encode()

    def write(fs, tmp):
        with fs.open_output_stream(tmp) as f:
            f.write(payload)

    _replace(uri, write)


def read_json(uri: str) -> dict | None:
    fs, path = _fs(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    with fs.open_input_stream(path) as f:
        raw = f.read()
    try:
        return json.loads(raw)
    except ValueError as e:
        raise ValueError(f"{uri}: not valid JSON ({e}); delete it to rebuild it") from None


def write_table(uri: str, table: pa.Table) -> None:
    _replace(uri, lambda fs, tmp: pq.write_table(table, tmp, filesystem=fs))


def read_table(uri: str, columns: list[str] | None = None) -> pa.Table | None:
    fs, path = _fs(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    return pq.read_table(path, filesystem=fs, columns=columns)


def latest_checkpoint_state(run_dir: str) -> dict | None:
    """train_state.json of the newest checkpoint Ray Train kept under `run_dir`, if any."""
    fs, path = _fs(run_dir)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return None
    names = sorted(
        info.base_name for info in fs.get_file_info(pafs.FileSelector(path))
        if info.type == pafs.FileType.Directory and info.base_name.startswith("checkpoint_")
    )  # checkpoint_<timestamp>: the name orders them
    for name in reversed(names):
        state_path = f"{path}/{name}/{STATE_FILE}"
        if fs.get_file_info(state_path).type == pafs.FileType.File:
            with fs.open_input_stream(state_path) as f:
                return json.loads(f.read())
    return None
