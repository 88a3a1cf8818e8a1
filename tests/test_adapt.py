"""Adaptive replanning policies (scheduler/adapt.py), all as data: re-costing a plan, speed factors
from measurements, adopt-or-decline decisions, the SLO controller on replayed latency histories."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from models_helper import CASES

from meshai.capabilities import NodeCapability, resolve_profiles, swarm
from meshai.errors import ConfigError, PlanError
from meshai.plan import Constraints, Plan
from meshai.planning import LoadedModel, load_for_planning
from scheduler.adapt import (
    Decision,
    SloConfig,
    SloController,
    decide,
    evaluate_plan,
    infeasible,
    measured_speeds,
    propose,
    recost,
    relax_stages,
)
from scheduler.cost import Evaluation
from scheduler.graph import GraphIR, build_graph, normalize_model
from scheduler.partition import plan


def _nodes(*kinds: str) -> list[NodeCapability]:
    return swarm(resolve_profiles(list(kinds)))


@pytest.fixture(scope="module")
def squeezenet() -> LoadedModel:
    return load_for_planning("squeezenet")


@pytest.fixture(scope="module")
def branchy() -> GraphIR:
    return build_graph(normalize_model(CASES["branchy"]()), "branchy")


@pytest.fixture(scope="module")
def three_cpus(squeezenet) -> tuple[list[NodeCapability], Constraints, Plan]:
    nodes = _nodes("cpu", "cpu", "cpu")
    c = Constraints(objective="throughput")
    return nodes, c, plan(squeezenet.graph, nodes, c)


def _figures(ev: Evaluation) -> tuple[float, float, int, float, list[float]]:
    """An Evaluation's figures as a Plan records them (ms, rounded to 1e-6)."""
    return (
        round(ev.latency_s * 1e3, 6),
        round(ev.bottleneck_s * 1e3, 6),
        ev.transfer_bytes,
        round(ev.energy_j * 1e3, 6),
        [round(s * 1e3, 6) for s in ev.stage_s],
    )


def _plan_figures(p: Plan) -> tuple[float, float, int, float, list[float]]:
    q = p.predicted
    return (q.latency_ms, q.bottleneck_ms, q.transfer_bytes, q.energy_mj, [s.predicted_ms for s in p.stages])


# ------------------------------------------------------------------------------------- evaluate_plan

SCENARIOS = [
    ("cpu,gpu,npu", Constraints(objective="latency")),
    ("cpu,gpu,npu", Constraints(objective="throughput", stages=3)),
    ("cpu,cpu,cpu", Constraints(objective="throughput", speed={"n1": 0.5})),
    ("cpu,cpu,gpu", Constraints(objective="latency", stages=2, pins={"data_0": "n0"})),
    ("cpu,tpu", Constraints(int8_drop_pts={}, whole_int8_drop_pts=0.0)),  # int8 stages
]


@pytest.mark.parametrize(("profiles", "constraints"), SCENARIOS)
def test_evaluate_plan_reproduces_the_plans_own_figures(squeezenet, profiles, constraints):
    nodes = _nodes(*profiles.split(","))
    p = plan(squeezenet.graph, nodes, constraints)
    ev = evaluate_plan(squeezenet.graph, nodes, constraints, p)
    assert ev.feasible, ev.reason
    assert _figures(ev) == _plan_figures(p)
    assert [nodes[s.device].name for s in ev.stages] == list(p.nodes)


@pytest.mark.parametrize("objective", ["latency", "throughput"])
def test_evaluate_plan_reproduces_figures_on_a_branchy_dag(branchy, objective):
    nodes = _nodes("cpu", "cpu", "gpu")
    c = Constraints(objective=objective, stages=3)
    p = plan(branchy, nodes, c)
    assert _figures(evaluate_plan(branchy, nodes, c, p)) == _plan_figures(p)


def test_evaluate_plan_under_new_speeds_and_constraints(squeezenet, three_cpus):
    nodes, c, p = three_cpus
    slow = evaluate_plan(squeezenet.graph, nodes, dataclasses.replace(c, speed={"n1": 0.25}), p)
    k = p.nodes.index("n1")
    # compute = work / speed + dispatch overhead: a bit under 4x
    assert 3.8 < slow.stage_s[k] * 1e3 / p.stages[k].predicted_ms <= 4.0
    others = [i for i in range(len(p.stages)) if i != k]
    assert [round(slow.stage_s[i] * 1e3, 6) for i in others] == [p.stages[i].predicted_ms for i in others]
    assert slow.bottleneck_s * 1e3 > 3 * p.predicted.bottleneck_ms
    # a stage count the plan breaks: infeasible, with the reason
    wrong = evaluate_plan(squeezenet.graph, nodes, dataclasses.replace(c, stages=2), p)
    assert not wrong.feasible
    assert "not 2" in wrong.reason


