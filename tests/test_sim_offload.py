"""``meshai sim --offload ray --offload-threshold Q``: a live swarm of node processes that spills a burst
to a real embedded Ray.  Every request has exactly one result, equal to the whole model's; the JSON says
how many went each way; no node process or Ray is left behind."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from runtime_helpers import MESHAI, WatchedRun, all_pids, assert_one_line_error, child_env, cmdline, is_zombie

from meshai.tensors import load_npz

pytestmark = [pytest.mark.ray, pytest.mark.process, pytest.mark.timeout(300)]
pytest.importorskip("ray")

TOL = 1e-4


def ray_pids() -> set[int]:
    """Pids of Ray's own daemons (GCS server, raylet) on this machine."""
    return {p for p in all_pids() if any(a.endswith(("/gcs_server", "/raylet")) for a in cmdline(p)[:1])}


def test_sim_burst_overflows_to_ray(tmp_path: Path) -> None:
    """A burst of 40 against threshold 4: exactly the first 4 find room on the swarm (two stages over two
    nodes, over mutual TLS), the other 36 run on Ray; every output matches the whole model."""
    out = tmp_path / "out.npz"
    w = WatchedRun(
        "sim", "--nodes", "2", "--model", "squeezenet", "--requests", "40", "--stages", "2",
        "--offload", "ray", "--offload-threshold", "4", "--ray-actors", "2", "--ray-cpus", "2",
        "--outputs", str(out), "--json", timeout=240,
    )  # fmt: skip
    before = ray_pids()
    r = w.run()
    assert r.returncode == 0, r.stderr
    assert w.leftovers() == [] and len(w.node_pids) == 2
    assert_gone(ray_pids() - before)
    rep = json.loads(r.stdout)
    assert rep["requests"] == 40 and rep["ok"] == 40 and rep["errors"] == 0, rep.get("first_error")
    assert rep["max_abs_diff"] < TOL
    off = rep["offload"]
    assert off["backend"] == "ray" and off["threshold"] == 4 and off["rate_rps"] is None
    assert (off["swarm"], off["ray"]) == (4, 36)
    assert off["completed"] == {"swarm": 4, "ray": 36}
    assert off["rules"] == {"local": 4, "overflow": 36}
    for target in ("swarm", "ray"):
        lat = off["latency_ms"][target]
        assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"]
    assert len(rep["plan"]["stages"]) == 2
    assert rep["throughput_rps"] > 0
    saved = load_npz(out)
    assert all(len(v) == 40 for v in saved.values())  # one result per request, in input order


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--offload", "ray"], "--offload-threshold"),
        (["--offload-threshold", "3"], "only with --offload ray"),
        (["--rate", "10"], "only with --offload ray"),
        (["--offload", "ray", "--offload-threshold", "3", "--rate", "-1"], "--rate"),
    ],
)
def test_sim_offload_flags_checked_before_anything_starts(args: list[str], fragment: str) -> None:
    cmd = [*MESHAI, "sim", "--model", "squeezenet", "--requests", "2", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=child_env())
    assert_one_line_error(r, fragment)


def assert_gone(pids: set[int], grace: float = 10.0) -> None:
    """The embedded Ray the sim started is shut down with it."""
    deadline = time.monotonic() + grace
    while pids and time.monotonic() < deadline:
        pids = {p for p in pids if Path(f"/proc/{p}").exists() and not is_zombie(p)}
        time.sleep(0.1)
    assert not pids, f"Ray daemons left behind: {pids}"
