"""Observability with real processes: what ``meshai sim --prom-file/--report`` writes, a real
Prometheus scraping a running swarm (three nodes and the caller's entry), and fleet telemetry that
real nodes publish to a real mosquitto (online, request counts, Last Will, never tensors).

Every server here binds 127.0.0.1 on a free port with its files in a temp dir, every swarm gets a mesh
id of its own, and every process is started by these tests and ended by its pid.  Nothing asserts
speed: the p95 comparison checks that the bucket layout lets Prometheus read the quantile meshai
itself measured (within 10 %), whatever the machine's speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from models_helper import branchy_model
from prometheus_client.parser import text_string_to_metric_families
from runtime_helpers import MESHAI, LoopThread, Nodes, WatchedRun, child_env, prometheus_server, unique_mesh

from meshai.capabilities import resolve_profiles
from meshai.mesh import Mesh
from meshai.metrics import bandwidth_saved_bytes
from meshai.plan import Plan
from meshai.planning import LoadedModel, load_for_planning
from meshai.telemetry import check_payload, fleet_state
from meshai.tensors import random_inputs, request_slices

pytestmark = [pytest.mark.process, pytest.mark.timeout(150)]

PROMETHEUS = shutil.which("prometheus")
MOSQUITTO = shutil.which("mosquitto") or (
    "/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None
)
PROMTOOL = shutil.which("promtool")

SIM_FAMILIES = {  # family name as the text parser reports it (counters lose _total) -> type
    "meshai_inference_latency_seconds": "histogram",
    "meshai_stage_latency_seconds": "histogram",
    "meshai_requests": "counter",
    "meshai_transfer_bytes": "counter",
    "meshai_bandwidth_saved_bytes": "counter",
    "meshai_energy_joules": "counter",
    "meshai_peers": "gauge",
    "meshai_feature_drift_score": "gauge",
    "meshai_prediction_drift_score": "gauge",
}

ID_OR_ADDRESS = [
    re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-", re.I),  # uuid
    re.compile(r"^[0-9a-f]{8,}$", re.I),  # hex id (a mesh id, a token)
    re.compile(r"\d{1,3}(\.\d{1,3}){3}"),  # IPv4
    re.compile(r":\d{2,5}$"),  # host:port
    re.compile(r"^\d{3,}$"),  # a request number
    re.compile(r"\.[0-9a-f]{8}$"),  # a stage deployment id (name.token)
]

SIM_REQUESTS = 520  # > the drift window (500) against a --reference: drift scores are computed


# ---------------------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    """(status, body) of a GET; 4xx/5xx are returned, not raised."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def wait_for(what: str, probe: Callable[[], Any], timeout: float) -> Any:
    """Poll ``probe`` until it returns something truthy; AssertionError with the last value after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = probe()
        except (OSError, urllib.error.URLError, ValueError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; last: {last!r}")


def end_process(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM one process we started (by its pid), SIGKILL it after ``grace``."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=grace)


def save_branchy(directory: Path) -> Path:
    path = directory / "branchy.onnx"
    onnx.save(branchy_model(), path)
    return path


def requests_for(loaded: LoadedModel, n: int, seed: int) -> list[dict[str, np.ndarray]]:
    return request_slices(random_inputs(loaded.model, batch=1, seed=seed, requests=n))


def label_values(families: list[Any]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for fam in families:
        for s in fam.samples:
            for k, v in s.labels.items():
                if k != "le":
                    out.setdefault(k, set()).add(v)
    return out


# ------------------------------------------------------------------------------ meshai sim outputs


@pytest.fixture(scope="module")
def sim_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One ``meshai sim --prom-file F --report DIR --json`` over the branchy model, its cameras pinned."""
    work = tmp_path_factory.mktemp("obs-sim")
    model = save_branchy(work)
    prom, report = work / "swarm.prom", work / "report"
    report.mkdir()
    from meshai.tensors import save_npz

    loaded = load_for_planning(model)
    reference = work / "reference.npz"
    save_npz(reference, random_inputs(loaded.model, seed=99, requests=300))
    run = WatchedRun(
        "sim", "--model", str(model), "--nodes", "3", "--profiles", "cpu,cpu,gpu",
        "--pin", "cam0=n0", "--pin", "cam1=n1", "--requests", str(SIM_REQUESTS),
        "--prom-file", str(prom), "--report", str(report), "--reference", str(reference), "--json",
        timeout=180,
    )  # fmt: skip
    t0 = time.monotonic()
    r = run.run()
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr[-2000:]
    assert run.leftovers() == [], "every node process of the sim is gone"
    print(f"meshai sim ({SIM_REQUESTS} requests, --prom-file, --report): {took:.1f} s")
    return {"report": json.loads(r.stdout), "prom": prom, "report_dir": report, "model": model}


