"""``meshai plan`` and ``meshai bench plan`` as a user runs them (a real subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def meshai(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshai", *args], capture_output=True, text=True, timeout=timeout
    )


def test_plan_json_matches_the_interface():
    r = meshai(
        "plan",
        "squeezenet",
        "--profiles",
        "cpu,gpu,npu",
        "--objective",
        "throughput",
        "--stages",
        "3",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["objective"] == "throughput"
    assert [s["id"] for s in d["stages"]] == [0, 1, 2]
    assert sorted(s["node"] for s in d["stages"]) == ["n0", "n1", "n2"]
    for s in d["stages"]:
        assert {"id", "node", "accelerator", "precision", "ops", "inputs", "outputs", "predicted_ms"} <= set(
            s
        )
    assert set(d["predicted"]) == {"latency_ms", "bottleneck_ms", "transfer_bytes", "energy_mj"}


def test_plan_check_runs_stages_and_reports_diff():
    r = meshai("plan", "resnet50", "--stages", "3", "--check", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["max_abs_diff"] < 1e-5


def test_plan_table_for_people():
    r = meshai("plan", "squeezenet", "--stages", "2")
    assert r.returncode == 0, r.stderr
    assert "stage" in r.stdout and "predicted ms" in r.stdout and "bytes out" in r.stdout
    assert "n0" in r.stdout


def test_plan_pin_is_honoured():
    r = meshai("plan", "squeezenet", "--pin", "data_0=n2", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert [s["node"] for s in d["stages"] if "data_0" in s["inputs"]] == ["n2"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["plan", "nosuchmodel"], "unknown model 'nosuchmodel'"),
        (["plan", "/nonexistent/x.onnx"], "does not exist"),
        (["plan", "squeezenet", "--profiles", "cpu,warp"], "unknown profile 'warp'"),
        (["plan", "squeezenet", "--stages", "5"], "--stages 5 needs 5 nodes"),
        (["plan", "squeezenet", "--profiles", "tpu"], "no node can run any variant"),
        (["plan", "squeezenet", "--pin", "data_0"], "bad --pin"),
        (["plan", "squeezenet", "--stages", "zero"], "expected a positive integer"),
    ],
)
def test_bad_input_is_one_clear_line(args, message):
    r = meshai(*args)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert message in lines[0]
    assert "Traceback" not in r.stderr


def test_corrupt_model_file(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 10)
    r = meshai("plan", str(bad))
    assert r.returncode == 1
    assert "not a valid ONNX file" in r.stderr and "Traceback" not in r.stderr


def test_bench_plan_json():
    r = meshai("bench", "plan", "--cases", "20", "--repeats", "2", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert {"plan_ms", "worst_ratio", "mean_ratio", "cases"} <= set(d)
    assert d["cases"] == 20 and d["ops"] > 600
    assert d["worst_ratio"] >= 1 - 1e-6 and d["mean_ratio"] >= 1 - 1e-6
