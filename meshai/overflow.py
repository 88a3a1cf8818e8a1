"""Live requests split between the swarm and Ray: the executor of ``scheduler.offload`` decisions.

``OverflowRouter.run`` takes requests as they arrive (all at once, a burst, or at a fixed rate), asks
the pure policy (``scheduler.offload.decide``) where each one goes from the swarm's queue at that
moment, and carries the decision out: the swarm's pipeline (``Pipeline.infer``) or a Ray actor pool
(``RayModel.infer``).  The swarm's queue is every request it has accepted and not yet answered: those
on the stages plus those waiting for a window slot.  ``OverflowCounter`` checks that every request is
routed once and answered once; the run ends with one result (outputs or the error) per request, in
input order.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from meshai.errors import InferenceError, MeshaiError, PeerError
from meshai.pipeline import percentiles_ms
from scheduler.offload import OffloadPolicy, OverflowCounter, Target, WorkState, decide

Tensors = dict[str, np.ndarray]

#: The embedded Ray shares this machine: shipping a request to it costs a loopback copy.
LOOPBACK_BPS = 10e9


class Runner(Protocol):
    """What runs one request: a swarm pipeline or a Ray model."""

    async def infer(self, inputs: Any) -> Tensors: ...


@dataclass
class OverflowReport:
    """Where every request went and how it went."""

    results: list[Tensors | BaseException]
    threshold: int  # the policy's queue threshold
    rate_rps: float | None  # arrivals per second (None: a burst)
    routed: dict[Target, int]
    completed: dict[Target, int]
    rules: dict[str, int]
    latencies_s: dict[Target, list[float]] = field(default_factory=dict)
    first_sent: float = 0.0
    last_result: float = 0.0

    @property
    def ok(self) -> int:
        """Requests that returned outputs."""
        return sum(1 for r in self.results if not isinstance(r, BaseException))

    def throughput_rps(self) -> float:
        """Results delivered per second, from the first request sent to the last result."""
        span = self.last_result - self.first_sent
        return round(self.ok / span, 3) if span > 0 else 0.0

    def latency_ms(self, target: Target | None = None) -> dict[str, float]:
        """p50/p95/p99 of successful requests, over both targets or one."""
        if target is not None:
            return percentiles_ms(self.latencies_s.get(target, []))
        return percentiles_ms([x for v in self.latencies_s.values() for x in v])

    def to_dict(self) -> dict[str, Any]:
        """The ``offload`` section of a sim report."""
        return {
            "backend": "ray",
            "threshold": self.threshold,
            "rate_rps": self.rate_rps,
            "swarm": self.routed["swarm"],
            "ray": self.routed["ray"],
            "completed": dict(self.completed),
            "rules": dict(self.rules),
            "latency_ms": {t: self.latency_ms(t) for t in ("swarm", "ray")},
        }


class OverflowRouter:
    """Route each live request to ``swarm`` or ``ray`` by ``policy`` and collect exactly one result each."""

    def __init__(self, swarm: Runner, ray: Runner, policy: OffloadPolicy, batch_size: int = 1) -> None:
        self.swarm = swarm
        self.ray = ray
        self.policy = policy
        self.batch_size = batch_size
        self.queued = 0  # swarm requests accepted and not yet answered

    def state(self, request: Tensors) -> WorkState:
        """What the policy sees for one request arriving now."""
        return WorkState(
            queue_depth=self.queued,
            in_flight=self.queued,
            swarm_p95_ms=None,
            batch_size=self.batch_size,
            request_bytes=sum(np.asarray(a).nbytes for a in request.values()),
            link_bandwidth_bps=LOOPBACK_BPS,
            link_latency_s=0.0,
        )

    async def run(
        self,
        requests: Sequence[Tensors],
        rate: float | None = None,
        on_result: Callable[[], None] | None = None,
    ) -> OverflowReport:
        """Send ``requests`` (all at once, or ``rate`` per second) and wait for every result.

        ``on_result()`` is called once per finished request (a progress bar)."""
        counter = OverflowCounter()
        results: list[Tensors | BaseException | None] = [None] * len(requests)
        latencies: dict[Target, list[float]] = {"swarm": [], "ray": []}
        rules: Counter[str] = Counter()
        last = [0.0]

        async def one(i: int, target: Target, req: Tensors) -> None:
            t0 = time.perf_counter()
            runner = self.swarm if target == "swarm" else self.ray
            out: Tensors | BaseException
            try:
                out = await runner.infer(req)
                latencies[target].append(time.perf_counter() - t0)
            except (InferenceError, PeerError) as exc:
                out = exc
            finally:
                if target == "swarm":
                    self.queued -= 1
            counter.done(i)
            results[i] = out
            last[0] = time.perf_counter()
            if on_result is not None:
                on_result()

        start = time.perf_counter()
        tasks: list[asyncio.Task[None]] = []
        try:
            for i, req in enumerate(requests):
                if rate:
                    await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
                decision = decide(self.policy, self.state(req))
                counter.route(decision, i)
                rules[decision.rule or "?"] += 1
                if decision.target == "swarm":
                    self.queued += 1
                tasks.append(asyncio.create_task(one(i, decision.target, req), name=f"overflow {i}"))
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
        missing = [i for i, r in enumerate(results) if r is None]
        if missing or counter.pending:
            raise MeshaiError(f"overflow run ended without a result for requests {missing[:10]}")
        return OverflowReport(
            results=[r for r in results if r is not None],
            threshold=self.policy.queue_threshold,
            rate_rps=rate,
            routed={"swarm": counter.swarm, "ray": counter.ray},
            completed=counter.completed,
            rules=dict(rules),
            latencies_s=latencies,
            first_sent=start,
            last_result=last[0],
        )
