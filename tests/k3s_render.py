"""A small kustomize, for the subset of its features that k3s/ uses, so that tests/test_k3s.py can render
the manifests on a machine without kubectl.

Supported (anything else in a kustomization is an error, never silently ignored):

- ``resources``: YAML files (several documents each) and directories holding a kustomization, built
  recursively (a directory outside the kustomization's own is fine: only files must be inside it);
- ``namespace``: set on every namespaced object;
- ``namePrefix`` / ``nameSuffix``: on every object the kustomization holds (not on Namespaces);
- ``configMapGenerator`` (``files`` as ``path`` or ``key=path``, ``literals``, ``behavior``
  create/merge/replace, ``options.labels``/``annotations``/``disableNameSuffixHash``) and
  ``generatorOptions``; generated names get kustomize's content hash, and references to them in pod
  templates (volumes, projected volumes, ``env`` ``configMapKeyRef``, ``envFrom``) follow;
- ``patches`` in JSON 6902 form (a list of operations, inline or from ``path``) on a ``target`` of
  ``kind`` and optionally ``name``.

Order, as kustomize does it: resources (each directory fully built), generators, namespace, patches,
prefix/suffix; hashes and the references to hashed names last, once for the whole build.
``tests/test_k3s.py`` checks that this agrees with ``kubectl kustomize`` where kubectl exists.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["KustomizeError", "config_map_hash", "render"]

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_FIELDS = {
    "apiVersion",
    "kind",
    "resources",
    "namespace",
    "namePrefix",
    "nameSuffix",
    "configMapGenerator",
    "generatorOptions",
    "patches",
}
CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PersistentVolume",
    "PriorityClass",
    "RuntimeClass",
    "StorageClass",
    "ValidatingWebhookConfiguration",
    "MutatingWebhookConfiguration",
}


class KustomizeError(Exception):
    """A kustomization this renderer cannot build (or kustomize would refuse)."""


@dataclass
class _Res:
    obj: dict[str, Any]
    names: list[str] = field(default_factory=list)  # every name it has had, the first one first
    hashed: bool = False  # a generated ConfigMap whose final name carries the content hash

    @property
    def kind(self) -> str:
        return str(self.obj.get("kind", ""))

    @property
    def name(self) -> str:
        return str(self.obj["metadata"]["name"])

    def rename(self, new: str) -> None:
        self.obj["metadata"]["name"] = new
        self.names.append(new)


def render(directory: str | Path) -> list[dict[str, Any]]:
    """Build the kustomization in ``directory``: the objects ``kubectl kustomize`` would print."""
    resources = _build(Path(directory).resolve())
    renames: dict[str, str] = {}
    for r in resources:
        if r.hashed:
            final = f"{r.name}-{config_map_hash(r.obj)}"
            renames[r.names[0]] = final
            renames[r.name] = final
            r.rename(final)
    for r in resources:
        _rename_config_map_refs(r.obj, renames)
    return [r.obj for r in resources]


def _kustomization(directory: Path) -> dict[str, Any]:
    for name in KUSTOMIZATION_FILES:
        path = directory / name
        if path.is_file():
            data = yaml.safe_load(path.read_text()) or {}
            unknown = set(data) - SUPPORTED_FIELDS
            if unknown:
                raise KustomizeError(
                    f"{path}: unsupported field(s) {sorted(unknown)} (see tests/k3s_render.py)"
                )
            return dict(data)
    raise KustomizeError(f"{directory} holds no kustomization.yaml")


def _inside(directory: Path, relative: str) -> Path:
    """A file a kustomization reads: it must lie inside the kustomization's directory (kustomize's
    default load restrictor)."""
    path = (directory / relative).resolve()
    if directory != path and directory not in path.parents:
        raise KustomizeError(f"{relative!r} is outside {directory} (kustomize would refuse to load it)")
    if not path.is_file():
        raise KustomizeError(f"{path} does not exist")
    return path


def _build(directory: Path) -> list[_Res]:
    k = _kustomization(directory)
    out: list[_Res] = []
    for entry in k.get("resources", []) or []:
        path = (directory / entry).resolve()
        if path.is_dir():
            out.extend(_build(path))
        elif path.is_file():
            for doc in yaml.safe_load_all(path.read_text()):
                if doc:
                    out.append(_Res(doc, [str(doc["metadata"]["name"])]))
        else:
            raise KustomizeError(f"{directory}: resource {entry!r} does not exist")
    _check_unique(out, directory)

    options = k.get("generatorOptions") or {}
    for gen in k.get("configMapGenerator", []) or []:
        _generate(directory, gen, options, out)

    namespace = k.get("namespace")
    if namespace:
        for r in out:
            if r.kind not in CLUSTER_SCOPED:
                r.obj["metadata"]["namespace"] = namespace

    for p in k.get("patches", []) or []:
        _patch(directory, p, out)

    prefix, suffix = k.get("namePrefix", ""), k.get("nameSuffix", "")
    if prefix or suffix:
        for r in out:
            if r.kind != "Namespace":
                r.rename(f"{prefix}{r.name}{suffix}")
    _check_unique(out, directory)
    return out


def _check_unique(resources: list[_Res], directory: Path) -> None:
    seen: set[tuple[str, str, str]] = set()
    for r in resources:
        key = (r.kind, str(r.obj["metadata"].get("namespace", "")), r.name)
        if key in seen:
            raise KustomizeError(f"{directory}: {r.kind} {r.name} appears twice")
        seen.add(key)


def _generate(directory: Path, gen: dict[str, Any], options: dict[str, Any], out: list[_Res]) -> None:
    name = gen["name"]
    behavior = gen.get("behavior", "create")
    data: dict[str, str] = {}
    for spec in gen.get("files", []) or []:
        key, sep, rel = str(spec).partition("=")
        if not sep:
            key, rel = Path(spec).name, spec
        data[key] = _inside(directory, rel).read_text()
    for lit in gen.get("literals", []) or []:
        key, sep, value = str(lit).partition("=")
        if not sep:
            raise KustomizeError(f"{directory}: literal {lit!r} is not KEY=VALUE")
        data[key] = value
    opts = {**options, **(gen.get("options") or {})}
    labels = dict(opts.get("labels") or {})
    annotations = dict(opts.get("annotations") or {})
    hashed = not opts.get("disableNameSuffixHash", False)
    existing = [r for r in out if r.kind == "ConfigMap" and name in r.names]
    if behavior == "create":
        if existing:
            raise KustomizeError(f"{directory}: ConfigMap {name} exists already (use behavior: merge)")
        meta: dict[str, Any] = {"name": name}
        if labels:
            meta["labels"] = labels
        if annotations:
            meta["annotations"] = annotations
        out.append(
            _Res({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data}, [name], hashed)
        )
        return
    if behavior not in ("merge", "replace"):
        raise KustomizeError(f"{directory}: unknown generator behavior {behavior!r}")
    if len(existing) != 1:
        raise KustomizeError(f"{directory}: behavior {behavior} needs exactly one ConfigMap {name}")
    target = existing[0]
    if behavior == "merge":
        target.obj["data"] = {**(target.obj.get("data") or {}), **data}
    else:
        target.obj["data"] = data
    meta = target.obj["metadata"]
    if labels:
        meta["labels"] = {**(meta.get("labels") or {}), **labels}
    if annotations:
        meta["annotations"] = {**(meta.get("annotations") or {}), **annotations}
    target.hashed = target.hashed and hashed


def _patch(directory: Path, spec: dict[str, Any], out: list[_Res]) -> None:
    text = spec.get("patch")
    if text is None:
        text = _inside(directory, spec["path"]).read_text()
    ops = yaml.safe_load(text)
    if not isinstance(ops, list):
        raise KustomizeError(f"{directory}: only JSON 6902 patches (a list of operations) are supported")
    target = spec.get("target") or {}
    unknown = set(target) - {"kind", "name"}
    if unknown or "kind" not in target:
        raise KustomizeError(f"{directory}: a patch target takes kind and optionally name, got {target}")
    hits = [
        r
        for r in out
        if r.kind == target["kind"] and ("name" not in target or target["name"] in (r.name, *r.names))
    ]
    if not hits:
        raise KustomizeError(f"{directory}: patch target {target} matches nothing")
    for r in hits:
        for op in ops:
            _apply(r.obj, op, f"{r.kind} {r.name}")


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise KustomizeError(f"JSON pointer {path!r} must start with /")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _apply(obj: dict[str, Any], op: dict[str, Any], what: str) -> None:
    parts = _pointer(op["path"])
    parent: Any = obj
    for p in parts[:-1]:
        try:
            parent = parent[int(p)] if isinstance(parent, list) else parent[p]
        except (KeyError, IndexError, ValueError):
            raise KustomizeError(f"{what}: {op['path']} does not exist") from None
    last = parts[-1]
    kind = op["op"]
    if isinstance(parent, list):
        index = len(parent) if last == "-" else int(last)
        if kind == "add":
            parent.insert(index, copy.deepcopy(op["value"]))
        elif kind == "replace":
            parent[index] = copy.deepcopy(op["value"])
        elif kind == "remove":
            del parent[index]
        else:
            raise KustomizeError(f"{what}: unsupported patch op {kind!r}")
        return
    if kind in ("replace", "remove") and last not in parent:
        raise KustomizeError(f"{what}: {op['path']} does not exist ({kind})")
    if kind in ("add", "replace"):
        parent[last] = copy.deepcopy(op["value"])
    elif kind == "remove":
        del parent[last]
    else:
        raise KustomizeError(f"{what}: unsupported patch op {kind!r}")


def _go_json(value: Any) -> str:
    """``json.Marshal`` of Go: sorted keys, no spaces, UTF-8, and <, >, & (and U+2028/9) escaped."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    for ch, esc in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        text = text.replace(ch, esc)
    return text


