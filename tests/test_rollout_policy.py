"""The staged-rollout policy (scheduler/rollout.py): metric histories replayed as data, no I/O, no clock."""

from __future__ import annotations

import json

import pytest

from meshai.errors import ConfigError
from scheduler.rollout import (
    Decision,
    RolloutConfig,
    RolloutState,
    VersionMetrics,
    decide,
    parse_duration,
    parse_fraction,
    parse_stages,
    pause,
    pipelines_on_new,
    resume,
    rollback,
    start,
)

CFG = RolloutConfig(stages=(0.1, 0.5, 1.0), bake_s=60.0, max_p95_regression=0.10, max_error_rate=0.01)
OLD = VersionMetrics(requests=200, errors=0, p95_ms=40.0, drift=0.05)
HEALTHY = VersionMetrics(requests=100, errors=0, p95_ms=42.0, drift=0.05)


def replay(config, state, history):
    """Feed ``(now, old, new)`` ticks to ``decide``; returns the final state and every decision."""
    decisions = []
    for now, old, new in history:
        state, d = decide(config, state, old, new, now)
        decisions.append(d)
    return state, decisions


def test_healthy_canary_advances_through_every_stage_exactly_when_bake_times_pass():
    state, d0 = start(CFG, 1000.0)
    assert (d0.action, d0.step, d0.share, state.status) == ("advance", 0, 0.1, "baking")
    ticks = [(1000.0 + t, OLD, HEALTHY) for t in range(0, 200, 10)]
    state, ds = replay(CFG, state, ticks)
    moves = [(d.at - 1000.0, d.action, d.share) for d in ds if d.action != "hold"]
    assert moves == [(60.0, "advance", 0.5), (120.0, "advance", 1.0), (180.0, "complete", 1.0)]
    assert state.status == "completed"
    # every hold before a bake ends says it waits for time
    assert all("bake time" in d.reason for d in ds if d.action == "hold" and d.at < 1180.0)
    # the last stage runs without old-version traffic: the stored baseline stands in
    assert state.baseline_p95_ms == 40.0
    # holds are not recorded; the state changes are
    assert [h.action for h in state.history] == ["advance", "advance", "advance", "complete"]
    assert ds[6].gates["p95"] == {"value": pytest.approx(0.05), "limit": 0.10, "ok": True}


def test_last_stage_uses_the_old_baseline_when_the_old_version_serves_nothing():
    state, _ = start(CFG, 0.0)
    state, _ = replay(CFG, state, [(60.0, OLD, HEALTHY), (120.0, OLD, HEALTHY)])
    assert (state.step, state.status) == (2, "baking")
    idle_old = VersionMetrics(requests=0)
    slow = VersionMetrics(requests=100, errors=0, p95_ms=80.0)
    state, d = decide(CFG, state, idle_old, slow, 130.0)
    assert d.action == "rollback"
    assert "baseline" in d.reason and "80.0 ms" in d.reason and "40.0 ms" in d.reason


def test_two_times_slower_canary_rolls_back_at_the_first_stage_naming_p95_and_both_figures():
    state, _ = start(CFG, 0.0)
    slow = VersionMetrics(requests=50, errors=0, p95_ms=80.0, drift=0.05)
    state, ds = replay(CFG, state, [(5.0, OLD, VersionMetrics(requests=5, p95_ms=80.0)), (10.0, OLD, slow)])
    assert ds[0].action == "hold"  # 5 samples: not judged yet
    d = ds[1]
    assert (d.action, d.step, d.share) == ("rollback", 0, 0.0)
    assert "p95" in d.reason and "80.0 ms" in d.reason and "40.0 ms" in d.reason and "100 %" in d.reason
    assert d.gates["p95"]["ok"] is False and d.gates["p95"]["value"] == pytest.approx(1.0)
    assert state.status == "rolled_back" and state.reason == d.reason
    assert state.history[-1] == d


def test_p95_regression_exactly_at_the_limit_passes():
    state, _ = start(CFG, 0.0)
    at_limit = VersionMetrics(requests=100, errors=0, p95_ms=44.0)
    _, d = decide(CFG, state, OLD, at_limit, 60.0)
    assert d.action == "advance"


def test_error_rate_breach_rolls_back():
    state, _ = start(CFG, 0.0)
    bad = VersionMetrics(requests=100, errors=3, p95_ms=40.0)
    state, d = decide(CFG, state, OLD, bad, 20.0)
    assert d.action == "rollback" and state.status == "rolled_back"
    assert "error rate" in d.reason and "3 of 100" in d.reason and "1 %" in d.reason
    assert d.gates["error_rate"] == {"value": 0.03, "limit": 0.01, "ok": False}