def test_evaluate_plan_errors_name_the_node_op_and_precision(squeezenet, three_cpus):
    g = squeezenet.graph
    nodes, c, p = three_cpus
    with pytest.raises(PlanError, match=r"runs on node 'n2', which is not in the swarm \(nodes: n0, n1\)"):
        evaluate_plan(g, nodes[:2], c, p)
    s0 = p.stages[0]
    bad_op = dataclasses.replace(p, stages=(dataclasses.replace(s0, ops=(*s0.ops, "nope")), *p.stages[1:]))
    with pytest.raises(PlanError, match="runs op 'nope', which model 'squeezenet' lacks"):
        evaluate_plan(g, nodes, c, bad_op)
    lost_op = dataclasses.replace(p, stages=(dataclasses.replace(s0, ops=s0.ops[1:]), *p.stages[1:]))
    with pytest.raises(PlanError, match=f"places no stage for op.*{s0.ops[0]!r}"):
        evaluate_plan(g, nodes, c, lost_op)
    twice = dataclasses.replace(
        p, stages=(s0, dataclasses.replace(p.stages[1], ops=p.stages[1].ops + s0.ops[:1]))
    )
    with pytest.raises(PlanError, match="in two stages"):
        evaluate_plan(g, nodes, c, twice)
    fp16 = dataclasses.replace(p, stages=(dataclasses.replace(s0, precision="fp16"), *p.stages[1:]))
    with pytest.raises(PlanError, match=f"runs fp16 on node {s0.node!r}, which runs only int8, fp32"):
        evaluate_plan(g, nodes, c, fp16)
    same = dataclasses.replace(p, stages=(s0, dataclasses.replace(p.stages[1], node=s0.node), *p.stages[2:]))
    with pytest.raises(PlanError, match="runs two stages"):
        evaluate_plan(g, nodes, c, same)


def test_recost_refreshes_predictions_and_keeps_placement(squeezenet, three_cpus):
    nodes, c, p = three_cpus
    slow = dataclasses.replace(c, speed={"n1": 0.5})
    r = recost(squeezenet.graph, nodes, slow, p)
    assert [s.ops for s in r.stages] == [s.ops for s in p.stages]
    assert _plan_figures(r) == _figures(evaluate_plan(squeezenet.graph, nodes, slow, p))
    assert recost(squeezenet.graph, nodes, c, p) == p
    with pytest.raises(PlanError, match="infeasible under these figures: uses 3 stages, not 2"):
        recost(squeezenet.graph, nodes, dataclasses.replace(c, stages=2), p)


# ------------------------------------------------------------------------------------ measured_speeds


def test_a_node_measured_4x_slower_has_speed_one_quarter(three_cpus):
    _, _, p = three_cpus
    k = p.nodes.index("n1")
    measured = {s.id: s.predicted_ms * (4.0 if s.id == k else 1.0) for s in p.stages}
    assert measured_speeds(p, measured, smoothing=1.0) == {"n0": 1.0, "n1": 0.25, "n2": 1.0}
    # smoothing in log space: half way from 1 to 1/4 is 1/2; a node 4x faster goes to 2 alike
    half = measured_speeds(p, measured, smoothing=0.5)
    assert half["n1"] == pytest.approx(0.5)
    fast = {k: p.stages[k].predicted_ms / 4.0}
    assert measured_speeds(p, fast, smoothing=0.5)["n1"] == pytest.approx(2.0)
    assert measured_speeds(p, measured, smoothing=0.0)["n1"] == 1.0


def test_measured_speeds_scale_the_current_factor_and_clamp(three_cpus):
    _, _, p = three_cpus
    k0 = p.nodes.index("n0")
    k1 = p.nodes.index("n1")
    # measured as predicted: the factor the plan was predicted with stands
    same = {s.id: s.predicted_ms for s in p.stages}
    assert measured_speeds(p, same, {"n0": 0.5, "n1": 2.0, "n2": 1.0}) == {"n0": 0.5, "n1": 2.0, "n2": 1.0}
    # 2x slower than predicted at factor 0.5 -> 0.25
    got = measured_speeds(p, {k0: 2 * p.stages[k0].predicted_ms}, {"n0": 0.5}, smoothing=1.0)
    assert got["n0"] == pytest.approx(0.25)
    # clamped to [lo, hi]
    crawl = measured_speeds(p, {k1: p.stages[k1].predicted_ms * 1e4}, smoothing=1.0)
    assert crawl["n1"] == 0.02
    sprint = measured_speeds(p, {k1: p.stages[k1].predicted_ms / 1e4}, smoothing=1.0, hi=8.0)
    assert sprint["n1"] == 8.0


