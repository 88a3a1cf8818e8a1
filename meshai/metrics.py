"""Prometheus metrics of a node and of a pipeline entry: the one place every reported number comes from.

A ``Metrics`` owns its own ``CollectorRegistry`` (never the process-global one), so several live side by
side in one process (a simulated swarm, the tests).  Events are recorded with plain calls
(``observe_inference``, ``observe_stage``, ``add_transfer``, ``add_energy``, ``set_peers``, ``set_drift``
…); ``exposition()`` renders the text format, ``serve()`` exposes ``/metrics``, ``/healthz`` and
``/readyz`` on the given host, and ``write_prom_file()`` writes one exposition for a whole swarm.

Labels are bounded by construction: the enumerated ones (``phase``, ``status``, ``direction``, ``state``)
are checked against their few values, the API takes no request id or address anywhere, and every free
label (model, version, node, stage, accelerator, feature, method) keeps at most ``max_label_values``
distinct values per ``Metrics``; later newcomers are folded into ``OTHER``.

Latency buckets (``latency_buckets``) are a geometric series from 100 µs to 10 s, 15 per decade (about
16.6 % steps, edges rounded to three significant digits) plus an edge exactly at the SLO, so
``histogram_quantile`` reads within a few percent of the exact quantile for sub-millisecond stages and
multi-second requests alike, and "share of requests within the SLO" is one bucket, not an interpolation.

The pure helpers ``link_bytes`` and ``bandwidth_saved_bytes`` compute, from a Plan and the byte sizes
of one request's tensors, what crossed the network and what stayed on its node; see
``BANDWIDTH_SAVED_HELP`` for the exact definition.
"""

from __future__ import annotations

import math
import os
import platform
import socket
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    make_wsgi_app,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from meshai.errors import ConfigError

__all__ = [
    "BANDWIDTH_SAVED_HELP",
    "DEFAULT_SLO_SECONDS",
    "DIRECTIONS",
    "ENERGY_HELP",
    "OTHER",
    "PEER_STATES",
    "PHASES",
    "STATUSES",
    "Metrics",
    "bandwidth_saved_bytes",
    "exposition_text",
    "latency_buckets",
    "link_bytes",
    "write_prom_file",
]

DEFAULT_SLO_SECONDS = 0.1
PHASES = ("queue", "compute", "transfer")
STATUSES = ("ok", "error")
DIRECTIONS = ("sent", "received")
PEER_STATES = ("trusted", "untrusted", "lost")
OTHER = "other"
"""The value a free label takes once it already has ``max_label_values`` distinct values."""

BANDWIDTH_SAVED_HELP = (
    "Bytes kept off the network by placement, relative to shipping every raw graph input once to one "
    "central node. Per request: max(0, I - L), where I = bytes of all the request's graph inputs and "
    "L = bytes the request actually sent between nodes (a graph input sent to a stage on a node other "
    "than the one it was born on - its pin, else the caller - plus each activation sent from its "
    "producing stage to a consuming stage on another node, once per receiving node). Results returned "
    "to the caller count on neither side; weights travel at deploy time, not per request."
)
ENERGY_HELP = (
    "ESTIMATED energy in joules: the device profile's active power (W) times the busy time (s) spent "
    "computing stages; not a measurement."
)

_BUILD_VERSION: str
try:
    _BUILD_VERSION = metadata.version("meshai")
except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
    _BUILD_VERSION = "unknown"


# --------------------------------------------------------------------------------------------------
# Buckets


def _round_sig(x: float, digits: int) -> float:
    return float(f"{x:.{digits - 1}e}")


