"""Device profiles as data, user profile files, and detection of the real host."""

from __future__ import annotations

import json

import pytest

from meshai.capabilities import (
    BUILTIN_PROFILES,
    KINDS,
    capability_from_dict,
    detect_host,
    load_profiles,
    parse_profile_list,
    resolve_profiles,
    swarm,
)
from meshai.errors import ConfigError


def test_builtin_profiles_cover_the_classes_and_precisions():
    assert set(BUILTIN_PROFILES) == set(KINDS)
    p = BUILTIN_PROFILES
    assert set(p["cpu"].flops) == {"fp32", "int8"}
    assert set(p["gpu"].flops) == {"fp32", "fp16", "int8"}
    assert set(p["npu"].flops) == {"fp32", "fp16", "int8"}
    assert p["npu"].flops["fp32"] < p["npu"].flops["fp16"] / 10  # fp32 is the NPU's slow path
    assert set(p["tpu"].flops) == {"int8"} and set(p["mcu"].flops) == {"int8"}
    assert p["mcu"].memory_bytes < 1024 * 1024  # a few hundred KiB
    assert not p["tpu"].supports("LRN") and p["tpu"].supports("Conv")
    assert p["cpu"].supports("LRN") and p["gpu"].supports("If")
    for prof in p.values():
        assert prof.active_w > prof.idle_w > 0
        assert prof.link.bandwidth_bps > 0


def test_capability_round_trip_and_summary():
    n = swarm(resolve_profiles(["gpu"]))[0]
    assert n.name == "n0"
    back = capability_from_dict(json.loads(json.dumps(n.to_dict())))
    assert back.to_dict() == n.to_dict()
    assert n.summary()["acc"] == "gpu"


def test_user_profiles_json_and_toml_with_base(tmp_path):
    j = tmp_path / "p.json"
    j.write_text(json.dumps({"jetson": {"base": "gpu", "memory_bytes": 4 * 1024**3}}))
    prof = load_profiles(j)["jetson"]
    assert prof.kind == "jetson" and prof.memory_bytes == 4 * 1024**3
    assert prof.flops == BUILTIN_PROFILES["gpu"].flops
    t = tmp_path / "p.toml"
    t.write_text('[hailo]\nbase = "npu"\nactive_w = 2.5\n')
    assert load_profiles(t)["hailo"].active_w == 2.5
    assert resolve_profiles(["cpu", "hailo"], load_profiles(t))[1].kind == "hailo"


@pytest.mark.parametrize(
    "content, match",
    [
        ("not json", "not valid"),
        ('{"x": {"base": "quantum"}}', "unknown base 'quantum'"),
        ('{"x": {"base": "cpu", "flops": {"fp64": 1}}}', "unknown precision 'fp64'"),
        ('{"x": {"base": "cpu", "memory_bytes": -1}}', "memory must be > 0"),
        ('{"x": {"flops": {"fp32": 1}}}', "missing key"),
    ],
)
def test_bad_profile_files_name_the_problem(tmp_path, content, match):
    f = tmp_path / "bad.json"
    f.write_text(content)
    with pytest.raises(ConfigError, match=match):
        load_profiles(f)


def test_profile_list_errors():
    with pytest.raises(ConfigError, match="unknown profile 'fpga'"):
        resolve_profiles(["cpu", "fpga"])
    with pytest.raises(ConfigError, match="bad --profiles"):
        parse_profile_list("cpu,,gpu")
    with pytest.raises(ConfigError, match="cannot read profiles file"):
        load_profiles("/nonexistent/profiles.json")


def test_detect_host_measures_this_machine():
    host = detect_host("me")
    assert host.kind in ("cpu", "gpu")
    assert host.emulated is False
    assert "CPUExecutionProvider" in host.providers
    assert host.profile.flops["fp32"] > 1e8  # a real measured figure, not a constant
    assert host.profile.memory_bytes > 256 * 1024**2
