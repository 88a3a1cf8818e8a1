"""The examples users copy run as shipped: each script, at its ``--quick`` size, as a subprocess.

Every run starts real node processes; the watcher proves each one is gone afterwards.  The figures
that could be wrong are asserted from the script's ``--json``: outputs equal to the whole model's, pins
honoured, precision where it was planned, both objectives measured, every offload decision counted
once.  Each writes a PNG, which must be a real one.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from runtime_helpers import WatchedRun, all_pids, child_env, cmdline, is_zombie

pytestmark = [pytest.mark.process, pytest.mark.timeout(240)]

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = [
    "collaborative_perception",
    "quantize_and_deploy",
    "hetero_swarm_sim",
    "cloud_offload",
    "federated_digits",
]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TOL = 1e-4


def run_example(name: str, out: Path, timeout: float = 180.0) -> dict[str, Any]:
    """``python examples/NAME.py --quick --json --out OUT``: exit 0, no node process left, a valid PNG;
    returns the JSON it printed."""
    w = WatchedRun(
        "--quick",
        "--json",
        "--out",
        str(out),
        timeout=timeout,
        command=[sys.executable, str(EXAMPLES / f"{name}.py")],
    )
    r = w.run()
    assert r.returncode == 0, r.stderr[-3000:]
    assert w.node_pids, "the watcher should have seen the example's node processes"
    assert w.leftovers() == [], "every node process the example started is gone"
    rep: dict[str, Any] = json.loads(r.stdout)
    png = Path(rep["png"])
    assert png.parent == out and png.read_bytes()[:8] == PNG_MAGIC
    return rep


@pytest.mark.parametrize("name", SCRIPTS)
def test_help(name: str) -> None:
    """Every example explains itself and names the flags the tests use."""
    r = subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(),
    )
    assert r.returncode == 0, r.stderr
    for flag in ("--quick", "--json", "--out"):
        assert flag in r.stdout


def test_collaborative_perception(tmp_path: Path) -> None:
    rep = run_example("collaborative_perception", tmp_path)
    assert rep["ok"] == rep["frames"] > 0 and rep["max_abs_diff"] <= TOL and rep["outputs_match"]
    stages = rep["plan"]["stages"]
    for c in range(3):  # camera c's raw frame is read only on robot c, where its whole backbone runs
        readers = [s for s in stages if f"cam{c}" in s["inputs"]]
        assert [s["node"] for s in readers] == [f"robot{c}"], readers
        backbone = {op for s in stages for op in s["ops"] if op.startswith(f"cam{c}_")}
        assert backbone and backbone <= set(readers[0]["ops"])
    fusion = [s for s in stages if "fusion_concat" in s["ops"]]
    assert [s["node"] for s in fusion] == ["hub"] == [rep["strongest_node"]] and rep["fusion_on_strongest"]
    for robot in rep["robots"].values():
        assert 0 < robot["bytes_sent_per_frame"] < robot["raw_frame_bytes"] / 100
        assert 0 < robot["stage_ms_p50"] <= robot["frame_to_fused_ms_p50"]
    assert (
        rep["bytes_sent"]["features"] < rep["bytes_sent"]["raw_frames"]
        and rep["bytes_sent"]["saved_pct"] > 99
    )


def test_quantize_and_deploy(tmp_path: Path) -> None:
    rep = run_example("quantize_and_deploy", tmp_path)
    assert rep["ok"] == rep["requests"] > 0 and rep["max_abs_diff"] <= TOL and rep["outputs_match"]
    node = rep["int8_only_node"]
    assert [s["precision"] for s in rep["plan"]["stages"] if s["node"] == node] == ["int8"]
    acc = rep["accuracy"]
    assert math.isfinite(acc["delta_pts"]) and abs(acc["delta_pts"]) <= acc["budget_pts"]
    assert acc["delta_pts"] == pytest.approx(acc["fp32"] - acc["swarm"], abs=1e-3) and acc["fp32"] > 90
    assert 0 < rep["sizes"]["int8_bytes"] < rep["sizes"]["fp32_bytes"]
    assert rep["max_abs_diff_fp32"] > 0  # int8 really ran: not the fp32 numbers


def test_hetero_swarm_sim(tmp_path: Path) -> None:
    rep = run_example("hetero_swarm_sim", tmp_path)
    assert set(rep["objectives"]) == {"latency", "throughput"} and rep["outputs_match"]
    for r in rep["objectives"].values():
        assert r["ok"] == r["requests"] > 0 and r["max_abs_diff"] <= TOL and r["same_plan_both_runs"]
        assert r["stages"][0]["node"] == rep["pins"]["image"]  # the frames are born there
        assert r["predicted"]["latency_ms"] > 0 and r["predicted"]["throughput_rps"] > 0
        assert r["measured"]["throughput_rps"] > 0 and r["measured"]["latency_ms"]["p50"] > 0
        assert r["measured"]["latency_ms"]["p50"] <= r["measured"]["latency_ms"]["p95"]
        assert {"n3", "n4"} <= set(r["idle"])  # int8-only tpu and mcu: an fp32 model takes none of them


def ray_daemons() -> set[int]:
    return {p for p in all_pids() if any(a.endswith(("/gcs_server", "/raylet")) for a in cmdline(p)[:1])}


@pytest.mark.ray
def test_cloud_offload(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    before = ray_daemons()
    rep = run_example("cloud_offload", tmp_path, timeout=200)
    assert rep["max_abs_diff"] <= TOL and rep["outputs_match"]
    live = rep["live"]
    assert live["swarm"] > 0 and live["ray"] > 0, live  # both sides used
    assert live["swarm"] + live["ray"] == live["requests"] == sum(live["rules"].values())
    assert live["completed"] == {"swarm": live["swarm"], "ray": live["ray"]}  # each answered exactly once
    assert live["rules"]["overflow"] == live["ray"] and live["rules"]["local"] == live["swarm"]
    assert (rep["bulk"]["target"], rep["bulk"]["rule"]) == ("ray", "bulk") and rep["bulk"]["requests"] > 0
    assert rep["decisions"] == live["requests"] + 1
    deadline = time.monotonic() + 10
    while (left := {p for p in ray_daemons() - before if not is_zombie(p)}) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"Ray daemons left behind: {left}"
