"""meshai.metrics: families, bounded labels, bucket layout and quantile accuracy, the HTTP endpoints,
one exposition for a swarm, the Prometheus config and rules (promtool), and a real Prometheus
scraping a ``Metrics`` endpoint."""

from __future__ import annotations

import itertools
import json
import math
import random
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from runtime_helpers import prometheus_server

from meshai.errors import ConfigError
from meshai.metrics import (
    OTHER,
    Metrics,
    bandwidth_saved_bytes,
    exposition_text,
    latency_buckets,
    link_bytes,
    write_prom_file,
)
from meshai.plan import Plan, Predicted, Stage

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")

FAMILIES = {  # family name as the parser reports it -> type
    "meshai_inference_latency_seconds": "histogram",
    "meshai_stage_latency_seconds": "histogram",
    "meshai_requests": "counter",
    "meshai_transfer_bytes": "counter",
    "meshai_bandwidth_saved_bytes": "counter",
    "meshai_energy_joules": "counter",
    "meshai_busy_seconds": "counter",
    "meshai_peers": "gauge",
    "meshai_feature_drift_score": "gauge",
    "meshai_prediction_drift_score": "gauge",
    "meshai_stage_queue_depth": "gauge",
    "meshai_slo_seconds": "gauge",
    "meshai_build_info": "gauge",
}


# ---- helpers ---------------------------------------------------------------------------------------


def prom_histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float:
    """Prometheus' histogram_quantile (promql/quantile.go, bucketQuantile) over cumulative
    (upper bound, count) pairs: linear interpolation inside the bucket holding rank q × total."""
    b = sorted(buckets)
    if len(b) < 2 or b[-1][0] != math.inf:
        return math.nan
    total = b[-1][1]
    if total == 0:
        return math.nan
    rank = q * total
    i = next(k for k, (_, c) in enumerate(b) if c >= rank)
    if i == len(b) - 1:
        return b[-2][0]
    if i == 0 and b[0][0] <= 0:
        return b[0][0]
    start, end, count = 0.0, b[i][0], b[i][1]
    if i > 0:
        start = b[i - 1][0]
        count -= b[i - 1][1]
        rank -= b[i - 1][1]
    return start + (end - start) * (rank / count)


def exact_quantile(q: float, values: Iterable[float]) -> float:
    """The q-quantile of the values themselves, interpolated between order statistics (numpy's default)."""
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def bucket_counts(expo: bytes, sample_name: str, **labels: str) -> list[tuple[float, float]]:
    """The (le, cumulative count) pairs of one histogram series, read back from an exposition."""
    out = []
    for fam in text_string_to_metric_families(expo.decode()):
        for s in fam.samples:
            if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()):
                out.append((float(s.labels["le"]), s.value))
    return out


