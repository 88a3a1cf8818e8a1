"""Rollouts and A/B tests of a long-lived deployment, run by the node that hosts its entry.

``meshai rollout …`` and ``meshai ab …`` hand the new package to the nodes (``Upload``), then send the
entry one control op, ``rollout`` or ``ab``, with an ``action``:

* ``rollout``: ``start`` (package ref, config, split by, tick), ``status``, ``pause``, ``resume``,
  ``rollback``.  Before a rollout completes, a rollback is a switch back to the version that never
  stopped being active in the stores.  After it completes (or to go back to any earlier version) the
  body must carry a rollback instruction signed with the fleet key: the entry applies it to its own
  store first (which verifies signature and freshness), then on every node that holds the package, then
  switches — to the previous version still loaded when it is the one named, else by deploying it.
* ``ab``: ``start`` (package ref, share, by), ``report``, ``stop``.

The runners are ``meshai.rollouts.RolloutRunner`` / ``ABTest``; this module is their deployer for a
node-hosted pipeline (plans with the entry's supervisor, deploys by package reference) and the control
surface.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from meshai.errors import ConfigError, DeploymentError, MeshaiError
from meshai.protocol import ControlReply

if TYPE_CHECKING:
    from meshai.pipeline import Generation, Pipeline
    from nodes.agent import NodeAgent
    from nodes.entry import NodeEntrySupervisor

__all__ = ["EntryVersions", "version_control"]


class EntryVersions:
    """``VersionDeployer`` for a deployment hosted on ``agent``: versions are packages of the same name
    that the standby nodes hold."""

    def __init__(self, agent: NodeAgent, supervisor: NodeEntrySupervisor) -> None:
        self.agent = agent
        self.supervisor = supervisor
        self.name = supervisor.package.rpartition("@")[0]

    def ref(self, version: str) -> str:
        """``name@version`` of this deployment's package."""
        return f"{self.name}@{version}"

    async def deploy_version(self, pipe: Pipeline, version: str) -> Generation:
        """Plan the version's model over the standby nodes and deploy it by package reference, without
        activating it in the stores."""
        ref = self.ref(version)
        plan = await self.supervisor.plan_package(ref, what=ref)
        gen = pipe.new_generation(plan, version)
        gen.activate = False  # a canary runs beside the active version; ``confirm`` activates it
        try:
            await pipe.deploy(None, package=ref, gen=gen)
        except BaseException:
            await pipe.discard(gen)
            raise
        return gen

    async def confirm(self, pipe: Pipeline, version: str) -> None:
        """Replan with ``version`` from now on; every standby node (and this one) activates it."""
        from meshai.rollouts import activate_everywhere

        ref = self.ref(version)
        self.supervisor.package = ref
        nodes = sorted({*self.supervisor.standby, *pipe.nodes, self.agent.name})
        await activate_everywhere(self.agent.pool, nodes, ref)


def _reply(op: str, ok: bool, body: Mapping[str, Any]) -> ControlReply:
    return ControlReply(op, ok, dict(body))


def _deployer(agent: NodeAgent, name: str) -> tuple[Pipeline, EntryVersions]:
    from nodes.entry import NodeEntrySupervisor

    pipe = agent._entries.get(name)
    if pipe is None:
        raise DeploymentError(f"no deployment {name!r} on {agent.name!r}")
    sup = pipe.supervisor
    if not isinstance(sup, NodeEntrySupervisor) or not sup.package:
        raise DeploymentError(
            f"deployment {name!r} was not deployed from a signed package: it has no versions to switch"
        )
    return pipe, EntryVersions(agent, sup)


async def version_control(agent: NodeAgent, op: str, body: Mapping[str, Any]) -> ControlReply:
    """The ``rollout`` and ``ab`` control ops (see the module doc); failures are error replies."""
    name = str(body.get("name", ""))
    action = str(body.get("action", ""))
    try:
        if op == "rollout":
            return _reply(op, True, await _rollout(agent, name, action, body))
        return _reply(op, True, await _ab(agent, name, action, body))
    except (MeshaiError, TimeoutError) as exc:
        return _reply(op, False, {"error": str(exc) or type(exc).__name__})