def latency_buckets(
    slo_seconds: float = DEFAULT_SLO_SECONDS,
    *,
    low: float = 1e-4,
    high: float = 10.0,
    per_decade: int = 15,
) -> tuple[float, ...]:
    """Histogram upper bounds in seconds: ``per_decade`` geometric steps from ``low`` to ``high``
    (rounded to 3 significant digits) plus ``slo_seconds`` exactly; raises ConfigError on bad bounds."""
    for name, v in (("slo_seconds", slo_seconds), ("low", low), ("high", high)):
        if not (math.isfinite(v) and v > 0):
            raise ConfigError(f"latency bucket {name} must be a finite number > 0 s, got {v!r}")
    if not high > low:
        raise ConfigError(f"latency bucket high ({high!r} s) must exceed low ({low!r} s)")
    if not 1 <= per_decade <= 100:
        raise ConfigError(f"latency buckets per_decade must be in 1..100, got {per_decade!r}")
    steps = math.ceil(round(math.log10(high / low) * per_decade, 9))
    edges = {_round_sig(low * 10 ** (k / per_decade), 3) for k in range(steps + 1)}
    edges.add(float(slo_seconds))
    return tuple(sorted(edges))


# --------------------------------------------------------------------------------------------------
# Bandwidth: pure helpers over a Plan-like description


class StageLike(Protocol):
    """What ``link_bytes`` reads of a plan stage (``meshai.plan.Stage`` fits)."""

    @property
    def node(self) -> str: ...
    @property
    def inputs(self) -> Sequence[str]: ...
    @property
    def outputs(self) -> Sequence[str]: ...


class PlanLike(Protocol):
    """What ``link_bytes`` reads of a plan (``meshai.plan.Plan`` fits)."""

    @property
    def stages(self) -> Sequence[StageLike]: ...
    @property
    def inputs(self) -> Sequence[str]: ...
    @property
    def pins(self) -> Mapping[str, str]: ...


def _nbytes(tensor_bytes: Mapping[str, int], name: str) -> int:
    try:
        n = int(tensor_bytes[name])
    except KeyError:
        raise ConfigError(f"no byte size given for tensor {name!r}") from None
    if n < 0:
        raise ConfigError(f"tensor {name!r} has a negative byte size {n!r}")
    return n


def link_bytes(plan: PlanLike, tensor_bytes: Mapping[str, int], *, caller: str | None = None) -> int:
    """Bytes one request sends between nodes under ``plan``: each graph input to every other node
    that consumes it (born at its pin, else at ``caller``; ``None`` = off the mesh) plus each
    activation to every node other than its producer's that consumes it; outputs back to the caller
    are not counted.  ``tensor_bytes`` maps tensor names to the request's sizes; a missing size that is
    needed raises ConfigError naming the tensor."""
    graph_inputs = set(plan.inputs)
    producer: dict[str, str] = {}
    for st in plan.stages:
        for t in st.outputs:
            producer.setdefault(t, st.node)
    sent: set[tuple[str, str]] = set()
    total = 0
    for st in plan.stages:
        for t in st.inputs:
            if t in graph_inputs:
                born: str | None = plan.pins.get(t, caller)
            elif t in producer:
                born = producer[t]
            else:
                continue  # a weight or constant: it travelled with the stage at deploy time
            if born == st.node or (t, st.node) in sent:
                continue
            sent.add((t, st.node))
            total += _nbytes(tensor_bytes, t)
    return total


def bandwidth_saved_bytes(
    plan: PlanLike, tensor_bytes: Mapping[str, int], *, caller: str | None = None
) -> int:
    """Bytes one request kept off the network (``BANDWIDTH_SAVED_HELP``): max(0, bytes of all graph
    inputs - ``link_bytes(plan, tensor_bytes, caller=caller)``)."""
    raw = sum(_nbytes(tensor_bytes, t) for t in dict.fromkeys(plan.inputs))
    return max(0, raw - link_bytes(plan, tensor_bytes, caller=caller))


# --------------------------------------------------------------------------------------------------
# The metrics of one process


