"""Every KubeRay manifest in k8s/ validates against the KubeRay v1.7.0 CRD schema it names."""
from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CRDS = {"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml", "RayService": "ray.io_rayservices.yaml"}


def _schema(crd_dir: Path, kind: str) -> dict:
    crd = yaml.safe_load((crd_dir / CRDS[kind]).read_text())
    return next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]


def _ray_docs():
    for path in sorted(REPO.glob("k8s/**/*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") in CRDS:
                yield pytest.param(doc, id=f"{path.relative_to(REPO)}:{doc['kind']}")


@pytest.mark.parametrize("doc", list(_ray_docs()))
def test_kuberay_manifest_is_valid(doc, shared_data):
    jsonschema.validate(doc, _schema(shared_data.parent / "k8s-crds", doc["kind"]))


def test_a_broken_manifest_is_rejected(shared_data):
    doc = next(_ray_docs()).values[0]
    broken = {**doc, "spec": {**doc["spec"], "shutdownAfterJobFinishes": "yes please"}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, _schema(shared_data.parent / "k8s-crds", broken["kind"]))
