"""``meshai bench transport|pipeline --json`` run as subprocesses: shapes and sanity of the figures.

Tiny sizes and counts; speed is never asserted (ratios only have to be positive finite numbers).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from meshai.bench import parse_sizes
from meshai.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _meshai(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshai", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def _bench_json(*args: str) -> dict[str, Any]:
    proc = _meshai("bench", *args, "--json")
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def _positive(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_parse_sizes() -> None:
    assert parse_sizes("4MiB,64KiB") == (4 * 1024 * 1024, 64 * 1024)
    assert parse_sizes("4096, 2k, 1M") == (4096, 2048, 1024 * 1024)
    for bad in ("", "4GiB", "x", "-4"):
        with pytest.raises(ConfigError):
            parse_sizes(bad)


def test_bench_transport_rejects_a_size_that_is_not_float32_and_says_so_in_one_line() -> None:
    proc = _meshai("bench", "transport", "--sizes", "6", "--json", timeout=30)
    assert proc.returncode != 0
    assert proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "6" in proc.stderr


@pytest.mark.process
def test_bench_transport_json_has_a_row_per_size_and_link() -> None:
    res = _bench_json("transport", "--sizes", "256KiB,16KiB", "--mib", "1", "--repeats", "1")
    rows = res["rows"]
    assert {(r["size_bytes"], r["tls"]) for r in rows} == {
        (256 * 1024, False),
        (16 * 1024, False),
        (256 * 1024, True),
        (16 * 1024, True),
    }
    for r in rows:
        for key in ("meshai_mb_s", "raw_mb_s", "ratio", "asyncio_mb_s", "ratio_to_asyncio"):
            assert _positive(r[key]), (key, r)
        assert r["ratio"] == pytest.approx(r["meshai_mb_s"] / r["raw_mb_s"], rel=0.01)
        assert r["messages"] >= 1
    assert res["repeats"] == 1
    assert isinstance(res["baseline"], str) and res["baseline"]


@pytest.mark.process
def test_bench_transport_plain_only() -> None:
    res = _bench_json("transport", "--sizes", "64KiB", "--mib", "1", "--repeats", "1", "--tls", "off")
    assert [(r["size_bytes"], r["tls"]) for r in res["rows"]] == [(64 * 1024, False)]


@pytest.mark.process
@pytest.mark.timeout(120)
def test_bench_pipeline_json_checks_every_result_against_the_whole_model() -> None:
    res = _bench_json(
        "pipeline", "--models", "squeezenet,resnet50", "--requests", "3", "--warmup", "1", "--window", "2"
    )
    assert [r["model"] for r in res["rows"]] == ["squeezenet", "resnet50"]
    assert [(n["profile"], n["threads"]) for n in res["nodes"]][:3] == [("cpu", 1)] * 3
    assert res["window"] == 2
    assert res["rounds"] == 2
    for r in res["rows"]:
        assert r["requests"] == 3
        assert r["stages"] == 3
        assert len(r["stage_ops"]) == 3 and all(n >= 1 for n in r["stage_ops"])
        for label in ("whole", "whole_threaded", "pipeline"):
            f = r[label]
            assert set(f) >= {"p50_ms", "p95_ms", "throughput_rps", "ok", "errors", "max_abs_diff"}
            assert f["ok"] == 3 and f["errors"] == 0
            assert _positive(f["p50_ms"]) and _positive(f["p95_ms"]) and _positive(f["throughput_rps"])
            assert f["p95_ms"] >= f["p50_ms"]
            assert f["max_abs_diff"] <= 1e-3
        for key in ("p50_ratio", "throughput_ratio", "p50_ratio_threaded", "throughput_ratio_threaded"):
            assert _positive(r[key]), (key, r)
        assert r["mismatches"] == 0
        assert r["max_abs_diff"] <= 1e-3
