"""The core modules of meshai import neither nodes/ nor scheduler/ (only the composition layer does)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMPOSITION = {
    "mesh.py",
    "cli.py",
    "planning.py",
    "bench.py",
    "sim.py",
    "batch_cli.py",
    "quantize_cli.py",
    "overflow.py",
    "bench_recovery.py",
    "chaos.py",
    "supervise.py",
    "rollouts.py",
    "sim_rollout.py",
    "sim_runtimes.py",
    "bench_runtimes.py",
    "artifacts.py",
    "rollout_client.py",
    "rollout_cli.py",
    "federate.py",
    "federate_cli.py",
    "__main__.py",
}
#: The scheduler's I/O modules: Ray actors and onnxruntime's quantizer run node executors.
SCHEDULER_IO = {"ray_backend.py", "quantize.py"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


def test_core_modules_do_not_import_nodes_or_scheduler():
    core = [p for p in (ROOT / "meshai").rglob("*.py") if p.name not in COMPOSITION]
    assert len(core) >= 8
    offenders = {str(p.relative_to(ROOT)): sorted(_imports(p) & {"nodes", "scheduler"}) for p in core}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_scheduler_is_pure_and_only_ray_backend_touches_ray():
    for p in (ROOT / "scheduler").rglob("*.py"):
        imps = _imports(p)
        if p.name in SCHEDULER_IO:
            assert "ray" not in imps or p.name == "ray_backend.py", p
            continue
        assert "nodes" not in imps, p
        assert not imps & {"socket", "asyncio", "subprocess", "onnxruntime"}, p
        assert "ray" not in imps, p
    for p in (ROOT / "scheduler").rglob("*.py"):  # nothing else in scheduler/ imports ray_backend
        if p.name not in SCHEDULER_IO:
            assert "scheduler.ray_backend" not in p.read_text(), p
            assert "scheduler.quantize" not in p.read_text(), p  # the planner reads figures, never measures
