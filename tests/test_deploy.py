"""The Kubernetes manifests in deploy/kubernetes, checked offline.

Every overlay is rendered (``tests/manifests.py``) and each resource validated
against the Kubernetes API schemas bundled with ``kubernetes-validate`` (no
cluster, no network). Then the manifests are checked against what they describe:
the probes and ports against the image (deploy/container/Containerfile), the
image names against what ``make container`` tags, the ``SERVING_*`` variables
against the settings the service reads (service/settings.py), the grace period
against the drain time, and the thread count against the CPU limit.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from service.settings import PREFIX, Settings
from tests.manifests import (
    KUBERNETES_DIR,
    commented_alternative,
    containers,
    find,
    read_env_file,
    referenced_files,
    render,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
CONTAINER_DIR = REPO_ROOT / "deploy" / "container"
OVERLAYS = {"cpu": KUBERNETES_DIR / "overlays" / "cpu", "gpu": KUBERNETES_DIR / "overlays" / "gpu"}
# The oldest Kubernetes release still maintained upstream, and the newest known here.
KUBERNETES_VERSIONS = ("1.32.0", kubernetes_validate.utils.latest_version())
PROBE_PATHS = {"startupProbe": "/readyz", "readinessProbe": "/readyz", "livenessProbe": "/livez"}


@pytest.fixture(scope="module", params=sorted(OVERLAYS))
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(OVERLAYS[request.param])


def deployment(resources: list[dict[str, Any]]) -> dict[str, Any]:
    return find(resources, "Deployment", "digit-sentiment-serving")


def serving_container(resources: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = containers(resources)
    return container


def settings_env(resources: list[dict[str, Any]]) -> dict[str, str]:
    """The environment the container gets from its ConfigMaps."""
    container = serving_container(resources)
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(find(resources, "ConfigMap", source["configMapRef"]["name"])["data"])
    return env


def containerfile_instruction(name: str) -> str:
    """The arguments of the runtime image's last ``name`` instruction (continuations joined)."""
    text = (CONTAINER_DIR / "Containerfile").read_text().replace("\\\n", " ")
    found = re.findall(rf"^{name} +(.+)$", text, flags=re.MULTILINE)
    assert found, f"no {name} in deploy/container/Containerfile"
    return found[-1]


class RecordingEnv(Mapping[str, str]):
    """An environment that records which variables are looked up."""

    def __init__(self, values: Mapping[str, str]) -> None:
        self.values = dict(values)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.read.add(key)
        return self.values[key]

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return self.values.get(key, default)

    def __iter__(self) -> Iterator[str]:
        return iter(self.values)

    def __len__(self) -> int:
        return len(self.values)


