"""The offload policy as data: every rule in a table, boundaries, reasons, a replayed burst, accounting."""

from __future__ import annotations

import ast
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest

from meshai.errors import ConfigError, MeshaiError
from scheduler.offload import (
    Decision,
    OffloadPolicy,
    OverflowCounter,
    WorkState,
    decide,
    link_seconds,
)

POLICY = OffloadPolicy(queue_threshold=8, latency_slo_ms=200.0, bulk_batch=64, max_link_s=2.0)


def state(**kw: Any) -> WorkState:
    """A quiet live request on a fast link, with ``kw`` overriding fields."""
    base: dict[str, Any] = {
        "queue_depth": 0,
        "in_flight": 0,
        "swarm_p95_ms": 50.0,
        "batch_size": 1,
        "request_bytes": 1_000,
        "link_bandwidth_bps": 1e9,
        "link_latency_s": 0.001,
        "ray_est_ms": None,
    }
    base.update(kw)
    return WorkState(**base)


# (id, policy overrides, state overrides, target, rule, reason)
RULES: list[tuple[str, dict[str, Any], dict[str, Any], str, str, str]] = [
    # 1. no Ray wins over everything
    ("no-ray", {"ray_available": False}, {}, "swarm", "no_ray", "ray unavailable: keep on swarm"),
    (
        "no-ray-bulk-and-overflow",
        {"ray_available": False},
        {"batch_size": 1000, "queue_depth": 100, "swarm_p95_ms": 900.0, "ray_est_ms": 1.0},
        "swarm",
        "no_ray",
        "ray unavailable: keep on swarm",
    ),
    # 2. bulk
    (
        "bulk-at-boundary",
        {},
        {"batch_size": 64, "request_bytes": 0, "link_latency_s": 0.5},
        "ray",
        "bulk",
        "bulk batch 64 ≥ 64, link 0.5 s ≤ max 2 s: bulk to ray",
    ),
    (
        "below-bulk-is-live",
        {},
        {"batch_size": 63},
        "swarm",
        "local",
        "queue 0 < threshold 8, swarm p95 50 ms ≤ SLO 200 ms: keep on swarm",
    ),
    (
        # 1 Gbit/s, 250 MB = 2.0 s exactly, no latency: not over the limit
        "bulk-link-exactly-max",
        {},
        {"batch_size": 128, "request_bytes": 250_000_000, "link_latency_s": 0.0},
        "ray",
        "bulk",
        "bulk batch 128 ≥ 64, link 2 s ≤ max 2 s: bulk to ray",
    ),
    (
        "bulk-link-too-slow",
        {},
        {"batch_size": 128, "request_bytes": 250_000_000, "link_latency_s": 0.25},
        "swarm",
        "bulk_link",
        "bulk batch 128 ≥ 64 but link 2.25 s > max 2 s: keep on swarm",
    ),
    (
        # a bulk job that cannot ship stays on the swarm even when the queue overflows
        "bulk-link-beats-overflow",
        {},
        {"batch_size": 64, "request_bytes": 10**9, "link_bandwidth_bps": 1e6, "queue_depth": 50},
        "swarm",
        "bulk_link",
        "bulk batch 64 ≥ 64 but link 8000 s > max 2 s: keep on swarm",
    ),
    # 3a. overflow
    (
        "overflow-at-threshold",
        {},
        {"queue_depth": 8},
        "ray",
        "overflow",
        "queue 8 ≥ threshold 8: overflow to ray",
    ),
    (
        "overflow-example",
        {},
        {"queue_depth": 12, "in_flight": 3},
        "ray",
        "overflow",
        "queue 12 ≥ threshold 8: overflow to ray",
    ),
    (
        "just-below-threshold",
        {},
        {"queue_depth": 7},
        "swarm",
        "local",
        "queue 7 < threshold 8, swarm p95 50 ms ≤ SLO 200 ms: keep on swarm",
    ),
    # 3b. SLO
    (
        "slo-breached-ray-faster",
        {},
        {"swarm_p95_ms": 250.0, "ray_est_ms": 120.0},
        "ray",
        "slo",
        "swarm p95 250 ms > SLO 200 ms and ray est 120 ms < 250 ms: to ray",
    ),
    (
        "p95-equals-slo",
        {},
        {"swarm_p95_ms": 200.0, "ray_est_ms": 1.0},
        "swarm",
        "local",
        "queue 0 < threshold 8, swarm p95 200 ms ≤ SLO 200 ms: keep on swarm",
    ),
    (
        "ray-est-equals-p95",
        {},
        {"swarm_p95_ms": 250.0, "ray_est_ms": 250.0},
        "swarm",
        "local",
        "queue 0 < threshold 8, swarm p95 250 ms > SLO 200 ms but ray est 250 ms not lower: keep on swarm",
    ),
    (
        "ray-est-just-lower",
        {},
        {"swarm_p95_ms": 250.0, "ray_est_ms": 249.5},
        "ray",
        "slo",
        "swarm p95 250 ms > SLO 200 ms and ray est 249.5 ms < 250 ms: to ray",
    ),
    (
        "ray-est-unknown",
        {},
        {"swarm_p95_ms": 250.0, "ray_est_ms": None},
        "swarm",
        "local",
        "queue 0 < threshold 8, swarm p95 250 ms > SLO 200 ms but ray est unknown: keep on swarm",
    ),
    (
        "p95-unknown",
        {},
        {"swarm_p95_ms": None, "ray_est_ms": 1.0},
        "swarm",
        "local",
        "queue 0 < threshold 8, swarm p95 unknown: keep on swarm",
    ),
    (
        "no-slo",
        {"latency_slo_ms": None},
        {"swarm_p95_ms": 10_000.0, "ray_est_ms": 1.0},
        "swarm",
        "local",
        "queue 0 < threshold 8, no SLO: keep on swarm",
    ),
    (
        # overflow is checked before the SLO rule and names the queue
        "overflow-before-slo",
        {},
        {"queue_depth": 9, "swarm_p95_ms": 250.0, "ray_est_ms": 120.0},
        "ray",
        "overflow",
        "queue 9 ≥ threshold 8: overflow to ray",
    ),
]


