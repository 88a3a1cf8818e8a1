"""Carry out offload decisions on a Ray cluster: bulk batches and overflow requests.

``RayBackend`` starts an embedded, local-only Ray (``127.0.0.1``, no dashboard, no usage stats, a
bounded number of CPUs) or connects to a cluster the user names, and shuts down what it started::

    with RayBackend(num_cpus=2, actors=2) as backend:
        outputs = backend.run_batch(model_bytes, requests, chunk=16)      # one call, one batch
        model = backend.load(model_bytes)                                  # or keep a handle
        result = await model.infer(feeds)                                  # one overflow request
        outputs = model.run_batch(requests)

The model goes into the object store once (``ray.put``); a pool of actors each builds one
onnxruntime session (``nodes.executor.StageSession``: no spinning) from that object.  A batch is cut
into chunks (lists of requests each actor runs one by one); every chunk has an id, so results come
back in input order, and a chunk whose actor dies is run again on a fresh actor — a bounded number of
times — without losing or duplicating a result.  Errors of the model itself (bad feeds) are not
retried: they raise ``InferenceError`` at once.

Ray is an optional extra (``pip install 'meshai[ray]'``): this module imports ``ray`` only when a
backend starts, and this is the one module in ``scheduler/`` that touches Ray at all.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import sys
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np

from meshai.errors import ConfigError, InferenceError, MeshaiError, PeerError, check_min

__all__ = ["BatchStats", "RayBackend", "RayModel", "import_ray"]

#: How often one chunk (or one request) may be re-run after its actor died.
MAX_RETRIES = 3
#: Chunks kept queued on each actor, so an actor never idles between two chunks.
IN_FLIGHT_PER_ACTOR = 2
#: How long a new actor pool may take to start and load its model.
READY_TIMEOUT_S = 120.0


def import_ray(loopback: bool = True) -> Any:
    """``import ray`` with usage stats off, or ConfigError saying how to install it.

    With ``loopback`` (an embedded cluster) Ray's node address stays 127.0.0.1: Ray turns
    ``_node_ip_address="127.0.0.1"`` into the host's outward address unless
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, which it reads when imported."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    if loopback and "ray" not in sys.modules:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError:
        raise ConfigError("the Ray backend needs Ray: pip install 'meshai[ray]'") from None
    return ray


class _Worker:
    """One onnxruntime session in a Ray actor (wrapped with ``ray.remote`` at start-up)."""

    def __init__(self, model_bytes: bytes, threads: int) -> None:
        from nodes.executor import StageSession

        self._session = StageSession(model_bytes, threads=threads, name="ray-actor")

    def ready(self) -> int:
        return os.getpid()

    def run_chunk(self, chunk_id: int, requests: list[dict[str, np.ndarray]]) -> tuple[int, list[Any]]:
        return chunk_id, [self._session.run(r) for r in requests]

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._session.run(inputs)


@dataclass
class BatchStats:
    """What the last batch did: requests, chunks, chunks run again, actors replaced."""

    requests: int = 0
    chunks: int = 0
    retried_chunks: int = 0
    replaced_actors: int = 0


def _cause(exc: BaseException) -> str:
    text = str(exc).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