def spread(lo: float, hi: float, n: int, seed: int = 7) -> list[float]:
    rng = random.Random(seed)
    return [rng.uniform(lo, hi) for _ in range(n)]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str, str]:
    """(status, content type, body) of a GET; 4xx/5xx are returned, not raised."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read().decode()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def busy_metrics(m: Metrics, requests: int, rng: random.Random) -> None:
    """Record what a 3-stage deployment of two models does for ``requests`` requests."""
    for model, version in (("squeezenet", "1"), ("resnet50", "2")):
        m.declare_model(model, version)
    for i in range(requests):
        model = "squeezenet" if i % 3 else "resnet50"
        for stage, (node, acc) in enumerate((("n0", "cpu"), ("n1", "gpu"), ("n2", "npu"))):
            for phase in ("queue", "compute", "transfer"):
                m.observe_stage(model, stage, phase, rng.uniform(1e-4, 5e-3), accelerator=acc, node=node)
            m.add_energy(acc, rng.uniform(1e-4, 5e-3), 15.0, node=node)
            m.add_transfer("sent", 4000, node=node)
            m.add_transfer("received", 4000, node=node)
            m.set_queue_depth(model, stage, i % 5, node=node)
        m.observe_inference(
            model, "1" if model == "squeezenet" else "2", rng.uniform(2e-3, 2e-2), ok=i % 17 != 0
        )
        m.add_bandwidth_saved(model, 150528)
        m.set_peers(trusted=2, untrusted=i % 2, lost=int(i % 50 == 0))
        m.set_drift(model, "psi", rng.random(), feature="data_0")
        m.set_drift(model, "psi", rng.random())


# ---- families, labels, buckets ---------------------------------------------------------------------


def test_every_family_is_exposed_with_its_type_and_help() -> None:
    m = Metrics(node="n0")
    busy_metrics(m, 20, random.Random(1))
    fams = {f.name: f for f in text_string_to_metric_families(m.exposition().decode())}
    assert {name: fams[name].type for name in FAMILIES if name in fams} == FAMILIES
    assert not [n for n in fams if n.endswith("_created")], "no *_created noise families"
    for f in fams.values():
        assert len(f.documentation) > 20, f.name
    assert "ESTIMATE" in fams["meshai_energy_joules"].documentation
    assert "active power" in fams["meshai_energy_joules"].documentation
    saved = fams["meshai_bandwidth_saved_bytes"].documentation
    assert "max(0, I - L)" in saved and "graph input" in saved
    hist = {s.labels["phase"] for s in fams["meshai_stage_latency_seconds"].samples}
    assert hist == {"queue", "compute", "transfer"}
    assert m.value("meshai_requests_total", model="resnet50", status="error") > 0
    assert m.value("meshai_energy_joules_total", node="n1", accelerator="gpu") == pytest.approx(
        15.0 * m.value("meshai_busy_seconds_total", node="n1", accelerator="gpu")
    )


def test_exposition_passes_promtool_lint() -> None:
    if PROMTOOL is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    m = Metrics(node="n0")
    busy_metrics(m, 5, random.Random(2))
    r = subprocess.run([PROMTOOL, "check", "metrics"], input=m.exposition(), capture_output=True, timeout=30)
    assert r.returncode == 0, (r.stdout + r.stderr).decode()


ID_OR_ADDRESS = [
    re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-", re.I),  # uuid
    re.compile(r"^[0-9a-f]{12,}$", re.I),  # hex id
    re.compile(r"\d{1,3}(\.\d{1,3}){3}"),  # IPv4
    re.compile(r":\d{2,5}$"),  # host:port
    re.compile(r"^\d{4,}$"),  # a counter-like request number
]


def test_labels_stay_bounded_after_many_requests() -> None:
    m = Metrics(node="n0")
    busy_metrics(m, 2000, random.Random(3))
    values: dict[str, set[str]] = {}
    series = 0
    for fam in text_string_to_metric_families(m.exposition().decode()):
        for s in fam.samples:
            series += 1
            for k, v in s.labels.items():
                if k != "le":
                    values.setdefault(k, set()).add(v)
    for k, vs in values.items():
        for v in vs:
            assert not any(p.search(v) for p in ID_OR_ADDRESS), (k, v)
    assert values["phase"] == {"queue", "compute", "transfer"}
    assert values["status"] == {"ok", "error"}
    assert values["state"] == {"trusted", "untrusted", "lost"}
    assert values["direction"] == {"sent", "received"}
    assert values["stage"] == {"0", "1", "2"}
    assert max(len(v) for v in values.values()) <= 3
    assert series < 3000  # independent of the 2000 requests


def test_free_labels_fold_into_other_past_the_limit() -> None:
    m = Metrics(max_label_values=5)
    for i in range(50):
        m.observe_inference(f"model-{i}", "1", 0.01)
    models = {
        s.labels["model"]
        for f in text_string_to_metric_families(m.exposition().decode())
        if f.name == "meshai_requests"
        for s in f.samples
    }
    assert len(models) == 6 and OTHER in models
    assert m.value("meshai_requests_total", model=OTHER, status="ok") == 45


@pytest.mark.parametrize(
    "call",
    [
        lambda m: m.observe_stage("m", 0, "waiting", 0.1, accelerator="cpu"),
        lambda m: m.add_transfer("sideways", 10),
        lambda m: m.observe_inference("m", "1", -0.1),
        lambda m: m.observe_inference("m", "1", math.nan),
        lambda m: m.add_energy("cpu", 1.0, -5.0),
        lambda m: m.set_drift("m", "psi", math.inf),
        lambda m: m.set_peers(trusted=1, untrusted=0, lost=-1),
    ],
)
def test_bad_values_raise_config_error(call: Callable[[Metrics], None]) -> None:
    with pytest.raises(ConfigError):
        call(Metrics())


def test_buckets_are_geometric_with_an_edge_at_the_slo() -> None:
    b = latency_buckets()
    assert b[0] == 1e-4 and b[-1] == 10.0 and 0.1 in b
    ratios = [hi / lo for lo, hi in itertools.pairwise(b)]
    assert all(1.15 < r < 1.19 for r in ratios), ratios
    b = latency_buckets(0.25)
    assert 0.25 in b and len(b) == len(latency_buckets()) + 1
    for slo, le in ((0.1, "0.1"), (0.25, "0.25"), (0.0333, "0.0333")):
        m = Metrics(slo_seconds=slo)
        m.observe_inference("m", "1", slo)  # a request exactly at the SLO is within it
        assert slo in m.buckets
        assert m.value("meshai_inference_latency_seconds_bucket", model="m", version="1", le=le) == 1
        assert m.value("meshai_slo_seconds") == slo
    with pytest.raises(ConfigError):
        Metrics(slo_seconds=0)


@pytest.mark.parametrize(("lo", "hi"), [(2e-3, 12e-3), (2e-4, 1.2e-3)])
def test_histogram_quantile_is_within_10_percent_of_exact(lo: float, hi: float) -> None:
    values = spread(lo, hi, 300)
    m = Metrics()
    for v in values:
        m.observe_inference("m", "1", v)
        m.observe_stage("m", 0, "compute", v, accelerator="cpu", node="n0")
    expo = m.exposition()
    for name, labels in (
        ("meshai_inference_latency_seconds_bucket", {"model": "m"}),
        ("meshai_stage_latency_seconds_bucket", {"phase": "compute"}),
    ):
        counts = bucket_counts(expo, name, **labels)
        # Within 10 % at p50 and p95; anywhere, at worst one bucket step (~17 %): p99 lands in the
        # bucket 11.7-13.6 ms that the data fills only up to 12 ms.
        for q, tolerance in ((0.5, 0.10), (0.95, 0.10), (0.99, 0.17)):
            est, exact = prom_histogram_quantile(q, counts), exact_quantile(q, values)
            assert abs(est - exact) / exact < tolerance, (name, q, est, exact)
    # The layout the architecture notes warn about: edges 10 ms apart read p95 ~17 ms here.
    if lo == 2e-3:
        coarse = [(le, sum(v <= le for v in values)) for le in (0.01, 0.02, 0.03, math.inf)]
        assert prom_histogram_quantile(0.95, coarse) > 1.4 * exact_quantile(0.95, values)


# ---- bandwidth --------------------------------------------------------------------------------------


def _plan(stages: list[Stage], inputs: tuple[str, ...], pins: dict[str, str] | None = None) -> Plan:
    return Plan(
        objective="latency",
        stages=tuple(stages),
        predicted=Predicted(latency_ms=1.0, bottleneck_ms=1.0, transfer_bytes=0, energy_mj=0.0),
        inputs=inputs,
        outputs=(stages[-1].outputs[-1],),
        pins=pins or {},
    )


def test_bandwidth_saved_is_zero_without_pins() -> None:
    plan = _plan(
        [
            Stage(0, "n1", "gpu", "fp32", ("a",), ("data_0",), ("r65",), {"r65": (1,)}),
            Stage(1, "n0", "cpu", "fp32", ("b",), ("r65",), ("softmax",)),
        ],
        ("data_0",),
    )
    sizes = {"data_0": 602112, "r65": 4000, "softmax": 4000}
    assert link_bytes(plan, sizes) == 602112 + 4000
    assert bandwidth_saved_bytes(plan, sizes) == 0
    assert link_bytes(plan, sizes, caller="n1") == 4000  # the caller lives on stage 0's node
    assert bandwidth_saved_bytes(plan, sizes, caller="n1") == 602112 - 4000


def test_bandwidth_saved_counts_pinned_inputs_that_stayed_home() -> None:
    plan = _plan(
        [
            Stage(0, "cam0", "npu", "int8", ("f0",), ("img0", "w0"), ("feat0",)),
            Stage(1, "cam1", "npu", "int8", ("f1",), ("img1",), ("feat1",)),
            Stage(2, "hub", "gpu", "fp32", ("fuse",), ("feat0", "feat1", "meta"), ("boxes",)),
            Stage(3, "hub", "gpu", "fp32", ("head",), ("feat0", "boxes"), ("scores",)),
        ],
        ("img0", "img1", "meta"),
        pins={"img0": "cam0", "img1": "cam1"},
    )
    sizes = {"img0": 1_000_000, "img1": 1_000_000, "meta": 100, "feat0": 8000, "feat1": 8000, "boxes": 64}
    # meta from the off-mesh caller, feat0 once to the hub (two stages there), feat1; w0 is a weight.
    assert link_bytes(plan, sizes) == 100 + 8000 + 8000
    assert bandwidth_saved_bytes(plan, sizes) == 2_000_100 - 16_100
    with pytest.raises(ConfigError, match="feat1"):
        link_bytes(plan, {k: v for k, v in sizes.items() if k != "feat1"})


# ---- HTTP --------------------------------------------------------------------------------------------


def test_http_endpoints_on_loopback() -> None:
    m = Metrics(node="n0")
    m.observe_inference("squeezenet", "1", 0.004)
    state = {"ready": False}
    server, thread = m.serve("127.0.0.1", 0, ready=lambda: state["ready"])
    try:
        assert server.server_address[0] == "127.0.0.1"
        base = f"http://127.0.0.1:{server.server_port}"
        status, ctype, body = http_get(base + "/metrics")
        assert status == 200 and ctype.startswith("text/plain")
        assert 'meshai_requests_total{model="squeezenet",status="ok"} 1.0' in body
        assert http_get(base + "/healthz")[::2] == (200, "ok\n")
        assert http_get(base + "/readyz")[0] == 503
        state["ready"] = True
        assert http_get(base + "/readyz")[::2] == (200, "ready\n")
        assert http_get(base + "/nope")[0] == 404
        status, _, body = http_get(base + "/metrics?name[]=meshai_slo_seconds")
        assert status == 200 and body.count("# TYPE") == 1
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert not thread.is_alive()


def test_readyz_is_503_when_the_probe_raises() -> None:
    def broken() -> bool:
        raise RuntimeError("store not loaded")

    with Metrics().serving("127.0.0.1", ready=broken) as port:
        status, _, body = http_get(f"http://127.0.0.1:{port}/readyz")
    assert status == 503 and "store not loaded" in body


# ---- one file for a swarm ------------------------------------------------------------------------------


def test_write_prom_file_merges_a_swarm_fetched_over_http(tmp_path: Path) -> None:
    nodes = {f"n{i}": Metrics(node=f"n{i}") for i in range(3)}
    for i, m in enumerate(nodes.values()):
        m.observe_stage("squeezenet", i, "compute", 0.002, accelerator="cpu")
        m.add_transfer("sent", 1000 * (i + 1))
        m.set_peers(trusted=2, untrusted=0, lost=i)
    entry = Metrics(node="entry")
    entry.observe_inference("squeezenet", "1", 0.008)
    fetched: dict[str, bytes | Metrics] = {}
    for name, m in nodes.items():
        with m.serving("127.0.0.1") as port:
            fetched[name] = http_get(f"http://127.0.0.1:{port}/metrics")[2].encode()
    fetched["entry"] = entry
    out = write_prom_file(tmp_path / "swarm.prom", fetched)
    text = out.read_text()
    fams = list(text_string_to_metric_families(text))
    names = [f.name for f in fams]
    assert len(names) == len(set(names)), "one HELP/TYPE per family"
    assert text.count("# TYPE meshai_peers gauge") == 1
    by = {f.name: f for f in fams}
    lost = {s.labels["node"]: s.value for s in by["meshai_peers"].samples if s.labels["state"] == "lost"}
    assert lost == {"n0": 0, "n1": 1, "n2": 2, "entry": 0}
    sent = {s.labels["node"]: s.value for s in by["meshai_transfer_bytes"].samples}
    assert sent == {"n0": 1000, "n1": 2000, "n2": 3000}
    assert {s.labels["node"] for s in by["meshai_stage_latency_seconds"].samples} == {"n0", "n1", "n2"}
    assert by["meshai_requests"].samples[0].labels == {"model": "squeezenet", "status": "ok", "node": "entry"}
    if PROMTOOL is not None:
        r = subprocess.run(
            [PROMTOOL, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30
        )
        assert r.returncode == 0, (r.stdout + r.stderr).decode()
    assert exposition_text(entry.exposition()) == entry.exposition()  # one source: unchanged
    # Without names the per-process series collide: refused, not silently duplicated.
    with pytest.raises(ConfigError, match="meshai_peers"):
        exposition_text(list(nodes.values()))


# ---- Prometheus configuration and rules ---------------------------------------------------------------


def _promtool(*args: str, cwd: Path = DEPLOY) -> str:
    if PROMTOOL is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    r = subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout + r.stderr


def test_promtool_checks_the_scrape_config() -> None:
    out = _promtool("check", "config", "prometheus.yml")
    assert "WARNING" not in out, out


def test_promtool_checks_the_rules() -> None:
    out = _promtool("check", "rules", "rules.yml")
    assert "SUCCESS" in out


ALERT_TESTS = """
rule_files: [{rules}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'meshai_peers{{state="lost",instance="n1:9464",job="meshai"}}'
        values: '0 0 1 1 1 1 1 1'
      - series: 'meshai_slo_seconds{{instance="e:9464",job="meshai"}}'
        values: '0.1x20'
      - series: 'meshai_inference_latency_seconds_bucket{{le="0.1",model="m",version="1"}}'
        values: '0+0x20'
      - series: 'meshai_inference_latency_seconds_bucket{{le="0.117",model="m",version="1"}}'
        values: '0+60x20'
      - series: 'meshai_inference_latency_seconds_bucket{{le="+Inf",model="m",version="1"}}'
        values: '0+60x20'
      - series: 'meshai_inference_latency_seconds_count{{model="m",version="1"}}'
        values: '0+60x20'
      - series: 'meshai_requests_total{{model="m",status="ok"}}'
        values: '0+54x20'
      - series: 'meshai_requests_total{{model="m",status="error"}}'
        values: '0+6x20'
      - series: 'meshai_feature_drift_score{{model="m",feature="x",method="psi"}}'
        values: '0.5x20'
    alert_rule_test:
      - eval_time: 4m
        alertname: MeshaiPeerLost
        exp_alerts:
          - exp_labels: {{severity: page, state: lost, instance: "n1:9464", job: meshai}}
            exp_annotations:
              summary: "n1:9464 lost 1 peer(s)"
              description: "A peer missed its heartbeats; stages on it are replanned if the entry can."
      - eval_time: 3m
        alertname: MeshaiLatencySLOBreach
        exp_alerts: []
      - eval_time: 12m
        alertname: MeshaiLatencySLOBreach
        exp_alerts:
          - exp_labels: {{severity: page, model: m, version: "1"}}
            exp_annotations:
              summary: "p95 latency of m 1 over its SLO"
              description: "End-to-end p95 is 116.2ms over the last 5m, above the SLO, for 5 minutes."
      - eval_time: 12m
        alertname: MeshaiErrorRateHigh
        exp_alerts:
          - exp_labels: {{severity: page, model: m}}
            exp_annotations:
              summary: "m: 10% of requests fail"
              description: "More than 5% of requests ended in an error over 5 minutes."
      - eval_time: 15m
        alertname: MeshaiFeatureDrift
        exp_alerts:
          - exp_labels: {{severity: ticket, model: m, feature: x, method: psi}}
            exp_annotations:
              summary: "Input feature x of m drifted (psi)"
              description: "Drift score 0.5 is above 0.2 for 10 minutes."
    promql_expr_test:
      - expr: meshai:inference_within_slo:ratio_rate5m
        eval_time: 10m
        exp_samples:
          - labels: 'meshai:inference_within_slo:ratio_rate5m{{model="m",version="1"}}'
            value: 0
"""


def test_alert_rules_fire_on_their_conditions(tmp_path: Path) -> None:
    spec = tmp_path / "alerts_test.yml"
    spec.write_text(ALERT_TESTS.format(rules=json.dumps(str(DEPLOY / "rules.yml"))))
    _promtool("test", "rules", str(spec), cwd=tmp_path)


# ---- a real Prometheus -----------------------------------------------------------------------------------


def _query(base: str, expr: str) -> list[dict[str, Any]]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    status, _, body = http_get(url)
    assert status == 200, body
    data = json.loads(body)
    assert data["status"] == "success", data
    result: list[dict[str, Any]] = data["data"]["result"]
    return result


def _wait_for(what: str, probe: Callable[[], Any], deadline: float) -> Any:
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = probe()
        except (OSError, urllib.error.URLError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_real_prometheus_reads_p95_within_10_percent(tmp_path: Path) -> None:
    if PROMETHEUS is None:
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    m = Metrics(node="entry")
    m.declare_model("squeezenet", "1")
    values = spread(2e-3, 12e-3, 300, seed=11)
    server, thread = m.serve("127.0.0.1", 0)
    try:
        with prometheus_server(tmp_path, [f"127.0.0.1:{server.server_port}"], [DEPLOY / "rules.yml"]) as base:
            deadline = time.monotonic() + 45
            _wait_for("Prometheus ready", lambda: http_get(base + "/-/ready", timeout=1)[0] == 200, deadline)
            _wait_for("a first scrape", lambda: _query(base, 'up{job="meshai"} == 1'), deadline)
            for i in range(0, len(values), 30):  # ~3 s of traffic, scraped every second meanwhile
                for v in values[i : i + 30]:
                    m.observe_inference("squeezenet", "1", v)
                time.sleep(0.3)
            _wait_for(
                "every request scraped",
                lambda: [r for r in _query(base, "meshai_requests_total") if float(r["value"][1]) == 300],
                deadline,
            )
            exact = exact_quantile(0.95, values)
            cumulative = _query(base, "histogram_quantile(0.95, meshai_inference_latency_seconds_bucket)")
            p95_cumulative = float(cumulative[0]["value"][1])
            over_rate = _query(
                base,
                "histogram_quantile(0.95, sum by (le) (rate(meshai_inference_latency_seconds_bucket[1m])))",
            )
            p95_rate = float(over_rate[0]["value"][1])
            recorded = _wait_for(
                "the p95 recording rule",
                lambda: _query(base, "meshai:inference_latency_seconds:p95_rate5m"),
                deadline,
            )
            p95_rule = float(recorded[0]["value"][1])
            print(
                f"exact p95 {exact * 1e3:.3f} ms; Prometheus: cumulative {p95_cumulative * 1e3:.3f} ms, "
                f"rate[1m] {p95_rate * 1e3:.3f} ms, recording rule {p95_rule * 1e3:.3f} ms"
            )
            for got in (p95_cumulative, p95_rate, p95_rule):
                assert abs(got - exact) / exact < 0.10, (got, exact)
            ok = _query(base, 'meshai_requests_total{status="ok"}')
            assert float(ok[0]["value"][1]) == 300
            groups = json.loads(http_get(base + "/api/v1/rules")[2])["data"]["groups"]
            rules = [r for g in groups for r in g["rules"]]
            assert len(rules) >= 16
            assert [(r["name"], r["lastError"]) for r in rules if r["health"] == "err"] == []
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
