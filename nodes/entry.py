"""Recovery for a long-lived deployment whose entry a node hosts (``meshai deploy``).

The node keeps the deployment's ``Pipeline``, so it keeps the inputs of every request in flight; this
supervisor gives that pipeline a new plan when a node is lost and deploys it.  It plans with the pure
planner over the deployment's standby nodes (those that received the signed package when it was
deployed) that still answer, on the model the node reads from the package in its own store, and
deploys by package reference, so that each node cuts its own stage.  A deployment made from raw stage
models (no package) has nothing to replan from: it fails the requests a lost node touched, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from meshai.capabilities import NodeCapability, capability_from_dict
from meshai.errors import MeshaiError, PlanError
from meshai.plan import Constraints, Plan
from nodes.executors import RUNTIMES_FILE, planner_artifacts

if TYPE_CHECKING:
    from meshai.pipeline import Generation, Pipeline
    from nodes.agent import NodeAgent

#: How long the entry waits for a standby node to answer when it replans.
REACH_TIMEOUT_S = 1.0


class NodeEntrySupervisor:
    """``plan_without`` and ``deploy`` for a pipeline hosted on ``agent`` (see the module doc)."""

    def __init__(self, agent: NodeAgent, package: str, constraints: Constraints, standby: list[str]) -> None:
        self.agent = agent
        self.package = package
        self.constraints = constraints
        self.standby = standby

    @classmethod
    def from_body(cls, agent: NodeAgent, plan: Plan, body: Mapping[str, Any]) -> NodeEntrySupervisor:
        """From the ``recover`` part of a ``host`` control: package ref, constraints, standby nodes."""
        pins = body.get("pins", {})
        stages = body.get("stages")
        constraints = Constraints(
            objective=plan.objective,
            stages=int(stages) if isinstance(stages, int) and stages > 0 else None,
            pins={str(k): str(v) for k, v in dict(pins).items()} if isinstance(pins, Mapping) else {},
        )
        standby = [str(n) for n in body.get("standby", []) if isinstance(n, str)]
        return cls(
            agent,
            str(body.get("package", "")),
            constraints,
            standby or list(dict.fromkeys(s.node for s in plan.stages)),
        )

    async def _capability(self, name: str) -> NodeCapability | None:
        if name == self.agent.name:
            return self.agent.config.capability
        try:
            async with asyncio.timeout(REACH_TIMEOUT_S):
                ch = await self.agent.pool.get(name)
        except (MeshaiError, TimeoutError, OSError):
            return None
        with contextlib.suppress(MeshaiError, KeyError, TypeError, ValueError):
            return capability_from_dict(ch.their_hello.capabilities)
        return None

    async def plan_without(self, plan: Plan, lost: frozenset[str]) -> Plan:
        """A plan over the standby nodes that still answer (PlanError if there is none)."""
        return await self.plan_package(self.package, lost, plan.model)

    async def plan_package(self, package: str, lost: frozenset[str] = frozenset(), what: str = "") -> Plan:
        """A plan of the model in the stored ``package`` over the standby nodes, other than ``lost``,
        that answer (PlanError if there is none)."""
        from scheduler.adapt import relax_stages
        from scheduler.partition import plan as partition

        names = [n for n in self.standby if n not in lost]
        found = await asyncio.gather(*(self._capability(n) for n in names))
        caps = [c for c in found if c is not None]
        if not caps:
            raise PlanError(
                f"no standby node of {what or package!r} answers (standby: {', '.join(self.standby)})"
            )
        _whole, graph, _cal = await asyncio.to_thread(self.agent.package_graph, package)
        constraints = relax_stages(self.constraints, len(caps))
        table = self.agent.package_files(package).get(RUNTIMES_FILE)
        if table is not None:  # nodes without onnxruntime take only the cuts converted for them
            arts = planner_artifacts(json.loads(table))
            constraints = dataclasses.replace(constraints, artifacts=arts, artifacts_only=True)
        return await asyncio.to_thread(partition, graph, caps, constraints)

    async def deploy(self, pipe: Pipeline, gen: Generation) -> None:
        """Deploy ``gen`` by package reference (every standby node holds the package)."""
        await pipe.deploy(None, package=self.package, gen=gen)