def test_errors_that_min_samples_could_not_absorb_roll_back_early_but_one_early_error_holds():
    cfg = RolloutConfig(max_error_rate=0.05, min_samples=30)  # 30 requests tolerate one error
    state, _ = start(cfg, 0.0)
    _, d = decide(cfg, state, OLD, VersionMetrics(requests=3, errors=1, p95_ms=40.0), 5.0)
    assert d.action == "hold" and d.gates["error_rate"]["ok"] is None
    _, d = decide(cfg, state, OLD, VersionMetrics(requests=4, errors=2, p95_ms=40.0), 5.0)
    assert d.action == "rollback" and "error rate" in d.reason


def test_drift_breach_rolls_back():
    state, _ = start(CFG, 0.0)
    drifting = VersionMetrics(requests=100, errors=0, p95_ms=40.0, drift=0.35)
    state, d = decide(CFG, state, OLD, drifting, 61.0)
    assert d.action == "rollback" and "drift" in d.reason and "0.35" in d.reason and "0.2" in d.reason
    assert d.gates["drift"]["ok"] is False


def test_too_few_samples_holds_and_never_advances_on_no_data():
    state, _ = start(CFG, 0.0)
    ticks = [(float(t), OLD, VersionMetrics()) for t in range(0, 600, 30)]
    ticks += [(700.0, OLD, VersionMetrics(requests=29, p95_ms=40.0))]
    state, ds = replay(CFG, state, ticks)
    assert {d.action for d in ds} == {"hold"} and state.step == 0
    assert "30 requests on the new version (0 so far)" in ds[-2].reason
    assert "(29 so far)" in ds[-1].reason and "bake time" not in ds[-1].reason
    _, d = decide(CFG, state, OLD, HEALTHY, 720.0)
    assert d.action == "advance"


def test_no_old_version_samples_holds_for_a_p95_baseline():
    state, _ = start(CFG, 0.0)
    few_old = VersionMetrics(requests=3, p95_ms=40.0)
    state, d = decide(CFG, state, few_old, HEALTHY, 100.0)
    assert d.action == "hold" and "old version" in d.reason and d.gates["p95"]["ok"] is None
    assert state.baseline_p95_ms is None
    state, d = decide(CFG, state, OLD, HEALTHY, 110.0)
    assert d.action == "advance" and state.baseline_p95_ms == 40.0


def test_pause_holds_through_time_and_resume_continues():
    state, _ = start(CFG, 0.0)
    state, dp = pause(state, 10.0, "checking dashboards")
    assert (dp.action, state.status, dp.share) == ("pause", "paused", 0.1)
    slow = VersionMetrics(requests=100, errors=0, p95_ms=90.0)
    state, ds = replay(CFG, state, [(t, OLD, HEALTHY) for t in (70.0, 200.0, 900.0)] + [(950.0, OLD, slow)])
    assert [d.action for d in ds] == ["hold"] * 4 and state.status == "paused"
    assert "checking dashboards" in ds[0].reason
    assert "would roll back" in ds[-1].reason and "p95" in ds[-1].reason
    state, dr = resume(state, 1000.0)
    assert (dr.action, state.status, state.step_started_at) == ("resume", "baking", 1000.0)
    state, ds = replay(CFG, state, [(1030.0, OLD, HEALTHY), (1060.0, OLD, HEALTHY)])
    assert [d.action for d in ds] == ["hold", "advance"] and state.step == 1
    # pausing twice or resuming what is not paused changes nothing
    again, d = resume(state, 1070.0)
    assert again == state and d.action == "hold"
    paused, _ = pause(state, 1070.0)
    again, d = pause(paused, 1071.0)
    assert again == paused and d.action == "hold"


@pytest.mark.parametrize("where", ["pending", "baking", "later_stage", "paused"])
def test_operator_rollback_from_any_non_terminal_state(where):
    if where == "pending":
        state = RolloutState()
    else:
        state, _ = start(CFG, 0.0)
        if where == "later_stage":
            state, _ = decide(CFG, state, OLD, HEALTHY, 60.0)
            assert state.step == 1
        if where == "paused":
            state, _ = pause(state, 5.0)
    state, d = rollback(state, 80.0, "bad reviews")
    assert (d.action, d.share, state.status) == ("rollback", 0.0, "rolled_back")
    assert "bad reviews" in d.reason and state.history[-1] == d


def test_terminal_states_never_change():
    done, _ = start(CFG, 0.0)
    for t in (60.0, 120.0, 180.0):
        done, _ = decide(CFG, done, OLD, HEALTHY, t)
    assert done.status == "completed"
    gone, _ = rollback(start(CFG, 0.0)[0], 1.0)
    slow = VersionMetrics(requests=100, errors=50, p95_ms=500.0, drift=9.0)
    for state in (done, gone):
        for after, d in (
            decide(CFG, state, OLD, slow, 500.0),
            decide(CFG, state, OLD, HEALTHY, 500.0),
            pause(state, 500.0),
            resume(state, 500.0),
            rollback(state, 500.0),
        ):
            assert after == state and d.action == "hold" and "already" in d.reason
    assert decide(CFG, done, OLD, HEALTHY, 600.0)[1].share == 1.0
    assert decide(CFG, gone, OLD, HEALTHY, 600.0)[1].share == 0.0


