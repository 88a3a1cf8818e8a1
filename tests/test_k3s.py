"""The k3s manifests (k3s/), the Dockerfile and the Grafana dashboard: rendered, validated, and run.

- Every kustomization renders (``kubectl kustomize`` where kubectl exists, else ``k3s_render``, which
  must agree with kubectl object for object when both exist) and every object validates offline with
  kubernetes-validate, strict, against pinned Kubernetes versions.
- The Prometheus rules ConfigMap is ``deploy/prometheus/rules.yml`` itself; the scrape config passes
  promtool; every metric name the dashboard queries is one meshai exports or a recording rule.
- The Dockerfile copies only files that exist (and the build context keeps), runs ``meshai``, and its
  wheel builds from exactly the files it copies.
- The smoke test runs a site on this machine: one network namespace per Kubernetes node on a bridge,
  the identity Secrets made by running the README's commands (``kubectl`` stood in for), the init
  steps, then exactly the command, arguments and environment of the node agent (DaemonSet) and
  scheduler (Deployment) containers, and mosquitto from its manifest — downward API and ConfigMap
  values substituted as the kubelet would, mount paths mapped to temp directories holding the
  ConfigMaps' and Secrets' contents, cluster DNS names in each namespace's hosts file. A model is
  deployed through the scheduler and checked against the whole model; every probe of the manifests
  must answer. Nothing here knows the containers' arguments: they come from the manifests only.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from k3s_render import KustomizeError, render
from runtime_helpers import assert_outputs_equal, child_env

ROOT = Path(__file__).resolve().parents[1]
K3S = ROOT / "k3s"
KUSTOMIZATIONS = {
    "base": K3S / "base",
    "small-site": K3S / "overlays" / "small-site",
    "robot-fleet": K3S / "overlays" / "robot-fleet",
    "static-discovery": K3S / "overlays" / "static-discovery",
}
#: Kubernetes versions every object must validate against (kubernetes-validate --strict): the oldest
#: k3s release these manifests support, and a current one.
KUBERNETES_VERSIONS = ("1.31.0", "1.33.0")
KUBECTL = shutil.which("kubectl")
PROMTOOL = shutil.which("promtool")
MOSQUITTO = shutil.which("mosquitto") or (
    "/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None
)
IMAGE_REPO = "ghcr.io/meshai/meshai"
DASHBOARD = K3S / "grafana" / "meshai-dashboard.json"
CLUSTER_DOMAIN = "cluster.local"


# ------------------------------------------------------------------------------------------ render


@functools.cache
def _rendered(name: str) -> tuple[dict[str, Any], ...]:
    directory = KUSTOMIZATIONS[name]
    if KUBECTL is None:
        return tuple(render(directory))
    r = subprocess.run([KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"kubectl kustomize {directory}: {r.stderr}"
    return tuple(d for d in yaml.safe_load_all(r.stdout) if d)


def rendered(name: str) -> list[dict[str, Any]]:
    """The objects of one kustomization (a deep copy: callers may change them)."""
    return copy.deepcopy(list(_rendered(name)))


def by_kind(objs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def ident(o: dict[str, Any]) -> tuple[str, str, str]:
    return (o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"])


def config_maps(objs: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    return {n: dict(o.get("data") or {}) for n, o in by_kind(objs, "ConfigMap").items()}


def generated(objs: list[dict[str, Any]], base_name: str) -> dict[str, Any]:
    """The ConfigMap kustomize generated as ``base_name`` (its name carries a content hash)."""
    hits = [
        o
        for o in objs
        if o["kind"] == "ConfigMap" and re.fullmatch(rf"{base_name}-[a-z0-9]{{10}}", o["metadata"]["name"])
    ]
    assert len(hits) == 1, f"expected one generated ConfigMap {base_name}, got {[ident(h) for h in hits]}"
    return hits[0]


def workloads(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] in ("Deployment", "DaemonSet")]


def pod_spec(w: dict[str, Any]) -> dict[str, Any]:
    return dict(w["spec"]["template"]["spec"])


def containers(w: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(w)
    return [*(spec.get("initContainers") or []), *spec["containers"]]


def meshai_agents(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Workloads running the meshai image's ``node`` command (node agents and the scheduler)."""
    return [w for w in workloads(objs) if pod_spec(w)["containers"][0]["image"].startswith(IMAGE_REPO + ":")]


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_every_kustomization_renders(name: str) -> None:
    objs = rendered(name)
    kinds = {o["kind"] for o in objs}
    assert {"Namespace", "ServiceAccount", "DaemonSet", "Deployment", "Service", "ConfigMap"} <= kinds
    assert {"PodDisruptionBudget", "NetworkPolicy"} <= kinds
    assert len({ident(o) for o in objs}) == len(objs)
    for o in objs:
        if o["kind"] != "Namespace":
            assert o["metadata"].get("namespace") == "meshai", ident(o)
    # no permissions at all: meshai never calls the Kubernetes API
    assert not kinds & {"Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}
    assert by_kind(objs, "ServiceAccount")["meshai"]["automountServiceAccountToken"] is False


@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed: nothing to compare the renderer with")
@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_renderer_agrees_with_kubectl(name: str) -> None:
    ours = {ident(o): o for o in render(KUSTOMIZATIONS[name])}
    theirs = {ident(o): o for o in rendered(name)}
    assert sorted(ours) == sorted(theirs)
    for key, obj in theirs.items():
        assert ours[key] == obj, f"{key} differs from kubectl's"


def test_renderer_refuses_what_it_does_not_know(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: []\ncommonLabels: {a: b}\n")
    with pytest.raises(KustomizeError, match="commonLabels"):
        render(tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        "configMapGenerator:\n  - name: x\n    files: [../escape.txt]\n"
    )
    (tmp_path.parent / "escape.txt").write_text("x")
    with pytest.raises(KustomizeError, match="outside"):
        render(tmp_path)


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_every_object_validates_offline(name: str) -> None:
    import kubernetes_validate

    failures = []
    for obj in rendered(name):
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except Exception as exc:  # ValidationError, SchemaNotFoundError, …: all say what is wrong
                failures.append(f"{obj['kind']}/{obj['metadata']['name']} (Kubernetes {version}): {exc}")
    assert not failures, "\n".join(failures)


def test_strict_validation_catches_a_misspelled_field() -> None:
    import kubernetes_validate

    ds = by_kind(rendered("base"), "DaemonSet")["meshai-node-cpu"]
    ds["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = ds["spec"]["template"]["spec"][
        "containers"
    ][0].pop("livenessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="livenessProbes"):
        kubernetes_validate.validate(ds, KUBERNETES_VERSIONS[0], strict=True)


# --------------------------------------------------------------------------------- manifest shape


def _env(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in c.get("env") or []}


def _arg(c: dict[str, Any], flag: str) -> str | None:
    for a in c.get("args") or []:
        if a.startswith(flag + "="):
            return str(a.split("=", 1)[1])
    return None


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_agents_are_on_the_host_network_with_probes_resources_and_their_class(name: str) -> None:
    objs = rendered(name)
    agents = meshai_agents(objs)
    assert {w["kind"] for w in agents} == {"DaemonSet", "Deployment"}
    for w in agents:
        spec = pod_spec(w)
        what = f"{w['kind']}/{w['metadata']['name']}"
        assert spec["hostNetwork"] is True and spec["dnsPolicy"] == "ClusterFirstWithHostNet", what
        assert spec["automountServiceAccountToken"] is False and spec["serviceAccountName"] == "meshai", what
        main = spec["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in main["ports"]}
        # the probes ask the metrics server the container starts, on the port it is given
        assert str(ports["metrics"]) == _arg(main, "--metrics-port"), what
        assert _arg(main, "--listen") == f"$(POD_IP):{ports['mesh']}", what
        assert main["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}, what
        assert main["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}, what
        assert _env(main)["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP", what
        for c in containers(w):
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]), (what, c["name"])
            assert {"cpu", "memory"} <= set(c["resources"]["limits"]), (what, c["name"])
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["readOnlyRootFilesystem"] is True
        if w["kind"] == "DaemonSet":
            cls = w["spec"]["selector"]["matchLabels"]["meshai.dev/accelerator"]
            assert w["metadata"]["name"] == f"meshai-node-{cls}"
            assert w["spec"]["template"]["metadata"]["labels"]["meshai.dev/accelerator"] == cls
            assert spec["nodeSelector"]["meshai.dev/accelerator"] == cls
            ref = _env(main)["MESHAI_ACCELERATOR"]["valueFrom"]["fieldRef"]["fieldPath"]
            assert (
                ref == "metadata.labels['meshai.dev/accelerator']"
                and _arg(main, "--profile") == "$(MESHAI_ACCELERATOR)"
            )
            gpus = main["resources"]["limits"].get("nvidia.com/gpu")
            assert (gpus == "1") == (cls == "gpu"), what
        else:
            assert "--entry-only" in main["args"] and w["spec"]["replicas"] == 1
            assert w["spec"]["strategy"]["type"] == "Recreate"
    classes = sorted(
        w["spec"]["selector"]["matchLabels"]["meshai.dev/accelerator"]
        for w in agents
        if w["kind"] == "DaemonSet"
    )
    assert (
        classes
        == {
            "base": ["cpu"],
            "small-site": ["cpu", "gpu"],
            "robot-fleet": ["cpu", "npu", "tpu"],
            "static-discovery": ["cpu"],
        }[name]
    )
    site = generated(objs, "meshai-site")["data"]
    assert site["discovery"] == ("none" if name == "static-discovery" else "mdns")
    pdb = by_kind(objs, "PodDisruptionBudget")["meshai-scheduler"]
    scheduler = by_kind(objs, "Deployment")["meshai-scheduler"]
    assert (
        pdb["spec"]["selector"]["matchLabels"].items()
        <= scheduler["spec"]["template"]["metadata"]["labels"].items()
    )


def test_robot_fleet_runs_int8_classes_on_less() -> None:
    def cpu_millis(v: str) -> float:
        return float(v[:-1]) if v.endswith("m") else float(v) * 1000

    base = by_kind(rendered("base"), "DaemonSet")["meshai-node-cpu"]
    fleet = by_kind(rendered("robot-fleet"), "DaemonSet")
    from meshai.capabilities import load_profiles

    profiles = load_profiles(K3S / "overlays" / "robot-fleet" / "profiles.json")
    assert {"npu", "tpu"} <= set(profiles) and all("int8" in profiles[c].flops for c in ("npu", "tpu"))
    b = pod_spec(base)["containers"][0]["resources"]
    for name, ds in fleet.items():
        r = pod_spec(ds)["containers"][0]["resources"]
        assert cpu_millis(r["requests"]["cpu"]) < cpu_millis(b["requests"]["cpu"]), name
        assert cpu_millis(r["limits"]["cpu"]) < cpu_millis(b["limits"]["cpu"]), name
        assert ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"] == "10%"


def test_network_policy_ports_exist_on_the_pods_it_selects() -> None:
    objs = rendered("small-site")
    pods = [(w["spec"]["template"]["metadata"]["labels"], pod_spec(w)) for w in workloads(objs)]

    def selects(sel: dict[str, Any], labels: dict[str, str]) -> bool:
        ok = all(labels.get(k) == v for k, v in (sel.get("matchLabels") or {}).items())
        for e in sel.get("matchExpressions") or []:
            assert e["operator"] == "In"
            ok = ok and labels.get(e["key"]) in e["values"]
        return ok

    for pol in by_kind(objs, "NetworkPolicy").values():
        chosen = [spec for labels, spec in pods if selects(pol["spec"]["podSelector"], labels)]
        assert chosen, pol["metadata"]["name"]
        for rule in pol["spec"].get("ingress") or []:
            for port in rule["ports"]:
                if isinstance(port["port"], str):  # a named port must exist on every pod selected
                    for spec in chosen:
                        assert port["port"] in {p["name"] for p in spec["containers"][0]["ports"]}


def test_image_everywhere_is_the_project_version() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for name in KUSTOMIZATIONS:
        for w in meshai_agents(rendered(name)):
            for c in containers(w):
                assert c["image"] == f"{IMAGE_REPO}:{version}", (name, w["metadata"]["name"], c["name"])


# ----------------------------------------------------------------------------- Prometheus, Grafana


def test_rules_config_map_is_the_deploy_file_itself() -> None:
    for name in KUSTOMIZATIONS:
        rules = generated(rendered(name), "meshai-prometheus-rules")
        assert rules["data"] == {"rules.yml": (ROOT / "deploy" / "prometheus" / "rules.yml").read_text()}


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (apt-get install prometheus)")
def test_prometheus_config_map_passes_promtool(tmp_path: Path) -> None:
    objs = rendered("small-site")
    config = generated(objs, "meshai-prometheus")["data"]["prometheus.yml"]
    rules = generated(objs, "meshai-prometheus-rules")["data"]
    rules_dir = tmp_path / "rules"  # where the README says to mount the rules
    rules_dir.mkdir()
    for key, text in rules.items():
        (rules_dir / key).write_text(text)
    assert "/etc/prometheus/rules/" in config
    (tmp_path / "prometheus.yml").write_text(config.replace("/etc/prometheus/rules/", f"{rules_dir}/"))
    r = subprocess.run(
        [PROMTOOL, "check", "config", "prometheus.yml"], cwd=tmp_path, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr
    found = re.search(r"SUCCESS: (\d+) rules found", r.stdout + r.stderr)
    rules_yml = yaml.safe_load(rules["rules.yml"])
    assert found and int(found.group(1)) == sum(len(g["rules"]) for g in rules_yml["groups"]), r.stdout
    assert 'job="meshai"' in rules["rules.yml"] and "job_name: meshai" in config


def _dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for p in panels:
            exprs.extend(t["expr"] for t in p.get("targets", []))
            walk(p.get("panels", []))

    walk(dash["panels"])
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", q)
            assert m, q
            exprs.append(m.group(1))
    return exprs


_PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
    "offset", "inf", "nan",
}  # fmt: skip


def promql_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords, label names
    (inside {} or by/without/on/ignoring lists), strings, durations or Grafana variables."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\$\{?\w+\}?", "", text)  # Grafana variables
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = m.group(0)
        after = text[m.end() :].lstrip()
        if word.lower() in _PROMQL_WORDS or after.startswith("("):
            continue
        if re.fullmatch(r"\d+\w*", word):
            continue
        names.add(word)
    return names


def meshai_series_names() -> set[str]:
    """Every series name meshai exports (from a fresh Metrics: the families and their suffixes) and every
    recording rule in deploy/prometheus/rules.yml."""
    from meshai.metrics import Metrics

    names = set()
    for fam in Metrics(node="x").registry.collect():
        if fam.type == "counter":
            names.add(fam.name + "_total")
        elif fam.type == "histogram":
            names.update(fam.name + s for s in ("_bucket", "_sum", "_count"))
        else:
            names.add(fam.name)
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "rules.yml").read_text())
    names.update(r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r)
    return names


def test_promql_name_extraction() -> None:
    got = promql_metric_names(
        'histogram_quantile(0.99, sum by (model, le) (rate(meshai_inference_latency_seconds_bucket{model=~"$model"}'
        "[$__rate_interval]))) / on(model) group_left meshai:requests:rate5m > bool 0.5"
    )
    assert got == {"meshai_inference_latency_seconds_bucket", "meshai:requests:rate5m"}


def test_dashboard_queries_only_metrics_that_exist() -> None:
    exprs = _dashboard_exprs()
    known = meshai_series_names()
    used = set()
    for e in exprs:
        names = promql_metric_names(e)
        assert names, f"no metric in {e!r}"
        assert names <= known, f"{e!r} names {sorted(names - known)}, which meshai does not export"
        used |= names
    # the panels the issue asks for: end-to-end and per-stage latency, throughput, drift, peers,
    # bytes moved, bandwidth saved
    for needed in (
        "meshai:inference_latency_seconds:p95_rate5m",
        "meshai:stage_latency_seconds:p95_rate5m",
        "meshai:requests:rate5m",
        "meshai_feature_drift_score",
        "meshai_prediction_drift_score",
        "meshai_peers",
        "meshai:transfer_bytes:rate5m",
        "meshai:bandwidth_saved_bytes:rate5m",
    ):
        assert needed in used, needed


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (apt-get install prometheus)")
def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    grafana = {"$__rate_interval": "1m", "$__range": "1h", "$model": ".*"}
    rules = []
    for i, e in enumerate(_dashboard_exprs()):
        for var, value in grafana.items():
            e = e.replace(var, value)
        assert "$" not in e, e
        rules.append({"record": f"dashboard:query_{i}", "expr": e})
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dashboard_ships_as_a_grafana_sidecar_config_map() -> None:
    cm = generated(rendered("base"), "meshai-grafana-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["meshai-dashboard.json"]) == json.loads(DASHBOARD.read_text())


# -------------------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) for every instruction of the Dockerfile, continuations joined."""
    out: list[tuple[str, str]] = []
    current = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        current += " " + line.rstrip("\\").strip() if current else line.rstrip("\\").strip()
        if line.endswith("\\"):
            continue
        word, _, rest = current.partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    return out


def final_stage() -> list[tuple[str, str]]:
    ins = dockerfile_instructions()
    last = max(i for i, (w, _) in enumerate(ins) if w == "FROM")
    return ins[last:]


def image_entrypoint() -> tuple[list[str], list[str], dict[str, str]]:
    """ENTRYPOINT, CMD (exec form) and ENV of the image the manifests run."""
    entry: list[str] = []
    cmd: list[str] = []
    env: dict[str, str] = {}
    for word, rest in final_stage():
        if word == "ENTRYPOINT":
            entry = json.loads(rest)
        elif word == "CMD":
            cmd = json.loads(rest)
        elif word == "ENV":
            for pair in shlex.split(rest):
                k, _, v = pair.partition("=")
                env[k] = v
    return entry, cmd, env


def test_dockerfile_copies_what_exists_and_runs_meshai() -> None:
    ignore = [p for p in (ROOT / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    assert ignore[0] == "*", "the context starts empty; every file the build needs is re-included"
    kept = {p[1:].rstrip("/") for p in ignore if p.startswith("!")}
    copies = [rest for word, rest in dockerfile_instructions() if word == "COPY"]
    assert copies
    for rest in copies:
        parts = rest.split()
        assert not any(p.startswith("--from") for p in parts), (
            "the runtime stage installs the wheel by a bind mount"
        )
        for src in parts[:-1]:
            assert (ROOT / src).exists(), f"COPY {src}: no such file in the repository"
            assert src.rstrip("/") in kept, f"COPY {src}: excluded by .dockerignore"
    entry, cmd, env = image_entrypoint()
    assert entry == ["meshai"] and cmd == ["--help"]
    assert env["PYTHONUNBUFFERED"] == "1"
    stage = final_stage()
    assert ("USER", "10001:10001") in stage
    for w in meshai_agents(rendered("base")):
        assert pod_spec(w)["securityContext"]["runAsUser"] == 10001
    froms = [rest for word, rest in dockerfile_instructions() if word == "FROM"]
    assert froms == ["${PYTHON_IMAGE} AS build", "${PYTHON_IMAGE}"]
    # the runtime stage installs the project's wheel, without extras
    run = " ".join(rest for word, rest in stage if word == "RUN")
    assert "pip install --no-cache-dir /dist/meshai-*.whl" in run and "[" not in run.split("whl")[0]


@pytest.mark.slow
def test_the_wheel_builds_from_exactly_what_the_dockerfile_copies(tmp_path: Path) -> None:
    import zipfile

    ctx = tmp_path / "context"
    ctx.mkdir()
    for word, rest in dockerfile_instructions():
        if word == "COPY":
            *srcs, _dest = rest.split()
            for src in srcs:
                s = ROOT / src
                if s.is_dir():
                    shutil.copytree(s, ctx / src, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
                else:
                    shutil.copy2(s, ctx / src)
    # as the Dockerfile does: an isolated build, which fetches the build backend (setuptools) from the index
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-q",
            "--wheel-dir",
            str(tmp_path / "dist"),
            str(ctx),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if r.returncode != 0 and re.search(
        r"No matching distribution found for setuptools|Could not fetch URL|NewConnectionError", r.stderr
    ):
        pytest.skip(
            f"the package index is unreachable: cannot fetch the build backend ({r.stderr.strip().splitlines()[-1]})"
        )
    assert r.returncode == 0, r.stderr
    (wheel,) = (tmp_path / "dist").glob("meshai-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next(z.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    for module in (
        "meshai/cli.py",
        "nodes/agent.py",
        "nodes/entry.py",
        "scheduler/partition.py",
        "meshai/protocol/__init__.py",
    ):
        assert module in names, module
    assert "meshai = meshai.cli:main" in entry_points


# ------------------------------------------------------------------------- a site, as the kubelet would


README = ROOT / "README.md"
SITE_NODES = ("site-1", "site-2", "site-3")  # the emulated site's Kubernetes nodes


def readme_block(after: str) -> str:
    """The first fenced code block after the line containing ``after`` in the README's k3s section."""
    text = README.read_text()
    section = text[text.index("## Running at a site (k3s)") :]
    start = section.index(after)
    m = re.search(r"```[a-z]*\n(.*?)```", section[start:], re.S)
    assert m, f"no code block after {after!r}"
    return m.group(1)


KUBECTL_STUB = r"""
kubectl() {  # stands in for kubectl: remembers namespaces applied, writes Secrets as directories
  if [ "$1" = apply ] && [ "$2" = -f ] && [ $# -eq 3 ]; then
    grep -q '^kind: Namespace' "$REPO/$3" || { echo "stub kubectl: $3 is not a Namespace" >&2; return 1; }
    awk '/^  name: /{print $2; exit}' "$REPO/$3" >> "$STUB/namespaces"; return 0
  fi
  if [ "$1" = -n ] && [ "$3" = create ] && [ "$4" = secret ] && [ "$5" = generic ] && [ $# -ge 6 ]; then
    ns=$2; name=$6; shift 6
    grep -qx "$ns" "$STUB/namespaces" 2>/dev/null || { echo "stub kubectl: namespace $ns does not exist" >&2; return 1; }
    mkdir -p "$STUB/secrets"; mkdir "$STUB/secrets/$name" || { echo "secret $name exists" >&2; return 1; }
    [ $# -gt 0 ] || { echo "stub kubectl: secret $name has no data" >&2; return 1; }
    for a in "$@"; do
      case "$a" in
        --from-file=*=*) kv=${a#--from-file=}; key=${kv%%=*}; path=${kv#*=} ;;
        --from-file=*) path=${a#--from-file=}; key=$(basename "$path") ;;
        *) echo "stub kubectl: unsupported argument $a" >&2; return 1 ;;
      esac
      [ -f "$path" ] || { echo "error: $path: no such file" >&2; return 1; }
      [ ! -e "$STUB/secrets/$name/$key" ] || { echo "error: duplicate key $key" >&2; return 1; }
      cp "$path" "$STUB/secrets/$name/$key"
    done
    return 0
  fi
  echo "stub kubectl: unsupported: kubectl $*" >&2; return 1
}
meshai() { "$PYTHON" -m meshai "$@"; }
"""


@dataclass
class SiteSecrets:
    work: Path  # the operator's directory: ca/, id/, ops/, fleet, fleet.pub, the package
    secrets: dict[str, dict[str, bytes]]  # Secret name -> key -> bytes
    package: Path


@pytest.fixture(scope="module")
def site_secrets(tmp_path_factory: pytest.TempPathFactory) -> SiteSecrets:
    """The README's identity block run as written (kubectl stood in for) for the nodes SITE_NODES, then
    the README's package commands."""
    work = tmp_path_factory.mktemp("operator")
    stub = work / ".stub"
    stub.mkdir()
    block = readme_block("**Identities and keys.**")
    first, rest = block.split("\n", 1)
    assert first.startswith('NODES="'), first
    script = "set -euo pipefail\n" + KUBECTL_STUB + f'NODES="{" ".join(SITE_NODES)}"\n' + rest
    env = {**child_env(), "REPO": str(ROOT), "STUB": str(stub), "PYTHON": sys.executable}
    env.pop("MESHAI_IDENTITY", None)
    r = subprocess.run(["bash", "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"README identity block failed:\n{r.stderr[-3000:]}"
    secrets = {}
    for d in sorted((stub / "secrets").iterdir()):
        data = {f.name: f.read_bytes() for f in d.iterdir()}
        assert all(re.fullmatch(r"[-._a-zA-Z0-9]+", k) for k in data), data.keys()
        assert sum(len(v) for v in data.values()) < 1024 * 1024, "a Secret holds at most 1 MiB"
        secrets[d.name] = data
    deploy = readme_block("**Deploy and infer**")
    package_lines = [ln.split("#")[0] for ln in deploy.splitlines() if ln.startswith("meshai package ")]
    assert len(package_lines) == 2, package_lines
    script = "set -euo pipefail\n" + KUBECTL_STUB + "\n".join(package_lines) + "\n"
    r = subprocess.run(["bash", "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"README package commands failed:\n{r.stderr[-3000:]}"
    return SiteSecrets(work, secrets, work / "det.pkg")


def expand(value: str, env: dict[str, str]) -> str:
    """The kubelet's $(VAR) expansion: defined names are replaced, $$ is a literal $, anything else stays."""
    out = []
    i = 0
    while i < len(value):
        if value.startswith("$$", i):
            out.append("$")
            i += 2
            continue
        if value.startswith("$(", i):
            j = value.find(")", i + 2)
            if j != -1:
                name = value[i + 2 : j]
                out.append(env.get(name, value[i : j + 1]))
                i = j + 1
                continue
        out.append(value[i])
        i += 1
    return "".join(out)


def test_expand_like_the_kubelet() -> None:
    env = {"A": "1", "POD_IP": "10.0.0.2"}
    assert expand("--listen=$(POD_IP):7000", env) == "--listen=10.0.0.2:7000"
    assert expand("$(A)$$(A)$(B)", env) == "1$(A)$(B)"


@dataclass
class KubeNode:
    """A Kubernetes node of the emulated site: a network namespace on the site's bridge (or, for the
    typo test, this machine's own loopback)."""

    name: str
    labels: dict[str, str]
    ip: str
    prefix: list[str]  # argv prefix that runs a command there
    enter: Callable[[], contextlib.AbstractContextManager[None]]


@dataclass
class Pod:
    name: str
    workload: dict[str, Any]
    node: KubeNode  # the Kubernetes node it is scheduled on
    net: KubeNode  # where its processes run: the node's namespace (host network), or a pod's own
    ip: str
    directory: Path
    volumes: dict[str, Path] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.workload["spec"]["template"]["metadata"].get("labels") or {})

    def log(self, container: str) -> str:
        with contextlib.suppress(OSError):
            return (self.directory / f"{container}.log").read_text(errors="replace")[-3000:]
        return ""

    def stdout(self, container: str) -> str:
        with contextlib.suppress(OSError):
            return (self.directory / f"{container}.out").read_text(errors="replace")
        return ""


class Kubelet:
    """Runs pods of rendered manifests as local processes, the way the kubelet would run them."""

    def __init__(self, objs: list[dict[str, Any]], secrets: dict[str, dict[str, bytes]], work: Path) -> None:
        self.config_maps = config_maps(objs)
        self.secrets = secrets
        self.work = work
        self.pods: list[Pod] = []
        entry, cmd, env = image_entrypoint()
        self.image_entry, self.image_cmd, self.image_env = entry, cmd, env

    # ----- what runs

    def resolve_env(self, c: dict[str, Any], pod: Pod) -> dict[str, str]:
        env: dict[str, str] = {}
        fields = {
            "spec.nodeName": pod.node.name,
            "status.podIP": pod.ip,
            "status.hostIP": pod.node.ip,
            "metadata.name": pod.name,
            "metadata.namespace": pod.workload["metadata"]["namespace"],
        }
        assert not c.get("envFrom"), "envFrom is not emulated"
        for e in c.get("env") or []:
            if "value" in e:
                env[e["name"]] = expand(str(e["value"]), env)
                continue
            src = e["valueFrom"]
            if "fieldRef" in src:
                path = src["fieldRef"]["fieldPath"]
                m = re.fullmatch(r"metadata\.labels\['(.+)'\]", path)
                if m:
                    assert m.group(1) in pod.labels, f"{pod.name}: pod has no label {m.group(1)}"
                    env[e["name"]] = pod.labels[m.group(1)]
                else:
                    assert path in fields, f"{pod.name}: fieldRef {path} is not emulated"
                    env[e["name"]] = fields[path]
            elif "configMapKeyRef" in src:
                ref = src["configMapKeyRef"]
                assert ref["name"] in self.config_maps, f"{pod.name}: no ConfigMap {ref['name']}"
                assert ref["key"] in self.config_maps[ref["name"]], (
                    f"{pod.name}: {ref['name']} lacks {ref['key']}"
                )
                env[e["name"]] = self.config_maps[ref["name"]][ref["key"]]
            else:
                raise AssertionError(f"{pod.name}: env source {sorted(src)} is not emulated")
        return env

    def argv(self, c: dict[str, Any], env: dict[str, str]) -> list[str]:
        """Command and arguments as the container runtime would run them (image ENTRYPOINT/CMD rules)."""
        ours = c["image"].startswith(IMAGE_REPO + ":")
        if "command" in c:
            command, args = list(c["command"]), list(c.get("args") or [])
        else:
            assert ours, f"{c['name']}: a third-party image needs an explicit command to be emulated"
            command, args = self.image_entry, list(c["args"]) if "args" in c else self.image_cmd
        return [expand(a, env) for a in [*command, *args]]

    @staticmethod
    def executable(argv: list[str]) -> list[str]:
        """What runs the image's program here: meshai from this checkout, the system's sh and mosquitto."""
        local = {
            "meshai": [sys.executable, "-m", "meshai"],
            "/bin/sh": ["/bin/sh"],
            "/usr/sbin/mosquitto": [str(MOSQUITTO)],
        }
        assert argv[0] in local, f"{argv[0]} is not a program this test can run"
        return [*local[argv[0]], *argv[1:]]

    def materialise(self, pod: Pod) -> None:
        for v in pod_spec(pod.workload).get("volumes") or []:
            d = pod.directory / "volumes" / v["name"]
            d.mkdir(parents=True)
            pod.volumes[v["name"]] = d
            if "emptyDir" in v:
                continue
            if "configMap" in v:
                source = v["configMap"]
                data = {k: t.encode() for k, t in self.config_maps[source["name"]].items()}
                what = f"ConfigMap {source['name']}"
            elif "secret" in v:
                source = v["secret"]
                assert source["secretName"] in self.secrets, f"{pod.name}: no Secret {source['secretName']}"
                data = self.secrets[source["secretName"]]
                what = f"Secret {source['secretName']}"
            else:
                raise AssertionError(f"{pod.name}: volume {v['name']} of a kind not emulated")
            items = source.get("items") or [{"key": k, "path": k} for k in data]
            for item in items:
                assert item["key"] in data, f"{pod.name}: {what} has no key {item['key']}"
                path = d / item["path"]
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data[item["key"]])
                path.chmod(item.get("mode", source.get("defaultMode", 0o644)))

    def mounted(self, text: str, c: dict[str, Any], pod: Pod) -> str:
        """``text`` with every mount path of ``c`` replaced by the directory that stands for it."""
        mounts = []
        for m in c.get("volumeMounts") or []:
            assert "subPath" not in m, "subPath mounts are not emulated"
            mounts.append((m["mountPath"].rstrip("/"), str(pod.volumes[m["name"]])))
        if not mounts:
            return text
        where = dict(mounts)
        # one pass, longest path first: a path starts a word and ends one (or goes on with "/")
        pattern = "|".join(re.escape(m) for m in sorted(where, key=len, reverse=True))
        return re.sub(rf"(?<![A-Za-z0-9_.-])({pattern})(?![A-Za-z0-9_.-])", lambda m: where[m.group(1)], text)

    # ----- running

    def start(
        self,
        w: dict[str, Any],
        node: KubeNode,
        *,
        pod_ip: str | None = None,
        pod_node: KubeNode | None = None,
    ) -> Pod:
        """Run pod of workload ``w`` scheduled on ``node``: its init containers to completion, then its
        containers. A host-network pod runs in ``node``'s namespace with its address; any other runs in
        ``pod_node`` (a namespace standing for its pod network address)."""
        spec = pod_spec(w)
        if spec.get("hostNetwork"):
            where, ip = node, node.ip
        else:
            assert pod_node is not None, f"{w['metadata']['name']} is on the pod network: give it a namespace"
            where, ip = pod_node, pod_ip or pod_node.ip
        name = f"{w['metadata']['name']}-{node.name}"
        pod = Pod(name, w, node, where, ip, self.work / name)
        pod.directory.mkdir(parents=True)
        self.pods.append(pod)
        self.materialise(pod)
        for c in spec.get("initContainers") or []:
            proc = self._spawn(pod, c)
            try:
                rc = proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"{pod.name}: init container {c['name']} did not finish") from None
            assert rc == 0, f"{pod.name}: init container {c['name']} exited {rc}: {pod.log(c['name'])}"
        for c in spec["containers"]:
            self._spawn(pod, c)
        return pod

    def _spawn(self, pod: Pod, c: dict[str, Any]) -> subprocess.Popen[bytes]:
        env = self.resolve_env(c, pod)
        argv = [self.mounted(a, c, pod) for a in self.argv(c, env)]
        ours = c["image"].startswith(IMAGE_REPO + ":")
        proc_env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "OMP_NUM_THREADS": "1",
            **(self.image_env if ours else {}),
            **{k: self.mounted(v, c, pod) for k, v in env.items()},
        }
        cwd = pod.directory / "cwd"
        cwd.mkdir(exist_ok=True)
        with (
            open(pod.directory / f"{c['name']}.log", "wb") as err,
            open(pod.directory / f"{c['name']}.out", "wb") as out,
        ):
            proc = subprocess.Popen(
                [*pod.net.prefix, *self.executable(argv)],
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                env=proc_env,
                cwd=cwd,
                start_new_session=True,
            )
        pod.procs[c["name"]] = proc
        return proc

    def probe(self, pod: Pod, c: dict[str, Any], probe: dict[str, Any]) -> tuple[bool, str]:
        ports = {p["name"]: p["containerPort"] for p in c.get("ports") or []}
        with pod.net.enter():
            if "httpGet" in probe:
                g = probe["httpGet"]
                port = ports[g["port"]] if isinstance(g["port"], str) else g["port"]
                url = f"http://{pod.ip}:{port}{g['path']}"
                try:
                    with urllib.request.urlopen(url, timeout=2) as r:
                        return 200 <= r.status < 400, f"{url}: {r.status}"
                except (urllib.error.URLError, OSError) as exc:
                    return False, f"{url}: {exc}"
            if "tcpSocket" in probe:
                t = probe["tcpSocket"]
                port = ports[t["port"]] if isinstance(t["port"], str) else t["port"]
                try:
                    with socket.create_connection((pod.ip, port), timeout=2):
                        return True, f"tcp {pod.ip}:{port}: open"
                except OSError as exc:
                    return False, f"tcp {pod.ip}:{port}: {exc}"
        raise AssertionError(f"probe {sorted(probe)} is not emulated")

    def wait_ready(self, timeout: float = 40.0) -> None:
        deadline = time.monotonic() + timeout
        for pod in self.pods:
            for c in pod_spec(pod.workload)["containers"]:
                probe = c.get("readinessProbe")
                assert probe, f"{pod.name}/{c['name']} has no readiness probe"
                while True:
                    proc = pod.procs[c["name"]]
                    if proc.poll() is not None:
                        raise AssertionError(
                            f"{pod.name}/{c['name']} exited {proc.returncode}: {pod.log(c['name'])}"
                        )
                    ok, why = self.probe(pod, c, probe)
                    if ok:
                        break
                    if time.monotonic() > deadline:
                        raise AssertionError(f"{pod.name}/{c['name']} not ready: {why}\n{pod.log(c['name'])}")
                    time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM every process started (as the kubelet does), SIGKILL what is left after 10 s."""
        procs = [p for pod in self.pods for p in pod.procs.values()]
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
                p.wait(timeout=10)


def schedule_daemonsets(
    objs: list[dict[str, Any]], nodes: list[KubeNode]
) -> list[tuple[dict[str, Any], KubeNode]]:
    """(DaemonSet, node) for every node whose labels satisfy a DaemonSet's nodeSelector."""
    out = []
    for ds in by_kind(objs, "DaemonSet").values():
        selector = pod_spec(ds).get("nodeSelector") or {}
        out.extend((ds, n) for n in nodes if selector.items() <= n.labels.items())
    return out


def test_a_typo_in_a_manifest_command_line_fails_the_pod(tmp_path: Path, site_secrets: SiteSecrets) -> None:
    """The same kubelet emulation the smoke test uses, on loopback: a misspelled flag in the DaemonSet
    stops the node agent, so the smoke test cannot pass with a broken command line."""
    objs = rendered("small-site")
    ds = by_kind(objs, "DaemonSet")["meshai-node-cpu"]
    args = pod_spec(ds)["containers"][0]["args"]
    args[args.index("--profile=$(MESHAI_ACCELERATOR)")] = "--profle=$(MESHAI_ACCELERATOR)"
    here = KubeNode(
        "site-1",
        {"kubernetes.io/os": "linux", "meshai.dev/accelerator": "cpu"},
        "127.0.0.1",
        [],
        contextlib.nullcontext,
    )
    kubelet = Kubelet(objs, site_secrets.secrets, tmp_path)
    try:
        pod = kubelet.start(ds, here)
        assert pod.procs["node"].wait(timeout=30) == 2
        assert "unrecognized arguments: --profle=cpu" in pod.log("node")
        with pytest.raises(AssertionError, match="exited 2"):
            kubelet.wait_ready(timeout=5)
    finally:
        kubelet.stop()


# ------------------------------------------------------------------------------------ the smoke test


def _netns_reason() -> str | None:
    from meshai.netns import netns_unavailable

    return netns_unavailable()


@contextlib.contextmanager
def cluster_dns(namespaces: list[str], records: dict[str, list[str]]) -> Iterator[None]:
    """Cluster DNS for processes in ``namespaces``: ``ip netns exec`` mounts /etc/netns/NS/hosts over
    /etc/hosts. Every file and folder made is removed on exit."""
    base = Path("/etc/netns")
    made_base = not base.exists()
    made: list[Path] = []
    try:
        base.mkdir(exist_ok=True)
        lines = ["127.0.0.1 localhost"] + [f"{ip} {name}" for name, ips in records.items() for ip in ips]
        for ns in namespaces:
            d = base / ns
            d.mkdir()
            made.append(d)
            (d / "hosts").write_text("\n".join(lines) + "\n")
        yield
    finally:
        for d in made:
            shutil.rmtree(d, ignore_errors=True)
        if made_base:
            with contextlib.suppress(OSError):
                base.rmdir()


def service_records(objs: list[dict[str, Any]], pods: list[Pod]) -> dict[str, list[str]]:
    """A DNS name per Service (``NAME.NS.svc`` and with the cluster domain), resolving to the
    addresses of the pods it selects. Standing in for a ClusterIP this is exact only where each
    Service port is the target port it names, which is checked here."""
    records: dict[str, list[str]] = {}
    for svc in by_kind(objs, "Service").values():
        sel = svc["spec"]["selector"]
        chosen = [p for p in pods if sel.items() <= p.labels.items()]
        assert chosen, f"Service {svc['metadata']['name']} selects no pod"
        for port in svc["spec"]["ports"]:
            for p in chosen:
                cports = {
                    cp["name"]: cp["containerPort"] for cp in pod_spec(p.workload)["containers"][0]["ports"]
                }
                target = port.get("targetPort", port["port"])
                assert cports.get(target, target) == port["port"], (svc["metadata"]["name"], port)
        short = f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc"
        ips = sorted({p.ip for p in chosen})
        records[short] = ips
        records[f"{short}.{CLUSTER_DOMAIN}"] = ips
    return records


def _run(
    prefix: list[str], argv: list[str], env: dict[str, str], cwd: Path, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
    )


def _http(node: KubeNode, url: str) -> tuple[int, str]:
    with node.enter():
        try:
            with urllib.request.urlopen(url, timeout=3) as r:
                return int(r.status), r.read().decode()
        except urllib.error.HTTPError as exc:
            return int(exc.code), ""


@pytest.mark.process
@pytest.mark.netns
@pytest.mark.timeout(180)
@pytest.mark.parametrize("overlay", ["small-site", "static-discovery"])
def test_smoke_site_runs_the_manifests(overlay: str, tmp_path: Path, site_secrets: SiteSecrets) -> None:
    reason = _netns_reason()
    if reason:
        pytest.skip(reason)
    if MOSQUITTO is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    from meshai.netns import SimNetwork
    from meshai.planning import load_for_planning
    from meshai.tensors import load_npz, random_inputs, request_slices, save_npz
    from nodes.executor import run_whole

    objs = rendered(overlay)
    site = generated(objs, "meshai-site")["data"]
    # The site: three Kubernetes nodes (two cpu, one gpu where the overlay has a gpu class), the
    # broker's pod address, and the operator's machine on the same LAN.
    classes = {
        w["spec"]["selector"]["matchLabels"]["meshai.dev/accelerator"]
        for w in by_kind(objs, "DaemonSet").values()
    }
    labels = dict(zip(SITE_NODES, ["cpu", "cpu", "gpu" if "gpu" in classes else "cpu"], strict=True))
    hosts = [*labels, "broker-pod", "operator"]
    with SimNetwork(hosts) as net:

        def node(name: str, accel: str | None = None) -> KubeNode:
            lab = {"kubernetes.io/os": "linux", "kubernetes.io/hostname": name}
            if accel:
                lab["meshai.dev/accelerator"] = accel
            return KubeNode(name, lab, net.address(name), net.exec_prefix(name), lambda: net.entered(name))

        knodes = [node(n, a) for n, a in labels.items()]
        broker_ns, operator = node("broker-pod"), node("operator")
        kubelet = Kubelet(objs, site_secrets.secrets, tmp_path)
        planned = schedule_daemonsets(objs, knodes)
        assert sorted(n.name for _, n in planned) == sorted(labels), "every node runs exactly one node agent"
        scheduler = by_kind(objs, "Deployment")["meshai-scheduler"]
        broker = by_kind(objs, "Deployment")["meshai-broker"]
        sched_node = next(
            n for n in knodes if (pod_spec(scheduler).get("nodeSelector") or {}).items() <= n.labels.items()
        )
        # where every pod will be, so that cluster DNS is in place before anything starts (a pod's
        # processes resolve Service names from the start)
        placed = [
            Pod("placed", w, n, n, n.ip if pod_spec(w).get("hostNetwork") else broker_ns.ip, tmp_path)
            for w, n in [*planned, (scheduler, sched_node), (broker, sched_node)]
        ]
        records = service_records(objs, placed)
        try:
            with cluster_dns(net.namespaces, records):
                kubelet.start(broker, sched_node, pod_node=broker_ns)
                for ds, n in planned:
                    kubelet.start(ds, n)
                sched = kubelet.start(scheduler, sched_node)
                kubelet.wait_ready()
                t_ready = time.monotonic()

                # every meshai process printed its ready line; its metrics answer on the manifest's port
                agents = [p for p in kubelet.pods if p.workload["kind"] == "DaemonSet" or p is sched]
                ready = {}
                for p in agents:
                    c = pod_spec(p.workload)["containers"][0]["name"]
                    line = json.loads(p.stdout(c).splitlines()[0])
                    ready[line["name"]] = line
                    assert (
                        line["address"]
                        == f"{p.ip}:{_arg(pod_spec(p.workload)['containers'][0], '--listen').split(':')[1]}"
                    )
                    for path in ("/healthz", "/readyz"):
                        status, _ = _http(p.net, f"http://{line['metrics']}{path}")
                        assert status == 200, (line["name"], path)
                profiles = {n: r["profile"] for n, r in ready.items()}
                entry = next(n for n, r in ready.items() if r["pid"] == sched.procs["scheduler"].pid)
                assert profiles == {**labels, entry: "cpu"}, profiles

                # the operator deploys squeezenet through the scheduler and runs requests
                loaded = load_for_planning("squeezenet")
                x = random_inputs(loaded.model, seed=5, requests=3)
                save_npz(tmp_path / "in.npz", x)
                env = {**child_env(), "MESHAI_IDENTITY": str(site_secrets.work / "ops")}
                if site["discovery"] == "mdns":
                    where = ["--interface", operator.ip, f"--mesh={site['mesh']}"]
                else:
                    line = next(
                        ln
                        for ln in readme_block("**mDNS or static discovery.**").splitlines()
                        if ln.startswith("PEERS=")
                    )
                    r = _run(operator.prefix, ["bash", "-c", f'{line}\necho "$PEERS"'], env, tmp_path)
                    assert r.returncode == 0, r.stderr
                    peers = r.stdout.strip()
                    want = {f"{n.ip}:7000" for n in knodes} | {
                        "meshai-scheduler.meshai.svc.cluster.local:7100"
                    }
                    assert set(peers.split(",")) == want, peers
                    where = ["--discovery", "static", "--peers", peers]
                common = [*where, "--wait", str(len(ready)), "--timeout", "20", "--json"]
                r = _run(
                    operator.prefix,
                    [sys.executable, "-m", "meshai", "deploy", "squeezenet", "--name", "site-test", "--entry", entry,
                     "--package", str(site_secrets.package), "--objective", "throughput", "--stages", "3", *common],
                    env, tmp_path,
                )  # fmt: skip
                assert r.returncode == 0, r.stderr
                dep = json.loads(r.stdout)
                assert dep["entry"] == entry
                assert sorted(s["node"] for s in dep["plan"]["stages"]) == sorted(labels)
                r = _run(
                    operator.prefix,
                    [sys.executable, "-m", "meshai", "infer", "site-test", "--inputs", str(tmp_path / "in.npz"),
                     "--outputs", str(tmp_path / "out.npz"), *common],
                    env, tmp_path,
                )  # fmt: skip
                assert r.returncode == 0, r.stderr
                rep = json.loads(r.stdout)
                assert (rep["ok"], rep["errors"], rep["entry"]) == (3, 0, entry)
                outputs = [o.name for o in loaded.model.graph.output]
                got = load_npz(tmp_path / "out.npz", outputs)
                for i, req in enumerate(request_slices(x)):
                    assert_outputs_equal(
                        {k: v[i] for k, v in got.items()}, run_whole(loaded.model, req), outputs
                    )

                # the entry counted them; telemetry reached the broker through its Service name
                _, text = _http(sched.net, f"http://{ready[entry]['metrics']}/metrics")
                ok = re.findall(r'^meshai_requests_total\{[^}]*status="ok"[^}]*\} (\S+)$', text, re.M)
                assert sum(float(v) for v in ok) == 3, text[:2000]
                assert site["mqtt"], "the site config sends telemetry to the broker"
                r = _run(
                    operator.prefix,
                    [sys.executable, "-m", "meshai", "telemetry", "--broker", site["mqtt"], "--site", site["site"], "--wait", "1", "--json"],
                    env, tmp_path,
                )  # fmt: skip
                assert r.returncode == 0, r.stderr
                fleet = {n["node"]: n["status"] for n in json.loads(r.stdout)["nodes"]}
                assert fleet == dict.fromkeys(ready, "online"), fleet

                # every probe of every container answers, as the kubelet would ask it
                for p in kubelet.pods:
                    for c in pod_spec(p.workload)["containers"]:
                        for kind in ("livenessProbe", "readinessProbe"):
                            ok_, why = kubelet.probe(p, c, c[kind])
                            assert ok_, f"{p.name}/{c['name']} {kind}: {why}"
                print(f"{overlay}: ready to results and probes in {time.monotonic() - t_ready:.1f} s")
                kubelet.stop()  # before the hosts files and the namespaces go
        finally:
            kubelet.stop()
    for p in kubelet.pods:
        for c, proc in p.procs.items():
            assert proc.poll() is not None, f"{p.name}/{c} still running"
    left = [
        ns for ns in net.namespaces if Path("/var/run/netns", ns).exists() or Path("/etc/netns", ns).exists()
    ]
    assert not left, f"namespaces left behind: {left}"