def test_measured_speeds_without_a_usable_measurement_keep_the_factor(three_cpus):
    _, _, p = three_cpus
    current = {"n0": 0.7, "gone": 3.0}
    k0 = p.nodes.index("n0")
    for bad in (0.0, -1.0, math.nan, math.inf):
        got = measured_speeds(p, {k0: bad}, current)
        assert got == {"n0": 0.7, "n1": 1.0, "n2": 1.0, "gone": 3.0}
    assert measured_speeds(p, {}, None) == {"n0": 1.0, "n1": 1.0, "n2": 1.0}
    with pytest.raises(PlanError, match="measured stage id 7 is not a stage of the plan"):
        measured_speeds(p, {7: 1.0})
    with pytest.raises(ConfigError, match="smoothing"):
        measured_speeds(p, {}, smoothing=1.5)
    with pytest.raises(ConfigError, match="lo"):
        measured_speeds(p, {}, lo=0.0)
    with pytest.raises(ConfigError, match="hi"):
        measured_speeds(p, {}, lo=2.0, hi=1.0)
    with pytest.raises(ConfigError, match="'n0'"):
        measured_speeds(p, {}, {"n0": 0.0})


def test_repeated_corrections_converge_on_the_true_speed(squeezenet, three_cpus):
    """Measure a node that is truly 4x slow, correct, re-cost, measure again: the factor settles at 0.25
    even though dispatch overhead does not scale with speed."""
    nodes, c, p = three_cpus
    truth = dataclasses.replace(c, speed={"n1": 0.25})
    measured = dict(enumerate(s * 1e3 for s in evaluate_plan(squeezenet.graph, nodes, truth, p).stage_s))
    speeds: dict[str, float] = {}
    believed = p
    for _ in range(12):
        speeds = measured_speeds(believed, measured, speeds, smoothing=0.5)
        believed = recost(squeezenet.graph, nodes, dataclasses.replace(c, speed=speeds), believed)
    assert speeds["n1"] == pytest.approx(0.25, rel=1e-3)
    assert speeds["n0"] == pytest.approx(1.0, rel=1e-6)  # only rounding of predicted_ms to 1e-6 ms
    assert speeds["n2"] == pytest.approx(1.0, rel=1e-6)
    assert [s.predicted_ms for s in believed.stages] == pytest.approx(list(measured.values()), rel=1e-3)


# ------------------------------------------------------------------------------------------ propose


def test_a_slowed_node_loses_work_and_the_new_plan_is_adopted(squeezenet, three_cpus):
    nodes, c, p = three_cpus
    k = p.nodes.index("n1")
    measured = {s.id: s.predicted_ms * (4.0 if s.id == k else 1.0) for s in p.stages}
    speeds = measured_speeds(p, measured, smoothing=1.0)
    assert speeds["n1"] == 0.25
    corrected = dataclasses.replace(c, speed=speeds)
    new, d = propose(squeezenet.graph, nodes, corrected, p)
    assert new is not None
    assert d.adopt, d.reason
    assert d.gain > 0.5
    assert d.candidate == pytest.approx(new.predicted.bottleneck_ms)
    assert d.current == pytest.approx(evaluate_plan(squeezenet.graph, nodes, corrected, p).bottleneck_s * 1e3)
    old_ops = len(p.stage_of("n1").ops)
    new_ops = len(new.stage_of("n1").ops) if "n1" in new.nodes else 0
    assert new_ops < old_ops
    assert d.reason.startswith(f"predicted bottleneck {new.predicted.bottleneck_ms:.1f} ms vs ")
    assert d.reason.endswith(f"{round(d.gain * 100)} % better")


def test_a_returning_strong_node_is_adopted(squeezenet):
    nodes = _nodes("cpu", "cpu", "gpu")
    c = Constraints(objective="throughput")
    running = plan(squeezenet.graph, nodes[:2], c)  # the gpu n2 was away
    new, d = propose(squeezenet.graph, nodes, c, running)
    assert new is not None and "n2" in new.nodes
    assert d.adopt and d.gain > 0.5
    assert d.current == pytest.approx(running.predicted.bottleneck_ms)