def config_map_hash(obj: dict[str, Any]) -> str:
    """kustomize's name suffix for a ConfigMap: sha256 of the JSON of kind, data (and binaryData), with
    the name read from a path kustomize's hasher never finds (so always ""), first 10 hex digits with
    0, 1, 3, a, e spelled g, h, k, m, t."""
    doc: dict[str, Any] = {"kind": "ConfigMap", "name": "", "data": obj.get("data", "")}
    if obj.get("binaryData"):
        doc["binaryData"] = obj["binaryData"]
    digest = hashlib.sha256(_go_json(doc).encode()).hexdigest()
    return digest[:10].translate(str.maketrans("013ae", "ghkmt"))


def _pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    kind = obj.get("kind")
    spec = obj.get("spec") or {}
    if kind == "Pod":
        return spec
    if kind in ("Deployment", "DaemonSet", "StatefulSet", "ReplicaSet", "Job"):
        return (spec.get("template") or {}).get("spec")
    if kind == "CronJob":
        return (((spec.get("jobTemplate") or {}).get("spec") or {}).get("template") or {}).get("spec")
    return None


def _rename_config_map_refs(obj: dict[str, Any], renames: dict[str, str]) -> None:
    spec = _pod_spec(obj)
    if not spec or not renames:
        return

    def fix(ref: dict[str, Any] | None) -> None:
        if ref and ref.get("name") in renames:
            ref["name"] = renames[ref["name"]]

    for vol in spec.get("volumes", []) or []:
        fix(vol.get("configMap"))
        for src in (vol.get("projected") or {}).get("sources", []) or []:
            fix(src.get("configMap"))
    for c in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]:
        for env in c.get("env", []) or []:
            fix((env.get("valueFrom") or {}).get("configMapKeyRef"))
        for env_from in c.get("envFrom", []) or []:
            fix(env_from.get("configMapRef"))