@pytest.mark.parametrize(
    ("policy_kw", "state_kw", "target", "rule", "reason"),
    [r[1:] for r in RULES],
    ids=[r[0] for r in RULES],
)
def test_rules(
    policy_kw: dict[str, Any], state_kw: dict[str, Any], target: str, rule: str, reason: str
) -> None:
    policy = dataclasses.replace(POLICY, **policy_kw)
    d = decide(policy, state(**state_kw))
    assert (d.target, d.rule, d.reason) == (target, rule, reason)


def test_every_rule_is_in_the_table() -> None:
    assert {r[4] for r in RULES} == {"no_ray", "bulk", "bulk_link", "overflow", "slo", "local"}


def test_decide_is_pure_and_deterministic() -> None:
    s = state(queue_depth=12)
    assert decide(POLICY, s) == decide(POLICY, s)
    assert s == state(queue_depth=12)


def test_decision_is_json_data() -> None:
    d = decide(POLICY, state(queue_depth=12))
    assert json.loads(json.dumps(d.to_dict())) == {
        "target": "ray",
        "reason": "queue 12 ≥ threshold 8: overflow to ray",
        "rule": "overflow",
    }
    assert Decision(**d.to_dict()) == d  # type: ignore[arg-type]


def test_link_seconds_is_latency_plus_bits_over_bandwidth() -> None:
    assert link_seconds(state(request_bytes=1_000_000, link_bandwidth_bps=8e6, link_latency_s=0.1)) == (
        pytest.approx(1.1)
    )
    assert link_seconds(state(request_bytes=0, link_latency_s=0.0)) == 0.0