def test_a_returning_weak_node_is_declined_with_the_figures(squeezenet):
    nodes = _nodes("cpu", "cpu", "cpu", "cpu")
    c = Constraints(objective="throughput", speed={"n3": 0.2})  # n3 crawls
    running = plan(squeezenet.graph, nodes[:3], c)
    new, d = propose(squeezenet.graph, nodes, c, running)
    assert new is not None
    assert not d.adopt
    assert 0 < d.gain < 0.15
    cur, cand = f"{d.current:.1f}", f"{d.candidate:.1f}"
    assert d.reason == (
        f"predicted bottleneck {cand} ms vs {cur} ms now: {round(d.gain * 100)} % better, "
        "less than the 15 % required: keep the current plan"
    )
    # the same figures pass a lower bar
    _, low = propose(squeezenet.graph, nodes, c, running, min_gain=d.gain)
    assert low.adopt

    # latency: the node adds nothing at all
    nodes = _nodes("cpu", "gpu", "cpu")
    c = Constraints(objective="latency", speed={"n2": 0.3})
    running = plan(squeezenet.graph, nodes[:2], c)
    new, d = propose(squeezenet.graph, nodes, c, running)
    assert new is not None and not d.adopt
    assert d.gain == 0.0 and d.current == d.candidate
    assert d.reason.endswith("no better: keep the current plan")


def test_a_lost_node_makes_the_running_plan_infeasible(squeezenet):
    nodes = _nodes("cpu", "cpu", "cpu")
    c = Constraints(objective="throughput", stages=3)
    running = plan(squeezenet.graph, nodes, c)
    left = [n for n in nodes if n.name != "n2"]
    # exactly 3 stages over 2 nodes: the planner says why, nothing is adopted
    new, d = propose(squeezenet.graph, left, c, running)
    assert new is None and not d.adopt
    assert d.reason == "--stages 3 needs 3 nodes that can run the model, but only 2 can (n0, n1)"
    # relaxed to what is left: any feasible plan beats an infeasible one
    new, d = propose(squeezenet.graph, left, relax_stages(c, len(left)), running)
    assert new is not None and len(new.stages) == 2 and set(new.nodes) == {"n0", "n1"}
    assert d.adopt and d.gain == 1.0 and d.current == math.inf
    assert "the current plan cannot run (stage" in d.reason and "'n2', which is not in the swarm" in d.reason


def test_propose_over_a_swarm_missing_a_pinned_node_returns_the_plan_error(squeezenet):
    nodes = _nodes("cpu", "cpu", "cpu")
    c = Constraints(pins={"data_0": "n2"})
    running = plan(squeezenet.graph, nodes, c)
    with pytest.raises(PlanError) as err:
        plan(squeezenet.graph, nodes[:2], c)
    new, d = propose(squeezenet.graph, nodes[:2], c, running)
    assert new is None
    assert d == Decision(False, str(err.value), 0.0, math.inf, math.inf)
    assert "--pin data_0=n2: no node named 'n2'" in d.reason
    assert d.to_dict() == {
        "adopt": False,
        "reason": str(err.value),
        "gain": 0.0,
        "current": None,
        "candidate": None,
    }


def test_propose_keeps_an_optimal_running_plan(squeezenet, three_cpus):
    nodes, c, p = three_cpus
    new, d = propose(squeezenet.graph, nodes, c, p)
    assert new == p
    assert not d.adopt and d.gain == 0.0


# ------------------------------------------------------------------------------------------- decide


def _ev(latency_ms: float, bottleneck_ms: float | None = None) -> Evaluation:
    b = latency_ms if bottleneck_ms is None else bottleneck_ms
    return Evaluation(True, "", latency_ms / 1e3, b / 1e3, 0, 0.0, (), (), (), (), (), (b / 1e3,))


def test_decide_names_the_figures():
    d = decide(_ev(63.0), _ev(41.2), "latency")
    assert d.adopt
    assert d.reason == "predicted latency 41.2 ms vs 63.0 ms now: 35 % better"
    assert d.gain == pytest.approx((63.0 - 41.2) / 63.0)
    assert (d.current, d.candidate) == pytest.approx((63.0, 41.2))
    worse = decide(_ev(40.0), _ev(50.0), "latency")
    assert not worse.adopt
    assert worse.reason == "predicted latency 50.0 ms vs 40.0 ms now: 25 % worse: keep the current plan"
    assert worse.gain == pytest.approx(-0.25)
    small = decide(_ev(2.5), _ev(1.25), "latency")
    assert small.reason == "predicted latency 1.25 ms vs 2.5 ms now: 50 % better"


