"""A small kustomize, for rendering deploy/kubernetes/ where `kubectl` is not installed.

It implements only what those files use and refuses the rest: a kustomization field, patch form or
strategic merge directive it does not know raises UnsupportedFeature, so a file that starts using a
new feature fails loudly here instead of rendering wrong. What it does:

- `resources`: YAML files (several documents each) and directories holding a kustomization;
- `components` (kind Component): their resources and transformations, applied to what the
  including kustomization has gathered so far;
- `patches`: strategic merge patches from a file (`path`), found by their own kind and name, and
  JSON 6902 patches given inline (`patch` with a `target` of group/version/kind/name), with the
  operations add, replace and remove;
- `images`: newName / newTag / digest for containers whose image has the given name;
- `namespace`: set on every namespaced object;
- `labels`: `pairs` added to every object's metadata.labels (not to selectors or templates).

Strategic merge follows Kubernetes' patch strategy for the built-in kinds (lists of containers,
env, volumes and mounts, ports merged by their keys; other lists replaced; maps merged; null
deletes a key) and JSON merge semantics (lists replaced) for custom resources, as kustomize does.
Merged keyed lists come out the way kustomize writes them: the patch's items in the patch's order
first, then the original's other items in their order."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_FIELDS = {
    "apiVersion",
    "kind",
    "resources",
    "components",
    "patches",
    "images",
    "namespace",
    "labels",
}

# Kinds without a namespace (of those a kustomization here could hold).
CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PersistentVolume",
    "StorageClass",
    "PriorityClass",
    "IngressClass",
}

# patchMergeKey of the lists Kubernetes' strategic merge merges by key, by field name. `ports`
# is containerPort in a container and port in a Service: told apart by the items.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "imagePullSecrets": "name",
}


class UnsupportedFeature(Exception):
    """The kustomization uses something this renderer does not implement."""


def render(directory: str | Path) -> list[dict]:
    """The objects `kubectl kustomize <directory>` would print (same content, not same order)."""
    return _build(Path(directory), expect_kind="Kustomization")


def _load_kustomization(directory: Path) -> dict:
    for name in KUSTOMIZATION_FILES:
        path = directory / name
        if path.is_file():
            kustomization = yaml.safe_load(path.read_text()) or {}
            unknown = set(kustomization) - SUPPORTED_FIELDS
            if unknown:
                raise UnsupportedFeature(f"{path}: {sorted(unknown)}")
            return kustomization
    raise FileNotFoundError(f"no kustomization in {directory}")


def _build(directory: Path, *, expect_kind: str, gathered: list[dict] | None = None) -> list[dict]:
    kustomization = _load_kustomization(directory)
    kind = kustomization.get("kind", "Kustomization")
    if kind != expect_kind:
        raise UnsupportedFeature(f"{directory}: a {kind} where a {expect_kind} was expected")
    objects = list(gathered or [])
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            objects.extend(_build(path, expect_kind="Kustomization"))
        else:
            objects.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    for entry in kustomization.get("components", []):
        objects = _build((directory / entry).resolve(), expect_kind="Component", gathered=objects)
    for patch in kustomization.get("patches", []):
        _apply_patch(directory, patch, objects)
    for image in kustomization.get("images", []):
        _set_image(image, objects)
    if "namespace" in kustomization:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj.setdefault("metadata", {})["namespace"] = kustomization["namespace"]
    for label in kustomization.get("labels", []):
        if set(label) - {"pairs"} or label.get("includeSelectors") or label.get("includeTemplates"):
            raise UnsupportedFeature(f"{directory}: labels other than plain `pairs`: {label}")
        for obj in objects:
            obj.setdefault("metadata", {}).setdefault("labels", {}).update(label["pairs"])
    return objects


# -- patches ---------------------------------------------------------------------------------------------


def _apply_patch(directory: Path, patch: dict, objects: list[dict]) -> None:
    if set(patch) - {"path", "patch", "target"}:
        raise UnsupportedFeature(f"patch fields {sorted(set(patch) - {'path', 'patch', 'target'})}")
    text = (directory / patch["path"]).read_text() if "path" in patch else patch["patch"]
    document = yaml.safe_load(text)
    if isinstance(document, list):  # JSON 6902
        if "target" not in patch:
            raise UnsupportedFeature("a JSON 6902 patch needs a target")
        targets = [obj for obj in objects if _matches(obj, patch["target"])]
        if not targets:
            raise LookupError(f"no object matches the patch target {patch['target']}")
        for obj in targets:
            for operation in document:
                _json6902(obj, operation)
        return
    if "target" in patch:
        raise UnsupportedFeature("a strategic merge patch with a target (it is found by its own name)")
    matching = [
        obj
        for obj in objects
        if obj["kind"] == document["kind"]
        and obj["apiVersion"] == document["apiVersion"]
        and obj["metadata"]["name"] == document["metadata"]["name"]
        and document["metadata"].get("namespace") in (None, obj["metadata"].get("namespace"))
    ]
    if len(matching) != 1:
        raise LookupError(
            f"{len(matching)} objects match the patch of {document['kind']}/{document['metadata']['name']}"
        )
    target = matching[0]
    builtin = "." not in target["apiVersion"].split("/")[0] or target["apiVersion"].split("/")[0].endswith(
        ".k8s.io"
    )
    merged = _merge(target, document, keyed=builtin)
    target.clear()
    target.update(merged)


def _matches(obj: dict, target: dict) -> bool:
    if set(target) - {"group", "version", "kind", "name", "namespace"}:
        raise UnsupportedFeature(f"patch target fields {sorted(target)}")
    group, _, version = obj["apiVersion"].rpartition("/")
    wanted = {
        "group": group,
        "version": version,
        "kind": obj["kind"],
        "name": obj["metadata"]["name"],
        "namespace": obj["metadata"].get("namespace"),
    }
    return all(wanted[key] == value for key, value in target.items())


def _merge(original: Any, patch: Any, *, keyed: bool, field: str = "") -> Any:
    """Strategic merge of `patch` into `original` (a new value; neither is changed)."""
    if isinstance(original, dict) and isinstance(patch, dict):
        if any(key.startswith("$") for key in patch):
            raise UnsupportedFeature(
                f"strategic merge directives {[key for key in patch if key.startswith('$')]}"
            )
        merged = copy.deepcopy(original)
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            elif key in merged:
                merged[key] = _merge(merged[key], value, keyed=keyed, field=key)
            else:
                merged[key] = copy.deepcopy(value)
        return merged
    if isinstance(original, list) and isinstance(patch, list) and keyed:
        key = _merge_key(field, original + patch)
        if key is not None:
            by_key = {item[key]: item for item in original}
            merged_items = [
                _merge(by_key[item[key]], item, keyed=keyed) if item[key] in by_key else copy.deepcopy(item)
                for item in patch
            ]
            patched = {item[key] for item in patch}
            return merged_items + [copy.deepcopy(item) for item in original if item[key] not in patched]
    return copy.deepcopy(patch)


def _merge_key(field: str, items: list) -> str | None:
    if not items or not all(isinstance(item, dict) for item in items):
        return None
    if field == "ports":
        for key in ("containerPort", "port"):
            if all(key in item for item in items):
                return key
        return None
    key = MERGE_KEYS.get(field)
    if key is not None and not all(key in item for item in items):
        raise UnsupportedFeature(f"items of {field} without their merge key {key}")
    return key


def _json6902(obj: dict, operation: dict) -> None:
    op, path = operation["op"], operation["path"]
    if op not in ("add", "replace", "remove"):
        raise UnsupportedFeature(f"JSON 6902 operation {op}")
    parts = [part.replace("~1", "/").replace("~0", "~") for part in path.split("/")[1:]]
    parent: Any = obj
    for part in parts[:-1]:
        parent = parent[int(part)] if isinstance(parent, list) else parent[part]
    last = parts[-1]
    if isinstance(parent, list):
        index = len(parent) if last == "-" else int(last)
        if op == "add":
            parent.insert(index, copy.deepcopy(operation["value"]))
        elif op == "replace":
            parent[index] = copy.deepcopy(operation["value"])
        else:
            del parent[index]
        return
    if op == "replace" and last not in parent:
        raise LookupError(f"JSON 6902 replace of a missing {path}")
    if op == "remove":
        del parent[last]
    else:
        parent[last] = copy.deepcopy(operation["value"])


# -- images ----------------------------------------------------------------------------------------------


def _set_image(image: dict, objects: list[dict]) -> None:
    if set(image) - {"name", "newName", "newTag", "digest"}:
        raise UnsupportedFeature(f"image fields {sorted(image)}")
    for obj in objects:
        for container in _containers(obj):
            name, tag, digest = _split_image(container["image"])
            if name != image["name"]:
                continue
            name = image.get("newName", name)
            if "digest" in image:
                container["image"] = f"{name}@{image['digest']}"
            elif "newTag" in image:
                container["image"] = f"{name}:{image['newTag']}"
            else:
                container["image"] = name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


def _split_image(image: str) -> tuple[str, str | None, str | None]:
    image, _, digest = image.partition("@")
    slash = image.rfind("/")
    colon = image.rfind(":")
    if colon > slash:  # a tag, not a registry's port
        return image[:colon], image[colon + 1 :], digest or None
    return image, None, digest or None


def _containers(obj: dict) -> list[dict]:
    spec = obj.get("spec", {})
    pod = spec.get("template", {}).get("spec", {}) if obj["kind"] != "Pod" else spec
    return [*pod.get("initContainers", []), *pod.get("containers", [])]
