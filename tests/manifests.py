"""Read the Kubernetes manifests in deploy/kubernetes as kustomize would render them.

``render(overlay_dir)`` applies the kustomize features the manifests use, and no
others: ``resources`` (files and bases), ``labels`` (metadata only),
``configMapGenerator`` (``envs`` files, ``behavior: merge``), ``images`` and
strategic-merge ``patches``. A feature outside that set is an error here, so a
manifest cannot silently use something these tests do not render. Generated
ConfigMaps keep their plain name (kustomize adds a content hash to it and to
every reference; the tests only need the names to agree).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

KUBERNETES_DIR = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes"
SUPPORTED = {
    "apiVersion",
    "kind",
    "resources",
    "labels",
    "configMapGenerator",
    "images",
    "patches",
}
# Lists that a strategic merge patch merges item by item, by this key (as in the
# Kubernetes API's patchMergeKey); every other list is replaced.
MERGE_KEYS = {
    "containers": "name",
    "env": "name",
    "ports": "containerPort",
    "volumes": "name",
    "volumeMounts": "mountPath",
}


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines, as kustomize reads a configMapGenerator ``envs`` file."""
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ValueError(f"{path}: {line!r} is not KEY=VALUE")
        values[key.strip()] = value
    return values


def referenced_files(directory: Path) -> set[Path]:
    """Every file a kustomization (and the bases it names) reads."""
    kustomization = _kustomization(directory)
    files = {directory / "kustomization.yaml"}
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        files |= referenced_files(path) if path.is_dir() else {path}
    for generator in kustomization.get("configMapGenerator", []):
        files |= {(directory / name).resolve() for name in generator.get("envs", [])}
    files |= {(directory / patch["path"]).resolve() for patch in kustomization.get("patches", [])}
    return files


def render(directory: Path) -> list[dict[str, Any]]:
    """The resources kustomize builds from ``directory`` (a base or an overlay)."""
    kustomization = _kustomization(directory)
    resources: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        resources += render(path) if path.is_dir() else load_yaml_documents(path)
    for generator in kustomization.get("configMapGenerator", []):
        data: dict[str, str] = {}
        for name in generator.get("envs", []):
            data.update(read_env_file(directory / name))
        for literal in generator.get("literals", []):
            key, _, value = literal.partition("=")
            data[key] = value
        behavior = generator.get("behavior", "create")
        existing = find(resources, "ConfigMap", generator["name"])
        if behavior == "merge":
            existing["data"].update(data)
        elif behavior == "create" and existing is None:
            resources.append(
                {
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "metadata": {"name": generator["name"]},
                    "data": data,
                }
            )
        else:
            raise ValueError(f"{directory}: configMapGenerator behavior {behavior!r} unsupported")
    for patch in kustomization.get("patches", []):
        for document in load_yaml_documents(directory / patch["path"]):
            target = find(resources, document["kind"], document["metadata"]["name"])
            if target is None:
                raise ValueError(f"{patch['path']}: no {document['kind']} to patch")
            resources[resources.index(target)] = merge_patch(target, document)
    for image in kustomization.get("images", []):
        for container in containers(resources):
            if container["image"].split(":")[0] == image["name"]:
                name = image.get("newName", image["name"])
                container["image"] = f"{name}:{image['newTag']}" if "newTag" in image else name
    for label_set in kustomization.get("labels", []):
        if label_set.get("includeSelectors") or label_set.get("includeTemplates"):
            raise ValueError(f"{directory}: labels on selectors or templates are not rendered")
        for resource in resources:
            resource["metadata"].setdefault("labels", {}).update(label_set["pairs"])
    return resources


def merge_patch(target: Any, patch: Any, key: str | None = None) -> Any:
    """A strategic merge patch of ``patch`` onto ``target`` (a new object)."""
    if isinstance(target, dict) and isinstance(patch, dict):
        merged = copy.deepcopy(target)
        for name, value in patch.items():
            merged[name] = merge_patch(merged[name], value, name) if name in merged else value
        return merged
    if isinstance(target, list) and isinstance(patch, list) and key in MERGE_KEYS:
        merge_key = MERGE_KEYS[key]
        merged = copy.deepcopy(target)
        for item in patch:
            same = [i for i, old in enumerate(merged) if old[merge_key] == item[merge_key]]
            if same:
                merged[same[0]] = merge_patch(merged[same[0]], item)
            else:
                merged.append(item)
        return merged
    return copy.deepcopy(patch)


def find(resources: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any] | None:
    for resource in resources:
        if resource["kind"] == kind and resource["metadata"]["name"] == name:
            return resource
    return None


def containers(resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        container
        for resource in resources
        if resource["kind"] == "Deployment"
        for container in resource["spec"]["template"]["spec"]["containers"]
    ]


def commented_alternative(path: Path, marker: str) -> Any:
    """The YAML block commented out after the line containing ``marker``."""
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if marker in line) + 1
    block = [line[1:] for line in lines[start:] if line.startswith("#")]
    return yaml.safe_load("\n".join(block))


def _kustomization(directory: Path) -> dict[str, Any]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - SUPPORTED
    if unsupported:
        raise ValueError(f"{directory}: kustomize fields not rendered here: {unsupported}")
    return kustomization
