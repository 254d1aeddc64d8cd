"""Renders the kustomizations in deploy/kubernetes without kubectl: the subset of kustomize they
use (resources, namespace, labels, images, strategic-merge patches, secretGenerator literals
without a name hash). Anything else in a kustomization.yaml is an error here, so a feature this
renderer does not know cannot slip through unvalidated. Where kubectl is installed the test
also compares this rendering with `kubectl kustomize`."""

from __future__ import annotations

import base64
import copy
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]
KNOWN_FIELDS = {
    "apiVersion",
    "kind",
    "resources",
    "namespace",
    "labels",
    "images",
    "patches",
    "secretGenerator",
}
# Kinds that live in no namespace: kustomize leaves them alone.
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}


class KustomizeError(ValueError):
    pass


def render(directory: Path) -> list[Obj]:
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(spec) - KNOWN_FIELDS
    if unknown:
        raise KustomizeError(
            f"{directory}: kustomization fields this renderer does not know: {sorted(unknown)}"
        )
    objects: list[Obj] = []
    for resource in spec.get("resources", []):
        path = directory / resource
        if path.is_dir():
            objects += render(path)
        else:
            objects += [o for o in yaml.safe_load_all(path.read_text()) if o]
    for generator in spec.get("secretGenerator", []):
        objects.append(_secret(generator))
    for patch in spec.get("patches", []):
        for doc in yaml.safe_load_all((directory / patch["path"]).read_text()):
            target = _find(objects, doc["kind"], doc["metadata"]["name"])
            _merge(target, doc)
    for entry in spec.get("labels", []):
        if entry.get("includeSelectors") or entry.get("includeTemplates"):
            raise KustomizeError("labels with includeSelectors/includeTemplates: not supported")
        for obj in objects:
            obj["metadata"].setdefault("labels", {}).update(entry["pairs"])
    for image in spec.get("images", []):
        for obj in objects:
            for container in _containers(obj):
                name, _, _tag = container["image"].partition(":")
                if name == image["name"]:
                    container["image"] = f"{image.get('newName', name)}:{image['newTag']}"
    if "namespace" in spec:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = spec["namespace"]
    return objects


def _secret(generator: Obj) -> Obj:
    if not generator.get("options", {}).get("disableNameSuffixHash"):
        raise KustomizeError("secretGenerator without disableNameSuffixHash: not supported")
    if set(generator) - {"name", "options", "literals"}:
        raise KustomizeError(f"secretGenerator fields not supported: {sorted(generator)}")
    data = {}
    for literal in generator["literals"]:
        key, _, value = literal.partition("=")
        data[key] = base64.b64encode(value.encode()).decode()
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {"name": generator["name"]},
        "data": data,
    }


def _find(objects: list[Obj], kind: str, name: str) -> Obj:
    for obj in objects:
        if obj["kind"] == kind and obj["metadata"]["name"] == name:
            return obj
    raise KustomizeError(f"patch target {kind}/{name} not found")


def _merge(target: Obj, patch: Obj) -> None:
    """Strategic merge as kustomize does it for these objects: maps merge, lists of named
    items (containers, env, ports, volumes) merge by name, other lists are replaced."""
    for key, value in patch.items():
        current = target.get(key)
        if isinstance(value, dict) and isinstance(current, dict):
            _merge(current, value)
        elif (
            isinstance(value, list)
            and isinstance(current, list)
            and all(isinstance(v, dict) and "name" in v for v in value + current)
        ):
            by_name = {item["name"]: item for item in current}
            for item in value:
                if item["name"] in by_name:
                    _merge(by_name[item["name"]], item)
                else:
                    current.append(copy.deepcopy(item))
        else:
            target[key] = copy.deepcopy(value)


def _containers(obj: Obj) -> list[Obj]:
    spec = obj.get("spec", {})
    pod = spec.get("template", {}).get("spec", {}) if "template" in spec else {}
    return [*pod.get("containers", []), *pod.get("initContainers", [])]
