"""LiteRT backend: real onnx2tf conversions (in ``.venv-convert``, ``make convert-env``) of stages cut
with ``scheduler.extract``, run with ai-edge-litert beside onnxruntime on the same ONNX stage.

Inputs are real: stage k gets what stages 0..k-1 computed on onnxruntime from standard-normal images.
fp32 agrees within 1e-4.  fp16 (float16 weights, float32 at the boundary) was measured at most 1.9e-3
(small CNN, activations up to ~7) and 7e-4 (squeezenet stage); ``FP16_TOL`` allows about five times
that.  All conversions run once per module, in parallel (about 16 s on 2 cores)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from meshai.cnn import small_cnn
from meshai.errors import ConfigError, InferenceError, ModelError
from meshai.litert_convert import CONVERT_ENV, converter_unavailable, to_tflite
from meshai.models import load_model
from nodes.executor import StageSession
from nodes.executors.base import StageRunner
from nodes.executors.litert import LiteRtSession
from scheduler.extract import extract_assignment
from scheduler.graph import build_graph, normalize_model

FP32_TOL = 1e-4
FP16_TOL = 1e-2  # measured ≤ 1.9e-3
CNN_STAGES = 3
SQUEEZENET_OPS = 10  # the squeezenet stage: its first ten compute ops (conv1 … fire2 concat)
CALIBRATION = "calibration_image_sample_data_20x128x128x3_float32.npy"


def cut(model: onnx.ModelProto, assignment: list[int]) -> list[onnx.ModelProto]:
    """The stage models of ``assignment`` (a stage per compute op), as ``scheduler.extract`` cuts them."""
    model = normalize_model(model)
    _, models = extract_assignment(model, build_graph(model, name=model.graph.name or "m"), assignment)
    return models


def chained_feeds(stages: list[onnx.ModelProto], batch: int) -> list[dict[str, np.ndarray]]:
    """Per stage, the tensors it reads, computed by the earlier stages on onnxruntime."""
    first = StageSession(stages[0])
    shape = [d if isinstance(d, int) else batch for d in first.input_shapes[first.input_names[0]] or ()]
    env = {first.input_names[0]: np.random.default_rng(7).standard_normal(shape).astype(np.float32)}
    out = []
    for m in stages:
        sess = StageSession(m)
        feeds = {n: env[n] for n in sess.input_names}
        out.append(feeds)
        env.update(sess.run(feeds))
    return out


@pytest.fixture(scope="module")
def stages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The CNN's stages and the squeezenet stage, each with its feeds, ONNX outputs and both .tflite."""
    why = converter_unavailable()
    if why:
        pytest.fail(why)
    n = 10  # small_cnn's compute ops
    cnn = cut(small_cnn(0), [min(CNN_STAGES - 1, p * CNN_STAGES // n) for p in range(n)])
    sq_model = load_model("squeezenet")
    sq_ops = len(build_graph(normalize_model(sq_model), name="squeezenet").ops)
    squeeze = cut(sq_model, [0 if p < SQUEEZENET_OPS else 1 for p in range(sq_ops)])[:1]
    models = {f"cnn{k}": m for k, m in enumerate(cnn)} | {"squeezenet0": squeeze[0]}
    feeds = dict(zip(list(models)[:-1], chained_feeds(cnn, batch=2), strict=True))
    feeds["squeezenet0"] = chained_feeds(squeeze, batch=1)[0]
    work = tmp_path_factory.mktemp("convert")
    first = next(iter(models))

    def convert(key: str) -> bytes:  # one onnx2tf process per stage, in parallel; one keeps its files
        return to_tflite(models[key], "fp32", work if key == first else None)

    with ThreadPoolExecutor(len(models)) as pool:
        tflite = {(k, "fp32"): b for k, b in zip(models, pool.map(convert, models), strict=True)}
    tflite |= {(k, "fp16"): to_tflite(m, "fp16") for k, m in models.items()}  # made by the same runs
    return {
        "models": models,
        "feeds": feeds,
        "want": {k: StageSession(m, name=k).run(feeds[k]) for k, m in models.items()},
        "tflite": tflite,
        "work": work,
    }


def runner(stages: dict[str, Any], key: str, precision: str) -> LiteRtSession:
    return LiteRtSession(stages["tflite"][(key, precision)], stages["models"][key], name=key)


def worst(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> float:
    assert set(got) == set(want)
    for k in want:
        assert got[k].shape == want[k].shape and got[k].dtype == want[k].dtype, k
    return max(float(np.abs(got[k] - want[k]).max()) for k in want)


@pytest.mark.parametrize("key", ["cnn0", "cnn1", "cnn2", "squeezenet0"])
@pytest.mark.parametrize(("precision", "tol"), [("fp32", FP32_TOL), ("fp16", FP16_TOL)])
def test_litert_matches_onnxruntime(stages: dict[str, Any], key: str, precision: str, tol: float) -> None:
    diff = worst(runner(stages, key, precision).run(stages["feeds"][key]), stages["want"][key])
    print(f"{key} {precision}: max abs diff {diff:.3g}")
    assert diff <= tol


def test_runner_interface_and_layout(stages: dict[str, Any]) -> None:
    first, last = runner(stages, "cnn0", "fp32"), runner(stages, "cnn2", "fp16")
    assert isinstance(first, StageRunner) and first.runtime == "litert"
    assert (first.input_names, first.output_names) == (("image",), ("relu2",))
    ins, outs = last.bindings
    assert [(b.onnx_name, b.tflite_name, b.transpose) for b in (*ins, *outs)] == [
        ("relu3", "relu3", True),  # [N,128,16,16] ↔ [N,16,16,128]
        ("logits", "logits", False),  # 2-D passes as it is
    ]
    first.warmup(batch=3, runs=2)  # a free batch: the interpreter resizes to the feed
    image = stages["feeds"]["cnn0"]["image"][:1]
    assert (
        worst(first.run({"image": image}), StageSession(stages["models"]["cnn0"]).run({"image": image}))
        <= FP32_TOL
    )


def test_bad_feeds_fail_as_onnxruntime_does(stages: dict[str, Any]) -> None:
    lite, ort = runner(stages, "cnn1", "fp32"), StageSession(stages["models"]["cnn1"], name="cnn1")
    good = stages["feeds"]["cnn1"]["relu2"]
    for bad in (
        {"relu2": good.astype(np.float64)},
        {"relu2": good[:, :32]},
        {"relu2": good[0]},
        {},
        {"relu2": good, "extra": good},
        {"relu2": good.tolist()},
    ):
        with pytest.raises(InferenceError) as lite_err:
            lite.run(bad)
        with pytest.raises(InferenceError) as ort_err:
            ort.run(bad)
        assert str(lite_err.value) == str(ort_err.value)
        assert str(lite_err.value).startswith("cnn1: ") and "\n" not in str(lite_err.value)


def test_corrupt_or_mismatched_tflite(stages: dict[str, Any]) -> None:
    good = stages["tflite"][("cnn0", "fp32")]
    for data in (b"", b"not a flatbuffer" * 64, good[: len(good) // 2]):
        with pytest.raises(InferenceError, match=r"^s: LiteRT cannot load the \.tflite: [^\n]+$"):
            LiteRtSession(data, stages["models"]["cnn0"], name="s")
    with pytest.raises(InferenceError, match=r"^s: ONNX input 'relu2' \[.*\] does not fit \.tflite tensor"):
        LiteRtSession(good, stages["models"]["cnn1"], name="s")  # stage 0's tflite for stage 1


def test_conversion_writes_its_own_calibration_sample(stages: dict[str, Any]) -> None:
    sample = np.load(Path(stages["work"]) / CALIBRATION)
    assert sample.shape == (20, 128, 128, 3) and sample.dtype == np.float32


def test_converter_unavailable_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHAI_CONVERT_PYTHON", "/nonexistent")
    why = converter_unavailable()
    assert "/nonexistent" in why and "make convert-env" in why
    with pytest.raises(ConfigError, match=r"^small_cnn: cannot convert to \.tflite: .*make convert-env"):
        to_tflite(small_cnn(11), "fp32")
    monkeypatch.delenv("MESHAI_CONVERT_PYTHON")
    assert converter_unavailable() == "" and (CONVERT_ENV / "bin" / "python").exists()


def test_conversion_errors_are_one_line(stages: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="precision must be one of fp32, fp16, got 'int8'"):
        to_tflite(stages["models"]["cnn0"], "int8")
    with pytest.raises(ModelError, match=r"^small_cnn: onnx2tf took over 0.5 s$"):
        to_tflite(small_cnn(12), timeout_s=0.5)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    node = helper.make_node("NoSuchOp", ["x"], ["y"], domain="example.custom")
    odd = helper.make_model(
        helper.make_graph([node], "odd_stage", [x], [y]),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("example.custom", 1)],
    )
    with pytest.raises(ModelError, match=r"^odd_stage: onnx2tf could not convert it: [^\n]+$"):
        to_tflite(odd)
