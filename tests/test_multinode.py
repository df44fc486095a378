"""Multi-node on one machine: a head and two worker nodes (`ray.cluster_utils.Cluster`).

Each node carries a custom resource naming it, and the state API tells which node every
actor ran on, so placement is asserted rather than assumed. The teacher stage's actors
and the training workers must spread over nodes; losing a worker node in the middle of
training must cost one restart from the last checkpoint, not the run. Storage is one
path every node reads (on a real cluster: a shared filesystem or an `s3://` URI).
"""
from __future__ import annotations

import json
import os
import threading
import time

import pytest
import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from distill_ray.config import Config
from distill_ray.ray_session import worker_env
from distill_ray.tasks.synthetic import generate
from distill_ray.teacher.stage import collect_rationales
from distill_ray.train.checkpoint import CALLER_STATE_KEY, read_state
from distill_ray.train.prebuild import prebuild
from distill_ray.train.trainer import run_training
from rows import arithmetic_rows
from tiny import TRAIN_SPEC, free_port

pytestmark = pytest.mark.timeout(600)




@pytest.fixture(scope="module")
def cluster():
    prebuild()  # DeepSpeed's comm op, built once rather than inside a test
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {"head_node": 1},
        # Ray Train's cleanup and the placement assertions read the state API.
        "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": free_port(),
    })
    workers = [c.add_node(num_cpus=1, resources={f"worker_node_{i}": 1}) for i in (1, 2)]
    c.wait_for_nodes()
    ray.init(address=c.address, namespace="multinode-test", runtime_env={"env_vars": worker_env()})
    yield c, workers
    ray.shutdown()
    c.shutdown()


def _nodes_of(class_fragment: str, state: str | None = None) -> dict[str, str]:
    """actor id -> node id, for actors whose class name contains `class_fragment`."""
    return {a.actor_id: a.node_id for a in list_actors(detail=True, limit=10_000, raise_on_missing_output=False)
            if class_fragment in a.class_name and (state is None or a.state == state)}


def _registered_checkpoints(run_dir: str) -> list[dict]:
    """Checkpoints Ray Train has committed (a checkpoint_* dir alone may still be uploading)."""
    try:
        with open(os.path.join(run_dir, "checkpoint_manager_snapshot.json")) as f:
            return json.load(f)["checkpoint_results"]
    except (OSError, ValueError, KeyError):
        return []


def test_teacher_actors_spread_over_nodes(cluster, tmp_path):
    cfg = Config.model_validate({
        "storage": {"root": str(tmp_path)},
        "teacher": {"num_actors": 2, "actor_cpus": 0.5, "max_in_flight": 8},
    })
    train, _ = generate(60, 6, seed=4)
    result = collect_rationales(cfg, train, progress=False)
    assert result.stats["kept"] + result.stats["failed"] == 60 and result.stats["kept"] > 50

    nodes = set(_nodes_of("QueryActor").values())
    assert len(nodes) == 2, f"both teacher actors on one node: {nodes}"
    assert nodes <= {n["NodeID"] for n in ray.nodes()}


def test_training_survives_losing_a_worker_node(cluster, tmp_path):
    c, workers = cluster
    head_node = c.head_node.node_id
    cfg = Config.model_validate({
        "train": {"num_workers": 2, "cpus_per_worker": 1, "placement_strategy": "SPREAD", "batch_size": 16,
                  "micro_batch_size": 8, "lr": 3e-3, "warmup_steps": 5, "max_seq_len": 64, "log_every": 20,
                  "max_steps": 240, "checkpoint_every": 20, "max_failures": 1},
        "student": {"tiny": TRAIN_SPEC},
    })
    storage = str(tmp_path / "train")
    outcome: dict = {}

    def fit():
        try:
            outcome["result"] = run_training(cfg, arithmetic_rows(320), output_dir=storage, name="mn",
                                             checkpoint_state={"curriculum_stage": 2})
        except BaseException as e:  # noqa: BLE001 -- re-raised in the test thread below
            outcome["error"] = e

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    deadline = time.monotonic() + 300
    while not _registered_checkpoints(os.path.join(storage, "mn")):
        assert thread.is_alive(), f"training ended before its first checkpoint: {outcome}"
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.2)

    first = _nodes_of("RayTrainWorker", "ALIVE")
    assert len(first) == 2 and len(set(first.values())) == 2, f"workers not spread: {first}"
    victim = next(n for n in workers if n.node_id in set(first.values()) - {head_node})
    c.remove_node(victim, allow_graceful=False)  # the node is gone, as when a VM disappears

    thread.join(timeout=400)
    assert not thread.is_alive(), "training did not finish after the node loss"
    if "error" in outcome:
        raise outcome["error"]
    result = outcome["result"]

    state = read_state(result.checkpoint_path)
    assert result.steps == state["step"] == state["planned_steps"] == 240, state
    # The restart loaded a checkpoint the first attempt wrote: progress kept, not redone.
    assert state["resumed_from"] > 0 and state["resumed_from"] % 20 == 0, state
    assert state[CALLER_STATE_KEY] == {"curriculum_stage": 2}
    retried = _nodes_of("RayTrainWorker", "ALIVE") or {
        a: n for a, n in _nodes_of("RayTrainWorker").items() if a not in first}
    assert retried and victim.node_id not in set(retried.values()), "a worker restarted on the removed node"
    assert os.path.isfile(os.path.join(result.model_dir, "config.json"))
