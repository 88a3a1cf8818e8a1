"""The client side of rollouts and A/B tests of long-lived deployments (``meshai rollout``, ``meshai ab``).

The new version travels as a signed package: it is uploaded to every stage-capable node and to the
deployment's entry (each verifies it against the fleet key and stores it), then the entry is asked to
run the rollout or the A/B test (``nodes/versions.py``).  An operator's rollback after a rollout
completed carries a rollback instruction signed here with the fleet key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from meshai.errors import ConfigError, DeploymentError
from meshai.packages import compare_versions, parse_package_ref

if TYPE_CHECKING:
    from meshai.mesh import Mesh
    from scheduler.rollout import RolloutConfig

__all__ = ["ab_action", "rollout_action", "start_ab", "start_rollout"]


async def _hand_out(mesh: Mesh, dep: Mapping[str, Any], package: tuple[bytes, str], *, newer: bool) -> str:
    """Check ``package`` is another version of what ``dep`` runs (a newer one if ``newer``), upload it
    to every stage node and the entry; its version."""
    name, version = parse_package_ref(package[1])
    current = str(dep.get("package") or "")
    if not current:
        raise DeploymentError(
            f"deployment {dep['name']!r} was not deployed from a signed package: it has no versions to switch"
        )
    cur_name, cur_version = parse_package_ref(current)
    if name != cur_name:
        raise DeploymentError(
            f"package {package[1]} is not a version of {current}, which {dep['name']!r} runs"
        )
    if newer and compare_versions(version, cur_version) <= 0:
        raise DeploymentError(
            f"package {package[1]} is not newer than {current}, which {dep['name']!r} runs "
            "(to go back, use 'meshai rollout rollback' with the fleet key)"
        )
    if version == cur_version:
        raise DeploymentError(f"deployment {dep['name']!r} already runs {package[1]}")
    await mesh.upload(package, sorted({*mesh.stage_nodes(), str(dep["entry"])}))
    return version


async def _ask(
    mesh: Mesh, entry: str, op: str, body: dict[str, Any], timeout: float = 300.0
) -> dict[str, Any]:
    reply = await mesh.pool.control(entry, op, body, timeout=timeout)
    if not reply.ok:
        raise DeploymentError(str(reply.body.get("error", f"{op} refused by {entry!r}")))
    return dict(reply.body)


async def start_rollout(
    mesh: Mesh,
    deployment: str,
    package: tuple[bytes, str],
    config: RolloutConfig,
    *,
    by: str = "request",
    tick_s: float = 0.5,
) -> dict[str, Any]:
    """Hand the new version to the nodes and start its staged rollout on ``deployment``'s entry; the
    rollout's first status."""
    dep = await mesh.find(deployment)
    version = await _hand_out(mesh, dep, package, newer=True)
    body = {
        "action": "start",
        "name": deployment,
        "version": version,
        "config": config.to_dict(),
        "by": by,
        "tick_s": tick_s,
    }
    return await _ask(mesh, str(dep["entry"]), "rollout", body)


async def rollout_action(
    mesh: Mesh, deployment: str, action: str, *, signing_key: str | None = None, to_version: str | None = None
) -> dict[str, Any]:
    """``status``, ``pause``, ``resume`` or ``rollback`` of ``deployment``'s rollout.  A rollback with
    ``signing_key`` carries a rollback instruction for ``to_version`` (default: the version the rollout
    replaced), which a completed rollout needs."""
    if action not in ("status", "pause", "resume", "rollback"):
        raise ConfigError(f"unknown rollout action {action!r}")
    dep = await mesh.find(deployment)
    body: dict[str, Any] = {"action": action, "name": deployment}
    if action == "rollback" and signing_key:
        from meshai.packages import sign_rollback

        target = to_version
        if target is None:
            status = await _ask(mesh, str(dep["entry"]), "rollout", {"action": "status", "name": deployment})
            target = str(status["old_version"])
        name = parse_package_ref(str(dep.get("package") or f"x@{target}"))[0]
        body["instruction"] = sign_rollback(name, target, signing_key).to_dict()
    elif to_version is not None:
        raise ConfigError("--to needs --key (going back to a chosen version takes a signed instruction)")
    return await _ask(mesh, str(dep["entry"]), "rollout", body)


async def start_ab(
    mesh: Mesh, deployment: str, package: tuple[bytes, str], share: float, by: str = "request"
) -> dict[str, Any]:
    """Hand variant B to the nodes and route ``share`` of ``deployment``'s traffic to it."""
    dep = await mesh.find(deployment)
    version = await _hand_out(mesh, dep, package, newer=False)
    body = {"action": "start", "name": deployment, "version": version, "share": share, "by": by}
    return await _ask(mesh, str(dep["entry"]), "ab", body)


async def ab_action(mesh: Mesh, deployment: str, action: str) -> dict[str, Any]:
    """``report`` or ``stop`` of ``deployment``'s A/B test."""
    if action not in ("report", "stop"):
        raise ConfigError(f"unknown ab action {action!r}")
    dep = await mesh.find(deployment)
    return await _ask(mesh, str(dep["entry"]), "ab", {"action": action, "name": deployment})