def test_decide_min_gain_boundary():
    assert decide(_ev(100.0), _ev(85.0), "latency", min_gain=0.15).adopt  # exactly 15 %
    assert not decide(_ev(100.0), _ev(85.1), "latency", min_gain=0.15).adopt
    assert decide(_ev(100.0), _ev(85.1), "latency", min_gain=0.14).adopt
    assert decide(_ev(100.0), _ev(50.0), "latency", min_gain=0.5).adopt
    assert not decide(_ev(100.0), _ev(50.01), "latency", min_gain=0.5).adopt
    with pytest.raises(ConfigError, match="min_gain"):
        decide(_ev(1.0), _ev(1.0), "latency", min_gain=-0.1)
    with pytest.raises(ConfigError, match="objective"):
        decide(_ev(1.0), _ev(1.0), "energy")


def test_decide_scores_the_objective():
    # better latency, worse bottleneck: the objective decides
    cur, cand = _ev(50.0, 10.0), _ev(30.0, 20.0)
    assert decide(cur, cand, "latency").adopt
    t = decide(cur, cand, "throughput")
    assert not t.adopt
    assert t.reason.startswith("predicted bottleneck 20.0 ms vs 10.0 ms now: 100 % worse")


def test_decide_with_infeasible_plans():
    gone = infeasible("node 'n2' is gone")
    d = decide(gone, _ev(80.0), "latency")
    assert d.adopt and d.gain == 1.0 and d.current == math.inf
    assert (
        d.reason
        == "the current plan cannot run (node 'n2' is gone): adopt the new plan (predicted latency 80.0 ms)"
    )
    d = decide(_ev(80.0), infeasible("stages form a cycle"), "latency")
    assert not d.adopt and d.gain == 0.0
    assert d.reason == "the new plan is infeasible (stages form a cycle): keep the current plan"
    assert not decide(gone, infeasible("no memory"), "throughput").adopt


# --------------------------------------------------------------------------------------- relax_stages


def test_relax_stages():
    c = Constraints(objective="throughput", stages=4, pins={"x": "n0"}, speed={"n1": 0.5})
    r = relax_stages(c, 3)
    assert r.stages == 3
    assert r == dataclasses.replace(c, stages=3)  # nothing else changes
    assert relax_stages(c, 4) is c
    assert relax_stages(c, 9) is c
    free = Constraints()
    assert relax_stages(free, 1) is free
    assert relax_stages(c, 1).stages == 1
    with pytest.raises(PlanError, match="no nodes left"):
        relax_stages(c, 0)
    with pytest.raises(ConfigError, match="n_nodes"):
        relax_stages(c, -1)


# ------------------------------------------------------------------------------------- SLO controller


def _replay(ctl: SloController, history: list[tuple[float, list[float]]]) -> list[bool]:
    """Feed (time, latencies observed since the last check) and check after each batch."""
    out = []
    for now, lats in history:
        for x in lats:
            ctl.observe(x)
        out.append(ctl.check(now).due)
    return out


def test_slo_sustain_then_due_then_cooldown_after_applying():
    ctl = SloController(SloConfig(slo_ms=50.0, window=10, sustain=2, cooldown_s=3.0))
    c = ctl.check(0.0)
    assert (c.p95_ms, c.over, c.due, c.reason) == (None, False, False, "no latencies observed yet")
    for x in [60.0] * 10:
        ctl.observe(x)
    first = ctl.check(0.0)
    assert first.over and not first.due and first.streak == 1
    assert first.reason == "p95 60.0 ms over SLO 50.0 ms for 1 consecutive check of 2"
    second = ctl.check(1.0)
    assert second.due and second.p95_ms == 60.0
    assert second.reason == "p95 60.0 ms over SLO 50.0 ms for 2 consecutive checks: replan"
    ctl.applied(1.0)
    assert ctl.samples == 0 and ctl.streak == 0  # latencies of the old plan no longer apply
    assert not ctl.check(1.5).due
    # still over under the new plan: sustained, but cooling down until t=4
    assert _replay(ctl, [(2.0, [70.0] * 10), (3.0, [])]) == [False, False]
    c = ctl.check(3.5)
    assert c.over and c.streak == 3 and not c.due
    assert c.reason.endswith("but cooling down 0.5 s more after a replan was applied")
    assert ctl.check(4.0).due