def test_defaults() -> None:
    p = OffloadPolicy(queue_threshold=4)
    assert (p.latency_slo_ms, p.bulk_batch, p.max_link_s, p.ray_available) == (None, 64, 2.0, True)
    assert state().ray_est_ms is None


def test_types_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        POLICY.queue_threshold = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        state().queue_depth = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        Decision("swarm", "x").target = "ray"  # type: ignore[misc]


# ---------------------------------------------------------------- a burst replayed


def replay(depths: list[int], policy: OffloadPolicy = POLICY) -> tuple[list[str], OverflowCounter]:
    """One live request per queue depth, routed and then finished in arrival order."""
    counter = OverflowCounter()
    targets: list[str] = []
    for rid, depth in enumerate(depths):
        d = decide(policy, state(queue_depth=depth))
        counter.route(d, rid)
        targets.append(d.target)
    return targets, counter


BURST = [0, 2, 5, 7, 8, 9, 12, 15, 12, 9, 8, 7, 4, 1, 0]


def test_burst_routes_only_the_overflow_to_ray() -> None:
    targets, counter = replay(BURST)
    assert targets == ["ray" if q >= 8 else "swarm" for q in BURST]
    assert (counter.swarm, counter.ray, counter.pending) == (8, 7, 15)
    assert targets[:4] == ["swarm"] * 4 and targets[4:11] == ["ray"] * 7 and targets[11:] == ["swarm"] * 4


@pytest.mark.parametrize(
    ("threshold", "swarm", "ray"),
    [(1, 2, 13), (8, 8, 7), (12, 12, 3), (15, 14, 1), (16, 15, 0)],
)
def test_burst_counts_by_threshold(threshold: int, swarm: int, ray: int) -> None:
    _, counter = replay(BURST, OffloadPolicy(queue_threshold=threshold))
    assert (counter.swarm, counter.ray) == (swarm, ray)


def test_burst_without_ray_stays_on_swarm() -> None:
    _, counter = replay(BURST, dataclasses.replace(POLICY, ray_available=False))
    assert (counter.swarm, counter.ray) == (len(BURST), 0)


def test_burst_each_request_exactly_once_out_of_order() -> None:
    _, counter = replay(BURST)
    order = list(range(len(BURST)))[::2] + list(range(len(BURST)))[1::2]
    where = {rid: counter.done(rid) for rid in order}
    assert sorted(where) == list(range(len(BURST)))
    assert counter.pending == 0
    assert counter.completed == {"swarm": 8, "ray": 7}
    assert [where[i] for i in range(len(BURST))] == ["ray" if q >= 8 else "swarm" for q in BURST]
    for rid in order:
        with pytest.raises(ConfigError, match="done twice"):
            counter.done(rid)
        with pytest.raises(ConfigError, match="after it was done"):
            counter.route(Decision("swarm", "again"), rid)
    assert (counter.swarm, counter.ray, counter.pending) == (8, 7, 0)


# ---------------------------------------------------------------- OverflowCounter


def test_counter_accounting() -> None:
    c = OverflowCounter()
    assert (c.swarm, c.ray, c.pending) == (0, 0, 0)
    c.route(Decision("ray", "r"), "a")
    c.route(Decision("swarm", "s"), "b")
    assert (c.swarm, c.ray, c.pending) == (1, 1, 2)
    assert c.done("a") == "ray"
    assert (c.swarm, c.ray, c.pending) == (1, 1, 1)
    assert c.completed == {"swarm": 0, "ray": 1}


def test_counter_duplicate_route_raises_and_changes_nothing() -> None:
    c = OverflowCounter()
    c.route(Decision("ray", "r"), 7)
    with pytest.raises(ConfigError, match="routed twice"):
        c.route(Decision("swarm", "s"), 7)
    assert (c.swarm, c.ray, c.pending) == (0, 1, 1)
    assert c.done(7) == "ray"


def test_counter_unknown_done_raises() -> None:
    c = OverflowCounter()
    with pytest.raises(ConfigError, match="never routed"):
        c.done(3)
    assert c.completed == {"swarm": 0, "ray": 0}


