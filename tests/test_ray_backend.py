"""The Ray backend on a real, embedded local Ray (127.0.0.1): batches equal the local onnxruntime run
in order, a killed actor loses and duplicates nothing, asyncio inference, the ``batch`` CLI, and lazy
import of Ray.  One module-scoped backend saves Ray's start-up (2–3 s, ~700 MiB)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from meshai.models import load_model, resolve_model
from meshai.tensors import load_npz, random_inputs, request_slices, save_npz

pytestmark = pytest.mark.ray
pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[1]
REQUESTS = 64


@pytest.fixture(scope="module")
def model_bytes() -> bytes:
    return resolve_model("squeezenet").read_bytes()


@pytest.fixture(scope="module")
def stacked() -> dict[str, np.ndarray]:
    return random_inputs(load_model("squeezenet"), requests=REQUESTS, seed=7)


@pytest.fixture(scope="module")
def local_outputs(model_bytes: bytes, stacked: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    from nodes.executor import StageSession

    s = StageSession(model_bytes)
    return [s.run(r) for r in request_slices(stacked)]


@pytest.fixture(scope="module")
def ray_model(model_bytes: bytes) -> Iterator[Any]:
    from scheduler.ray_backend import RayBackend

    with RayBackend(num_cpus=2, actors=2) as backend:
        # the embedded cluster must bind to loopback only (ARCHITECTURE.md, network rules)
        assert {n["NodeManagerAddress"] for n in backend.ray.nodes()} == {"127.0.0.1"}
        yield backend.load(model_bytes)


def _assert_equal(got: list[dict[str, np.ndarray]], want: list[dict[str, np.ndarray]]) -> None:
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert set(g) == set(w), i
        for k in w:
            np.testing.assert_array_equal(g[k], w[k], err_msg=f"request {i}, output {k}")


def test_batch_equals_local_in_order(
    ray_model: Any, stacked: dict[str, np.ndarray], local_outputs: Any
) -> None:
    done: list[int] = []
    got = ray_model.run_batch(request_slices(stacked), chunk=8, progress=done.append)
    _assert_equal(got, local_outputs)
    assert sum(done) == REQUESTS
    assert ray_model.last_stats.chunks == 8 and ray_model.last_stats.retried_chunks == 0


def test_killed_actor_loses_and_duplicates_nothing(
    ray_model: Any, stacked: dict[str, np.ndarray], local_outputs: Any
) -> None:
    before = list(ray_model.actors)
    ray_model.kill_one_actor_after(2)
    done: list[int] = []
    got = ray_model.run_batch(request_slices(stacked), chunk=4, progress=done.append)
    _assert_equal(got, local_outputs)
    assert sum(done) == REQUESTS  # every chunk counted exactly once
    stats = ray_model.last_stats
    assert stats.retried_chunks >= 1 and stats.replaced_actors == 1
    assert sum(a is b for a, b in zip(before, ray_model.actors, strict=True)) == len(before) - 1


def test_infer_from_asyncio(ray_model: Any, stacked: dict[str, np.ndarray], local_outputs: Any) -> None:
    reqs = request_slices(stacked)[:4]

    async def go() -> list[dict[str, np.ndarray]]:
        return list(await asyncio.gather(*(ray_model.infer(r) for r in reqs)))

    _assert_equal(asyncio.run(go()), local_outputs[:4])
    _assert_equal([ray_model.submit(reqs[1]).result(timeout=60)], local_outputs[1:2])


def test_model_error_is_not_retried(ray_model: Any) -> None:
    from meshai.errors import InferenceError

    with pytest.raises(InferenceError, match="dtype"):
        ray_model.run_batch([{"data_0": np.zeros((1, 3, 224, 224), np.float64)}], chunk=1)


def test_cli_batch_on_ray_equals_local(
    tmp_path: Path, stacked: dict[str, np.ndarray], local_outputs: Any, ray_model: Any
) -> None:
    # ray_model keeps the embedded Ray of this module alive; the CLI starts its own in a subprocess
    inp, out = tmp_path / "in.npz", tmp_path / "out.npz"
    save_npz(inp, {k: v[:32] for k, v in stacked.items()})
    env = {**os.environ, "MESHAI_PROGRESS": "0"}
    cmd = [sys.executable, "-m", "meshai", "batch", "squeezenet", "--inputs", str(inp)]
    cmd += ["--outputs", str(out), "--backend", "ray", "--chunk", "8", "--actors", "1", "--num-cpus", "1"]
    proc = subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["requests"] == 32 and report["backend"] == "ray" and report["chunks"] == 4
    assert report["throughput_rps"] > 0 and report["retried_chunks"] == 0
    _assert_equal(request_slices(load_npz(out)), local_outputs[:32])


def test_cli_local_backend_from_directory(
    tmp_path: Path, stacked: dict[str, np.ndarray], local_outputs: Any
) -> None:
    from meshai.cli import main

    d = tmp_path / "in"
    d.mkdir()
    save_npz(d / "b.npz", {k: v[3:6] for k, v in stacked.items()})
    save_npz(d / "a.npz", {k: v[:3] for k, v in stacked.items()})
    out = tmp_path / "out.npz"
    assert main(["batch", "squeezenet", "--inputs", str(d), "--outputs", str(out), "--backend", "local"]) == 0
    _assert_equal(request_slices(load_npz(out)), local_outputs[:6])
    assert main(["batch", "squeezenet", "--inputs", str(tmp_path / "nope"), "--outputs", str(out)]) == 1


def test_import_does_not_import_ray() -> None:
    code = (
        "import sys, scheduler.ray_backend as rb, meshai.batch_cli\n"
        "assert 'ray' not in sys.modules, 'imported ray'\n"
        "b = rb.RayBackend(actors=3)\n"
        "assert 'ray' not in sys.modules, 'constructing imported ray'\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


# ------------------------------------------------------------------ overflow: swarm or Ray per request


class LocalRunner:
    """The swarm's side of the router in-process: the whole model on onnxruntime in a worker thread;
    requests whose index is in ``fail`` raise InferenceError, as a failed stage would."""

    def __init__(self, model_bytes: bytes, reqs: list[dict[str, np.ndarray]], fail: set[int]) -> None:
        from nodes.executor import StageSession

        self.session = StageSession(model_bytes)
        self.index = {id(r): i for i, r in enumerate(reqs)}
        self.fail = fail
        self.calls = 0

    async def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from meshai.errors import InferenceError

        self.calls += 1
        if self.index[id(inputs)] in self.fail:
            raise InferenceError(f"request {self.index[id(inputs)]} failed on the swarm")
        return await asyncio.to_thread(self.session.run, inputs)


def test_overflow_burst_spills_exactly_past_threshold(
    ray_model: Any, model_bytes: bytes, stacked: dict[str, np.ndarray], local_outputs: Any
) -> None:
    """A burst of 24 with threshold 5: the first 5 find room on the swarm, the other 19 go to Ray; every
    request has exactly one result, equal to the whole model's, in input order."""
    from meshai.overflow import OverflowRouter
    from scheduler.offload import OffloadPolicy

    reqs = request_slices(stacked)[:24]
    swarm = LocalRunner(model_bytes, reqs, fail=set())
    router = OverflowRouter(swarm, ray_model, OffloadPolicy(queue_threshold=5))
    finished: list[int] = []
    rep = asyncio.run(router.run(reqs, on_result=lambda: finished.append(1)))
    _assert_equal(rep.results, local_outputs[:24])  # type: ignore[arg-type]
    assert rep.routed == {"swarm": 5, "ray": 19} and rep.completed == rep.routed
    assert rep.rules == {"local": 5, "overflow": 19}
    assert swarm.calls == 5 and len(finished) == 24 and router.queued == 0
    assert rep.ok == 24 and rep.throughput_rps() > 0
    assert rep.latency_ms("ray")["p50"] > 0 and rep.latency_ms("swarm")["p50"] > 0


def test_overflow_at_a_rate_accounts_every_request_once(
    ray_model: Any, model_bytes: bytes, stacked: dict[str, np.ndarray], local_outputs: Any
) -> None:
    """Requests arriving at a rate: however they split, routed = completed = all, and a request that fails
    on the swarm is one error result, not a lost or repeated request."""
    from meshai.errors import InferenceError
    from meshai.overflow import OverflowRouter
    from scheduler.offload import OffloadPolicy

    reqs = request_slices(stacked)[:20]
    swarm = LocalRunner(model_bytes, reqs, fail={0})
    rep = asyncio.run(
        OverflowRouter(swarm, ray_model, OffloadPolicy(queue_threshold=2)).run(reqs, rate=200.0)
    )
    assert rep.routed["swarm"] + rep.routed["ray"] == 20 and rep.completed == rep.routed
    assert rep.routed["swarm"] >= 2  # request 0 (and 1) always find an empty swarm
    assert isinstance(rep.results[0], InferenceError) and rep.ok == 19
    _assert_equal(rep.results[1:], local_outputs[1:20])  # type: ignore[arg-type]
