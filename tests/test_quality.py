"""The planner against brute-force enumeration on hundreds of random small DAGs (same cost model)."""

from __future__ import annotations

import math
import statistics

import pytest

from scheduler.quality import brute_force, compare, random_case

CASES = 300


def test_random_cases_are_varied():
    cases = [random_case(s) for s in range(60)]
    assert {len(c.graph.ops) for c in cases} >= {3, 5, 8}
    assert {len(c.nodes) for c in cases} == {1, 2, 3}
    assert {c.constraints.objective for c in cases} == {"latency", "throughput"}
    assert any(c.constraints.stages for c in cases)
    assert any(c.constraints.pins for c in cases)
    assert any(len(c.graph.outputs) > 1 for c in cases)
    assert any(len(c.graph.inputs) > 1 for c in cases)


def test_brute_force_on_one_node_is_that_nodes_score():
    from scheduler.cost import build_context, evaluate

    c = next(
        random_case(s)
        for s in range(100)
        if len(random_case(s).nodes) == 1 and not random_case(s).constraints.stages
    )
    ctx = build_context(c.graph, c.nodes, c.constraints)
    ev = evaluate(ctx, [0] * len(c.graph.ops))
    assert brute_force(c) == (ev.score(c.constraints.objective) if ev.feasible else math.inf)


def test_planner_within_2pct_of_optimum_on_every_case(capsys):
    ratios = []
    for seed in range(CASES):
        r = compare(random_case(seed))
        assert r.ratio >= 1 - 1e-6, f"seed {seed}: the planner beat the brute-force optimum"
        assert r.ratio <= 1.02, (
            f"seed {seed}: planner {r.planned_s * 1e3:.3f} ms vs optimum {r.optimum_s * 1e3:.3f} ms"
        )
        ratios.append(r.ratio)
    with capsys.disabled():
        print(
            f"\nplanner vs brute force over {CASES} DAGs: worst {max(ratios):.6f}, mean {statistics.fmean(ratios):.8f}"
        )
    assert max(ratios) <= 1.02


@pytest.mark.parametrize("seed", [0, 7])
def test_brute_force_and_planner_agree_on_infeasibility(seed):
    c = random_case(seed)
    r = compare(c)
    assert math.isinf(r.optimum_s) == math.isinf(r.planned_s)
