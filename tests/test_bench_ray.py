"""``bench_ray``: meshai's pipeline against a plain Ray actor pipeline, run in a subprocess.

Small counts; speed is never asserted (ratios only have to be positive finite numbers).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")

pytestmark = [pytest.mark.ray, pytest.mark.process, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ("throughput_rps", "p50_ms", "p95_ms")


def _positive(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_bench_ray_shape_and_results() -> None:
    code = "import json; from meshai.bench import bench_ray; print(json.dumps(bench_ray(requests=30)))"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=180, cwd=ROOT, env=env
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["model"] == "squeezenet"
    assert res["stages"] == 3
    assert res["requests"] == 30
    assert res["window"] == 8
    for side in ("meshai", "ray"):
        for key in FIGURES:
            assert _positive(res[side][key]), (side, key, res[side])
        assert res[side]["ok"] == 30
        assert res[side]["p50_ms"] <= res[side]["p95_ms"]
    assert _positive(res["throughput_ratio"])
    assert _positive(res["p50_ratio"])
    assert set(res["max_abs_diff"]) == {"meshai", "ray", "batch"}
    for side, diff in res["max_abs_diff"].items():
        assert 0.0 <= diff <= 1e-4, (side, diff)
    batch = res["batch"]
    for key in ("ray_rps", "local_rps", "ratio"):
        assert _positive(batch[key]), (key, batch)


def test_bench_ray_bad_arguments() -> None:
    from meshai.bench import bench_ray
    from meshai.errors import ConfigError

    for kwargs in ({"requests": 0}, {"window": 0}, {"stages": 0}, {"rounds": 0}):
        with pytest.raises(ConfigError):
            bench_ray(**kwargs)  # type: ignore[arg-type]


def test_bench_ray_needs_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    from meshai.bench import bench_ray
    from meshai.errors import ConfigError

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'meshai\[ray\]'"):
        bench_ray(requests=1)