def test_slo_below_slo_resets_the_streak():
    ctl = SloController(SloConfig(slo_ms=50.0, window=10, sustain=3, cooldown_s=0.0))
    history = [
        (0.0, [80.0] * 10),  # over 1
        (1.0, []),  # over 2
        (2.0, [10.0] * 10),  # within: reset
        (3.0, [80.0] * 10),  # over 1
        (4.0, []),  # over 2
        (5.0, []),  # over 3: due
    ]
    assert _replay(ctl, history) == [False, False, False, False, False, True]
    ctl2 = SloController(SloConfig(slo_ms=50.0, window=10, sustain=1))
    ctl2.observe(50.0)  # at the SLO is not over it
    assert not ctl2.check(0.0).over


def test_slo_window_must_be_half_full_and_is_bounded():
    ctl = SloController(SloConfig(slo_ms=50.0, window=10, sustain=1, cooldown_s=0.0))
    for x in [100.0] * 4:
        ctl.observe(x)
    c = ctl.check(0.0)
    assert c.over and not c.due and c.streak == 0
    assert c.reason == "p95 100.0 ms over SLO 50.0 ms, but only 4 of 5 samples needed"
    ctl.observe(100.0)
    assert ctl.check(1.0).due
    # ten fast requests push the slow ones out of the window
    for x in [10.0] * 10:
        ctl.observe(x)
    c = ctl.check(2.0)
    assert ctl.samples == 10 and c.p95_ms == 10.0 and not c.over
    assert c.reason == "p95 10.0 ms within SLO 50.0 ms"


def test_slo_p95_is_numpys_like_the_sim_reports():
    ctl = SloController(SloConfig(slo_ms=1.0, window=40))
    values = [float(x) for x in range(1, 21)]
    for x in values:
        ctl.observe(x)
    assert ctl.p95_ms() == pytest.approx(float(np.percentile(values, 95)))
    assert ctl.check(0.0).p95_ms == pytest.approx(19.05)


def test_slo_declined_retries_at_most_once_per_cooldown():
    """A hopeless SLO: every due replan is declined; the controller asks again only after the cooldown
    and a fresh sustained streak, and keeps the window (the plan did not change)."""
    ctl = SloController(SloConfig(slo_ms=5.0, window=8, sustain=2, cooldown_s=3.0))
    dues = []
    for t in range(30):
        ctl.observe(40.0)
        ctl.observe(41.0)
        c = ctl.check(float(t))
        if c.due:
            dues.append(t)
            ctl.declined(float(t), "predicted latency 39.0 ms vs 40.0 ms now: 2 % better")
            assert ctl.samples == min(8, 2 * (t + 1))
    # t=0: 2 samples, under half the window; t=1: streak 1; t=2: streak 2, due; declined until t=5 ...
    assert dues == [2, 5, 8, 11, 14, 17, 20, 23, 26, 29]
    ctl2 = SloController(SloConfig(slo_ms=5.0, window=4, sustain=1, cooldown_s=2.0))
    ctl2.observe(9.0)
    ctl2.observe(9.0)
    ctl2.declined(0.0, "no better plan")
    c = ctl2.check(1.0)
    assert not c.due
    assert c.reason.endswith("cooling down 1.0 s more after a replan was declined: no better plan")
    assert ctl2.check(2.0).due


def test_slo_config_is_validated():
    for bad in (
        {"slo_ms": 0.0},
        {"slo_ms": math.inf},
        {"slo_ms": 1.0, "window": 0},
        {"slo_ms": 1.0, "sustain": 0},
        {"slo_ms": 1.0, "cooldown_s": -1.0},
        {"slo_ms": 1.0, "min_gain": -0.5},
        {"slo_ms": 1.0, "window": True},
    ):
        with pytest.raises(ConfigError):
            SloConfig(**bad)  # type: ignore[arg-type]
    ctl = SloController(SloConfig(slo_ms=1.0))
    with pytest.raises(ConfigError, match="latency_ms"):
        ctl.observe(-1.0)
    with pytest.raises(ConfigError, match="latency_ms"):
        ctl.observe(math.nan)
    assert SloConfig(slo_ms=1.0, window=1).min_samples == 1
    assert SloConfig(slo_ms=1.0).min_samples == 32