class RayModel:
    """A model loaded on the backend: its bytes in the object store and a pool of actors."""

    def __init__(self, backend: RayBackend, model_bytes: bytes, actors: int, threads: int) -> None:
        check_min("actors", actors, 1)
        ray = backend.ray
        self._backend = backend
        self._ray = ray
        self._threads = threads
        self._model_ref: Any = ray.put(bytes(model_bytes))
        total_cpus = float(ray.cluster_resources().get("CPU", 1.0))
        self._cpus_per_actor = min(1.0, total_cpus / actors)
        self._actor_cls: Any = ray.remote(_Worker).options(num_cpus=self._cpus_per_actor)
        self.actors: list[Any] = [self._new_actor() for _ in range(actors)]
        self.last_stats = BatchStats()
        self._kill_after: int | None = None
        self._next = 0
        try:
            ray.get([a.ready.remote() for a in self.actors], timeout=READY_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            self.close()
            raise PeerError(
                f"{actors} Ray actors ({self._cpus_per_actor:g} CPU each) did not start within "
                f"{READY_TIMEOUT_S:g} s: the cluster has {total_cpus:g} CPUs, are other actors holding them?"
            ) from None
        except ray.exceptions.RayError as exc:
            self.close()
            raise InferenceError(f"Ray actors cannot load the model: {_cause(exc)}") from None

    def _new_actor(self) -> Any:
        return self._actor_cls.remote(self._model_ref, self._threads)

    def kill_one_actor_after(self, n_chunks: int) -> None:
        """Test hook: during the next batch, once ``n_chunks`` chunks are done, kill an actor that
        still has chunks queued (as a crash would); its chunks must be run again elsewhere."""
        self._kill_after = n_chunks

    def close(self) -> None:
        """Kill this model's actors (the backend does so too when it shuts down)."""
        for a in self.actors:
            with contextlib.suppress(Exception):  # already dead, or Ray is shutting down
                self._ray.kill(a)
        self.actors = []

    def run_batch(
        self,
        requests: Sequence[Mapping[str, np.ndarray]],
        chunk: int = 16,
        progress: Callable[[int], None] | None = None,
    ) -> list[dict[str, np.ndarray]]:
        """Run every request on the actor pool; results in input order.  ``progress(n)`` is called
        with the number of requests each finished chunk held.  A chunk whose actor died is run again
        on a fresh actor (at most MAX_RETRIES times; then PeerError); a model error raises
        InferenceError."""
        check_min("chunk", chunk, 1)
        if not self.actors:
            raise ConfigError("this RayModel is closed")
        ray = self._ray
        reqs = [dict(r) for r in requests]
        chunks = [reqs[i : i + chunk] for i in range(0, len(reqs), chunk)]
        stats = BatchStats(requests=len(reqs), chunks=len(chunks))
        self.last_stats = stats
        todo: deque[int] = deque(range(len(chunks)))
        attempts = [0] * len(chunks)
        results: dict[int, list[dict[str, np.ndarray]]] = {}
        pending: dict[Any, tuple[int, int, Any]] = {}  # ref -> (chunk id, actor slot, actor handle)
        load = [0] * len(self.actors)
        retried: set[int] = set()
        kill_after, self._kill_after = self._kill_after, None

        def dispatch(slot: int) -> None:
            while todo and load[slot] < IN_FLIGHT_PER_ACTOR:
                cid = todo.popleft()
                actor = self.actors[slot]
                pending[actor.run_chunk.remote(cid, chunks[cid])] = (cid, slot, actor)
                load[slot] += 1

        try:
            for slot in range(len(self.actors)):
                dispatch(slot)
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                ref = ready[0]
                cid, slot, actor = pending.pop(ref)
                current = self.actors[slot] is actor
                try:
                    got_cid, outs = ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    attempts[cid] += 1
                    if attempts[cid] > MAX_RETRIES:
                        first = cid * chunk
                        raise PeerError(
                            f"chunk {cid} (requests {first}..{first + len(chunks[cid]) - 1}) lost its "
                            f"Ray actor {attempts[cid]} times; giving up: {_cause(exc)}"
                        ) from None
                    retried.add(cid)
                    todo.appendleft(cid)
                    if current:  # the first failed ref of this actor: replace it, once
                        with contextlib.suppress(Exception):
                            ray.kill(actor)
                        self.actors[slot] = self._new_actor()
                        stats.replaced_actors += 1
                        load[slot] = 0  # the dead actor's other refs fail on their own, requeued then
                    for s in range(len(self.actors)):
                        dispatch(s)
                    continue
                except ray.exceptions.RayTaskError as exc:
                    raise InferenceError(f"chunk {cid} failed on Ray: {_cause(exc)}") from None
                if current:
                    load[slot] -= 1
                if got_cid != cid or cid in results:
                    raise MeshaiError(f"Ray returned chunk {got_cid} twice or for chunk {cid}")
                results[cid] = outs
                if progress is not None:
                    progress(len(outs))
                dispatch(slot)
                if kill_after is not None and len(results) >= kill_after and load[slot] > 0:
                    kill_after = None
                    ray.kill(self.actors[slot])  # test hook: a crash with chunks still queued
        finally:
            for ref in pending:
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=False)
        stats.retried_chunks = len(retried)
        if len(results) != len(chunks):
            raise MeshaiError(f"Ray batch finished with {len(results)} of {len(chunks)} chunks")
        return [out for cid in range(len(chunks)) for out in results[cid]]

    def submit(self, inputs: Mapping[str, np.ndarray]) -> concurrent.futures.Future[dict[str, np.ndarray]]:
        """One request on the next actor, as a ``concurrent.futures.Future`` (no retry)."""
        actor = self._pick()
        fut: concurrent.futures.Future[dict[str, np.ndarray]] = actor.infer.remote(dict(inputs)).future()
        return fut

    async def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One request, awaited in asyncio; a dead actor is replaced and the request re-run (bounded)."""
        ray = self._ray
        feeds = dict(inputs)
        for attempt in range(MAX_RETRIES + 1):
            slot = self._next_slot()
            actor = self.actors[slot]
            try:
                out: dict[str, np.ndarray] = await actor.infer.remote(feeds)
                return out
            except ray.exceptions.RayActorError as exc:
                if attempt == MAX_RETRIES:
                    raise PeerError(
                        f"request lost its Ray actor {attempt + 1} times: {_cause(exc)}"
                    ) from None
                if self.actors[slot] is actor:
                    self.actors[slot] = self._new_actor()
            except ray.exceptions.RayTaskError as exc:
                raise InferenceError(f"request failed on Ray: {_cause(exc)}") from None
        raise AssertionError("unreachable")

    def _next_slot(self) -> int:
        if not self.actors:
            raise ConfigError("this RayModel is closed")
        slot = self._next % len(self.actors)
        self._next += 1
        return slot

    def _pick(self) -> Any:
        return self.actors[self._next_slot()]


class RayBackend:
    """An embedded local Ray (or a connection to ``address``); a context manager."""

    def __init__(
        self, address: str | None = None, num_cpus: int = 2, actors: int = 2, threads: int = 1
    ) -> None:
        check_min("num_cpus", num_cpus, 1)
        check_min("actors", actors, 1)
        check_min("threads", threads, 1)
        self.address = address
        self.num_cpus = num_cpus
        self.actor_count = actors
        self.threads = threads
        self.ray: Any = None
        self._owned = False
        self._models: list[RayModel] = []
        self._last: RayModel | None = None

    def start(self) -> RayBackend:
        """Start (or connect to) Ray; idempotent."""
        if self.ray is not None:
            return self
        ray = import_ray(loopback=not self.address)
        if ray.is_initialized():
            self.ray = ray  # someone in this process already started Ray: use it, leave it running
            return self
        try:
            if self.address:
                ray.init(address=self.address, log_to_driver=False, ignore_reinit_error=False)
            else:
                # ray was imported before the environment said so: tell its constants directly
                constants = getattr(getattr(ray, "_private", None), "ray_constants", None)
                if constants is not None and hasattr(constants, "ENABLE_RAY_CLUSTER"):
                    constants.ENABLE_RAY_CLUSTER = False
                ray.init(
                    _node_ip_address="127.0.0.1",
                    include_dashboard=False,
                    num_cpus=self.num_cpus,
                    log_to_driver=False,
                    ignore_reinit_error=False,
                )
        except Exception as exc:  # ConnectionError, RuntimeError, ValueError from Ray
            where = f"at {self.address!r}" if self.address else "locally on 127.0.0.1"
            raise PeerError(f"cannot start Ray {where}: {_cause(exc)}") from None
        self.ray = ray
        self._owned = True
        if not self.address:
            ips = {str(n.get("NodeManagerAddress")) for n in ray.nodes()}
            if ips != {"127.0.0.1"}:
                self.close()
                raise PeerError(
                    f"embedded Ray bound to {', '.join(sorted(ips))}, not 127.0.0.1 (Ray's loopback switch, "
                    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, did not take)"
                )
        return self

    def close(self) -> None:
        """Kill the actors this backend made; shut Ray down if this backend started it."""
        for m in self._models:
            m.close()
        self._models.clear()
        self._last = None
        if self.ray is not None and self._owned:
            self.ray.shutdown()
        self.ray = None
        self._owned = False

    def __enter__(self) -> RayBackend:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def load(self, model_bytes: bytes, actors: int | None = None) -> RayModel:
        """Put the model in the object store once and start its actor pool."""
        self.start()
        m = RayModel(self, model_bytes, actors or self.actor_count, self.threads)
        self._models.append(m)
        return m

    def run_batch(
        self,
        model_bytes: bytes,
        requests: Sequence[Mapping[str, np.ndarray]],
        chunk: int = 16,
        progress: Callable[[int], None] | None = None,
    ) -> list[dict[str, np.ndarray]]:
        """Load the model, run the batch (see ``RayModel.run_batch``), stop its actors again."""
        m = self.load(model_bytes)
        self._last = m
        try:
            return m.run_batch(requests, chunk=chunk, progress=progress)
        finally:
            m.close()
            self._models.remove(m)

    @property
    def last_stats(self) -> BatchStats:
        """Stats of the last ``run_batch`` this backend ran itself."""
        return self._last.last_stats if self._last is not None else BatchStats()