def test_sim_prom_file_holds_every_family_with_the_work_done(sim_run: dict[str, Any]) -> None:
    rep = sim_run["report"]
    text = sim_run["prom"].read_text()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert {n: fams[n].type for n in SIM_FAMILIES if n in fams} == SIM_FAMILIES, sorted(fams)

    def samples(fam: str, name: str | None = None, **labels: str) -> list[Any]:
        return [
            s
            for s in fams[fam].samples
            if (name is None or s.name == name) and all(s.labels.get(k) == v for k, v in labels.items())
        ]

    # requests: every one ok, as the JSON report says
    assert rep["ok"] == SIM_REQUESTS and rep["errors"] == 0
    ok = samples("meshai_requests", "meshai_requests_total", status="ok")
    assert sum(s.value for s in ok) == SIM_REQUESTS == rep["ok"]
    assert sum(s.value for s in samples("meshai_requests", "meshai_requests_total", status="error")) == 0
    lat = samples("meshai_inference_latency_seconds", "meshai_inference_latency_seconds_count")
    assert sum(s.value for s in lat) == SIM_REQUESTS

    # every stage of the plan: one series per phase, one observation per request
    plan = Plan.from_dict(rep["plan"])
    for st in plan.stages:
        for phase in ("queue", "compute", "transfer"):
            got = samples(
                "meshai_stage_latency_seconds",
                "meshai_stage_latency_seconds_count",
                stage=str(st.id),
                node=st.node,
                phase=phase,
            )
            assert [s.value for s in got] == [SIM_REQUESTS], (st.id, st.node, phase, got)

    # bandwidth: the pinned camera frames never crossed a link
    loaded = load_for_planning(str(sim_run["model"]))
    sizes = {t: loaded.graph.nbytes(t) for s in plan.stages for t in (*s.inputs, *s.outputs)}
    per_request = bandwidth_saved_bytes(plan, sizes)
    assert plan.pins == {"cam0": "n0", "cam1": "n1"}
    assert per_request >= sizes["cam0"] + sizes["cam1"] - 1024 > 0
    saved = samples("meshai_bandwidth_saved_bytes", "meshai_bandwidth_saved_bytes_total")
    assert sum(s.value for s in saved) == per_request * SIM_REQUESTS > 0

    # transfer bytes, both ways
    for direction in ("sent", "received"):
        moved = samples("meshai_transfer_bytes", "meshai_transfer_bytes_total", direction=direction)
        assert sum(s.value for s in moved) > 0, direction

    # energy: estimated, busy seconds times the profile's active power, per node that computed
    profiles = {n["name"]: n["profile"] for n in rep["nodes"]}
    joules = {
        s.labels["node"]: s.value for s in samples("meshai_energy_joules", "meshai_energy_joules_total")
    }
    assert sum(joules.values()) > 0
    busy = {s.labels["node"]: s.value for s in fams["meshai_busy_seconds"].samples}
    for st in plan.stages:
        watts = resolve_profiles([profiles[st.node]])[0].active_w
        assert busy[st.node] > 0 and joules[st.node] == pytest.approx(busy[st.node] * watts, rel=1e-6)

    # peers: every state of every process, per node
    states = {(s.labels["node"], s.labels["state"]) for s in fams["meshai_peers"].samples}
    assert states == {(n, st) for n in [*profiles, "entry"] for st in ("trusted", "untrusted", "lost")}

    # bounded labels: no request id, no address, no deployment token
    values = label_values(list(fams.values()))
    for k, vs in values.items():
        for v in vs:
            assert not any(p.search(v) for p in ID_OR_ADDRESS), (k, v)
    assert values["node"] <= {*profiles, "entry"}
    assert values["model"] == {"branchy"}
    if PROMTOOL is not None:
        r = subprocess.run(
            [PROMTOOL, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30
        )
        assert r.returncode == 0, (r.stdout + r.stderr).decode()


def test_sim_drift_is_scored_and_quiet_on_an_unshifted_stream(sim_run: dict[str, Any]) -> None:
    rep = sim_run["report"]["drift"]
    assert rep["ready"] is True, rep
    assert rep["drifted"] == [], "same distribution as the reference: no alarm"
    assert set(rep["max"]) == {"psi", "ks", "wasserstein"}
    text = sim_run["prom"].read_text()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    feature = [s for s in fams["meshai_feature_drift_score"].samples]
    assert feature, "feature drift gauges have values"
    methods = {s.labels["method"] for s in feature}
    assert methods == {"psi", "ks", "wasserstein"}
    features = {s.labels["feature"] for s in feature}
    assert any(f.startswith("cam0.c") for f in features) and any(f.startswith("cam1.c") for f in features)
    assert all(math.isfinite(s.value) and s.value >= 0 for s in feature)
    # prediction drift needs its own reference (the first 500 predictions) plus a full window: 1000
    # requests, which this run does not make; its family is present (checked above) and stays empty
    assert "meshai_prediction_drift_score" in fams


def test_sim_report_writes_a_png(sim_run: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image

    pngs = sorted(sim_run["report_dir"].glob("*.png"))
    assert len(pngs) == 1, sorted(sim_run["report_dir"].iterdir())
    data = pngs[0].read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(pngs[0])
    assert img.ndim == 3 and img.shape[2] in (3, 4), img.shape
    assert img.shape[0] >= 200 and img.shape[1] >= 200, img.shape
    rgb = img[..., :3]
    assert float(rgb.std()) > 0.01, "the image is not blank"
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 16, "more than a few flat colours: it has plots"


# -------------------------------------------------------------------- a real Prometheus, a real swarm


def prom_query(base: str, expr: str) -> list[dict[str, Any]]:
    status, body = http_get(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    assert status == 200, body
    data = json.loads(body)
    assert data["status"] == "success", data
    result: list[dict[str, Any]] = data["data"]["result"]
    return result


def prom_value(base: str, expr: str) -> float | None:
    """The single value of an instant query, or None when it has no result (yet)."""
    res = prom_query(base, expr)
    return float(res[0]["value"][1]) if len(res) == 1 else None


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus is not installed (apt-get install prometheus)")
def test_real_prometheus_scrapes_a_running_swarm(tmp_path: Path) -> None:
    n_requests = 300
    names = ["pm0", "pm1", "pm2"]
    loaded = load_for_planning(str(save_branchy(tmp_path)))
    reqs = requests_for(loaded, n_requests, seed=3)
    mesh_id = unique_mesh()
    lt = LoopThread()
    mesh = Mesh(mesh=mesh_id)  # the session's client identity ($MESHAI_IDENTITY)
    server = thread = None
    entered = False
    t_start = time.monotonic()
    try:
        with Nodes(mesh_id) as nodes:
            for n, prof in zip(names, ("cpu", "gpu", "cpu"), strict=True):
                nodes.start(n, "--metrics-port", "0", profile=prof)
            ready = nodes.wait_ready()
            node_metrics = {n: str(ready[n]["metrics"]) for n in names}
            for n, addr in node_metrics.items():
                host, _, port = addr.rpartition(":")
                assert host == "127.0.0.1" and port.isdigit() and int(port) > 0, (n, addr)
                assert http_get(f"http://{addr}/healthz")[0] == 200, n
                assert http_get(f"http://{addr}/readyz")[0] == 200, n
                assert http_get(f"http://{addr}/nope")[0] == 404, n
            lt.run(mesh.__aenter__())
            entered = True
            lt.run(mesh.wait_for_peers(3, timeout=30.0))
            server, thread = mesh.metrics.serve("127.0.0.1", 0)
            entry = f"127.0.0.1:{server.server_port}"
            with prometheus_server(tmp_path, [*node_metrics.values(), entry]) as base:
                wait_for("every target up", lambda: prom_value(base, 'sum(up{job="meshai"})') == 4, 30)

                async def stream() -> tuple[Plan, dict[str, float], int, int]:
                    plan, _ = mesh.plan(loaded, objective="throughput", stages=3, nodes=names)
                    async with asyncio.timeout(90), mesh.deploy(plan, loaded, window=8) as pipe:
                        outs = [o async for o in pipe.stream(reqs)]
                    bad = [o for o in outs if isinstance(o, BaseException)]
                    assert not bad, bad[0]
                    return plan, pipe.stats.latency_ms(), pipe.stats.ok, pipe.stats.errors

                plan, latency_ms, ok, errors = lt.run(stream(), timeout=120)
                assert (ok, errors) == (n_requests, 0)
                assert len(plan.stages) == 3 and {s.node for s in plan.stages} == set(names)

                # the final counts, once the next scrapes have them
                wait_for(
                    "every request scraped",
                    lambda: prom_value(base, 'sum(meshai_requests_total{status="ok"})') == n_requests,
                    20,
                )
                per_stage = 'sum by (stage, node) (meshai_stage_latency_seconds_count{phase="compute"})'
                want = {(str(s.id), s.node): n_requests for s in plan.stages}

                def stage_counts() -> dict[tuple[str, str], float]:
                    return {(r["metric"]["stage"], r["metric"]["node"]): float(r["value"][1])
                            for r in prom_query(base, per_stage)}  # fmt: skip

                wait_for("every stage's final count scraped", lambda: stage_counts() == want, 20)
                for phase in ("queue", "compute", "transfer"):
                    got = prom_query(base, f'meshai_stage_latency_seconds_count{{phase="{phase}"}}')
                    assert {(r["metric"]["stage"], r["metric"]["node"]) for r in got} == set(want), phase
                assert prom_value(base, 'sum(meshai_requests_total{status="error"})') == 0
                assert prom_value(base, "sum(meshai_inference_latency_seconds_count)") == n_requests

                p95_prom = prom_value(
                    base, "histogram_quantile(0.95, sum by (le) (meshai_inference_latency_seconds_bucket))"
                )
                assert p95_prom is not None and math.isfinite(p95_prom)
                p95_meshai = latency_ms["p95"] / 1e3
                print(
                    f"p95: Prometheus {p95_prom * 1e3:.3f} ms, meshai {p95_meshai * 1e3:.3f} ms "
                    f"({(p95_prom / p95_meshai - 1) * 100:+.1f} %); "
                    f"test {time.monotonic() - t_start:.1f} s"
                )
                assert abs(p95_prom - p95_meshai) / p95_meshai < 0.10, (p95_prom, p95_meshai)
                assert http_get(f"http://{node_metrics['pm0']}/healthz") == (200, "ok\n")
                assert http_get(f"http://{node_metrics['pm0']}/readyz") == (200, "ready\n")
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)
        if entered:
            lt.run(mesh.close(), timeout=30)
        lt.close()


# ------------------------------------------------------------------------ telemetry from real nodes


@contextlib.contextmanager
def mosquitto(directory: Path) -> Iterator[int]:
    """A mosquitto on 127.0.0.1:port, config/pid/log in ``directory``, no persistence; yields the port."""
    assert MOSQUITTO is not None
    port = free_port()
    conf = directory / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\n"
        "allow_anonymous true\n"
        "persistence false\n"
        "user root\n"  # running as root: do not switch to a user that cannot write the temp dir
        f"pid_file {directory / 'mosquitto.pid'}\n"
        f"log_dest file {directory / 'mosquitto.log'}\n"
    )
    proc = subprocess.Popen(
        [MOSQUITTO, "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    try:

        def listening() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"mosquitto exited with {proc.returncode}")
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True

        wait_for("mosquitto listening", listening, 10)
        yield port
    finally:
        end_process(proc)


def telemetry_cli(port: int, wait: float) -> dict[str, dict[str, Any]]:
    r = subprocess.run(
        [
            *MESHAI,
            "telemetry",
            "--broker",
            f"127.0.0.1:{port}",
            "--site",
            "lab",
            "--wait",
            str(wait),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(),
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["rejected"] == 0, out
    return {n["node"]: n for n in out["nodes"]}


@pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto binary not installed (apt install mosquitto)")
def test_real_nodes_publish_fleet_telemetry(tmp_path: Path) -> None:
    import aiomqtt

    names = ["tl0", "tl1"]
    loaded = load_for_planning(str(save_branchy(tmp_path)))
    reqs = requests_for(loaded, 20, seed=4)
    mesh_id = unique_mesh()
    lt = LoopThread()
    mesh = Mesh(mesh=mesh_id)
    entered = False
    seen: list[tuple[str, bytes]] = []
    listener: asyncio.Task[None] | None = None
    t_start = time.monotonic()
    with mosquitto(tmp_path) as port:
        try:
            subscribed = asyncio.Event()

            async def listen() -> None:  # every telemetry payload the nodes publish, for the gate below
                async with aiomqtt.Client("127.0.0.1", port, identifier=f"obs-test-{os.getpid()}") as c:
                    await c.subscribe("meshai/lab/+/telemetry", qos=1)
                    subscribed.set()
                    async for m in c.messages:
                        assert isinstance(m.payload, bytes)
                        seen.append((str(m.topic), m.payload))

            async def start_listener() -> asyncio.Task[None]:
                task = asyncio.get_running_loop().create_task(listen(), name="obs-test-subscriber")
                await asyncio.wait_for(subscribed.wait(), 10)
                return task

            listener = lt.run(start_listener(), timeout=15)
            with Nodes(mesh_id) as nodes:
                for n in names:
                    nodes.start(
                        n, "--mqtt", f"127.0.0.1:{port}", "--site", "lab", "--telemetry-interval", "0.5"
                    )
                nodes.wait_ready()
                lt.run(mesh.__aenter__())
                entered = True
                lt.run(mesh.wait_for_peers(2, timeout=30.0))

                async def run_requests() -> int:
                    plan, _ = mesh.plan(loaded, objective="throughput", stages=2, nodes=names)
                    assert {s.node for s in plan.stages} == set(names)
                    async with asyncio.timeout(60), mesh.deploy(plan, loaded, window=4) as pipe:
                        outs = [o async for o in pipe.stream(reqs)]
                    assert not [o for o in outs if isinstance(o, BaseException)]
                    return pipe.stats.ok

                assert lt.run(run_requests(), timeout=90) == len(reqs)

                def both_counted() -> dict[str, dict[str, Any]]:
                    fleet = telemetry_cli(port, wait=1.5)
                    good = sorted(fleet) == names and all(
                        v["status"] == "online" and (v["requests"] or 0) > 0 for v in fleet.values()
                    )
                    return fleet if good else {}

                fleet = wait_for("both nodes online with their requests counted", both_counted, 20)
                for n in names:
                    assert fleet[n]["requests"] == len(reqs), fleet[n]  # each node served one stage of each
                    assert fleet[n]["error_rate"] == 0

                # SIGKILL: no goodbye, the broker publishes the node's Last Will
                nodes.kill("tl1")
                killed_at = time.monotonic()

                def offline() -> bool:
                    state = asyncio.run(fleet_state("127.0.0.1", port, "lab", wait=0.3))
                    return state["lab/tl1"].status == "offline" and state["lab/tl0"].status == "online"

                wait_for("tl1 offline (Last Will)", offline, 10)
                took = time.monotonic() - killed_at
                fleet = telemetry_cli(port, wait=0.5)
                assert fleet["tl1"]["status"] == "offline" and fleet["tl0"]["status"] == "online", fleet
                print(f"Last Will seen {took:.2f} s after SIGKILL; test {time.monotonic() - t_start:.1f} s")
        finally:
            if entered:
                lt.run(mesh.close(), timeout=30)
            if listener is not None:

                async def settle(task: asyncio.Task[None]) -> None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                        await task

                lt.run(settle(listener), timeout=10)
            lt.close()
    # no payload on meshai/lab/+/telemetry carries tensor data: all of them pass the aggregate-only gate
    assert {t for t, _ in seen} == {f"meshai/lab/{n}/telemetry" for n in names}, {t for t, _ in seen}
    for topic, payload in seen:
        snap = check_payload(payload)
        assert topic == f"meshai/lab/{snap.node}/telemetry" and snap.site == "lab"