def _check_enum(label: str, value: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ConfigError(f"metric label {label} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def _check_amount(what: str, value: float) -> float:
    v = float(value)
    if not (math.isfinite(v) and v >= 0):
        raise ConfigError(f"{what} must be a finite number >= 0, got {value!r}")
    return v


class Metrics:
    """The Prometheus metrics of one meshai process (a node, an entry, or a caller), in its own registry.

    ``node`` is the default for every ``node`` label; ``slo_seconds`` becomes an exact bucket edge and
    the ``meshai_slo_seconds`` gauge the alert rules compare against.
    """

    def __init__(
        self,
        slo_seconds: float = DEFAULT_SLO_SECONDS,
        *,
        node: str = "",
        max_label_values: int = 256,
        buckets: Sequence[float] | None = None,
    ) -> None:
        if not (math.isfinite(slo_seconds) and slo_seconds > 0):
            raise ConfigError(f"slo_seconds must be a finite number > 0, got {slo_seconds!r}")
        if max_label_values < 1:
            raise ConfigError(f"max_label_values must be >= 1, got {max_label_values!r}")
        self.slo_seconds = float(slo_seconds)
        self.node = node
        self.max_label_values = max_label_values
        self.buckets: tuple[float, ...] = (
            latency_buckets(slo_seconds) if buckets is None else tuple(sorted({*buckets, self.slo_seconds}))
        )
        self._seen: dict[str, set[str]] = {}
        self._lock = threading.Lock()
        r = self.registry = CollectorRegistry(auto_describe=True)

        self.inference_latency = Histogram(
            "meshai_inference_latency_seconds",
            "End-to-end latency of successful requests, measured at the pipeline entry "
            "(request in to result out), in seconds.",
            ["model", "version"],
            buckets=self.buckets,
            registry=r,
        )
        self.stage_latency = Histogram(
            "meshai_stage_latency_seconds",
            "Time one request spends in one pipeline stage, by phase: queue (waiting for the stage), "
            "compute (running its subgraph), transfer (sending its outputs onward), in seconds.",
            ["model", "stage", "node", "accelerator", "phase"],
            buckets=self.buckets,
            registry=r,
        )
        self.requests = Counter(
            "meshai_requests",
            "Requests finished at the pipeline entry, by status (ok or error).",
            ["model", "status"],
            registry=r,
        )
        self.transfer_bytes = Counter(
            "meshai_transfer_bytes",
            "Tensor bytes this node sent to or received from peers (frame payloads and headers).",
            ["node", "direction"],
            registry=r,
        )
        self.bandwidth_saved = Counter(
            "meshai_bandwidth_saved_bytes",
            BANDWIDTH_SAVED_HELP,
            ["model"],
            registry=r,
        )
        self.energy = Counter(
            "meshai_energy_joules",
            ENERGY_HELP,
            ["node", "accelerator"],
            registry=r,
        )
        self.busy = Counter(
            "meshai_busy_seconds",
            "Seconds the accelerator spent computing stages (the busy time the energy estimate uses).",
            ["node", "accelerator"],
            registry=r,
        )
        self.peers = Gauge(
            "meshai_peers",
            "Peers this process knows, by state: trusted (verified mesh identity), untrusted "
            "(seen but not verified), lost (missed its heartbeats).",
            ["state"],
            registry=r,
        )
        self.feature_drift = Gauge(
            "meshai_feature_drift_score",
            "Drift score of one model input feature between the reference and the recent window, by "
            "method (e.g. psi); higher means more drift.",
            ["model", "feature", "method"],
            registry=r,
        )
        self.prediction_drift = Gauge(
            "meshai_prediction_drift_score",
            "Drift score of the model's predictions between the reference and the recent window, by "
            "method; higher means more drift.",
            ["model", "method"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "meshai_stage_queue_depth",
            "Requests waiting for a stage on this node right now.",
            ["model", "stage", "node"],
            registry=r,
        )
        self.slo = Gauge(
            "meshai_slo_seconds",
            "The end-to-end latency objective this process was configured with, in seconds.",
            registry=r,
        )
        self.slo.set(self.slo_seconds)
        self.build_info = Gauge(
            "meshai_build_info",
            "Always 1; labels say which meshai and Python this process runs.",
            ["version", "python"],
            registry=r,
        )
        self.build_info.labels(version=_BUILD_VERSION, python=platform.python_version()).set(1)
        self._view = _WithoutCreated(r)
        for state in PEER_STATES:
            self.peers.labels(state=state).set(0)

    # ---- label hygiene ---------------------------------------------------------------------------

    def _free(self, label: str, value: object) -> str:
        """``value`` as a label value, folded into OTHER once ``label`` has max_label_values values."""
        v = str(value)
        with self._lock:
            seen = self._seen.setdefault(label, set())
            if v in seen:
                return v
            if len(seen) >= self.max_label_values:
                return OTHER
            seen.add(v)
            return v

    def _node(self, node: str | None) -> str:
        return self._free("node", self.node if node is None else node)

    # ---- recording -------------------------------------------------------------------------------

    def declare_model(self, model: str, version: str) -> None:
        """Create ``model``'s request and latency series at zero before its first request, so that
        ``rate()`` and the error ratio are defined from the first scrape on (call it at deploy)."""
        m = self._free("model", model)
        for status in STATUSES:
            self.requests.labels(model=m, status=status)
        self.inference_latency.labels(model=m, version=self._free("version", version))

    def observe_inference(self, model: str, version: str, seconds: float, ok: bool = True) -> None:
        """Record one finished request at the entry: its status always, its latency when it succeeded."""
        seconds = _check_amount("inference latency (s)", seconds)
        m = self._free("model", model)
        self.requests.labels(model=m, status="ok" if ok else "error").inc()
        if ok:
            self.inference_latency.labels(model=m, version=self._free("version", version)).observe(seconds)

    def observe_stage(
        self,
        model: str,
        stage: int | str,
        phase: str,
        seconds: float,
        *,
        accelerator: str,
        node: str | None = None,
    ) -> None:
        """Record one request's time in one phase (queue | compute | transfer) of one stage."""
        seconds = _check_amount(f"stage {phase} time (s)", seconds)
        self.stage_latency.labels(
            model=self._free("model", model),
            stage=self._free("stage", stage),
            node=self._node(node),
            accelerator=self._free("accelerator", accelerator),
            phase=_check_enum("phase", phase, PHASES),
        ).observe(seconds)

    def add_transfer(self, direction: str, nbytes: int, *, node: str | None = None) -> None:
        """Count ``nbytes`` sent to or received from peers (direction: sent | received)."""
        self.transfer_bytes.labels(
            node=self._node(node), direction=_check_enum("direction", direction, DIRECTIONS)
        ).inc(_check_amount("transfer bytes", nbytes))

    def add_bandwidth_saved(self, model: str, nbytes: int) -> None:
        """Count bytes one request kept off the network (compute them with ``bandwidth_saved_bytes``)."""
        self.bandwidth_saved.labels(model=self._free("model", model)).inc(
            _check_amount("bandwidth saved bytes", nbytes)
        )

    def add_energy(
        self, accelerator: str, busy_seconds: float, active_watts: float, *, node: str | None = None
    ) -> float:
        """Add ``busy_seconds`` of compute and its ESTIMATED energy ``active_watts × busy_seconds``;
        returns the joules added."""
        busy = _check_amount("busy time (s)", busy_seconds)
        joules = busy * _check_amount("active power (W)", active_watts)
        labels = {"node": self._node(node), "accelerator": self._free("accelerator", accelerator)}
        self.busy.labels(**labels).inc(busy)
        self.energy.labels(**labels).inc(joules)
        return joules

    def set_peers(self, *, trusted: int, untrusted: int, lost: int) -> None:
        """Set how many peers this process knows in each state."""
        for state, n in (("trusted", trusted), ("untrusted", untrusted), ("lost", lost)):
            self.peers.labels(state=state).set(_check_amount(f"{state} peer count", n))

    def set_drift(self, model: str, method: str, score: float, *, feature: str | None = None) -> None:
        """Set a drift score: of input ``feature`` when given, else of the model's predictions."""
        if not math.isfinite(float(score)):
            raise ConfigError(f"drift score must be a finite number, got {score!r}")
        m, meth = self._free("model", model), self._free("method", method)
        if feature is None:
            self.prediction_drift.labels(model=m, method=meth).set(score)
        else:
            self.feature_drift.labels(model=m, feature=self._free("feature", feature), method=meth).set(score)

    def set_queue_depth(self, model: str, stage: int | str, depth: int, *, node: str | None = None) -> None:
        """Set how many requests wait for ``stage`` on this node right now."""
        self.queue_depth.labels(
            model=self._free("model", model), stage=self._free("stage", stage), node=self._node(node)
        ).set(_check_amount("queue depth", depth))

    # ---- reading ---------------------------------------------------------------------------------

    def value(self, name: str, **labels: str) -> float:
        """The current value of one sample (e.g. ``value("meshai_requests_total", model="m",
        status="ok")``), 0.0 when it was never recorded."""
        v = self.registry.get_sample_value(name, labels)
        return 0.0 if v is None else v

    def exposition(self) -> bytes:
        """The Prometheus text exposition (format 0.0.4) of every family."""
        return generate_latest(self._view)

    # ---- HTTP --------------------------------------------------------------------------------------

    def wsgi_app(self, ready: Callable[[], bool] | None = None) -> Callable[..., Iterable[bytes]]:
        """A WSGI app: ``/metrics`` (exposition), ``/healthz`` (200 ok), ``/readyz`` (200 when
        ``ready()`` is true, else 503; no ``ready`` means always ready), anything else 404."""
        metrics_app = make_wsgi_app(self._view)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            path = environ.get("PATH_INFO", "")
            if path == "/metrics":
                result: Iterable[bytes] = metrics_app(environ, start_response)
                return result
            if path == "/healthz":
                start_response("200 OK", _text_headers())
                return [b"ok\n"]
            if path == "/readyz":
                try:
                    is_ready = True if ready is None else bool(ready())
                except Exception as exc:  # a failing readiness probe means not ready, never a 500
                    start_response("503 Service Unavailable", _text_headers())
                    return [f"not ready: {type(exc).__name__}: {exc}\n".encode()]
                if is_ready:
                    start_response("200 OK", _text_headers())
                    return [b"ready\n"]
                start_response("503 Service Unavailable", _text_headers())
                return [b"not ready\n"]
            start_response("404 Not Found", _text_headers())
            return [b"not found; try /metrics, /healthz or /readyz\n"]

        return app

    def serve(
        self, host: str, port: int = 0, *, ready: Callable[[], bool] | None = None
    ) -> tuple[WSGIServer, threading.Thread]:
        """Serve ``wsgi_app(ready)`` on ``host:port`` only (port 0 picks a free one; read it from
        ``server.server_port``) in a daemon thread.  Stop with ``server.shutdown(); server.server_close()``.
        Raises ConfigError when the address cannot be bound."""
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        except socket.gaierror as exc:
            raise ConfigError(f"cannot resolve metrics host {host!r}: {exc}") from None

        class _Server(_ThreadingWSGIServer):
            address_family = family

        try:
            server = make_server(host, port, self.wsgi_app(ready), _Server, handler_class=_SilentHandler)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc}") from None
        thread = threading.Thread(
            target=server.serve_forever, name=f"meshai-metrics-{server.server_port}", daemon=True
        )
        thread.start()
        return server, thread

    @contextmanager
    def serving(self, host: str, port: int = 0, *, ready: Callable[[], bool] | None = None) -> Iterator[int]:
        """``with metrics.serving("127.0.0.1") as port:`` — ``serve`` for the block, yielding the bound
        port, and stop the server when the block ends."""
        server, thread = self.serve(host, port, ready=ready)
        try:
            yield int(server.server_port)
        finally:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)


class _WithoutCreated(Collector):
    """A view of a registry without the ``*_created`` samples prometheus-client adds to counters and
    histograms: in the text format they become separate gauge families that nobody queries."""

    def __init__(self, registry: CollectorRegistry, names: Iterable[str] | None = None) -> None:
        self._registry = registry
        self._names = None if names is None else tuple(names)

    def collect(self) -> Iterable[Metric]:
        source = self._registry if self._names is None else self._registry.restricted_registry(self._names)
        for fam in source.collect():
            if fam.type not in ("counter", "histogram", "summary", "gaugehistogram"):
                yield fam
                continue
            out = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            out.samples = [s for s in fam.samples if not s.name.endswith("_created")]
            yield out

    def restricted_registry(self, names: Iterable[str]) -> _WithoutCreated:
        """What ``make_wsgi_app`` calls for ``/metrics?name[]=…``: the same view, fewer families."""
        return _WithoutCreated(self._registry, names)


def _text_headers() -> list[tuple[str, str]]:
    # A fresh list per response: wsgiref appends Content-Length to the list it is given.
    return [("Content-Type", "text/plain; charset=utf-8")]


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _SilentHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Log nothing: a scrape every second would flood stderr."""


# --------------------------------------------------------------------------------------------------
# One exposition for a swarm

Source = Metrics | CollectorRegistry | bytes | str


def _text_of(src: Source) -> str:
    if isinstance(src, Metrics):
        return src.exposition().decode()
    if isinstance(src, CollectorRegistry):
        return generate_latest(src).decode()
    if isinstance(src, bytes):
        return src.decode()
    return src


def exposition_text(
    sources: Mapping[str, Source] | Sequence[Source] | Source, *, label: str = "node"
) -> bytes:
    """Merge expositions (``Metrics``, registries, or text fetched from ``/metrics``) into one valid
    text exposition: one HELP/TYPE per family, every series once.  With a mapping
    ``name -> source``, each series lacking ``label`` gets ``label=name`` (so per-process families
    such as ``meshai_peers`` stay apart).  Raises ConfigError on a family with two types or a series
    that appears twice."""
    if isinstance(sources, str | bytes | Metrics | CollectorRegistry):
        sources = [sources]
    named = list(sources.items()) if isinstance(sources, Mapping) else [(None, s) for s in sources]
    families: dict[str, Metric] = {}
    seen: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    for name, src in named:
        try:
            parsed = list(text_string_to_metric_families(_text_of(src)))
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"metrics of {name or 'a source'} do not parse: {exc}") from None
        for fam in parsed:
            merged = families.get(fam.name)
            if merged is None:
                merged = families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            elif merged.type != fam.type:
                raise ConfigError(
                    f"metric family {fam.name!r} is a {merged.type} in one source, a {fam.type} in another"
                )
            for s in fam.samples:
                labels = dict(s.labels)
                if name is not None:
                    labels.setdefault(label, name)
                key = (s.name, tuple(sorted(labels.items())))
                if key in seen:
                    raise ConfigError(
                        f"series {s.name}{dict(key[1])} appears in more than one source; name the sources"
                    )
                seen.add(key)
                merged.samples.append(Sample(s.name, labels, s.value, s.timestamp, s.exemplar))

    class _Static:
        def collect(self) -> Iterator[Metric]:
            yield from families.values()

    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Static())
    return generate_latest(reg)


def write_prom_file(
    path: str | os.PathLike[str],
    sources: Mapping[str, Source] | Sequence[Source] | Source,
    *,
    label: str = "node",
) -> Path:
    """Write ``exposition_text(sources, label=label)`` to ``path`` atomically (a temporary file in the
    same directory, then a rename); returns the path."""
    out = Path(path)
    data = exposition_text(sources, label=label)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # readable by a node_exporter textfile collector, like any written file
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