async def _rollout(agent: NodeAgent, name: str, action: str, body: Mapping[str, Any]) -> dict[str, Any]:
    from meshai.rollouts import RolloutRunner
    from scheduler.rollout import RolloutConfig

    pipe, deployer = _deployer(agent, name)
    runner: RolloutRunner | None = agent.rollouts.get(name)
    if action == "start":
        if runner is not None and not runner.state.terminal:
            raise DeploymentError(
                f"a rollout of {name!r} to version {runner.new_version!r} is already {runner.state.status}"
            )
        if name in agent.abtests and not agent.abtests[name].stopped:
            raise DeploymentError(f"deployment {name!r} runs an A/B test; stop it first")
        version = str(body.get("version", ""))
        config = RolloutConfig.from_dict(dict(body.get("config") or {}))
        tick = body.get("tick_s", 0.5)
        if isinstance(tick, bool) or not isinstance(tick, int | float) or not 0.01 <= tick <= 60:
            raise ConfigError(f"tick_s must be in [0.01, 60], got {tick!r}")
        runner = RolloutRunner(
            pipe, deployer, version, config, tick_s=float(tick), by=str(body.get("by", "request"))
        )
        await runner.start()
        agent.rollouts[name] = runner
        return runner.status()
    if action == "rollback" and body.get("instruction") is not None:
        return await _signed_rollback(agent, pipe, deployer, runner, body["instruction"])
    if runner is None:
        raise DeploymentError(f"no rollout of {name!r} on {agent.name!r}")
    if action == "status":
        return runner.status()
    if action == "pause":
        await runner.pause()
    elif action == "resume":
        await runner.resume()
    elif action == "rollback":
        if runner.state.status == "completed":
            raise DeploymentError(
                f"the rollout of {name!r} completed: version {runner.new_version!r} is the active one on "
                f"the nodes; going back to {runner.old_version!r} needs a rollback instruction signed "
                "with the fleet key"
            )
        await runner.rollback()
    else:
        raise ConfigError(f"unknown rollout action {action!r} (start, status, pause, resume, rollback)")
    return runner.status()


async def _signed_rollback(
    agent: NodeAgent, pipe: Pipeline, deployer: EntryVersions, runner: Any, instruction: Any
) -> dict[str, Any]:
    """Go back to the version a fleet-signed rollback instruction names (see the module doc)."""
    from meshai.packages import RollbackInstruction
    from meshai.rollouts import serve_beside

    t0 = time.perf_counter()
    instr = RollbackInstruction.from_dict(instruction)
    if instr.name != deployer.name:
        raise DeploymentError(
            f"rollback instruction names {instr.ref}, but {pipe.name!r} runs {deployer.name}"
        )
    if runner is not None and not runner.state.terminal:
        await runner.rollback("rolled back by the operator (signed instruction)")
    store = agent._require_store()
    await asyncio.to_thread(store.rollback, instr)  # verifies signature and freshness first
    nodes = sorted({*deployer.supervisor.standby, *pipe.nodes} - {agent.name})
    for node in nodes:
        reply = await agent.pool.control(node, "store_rollback", {"instruction": instr.to_dict()})
        if not reply.ok:
            raise DeploymentError(
                f"node {node!r} refused the rollback to {instr.ref}: {reply.body.get('error')}"
            )
    switched = "already serving"
    if pipe.version != instr.version:
        prev = pipe.previous
        if prev is not None and prev.version == instr.version:
            pipe.restore_previous()
            switched = "switched to the previous version, still loaded"
        else:
            await serve_beside(pipe, deployer, instr.version, 0.0, "request", pipe.name)
            pipe.promote_variant(keep_previous=False)
            switched = "deployed and switched"
    deployer.supervisor.package = instr.ref
    out: dict[str, Any] = runner.status() if runner is not None else {"deployment": pipe.name}
    out.update(
        {
            "rolled_back_to": instr.ref,
            "switch": switched,
            "version": pipe.version,
            "took_s": round(time.perf_counter() - t0, 4),  # verify, every node's store, switch
        }
    )
    return out


async def _ab(agent: NodeAgent, name: str, action: str, body: Mapping[str, Any]) -> dict[str, Any]:
    from meshai.rollouts import ABTest

    pipe, deployer = _deployer(agent, name)
    test: ABTest | None = agent.abtests.get(name)
    if action == "start":
        if test is not None and not test.stopped:
            raise DeploymentError(f"an A/B test of {name!r} against {test.version_b!r} is already running")
        runner = agent.rollouts.get(name)
        if runner is not None and not runner.state.terminal:
            raise DeploymentError(f"deployment {name!r} is being rolled out; finish or roll back first")
        share = body.get("share")
        if isinstance(share, bool) or not isinstance(share, int | float) or not 0.0 < share < 1.0:
            raise ConfigError(f"--split must be a share strictly between 0 and 100%, got {share!r}")
        test = ABTest(
            pipe, deployer, str(body.get("version", "")), float(share), str(body.get("by", "request"))
        )
        await test.start()
        agent.abtests[name] = test
        return test.report()
    if test is None:
        raise DeploymentError(f"no A/B test of {name!r} on {agent.name!r}")
    if action == "report":
        return test.report()
    if action == "stop":
        test.stop()
        return test.report()
    raise ConfigError(f"unknown ab action {action!r} (start, report, stop)")