def cpu_cores(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def test_every_manifest_validates_against_the_kubernetes_schemas(overlay):
    _, resources = overlay
    kinds = sorted(resource["kind"] for resource in resources)
    assert kinds == [
        "ConfigMap",
        "Deployment",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "Service",
    ]
    for version in KUBERNETES_VERSIONS:
        for resource in resources:
            kubernetes_validate.validate(resource, version, strict=True)


def test_the_validation_catches_a_broken_manifest(overlay):
    _, resources = overlay
    broken = deployment(resources)
    broken = {**broken, "spec": {**broken["spec"], "replicas": "two"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


def test_every_file_in_deploy_kubernetes_is_used_by_an_overlay():
    used = set().union(*(referenced_files(path) for path in OVERLAYS.values()))
    on_disk = {path.resolve() for path in KUBERNETES_DIR.rglob("*") if path.is_file()}
    assert on_disk == used


def test_probes_ports_and_metrics_agree_with_the_image(overlay):
    _, resources = overlay
    pod = deployment(resources)["spec"]["template"]
    container = serving_container(resources)
    (port,) = container["ports"]
    exposed = containerfile_instruction("EXPOSE").split()
    assert exposed == [str(port["containerPort"])]
    for probe, path in PROBE_PATHS.items():
        assert container[probe]["httpGet"] == {"path": path, "port": port["name"]}
    # The image's own health check asks the same question as the readiness probe.
    assert "/readyz" in containerfile_instruction("HEALTHCHECK")
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port["containerPort"])
    assert annotations["prometheus.io/path"] == "/metrics"
    service = find(resources, "Service", "digit-sentiment-serving")
    assert [p["targetPort"] for p in service["spec"]["ports"]] == [port["name"]]
    # Runs as the image's user.
    user = containerfile_instruction("USER").split(":")[0]
    assert pod["spec"]["securityContext"]["runAsUser"] == int(user)


def test_selectors_pick_the_deployments_pods(overlay):
    _, resources = overlay
    pod_labels = deployment(resources)["spec"]["template"]["metadata"]["labels"]
    selectors = {
        "Deployment": deployment(resources)["spec"]["selector"]["matchLabels"],
        "Service": find(resources, "Service", "digit-sentiment-serving")["spec"]["selector"],
        "PodDisruptionBudget": find(resources, "PodDisruptionBudget", "digit-sentiment-serving")[
            "spec"
        ]["selector"]["matchLabels"],
    }
    for kind, selector in selectors.items():
        assert selector and selector.items() <= pod_labels.items(), kind
    hpa = find(resources, "HorizontalPodAutoscaler", "digit-sentiment-serving")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment(resources)["metadata"]["name"],
    }
    assert hpa["spec"]["minReplicas"] >= 2  # the disruption budget needs a second replica


def test_the_image_is_the_one_make_container_tags(overlay):
    variant, resources = overlay
    env_sh = (CONTAINER_DIR / "env.sh").read_text()
    image = re.search(r"^IMAGE=\$\{IMAGE:-([^}]+)\}", env_sh, flags=re.MULTILINE).group(1)
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert re.search(rf"^IMAGE \?= {re.escape(image)}$", makefile, flags=re.MULTILINE)
    assert serving_container(resources)["image"] == f"{image}:{variant}"
    build_sh = (CONTAINER_DIR / "build.sh").read_text()
    assert re.search(rf"^\s+{variant}\) bentofile=", build_sh, flags=re.MULTILINE)
    assert '-t "localhost/$IMAGE:$variant"' in build_sh


def test_the_settings_are_ones_the_service_reads_and_accepts(overlay):
    variant, resources = overlay
    env = settings_env(resources)
    assert env and all(name.startswith(PREFIX) for name in env)
    recording = RecordingEnv(env)
    settings = Settings.from_env(recording)  # raises SettingsError on a bad value
    assert set(env) <= recording.read, set(env) - recording.read
    assert settings.device == variant.replace("gpu", "cuda")


def test_the_grace_period_covers_the_prestop_delay_and_the_drain(overlay):
    _, resources = overlay
    pod = deployment(resources)["spec"]["template"]["spec"]
    settings = Settings.from_env(settings_env(resources))
    command = serving_container(resources)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop_s = float(command[1])
    # The drain ends SERVING_DRAIN_S after the signal; the workers then need a moment to exit.
    assert pod["terminationGracePeriodSeconds"] >= pre_stop_s + settings.connections.drain_s + 5
    assert pre_stop_s >= 2  # endpoints and proxies need time to stop routing here


def test_resources_fit_the_service_on_its_node(overlay):
    variant, resources = overlay
    container = serving_container(resources)
    requests, limits = container["resources"]["requests"], container["resources"]["limits"]
    settings = Settings.from_env(settings_env(resources))
    # In a container os.cpu_count() is the node's: the threads must be set, within the limit.
    assert settings.threads is not None
    assert settings.threads * settings.workers <= cpu_cores(limits["cpu"])
    assert cpu_cores(requests["cpu"]) <= cpu_cores(limits["cpu"])
    pod = deployment(resources)["spec"]["template"]["spec"]
    if variant == "gpu":
        assert requests["nvidia.com/gpu"] == limits["nvidia.com/gpu"] == 1
        assert pod["nodeSelector"] or pod["tolerations"]
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    else:
        assert "nvidia.com/gpu" not in limits
        assert "nodeSelector" not in pod and "tolerations" not in pod


def test_the_commented_autoscaling_alternative_is_a_valid_metrics_block(overlay):
    _, resources = overlay
    hpa = find(resources, "HorizontalPodAutoscaler", "digit-sentiment-serving")
    alternative = commented_alternative(KUBERNETES_DIR / "base" / "hpa.yaml", "replace `metrics:`")
    assert alternative["metrics"][0]["pods"]["metric"]["name"] == in_flight_metric()
    swapped = {**hpa, "spec": {**hpa["spec"], "metrics": alternative["metrics"]}}
    kubernetes_validate.validate(swapped, KUBERNETES_VERSIONS[-1], strict=True)


def in_flight_metric() -> str:
    """The metric the commented HPA alternative scales on (served on /metrics by BentoML;
    tests/test_container.py checks that the image serves it)."""
    return "bentoml_service_request_in_progress"


def test_the_env_files_hold_only_serving_settings():
    for path in KUBERNETES_DIR.rglob("*.env"):
        assert all(name.startswith(PREFIX) for name in read_env_file(path)), path


def test_the_cpu_bentofile_differs_from_the_standard_one_only_in_its_packages():
    import yaml

    standard = yaml.safe_load((REPO_ROOT / "bentofile.yaml").read_text())
    cpu = yaml.safe_load((REPO_ROOT / "deploy" / "bentofile-cpu.yaml").read_text())
    packages = {"standard": standard["python"].pop("packages")}
    packages["cpu"] = cpu["python"].pop("packages")
    for bentofile in (standard, cpu):
        for key in ("name", "description"):
            bentofile.pop(key)
    assert cpu == standard
    pins = {variant: dict(p.split("==") for p in listed) for variant, listed in packages.items()}
    assert "torch" not in pins["cpu"] and "onnxruntime-gpu" not in pins["cpu"]
    assert pins["cpu"].pop("onnxruntime") == pins["standard"].pop("onnxruntime-gpu")
    pins["standard"].pop("torch")
    assert pins["cpu"] == pins["standard"]