@pytest.mark.parametrize("rid", [True, 1.0, None, (1,)])
def test_counter_rejects_bad_ids(rid: Any) -> None:
    c = OverflowCounter()
    with pytest.raises(ConfigError, match="request id"):
        c.route(Decision("swarm", "s"), rid)
    with pytest.raises(ConfigError, match="request id"):
        c.done(rid)


def test_counters_are_independent() -> None:
    a, b = OverflowCounter(), OverflowCounter()
    a.route(Decision("ray", "r"), 1)
    assert (b.ray, b.pending) == (0, 0)


# ---------------------------------------------------------------- bad values

BAD_POLICY: list[tuple[str, object]] = [
    ("queue_threshold", 0),
    ("queue_threshold", -1),
    ("queue_threshold", 2.5),
    ("queue_threshold", True),
    ("latency_slo_ms", 0.0),
    ("latency_slo_ms", -5.0),
    ("latency_slo_ms", math.nan),
    ("latency_slo_ms", math.inf),
    ("latency_slo_ms", "200"),
    ("bulk_batch", 0),
    ("bulk_batch", 64.0),
    ("max_link_s", 0.0),
    ("max_link_s", -1.0),
    ("max_link_s", math.inf),
    ("ray_available", 1),
    ("ray_available", "yes"),
]


@pytest.mark.parametrize(("name", "value"), BAD_POLICY, ids=[f"{n}={v!r}" for n, v in BAD_POLICY])
def test_bad_policy_rejected(name: str, value: object) -> None:
    kw: dict[str, Any] = {"queue_threshold": 8, name: value}
    with pytest.raises(ConfigError, match=f"OffloadPolicy.{name}") as e:
        OffloadPolicy(**kw)
    assert repr(value) in str(e.value)
    assert isinstance(e.value, MeshaiError)


BAD_STATE: list[tuple[str, object]] = [
    ("queue_depth", -1),
    ("queue_depth", 1.5),
    ("queue_depth", False),
    ("in_flight", -1),
    ("swarm_p95_ms", -0.1),
    ("swarm_p95_ms", math.nan),
    ("batch_size", 0),
    ("request_bytes", -1),
    ("request_bytes", 1.0),
    ("link_bandwidth_bps", 0.0),
    ("link_bandwidth_bps", -1e6),
    ("link_bandwidth_bps", math.inf),
    ("link_latency_s", -0.001),
    ("link_latency_s", math.nan),
    ("ray_est_ms", -1.0),
    ("ray_est_ms", math.inf),
]


@pytest.mark.parametrize(("name", "value"), BAD_STATE, ids=[f"{n}={v!r}" for n, v in BAD_STATE])
def test_bad_state_rejected(name: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"WorkState.{name}") as e:
        state(**{name: value})
    assert repr(value) in str(e.value)


def test_boundary_values_accepted() -> None:
    OffloadPolicy(queue_threshold=1, latency_slo_ms=1e-9, bulk_batch=1, max_link_s=1e-9, ray_available=False)
    state(queue_depth=0, in_flight=0, swarm_p95_ms=0.0, batch_size=1, request_bytes=0, link_latency_s=0.0)
    state(swarm_p95_ms=None, ray_est_ms=0.0, link_bandwidth_bps=1)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"target": "cloud", "reason": "x"}, "Decision.target"),
        ({"target": "ray", "reason": ""}, "Decision.reason"),
        ({"target": "ray", "reason": "x", "rule": "whim"}, "Decision.rule"),
    ],
)
def test_bad_decision_rejected(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Decision(**kw)


def test_no_io_imports() -> None:
    src = Path(__file__).resolve().parents[1] / "scheduler" / "offload.py"
    imported: set[str] = set()
    for node in ast.walk(ast.parse(src.read_text())):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert imported <= {"__future__", "math", "dataclasses", "typing", "meshai"}