def test_pending_rollout_holds_until_started():
    state, d = decide(CFG, RolloutState(), OLD, HEALTHY, 5.0)
    assert state == RolloutState() and d.action == "hold" and d.share == 0.0


@pytest.mark.parametrize(
    ("share", "n", "k"),
    [
        (0.0, 10, 0),
        (0.1, 10, 1),
        (0.5, 10, 5),
        (1.0, 10, 10),
        (0.1, 3, 1),
        (0.5, 3, 2),
        (0.01, 1, 1),
        (0.7, 10, 7),
    ],
)
def test_pipelines_on_new_takes_whole_pipelines(share, n, k):
    names = [f"p{i:02d}" for i in range(n)]
    assert pipelines_on_new(share, names) == sorted(names)[:k]


def test_pipelines_on_new_is_deterministic_and_grows_monotonically():
    names = ["kitchen", "dock", "yard", "gate", "lab"]
    assert pipelines_on_new(0.5, names) == pipelines_on_new(0.5, list(reversed(names)))
    picked = [set(pipelines_on_new(s, names)) for s in CFG.stages]
    assert picked[0] <= picked[1] <= picked[2] == set(names)
    assert pipelines_on_new(0.3, []) == []
    with pytest.raises(ConfigError, match="'dock' twice"):
        pipelines_on_new(0.5, ["dock", "dock"])
    with pytest.raises(ConfigError, match=r"1\.5"):
        pipelines_on_new(1.5, names)


def test_parse_helpers():
    assert parse_stages("10%,50%,100%") == (0.1, 0.5, 1.0)
    assert parse_stages("0.25, 1") == (0.25, 1.0)
    assert parse_duration("60s") == 60.0 and parse_duration("2m") == 120.0
    assert parse_duration("500ms") == 0.5 and parse_duration("1h") == 3600.0 and parse_duration("7") == 7.0
    assert parse_fraction("10%") == pytest.approx(0.1) and parse_fraction("0.2") == 0.2


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("", "''"),
        ("10%,abc,100%", "abc"),
        ("50%,10%,100%", "10 %"),
        ("10%,50%", "50 %"),
        ("0%,100%", "0.0"),
        ("10%,150%", "1.5"),
    ],
)
def test_bad_stages_raise_naming_the_value(text, named):
    with pytest.raises(ConfigError, match=named):
        parse_stages(text)


@pytest.mark.parametrize("text", ["", "60x", "-5s", "s", "1e999s", "fast"])
def test_bad_durations_raise_naming_the_value(text):
    with pytest.raises(ConfigError) as exc:
        parse_duration(text)
    assert repr(text) in str(exc.value)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"stages": ()}, "stages"),
        ({"stages": (0.5, 0.5, 1.0)}, "strictly increasing"),
        ({"stages": (0.1, 0.9)}, "last stage"),
        ({"bake_s": -1.0}, "bake_s.*-1.0"),
        ({"max_p95_regression": float("nan")}, "max_p95_regression.*nan"),
        ({"max_error_rate": 2.0}, "max_error_rate.*2.0"),
        ({"max_drift": -0.1}, "max_drift.*-0.1"),
        ({"min_samples": 0}, "min_samples.*0"),
        ({"min_samples": True}, "min_samples.*True"),
    ],
)
def test_bad_configs_raise_config_error_naming_the_value(kwargs, named):
    with pytest.raises(ConfigError, match=named):
        RolloutConfig(**kwargs)


def test_bad_metrics_raise_config_error():
    with pytest.raises(ConfigError, match="errors must be <= requests"):
        VersionMetrics(requests=3, errors=4)
    with pytest.raises(ConfigError, match=r"p95_ms.*-1"):
        VersionMetrics(requests=3, p95_ms=-1.0)


def test_json_round_trip():
    state, _ = start(CFG, 0.0)
    state, _ = decide(CFG, state, OLD, HEALTHY, 60.0)
    state, _ = pause(state, 61.0, "lunch")
    blob = json.dumps({"config": CFG.to_dict(), "state": state.to_dict(), "old": OLD.to_dict()})
    back = json.loads(blob)
    assert RolloutConfig.from_dict(back["config"]) == CFG
    assert RolloutState.from_dict(back["state"]) == state
    assert Decision.from_dict(back["state"]["history"][1]) == state.history[1]
    assert back["old"]["error_rate"] == 0.0
    with pytest.raises(ConfigError, match="'speed'"):
        RolloutConfig.from_dict({"speed": 2})
