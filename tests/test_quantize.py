"""Static INT8 (QDQ): the digits case meets its goals (≥ 3.5× smaller, ≤ 1 point of accuracy lost),
``meshai quantize`` and ``meshai digits`` work end to end, the saved ranges quantize stages that chain
to exactly the whole int8 model, bad input is one clean error line; ``scheduler.quantize`` helpers."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from runtime_helpers import assert_one_line_error, meshai

from meshai.cnn import small_cnn
from meshai.digits import DigitsCase, train_digits
from meshai.errors import ConfigError
from meshai.tensors import load_npz, random_inputs, request_slices, save_npz
from scheduler.extract import extract_cut
from scheduler.graph import build_graph, normalize_model
from scheduler.quantize import (
    Calibration,
    accuracy_pts,
    calibrate,
    drop_pts,
    quantize,
    run_model,
    top1,
)

pytestmark = pytest.mark.timeout(120)

Feeds = dict[str, np.ndarray]


@dataclass
class Int8Digits:
    case: DigitsCase
    fp32: onnx.ModelProto  # normalized, as meshai quantize and the planner see it
    int8: onnx.ModelProto
    cal: Calibration
    samples: list[Feeds]  # the held-out eval split
    labels: np.ndarray


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Int8Digits:
    case = train_digits(tmp_path_factory.mktemp("digits"), seed=0)
    fp32 = normalize_model(onnx.load(str(case.model)))
    cal = calibrate(fp32, request_slices(load_npz(case.calibration)))
    return Int8Digits(
        case,
        fp32,
        quantize(fp32, cal),
        cal,
        request_slices(load_npz(case.eval)),
        load_npz(case.labels, ["labels"])["labels"],
    )


def _file_bytes(model: onnx.ModelProto, path: Path) -> int:
    onnx.save(model, str(path))
    return path.stat().st_size


# ------------------------------------------------------------------------------------ the goals


def test_the_digits_case_is_a_real_held_out_split(digits: Int8Digits) -> None:
    case = digits.case
    cal, ev = load_npz(case.calibration), load_npz(case.eval)
    assert list(cal) == ["pixels"] and list(ev) == ["pixels"]
    assert cal["pixels"].shape == (200, 1, 64) and cal["pixels"].dtype == np.float32
    assert ev["pixels"].shape == (case.eval_samples, 1, 64) and 0.25 * 1797 <= case.eval_samples <= 0.3 * 1797
    assert float(ev["pixels"].min()) >= 0.0 and float(ev["pixels"].max()) <= 1.0
    assert digits.labels.shape == (case.eval_samples,) and set(digits.labels.tolist()) == set(range(10))
    assert case.fp32_accuracy >= 95.0
    assert accuracy_pts(run_model(digits.fp32, digits.samples), digits.labels) == pytest.approx(
        case.fp32_accuracy, abs=1e-3
    )


def test_int8_digits_is_at_least_3_5x_smaller_and_loses_at_most_one_point(
    digits: Int8Digits, tmp_path: Path
) -> None:
    ratio = _file_bytes(digits.fp32, tmp_path / "fp32.onnx") / _file_bytes(
        digits.int8, tmp_path / "int8.onnx"
    )
    assert ratio >= 3.5
    ref, got = run_model(digits.fp32, digits.samples), run_model(digits.int8, digits.samples)
    assert drop_pts(ref, got, digits.labels) <= 1.0
    assert accuracy_pts(got, digits.labels) >= 95.0
    assert {n.op_type for n in digits.int8.graph.node} >= {"QuantizeLinear", "DequantizeLinear", "Gemm"}
    assert any(t.data_type == onnx.TensorProto.INT8 for t in digits.int8.graph.initializer)


def test_training_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    a = train_digits(tmp_path / "a", seed=3, hidden=(16,))
    b = train_digits(tmp_path / "b", seed=3, hidden=(16,))
    c = train_digits(tmp_path / "c", seed=4, hidden=(16,))
    for name in ("digits.onnx", "calibration.npz", "eval.npz", "labels.npz"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert a.fp32_accuracy == b.fp32_accuracy
    assert (tmp_path / "a" / "digits.onnx").read_bytes() != (tmp_path / "c" / "digits.onnx").read_bytes()
    assert c.fp32_accuracy > 80.0


def test_without_scikit_learn_the_digits_case_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import fails as if it were not installed
    with pytest.raises(ConfigError, match=r"pip install 'meshai\[examples\]'"):
        train_digits(tmp_path)


# ------------------------------------------------------------------------- stages from saved ranges


def _chain(stages: Sequence[onnx.ModelProto], samples: Sequence[Feeds]) -> list[Feeds]:
    """Every sample through the stage models in order, each stage fed what it names from earlier ones."""
    known = [dict(s) for s in samples]
    for m in stages:
        names = [i.name for i in m.graph.input]
        feeds = [{n: k[n] for n in names} for k in known]
        for k, out in zip(known, run_model(m, feeds), strict=True):
            k.update(out)
    return [{o.name: k[o.name] for o in stages[-1].graph.output} for k in known]


@pytest.fixture(scope="module")
def saved_cal(digits: Int8Digits, tmp_path_factory: pytest.TempPathFactory) -> Calibration:
    path = tmp_path_factory.mktemp("cal") / "digits.calibration.json"
    digits.cal.save(path)
    return Calibration.load(path)


def test_the_calibration_round_trips_and_requantizes_the_same_model(
    digits: Int8Digits, saved_cal: Calibration
) -> None:
    assert json.loads(saved_cal.data) == json.loads(digits.cal.data)
    assert (saved_cal.per_channel, saved_cal.samples) == (False, 200)
    assert quantize(digits.fp32, saved_cal).SerializeToString() == digits.int8.SerializeToString()


@pytest.mark.parametrize(
    "cut",
    [
        "relu1",
        "relu2",
        "fc1",  # between a Gemm and its Relu: exact because the quantizer keeps the Relu
    ],
)
def test_int8_stages_quantized_from_saved_ranges_chain_to_exactly_the_whole_int8_model(
    digits: Int8Digits, saved_cal: Calibration, cut: str
) -> None:
    graph = build_graph(digits.fp32, "digits")
    first = extract_cut(digits.fp32, graph, ["pixels"], [cut], "s0")
    second = extract_cut(digits.fp32, graph, [cut], ["logits"], "s1")
    stages = [quantize(first, saved_cal), quantize(second, saved_cal)]
    whole = run_model(digits.int8, digits.samples)
    chained = _chain(stages, digits.samples)
    for w, c in zip(whole, chained, strict=True):
        np.testing.assert_array_equal(w["logits"], c["logits"])


# -------------------------------------------------------------------------------------- the CLI


def test_meshai_quantize_json_end_to_end(digits: Int8Digits, tmp_path: Path) -> None:
    case = digits.case
    out = tmp_path / "digits.int8.onnx"
    r = meshai(
        "quantize", str(case.model), "--calibration", str(case.calibration), "-o", str(out),
        "--eval", str(case.eval), "--labels", str(case.labels), "--timing-samples", "50", "--json",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    for key in ("model", "output", "fp32_bytes", "int8_bytes", "size_ratio", "fp32_ms", "int8_ms", "speedup"):
        assert rep[key] is not None, key
    assert rep["model"] == "digits" and rep["output"] == str(out) and rep["format"] == "qdq"
    assert rep["fp32_bytes"] == case.model.stat().st_size and rep["int8_bytes"] == out.stat().st_size
    assert rep["size_ratio"] == pytest.approx(rep["fp32_bytes"] / rep["int8_bytes"], rel=1e-3)
    assert rep["size_ratio"] >= 3.5
    assert rep["fp32_ms"] > 0 and rep["int8_ms"] > 0
    assert rep["speedup"] == pytest.approx(rep["fp32_ms"] / rep["int8_ms"], rel=0.02)
    assert rep["fp32_accuracy"] == pytest.approx(case.fp32_accuracy, abs=1e-3)
    assert rep["accuracy_delta_pts"] == pytest.approx(rep["fp32_accuracy"] - rep["int8_accuracy"], abs=1e-3)
    assert rep["accuracy_delta_pts"] <= 1.0
    assert rep["agreement_pts"] >= 98.0 and rep["agreement_on"] == "eval"
    # onnxruntime loads the written model, and its outputs are close to fp32's
    sess = ort.InferenceSession(out.read_bytes(), providers=["CPUExecutionProvider"])
    x = load_npz(case.eval)["pixels"][:, 0, :]
    got = sess.run(["logits"], {"pixels": x})[0]
    want = np.concatenate([o["logits"] for o in run_model(digits.fp32, digits.samples)])
    assert np.mean(np.argmax(got, 1) == np.argmax(want, 1)) >= 0.98
    assert float(np.max(np.abs(got - want))) < 0.1 * float(np.max(np.abs(want)))
    # the ranges land next to OUT and quantize the model again to the same bytes
    cal = Calibration.load(tmp_path / "digits.int8.calibration.json")
    assert cal.samples == 200 and not cal.per_channel
    assert quantize(digits.fp32, cal).SerializeToString() == out.read_bytes()


def test_meshai_quantize_table_and_per_channel_without_eval(digits: Int8Digits, tmp_path: Path) -> None:
    data = tmp_path / "data"  # a directory of npz: samples concatenated in name order
    data.mkdir()
    pixels = load_npz(digits.case.calibration)["pixels"]
    save_npz(data / "a.npz", {"pixels": pixels[:120]})
    save_npz(data / "b.npz", {"pixels": pixels[120:]})
    r = meshai(
        "quantize", str(digits.case.model), "--calibration", str(data), "-o", str(tmp_path / "q.onnx"),
        "--per-channel", "--calibration-out", str(tmp_path / "ranges.json"), "--timing-samples", "20",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "per-channel" in r.stdout and "file size" in r.stdout and "agreement" in r.stdout
    cal = Calibration.load(tmp_path / "ranges.json")
    assert cal.per_channel and cal.samples == 200
    assert onnx.load(str(tmp_path / "q.onnx")).graph.output[0].name == "logits"


def test_meshai_digits_json_writes_the_case(tmp_path: Path) -> None:
    r = meshai("digits", str(tmp_path / "case"), "--seed", "1", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    for key in ("model", "calibration", "eval", "labels"):
        assert Path(rep[key]).is_file(), key
    assert Path(rep["model"]).name == "digits.onnx"
    assert rep["fp32_accuracy"] >= 95.0


@pytest.fixture(scope="module")
def bad_files(digits: Int8Digits, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("bad")
    save_npz(d / "other.npz", {"image": np.zeros((3, 1, 64), np.float32)})
    save_npz(d / "labels5.npz", {"labels": np.zeros(5, np.int64)})
    save_npz(d / "rank.npz", {"pixels": np.zeros((3, 64), np.float32)})
    (d / "not.onnx").write_text("hello, not a model")
    return d


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["{d}/missing.onnx", "--calibration", "{cal}"], ["missing.onnx", "does not exist"]),
        (["{model}", "--calibration", "{d}/missing.npz"], ["--calibration", "missing.npz"]),
        (["{model}", "--calibration", "{d}/other.npz"], ["other.npz", "'pixels'"]),
        (["{model}", "--calibration", "{d}/rank.npz"], ["rank.npz", "'pixels'", "rank"]),
        (
            ["{model}", "--calibration", "{cal}", "--eval", "{eval}", "--labels", "{d}/labels5.npz"],
            ["5 labels"],
        ),
        (["{model}", "--calibration", "{cal}", "--labels", "{labels}"], ["--labels needs --eval"]),
        (["{d}/not.onnx", "--calibration", "{cal}"], ["not.onnx", "not a valid ONNX"]),
    ],
    ids=[
        "missing-model",
        "missing-data",
        "lacks-input",
        "wrong-rank",
        "label-count",
        "labels-no-eval",
        "not-onnx",
    ],
)
def test_bad_input_is_one_clean_error_line(
    digits: Int8Digits, bad_files: Path, args: list[str], fragments: list[str]
) -> None:
    case = digits.case
    paths = {
        "d": bad_files,
        "model": case.model,
        "cal": case.calibration,
        "eval": case.eval,
        "labels": case.labels,
    }
    out = bad_files / "out.onnx"
    r = meshai("quantize", *[a.format(**paths) for a in args], "-o", str(out), timeout=60)
    assert_one_line_error(r, *fragments)
    assert not out.exists()


# ------------------------------------------------------------------------------------ the bench


@pytest.mark.slow
def test_meshai_bench_quantize_json_has_the_documented_keys() -> None:
    r = meshai("bench", "quantize", "--json", timeout=110)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    rows = {row["model"]: row for row in res["rows"]}
    assert set(rows) == {"digits", "small_cnn"}
    for row in rows.values():
        for key in ("size_ratio", "fp32_ms", "int8_ms", "agreement_pts", "per_channel"):
            assert isinstance(row[key], int | float), key
        assert row["size_ratio"] >= 3.5 and row["fp32_ms"] > 0 and row["int8_ms"] > 0
        assert "accuracy_delta_pts" in row and len(row["variants"]) == 2
    assert rows["digits"]["accuracy_delta_pts"] <= 1.0
    assert rows["small_cnn"]["accuracy_delta_pts"] is None


# ------------------------------------------------------------------------------------ the CNN


def test_small_cnn_has_real_weights_and_input_dependent_predictions() -> None:
    model = small_cnn(seed=0)
    assert model.SerializeToString() == small_cnn(seed=0).SerializeToString()
    assert model.SerializeToString() != small_cnn(seed=1).SerializeToString()
    assert 200_000 < len(model.SerializeToString()) < 4_000_000
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    assert len(np.unique(weights["conv2.weight"])) > 10_000
    samples = request_slices(random_inputs(model, requests=40, seed=5))
    assert len(set(top1(run_model(model, samples)).tolist())) >= 4


# ------------------------------------------------------------------------ scheduler.quantize helpers


def _out(*rows: Sequence[float]) -> dict[str, np.ndarray]:
    return {"y": np.asarray(rows, np.float32)}


def test_top1_gives_one_class_per_row_of_batched_samples() -> None:
    outs = [_out([0, 1, 0], [5, 1, 0]), _out([0, 0, 2])]
    assert top1(outs).tolist() == [1, 0, 2]
    assert top1([{"a": np.zeros((1, 2)), "b": np.array([[0.0, 1.0]])}], "b").tolist() == [1]
    assert top1([]).size == 0


def test_drop_pts_with_labels_is_the_accuracy_delta_and_without_the_disagreement() -> None:
    ref = [_out([0, 1], [1, 0]), _out([0, 1], [1, 0])]  # predicts 1, 0, 1, 0
    got = [_out([0, 1], [0, 1]), _out([1, 0], [1, 0])]  # predicts 1, 1, 0, 0
    labels = np.array([1, 1, 1, 1])
    assert accuracy_pts(ref, labels) == 50.0 and accuracy_pts(got, labels) == 50.0
    assert drop_pts(ref, got, labels) == 0.0
    assert drop_pts(ref, got) == 50.0
    assert drop_pts(ref, got, np.array([1, 0, 1, 0])) == 50.0
    assert drop_pts(ref, got, np.array([1, 1, 0, 0])) == -50.0
    with pytest.raises(ConfigError, match="3 labels for 4 predictions"):
        accuracy_pts(ref, np.array([1, 0, 1]))


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"[]",
        b'{"ranges": {}}',
        b'{"ranges": [], "per_channel": false}',
        b'{"per_channel": 1}',
    ],
)
def test_calibration_from_bytes_rejects_garbage(raw: bytes) -> None:
    with pytest.raises(ConfigError, match="not a meshai calibration"):
        Calibration.from_bytes(raw)


def test_calibration_load_of_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read calibration"):
        Calibration.load(tmp_path / "nope.json")
