"""MQTT fleet telemetry: the pure part (snapshots, the payload gate, backoff, fleet state) without a
socket, then the wiring against a real mosquitto on a loopback port: interval publishing, retained
status, the Last Will of a SIGKILLed process, reconnection across a broker restart without blocking an
inference loop, and ``meshai telemetry --json``."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshai.errors import ConfigError, PeerError, RemoteProtocolError
from meshai.telemetry import (
    MAX_DRIFT_FEATURES,
    MAX_PAYLOAD,
    MAX_STRING,
    PAYLOAD_KEYS,
    Backoff,
    FleetState,
    LatestOnly,
    Telemetry,
    TelemetryRecorder,
    TelemetrySnapshot,
    check_name,
    check_payload,
    fleet_state,
    status_topic,
    telemetry_topic,
)
from meshai.telemetry_cli import parse_broker

ROOT = Path(__file__).resolve().parents[1]
MOSQUITTO = shutil.which("mosquitto") or (
    "/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None
)
needs_broker = pytest.mark.skipif(
    MOSQUITTO is None, reason="mosquitto binary not installed (apt install mosquitto)"
)


def snap(**kw: Any) -> TelemetrySnapshot:
    base: dict[str, Any] = {
        "node": "n0",
        "site": "lab",
        "model": "squeezenet",
        "deployment": "cam-front",
        "requests_ok": 95,
        "requests_error": 5,
        "latency_p50_ms": 4.5,
        "latency_p95_ms": 9.25,
        "bytes_sent": 1 << 20,
        "bytes_received": 4096,
        "drift": {"brightness": 0.12, "input_0": 0.4},
        "uptime_s": 12.5,
        "timestamp": 1_700_000_000.25,
    }
    base.update(kw)
    return TelemetrySnapshot(**base)


def payload_with(**changes: Any) -> bytes:
    obj = snap().to_dict()
    obj.update(changes)
    return json.dumps(obj).encode()


# ------------------------------------------------------------------------------------- pure: snapshot


def test_snapshot_round_trips_through_its_payload():
    s = snap()
    assert s.error_rate == pytest.approx(0.05)
    assert s.requests == 100 and s.drift_max == pytest.approx(0.4)
    data = s.to_payload()
    assert set(json.loads(data)) == PAYLOAD_KEYS
    back = check_payload(data)
    assert back == s and back.to_payload() == data
    assert check_payload(snap(requests_ok=0, requests_error=0, drift={}).to_payload()).error_rate == 0.0


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"node": "a/b"}, "'a/b'"),
        ({"site": "+"}, "'+'"),
        ({"node": "#"}, "'#'"),
        ({"node": ""}, "''"),
        ({"model": "x" * (MAX_STRING + 1)}, "65 characters"),
        ({"requests_ok": -1}, "requests_ok"),
        ({"requests_error": True}, "requests_error"),
        ({"latency_p50_ms": float("nan")}, "latency_p50_ms"),
        ({"latency_p50_ms": 10.0, "latency_p95_ms": 5.0}, "below"),
        ({"drift": {f"f{i}": 0.1 for i in range(MAX_DRIFT_FEATURES + 1)}}, "17 features"),
        ({"drift": {"ok": float("inf")}}, "drift"),
        ({"deployment": "AAAAAIA/AAAAQA=="}, "not a name"),
    ],
)
def test_snapshot_refuses_bad_fields_naming_them(kw: dict[str, Any], needle: str):
    with pytest.raises(ConfigError) as info:
        snap(**kw)
    assert needle in str(info.value)


def test_topics_and_names_refuse_wildcards_and_separators():
    assert telemetry_topic("lab", "n0") == "meshai/lab/n0/telemetry"
    assert status_topic("+", "+") == "meshai/+/+/status"
    for bad in ("a+b", "a#", "a/b", "", " n0", "n 0", "-x"):
        with pytest.raises(ConfigError):
            check_name("node", bad)
    rec = TelemetryRecorder("n0", "lab")
    with pytest.raises(ConfigError, match="'lab/x'"):
        Telemetry("127.0.0.1", 1883, "lab/x", "n0", snapshot=rec.snapshot)
    with pytest.raises(ConfigError, match="'#'"):
        Telemetry("127.0.0.1", 1883, "lab", "#", snapshot=rec.snapshot)
    with pytest.raises(ConfigError, match="interval"):
        Telemetry("127.0.0.1", 1883, "lab", "n0", 0.0, snapshot=rec.snapshot)


def test_recorder_aggregates_counts_percentiles_and_uptime():
    clock = iter([100.0, 107.5])
    rec = TelemetryRecorder("n0", "lab", "squeezenet", clock=lambda: 5.0e9, monotonic=lambda: next(clock))
    for i in range(1, 101):
        rec.record(float(i), ok=i % 10 != 0, bytes_sent=10, bytes_received=3)
    rec.set_drift("brightness", 0.3)
    s = rec.snapshot()
    assert (s.requests_ok, s.requests_error, s.error_rate) == (90, 10, pytest.approx(0.1))
    assert (s.latency_p50_ms, s.latency_p95_ms) == (50.0, 95.0)
    assert (s.bytes_sent, s.bytes_received, s.uptime_s, s.timestamp) == (1000, 300, 7.5, 5.0e9)
    for i in range(MAX_DRIFT_FEATURES - 1):
        rec.set_drift(f"f{i}", 0.0)
    with pytest.raises(ConfigError, match="refusing"):
        rec.set_drift("one-too-many", 0.0)


# ------------------------------------------------------------------------------ pure: payload gate


def _tensor_b64(n: int, *, urlsafe: bool = False) -> str:
    raw = np.random.default_rng(n).standard_normal(n).astype(np.float32).tobytes()
    return (base64.urlsafe_b64encode(raw).decode().rstrip("=")) if urlsafe else base64.b64encode(raw).decode()


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (payload_with(tensor=[0.1, 0.2]), "numeric array"),
        (payload_with(extra="x"), "unknown keys ['extra']"),
        (payload_with(drift=np.arange(64, dtype=np.float32).tolist()), "numeric array"),
        (payload_with(drift=[0.5]), "numeric array"),
        (payload_with(model=["a", "b", "c", "d", "e"]), "array of 5 items"),
        (payload_with(model=["a"]), "model must be a string"),
        (payload_with(model="m" * (MAX_STRING + 1)), "65-character string"),
        (payload_with(model=_tensor_b64(4)), "base64-looking"),
        (payload_with(model=_tensor_b64(12, urlsafe=True)), "base64-looking"),
        (payload_with(node=_tensor_b64(256)), "string"),
        (payload_with(drift={_tensor_b64(8): 0.1}), "base64-looking"),
        (payload_with(drift={"a": {"b": 1.0}}), "drift"),
        (payload_with(drift={"a": [1.0, 2.0]}), "numeric array"),
        (payload_with(drift={f"f{i}": 0.1 for i in range(MAX_DRIFT_FEATURES + 1)}), "17 features"),
        (payload_with(requests_ok=1.5), "requests_ok must be an integer"),
        (payload_with(requests_ok=True), "requests_ok must be an integer"),
        (payload_with(error_rate=0.5), "disagrees"),
        (payload_with(v=2), "schema version"),
        (payload_with(site="a/b"), "not a name"),
        (payload_with(latency_p95_ms="9"), "latency_p95_ms must be a number"),
        (payload_with(uptime_s=1e400), "non-finite"),
        (b'{"v":1,"v":1}', "repeats the key 'v'"),
        (b'{"latency_p50_ms": NaN}', "non-finite number NaN"),
        (b"[1, 2, 3]", "JSON object"),
        (b"\x00\x01tensor", "not JSON"),
        (b" " * (MAX_PAYLOAD + 1), "bytes, more than"),
        (
            json.dumps({k: v for k, v in snap().to_dict().items() if k != "drift"}).encode(),
            "lacks keys ['drift']",
        ),
    ],
)
def test_check_payload_refuses_anything_but_aggregates(data: bytes, needle: str):
    with pytest.raises(RemoteProtocolError) as info:
        check_payload(data)
    assert needle in str(info.value)


def test_no_tensor_fits_anywhere_in_a_payload():
    """Put a real tensor, in every encoding, in every place a payload has room for: all refused."""
    tensor = np.random.default_rng(0).standard_normal((1, 3, 4, 4)).astype(np.float32)
    raw = tensor.tobytes()
    encodings = [
        tensor.ravel().tolist(),
        tensor.tolist(),
        base64.b64encode(raw).decode(),
        base64.urlsafe_b64encode(raw).decode().rstrip("="),
        raw.hex(),
        {f"x{i}": float(v) for i, v in enumerate(tensor.ravel())},
    ]
    for enc in encodings:
        for key in [k for k in PAYLOAD_KEYS if k != "v"] + ["tensor"]:
            with pytest.raises(RemoteProtocolError):
                check_payload(payload_with(**{key: enc}))
    # and byte by byte, a tensor is far bigger than the payload limit allows anyway
    assert len(raw) * 4 // 3 > MAX_STRING


names = st.from_regex(r"[a-z][a-z0-9]{0,10}(-[a-z0-9]{1,8}){0,2}", fullmatch=True)
reals = st.floats(min_value=0, max_value=1e9, allow_nan=False, allow_infinity=False)
counts = st.integers(min_value=0, max_value=2**53 - 1)


@settings(max_examples=150, deadline=None)
@given(
    node=names,
    site=names,
    model=names,
    ok=counts,
    err=counts,
    p=st.tuples(reals, reals).map(sorted),
    drift=st.dictionaries(names, reals, max_size=MAX_DRIFT_FEATURES),
    up=reals,
    ts=reals,
)
def test_every_snapshot_payload_passes_and_holds_no_array(node, site, model, ok, err, p, drift, up, ts):
    s = TelemetrySnapshot(
        node=node,
        site=site,
        model=model,
        requests_ok=ok,
        requests_error=err,
        latency_p50_ms=p[0],
        latency_p95_ms=p[1],
        drift=drift,
        uptime_s=up,
        timestamp=ts,
    )
    data = s.to_payload()
    assert len(data) <= MAX_PAYLOAD
    assert check_payload(data) == s

    def leaves(v: object) -> Iterator[object]:
        if isinstance(v, dict):
            for k, x in v.items():
                yield k
                yield from leaves(x)
        else:
            yield v

    for leaf in leaves(json.loads(data)):
        assert not isinstance(leaf, list)
        assert not isinstance(leaf, str) or len(leaf) <= MAX_STRING


# ------------------------------------------------------------------- pure: backoff, mailbox, fleet


def test_backoff_is_exponential_bounded_and_jittered():
    b = Backoff(initial=0.1, factor=2.0, maximum=1.0, jitter=0.5)
    top = [b.delay(k, 0.0) for k in range(8)]
    assert top == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0])
    assert [b.delay(k, 0.999999) for k in range(3)] == pytest.approx([0.05, 0.1, 0.2], rel=1e-4)
    assert b.delay(10_000, 0.3) <= 1.0
    for bad in ({"initial": 0.0}, {"initial": 2.0, "maximum": 1.0}, {"jitter": 1.0}, {"factor": 0.5}):
        with pytest.raises(ConfigError):
            Backoff(**bad)


def test_latest_only_keeps_one_and_counts_the_dropped():
    box: LatestOnly[int] = LatestOnly()
    for i in range(1000):
        box.put(i)
    assert len(box) == 1 and box.dropped == 999
    assert box.take() == 999 and box.take() is None and len(box) == 0


def test_fleet_state_folds_status_and_snapshots_and_refuses_the_rest():
    fs = FleetState("lab", clock=lambda: 1.0)
    assert fs.apply("meshai/lab/n0/status", b"online")
    assert fs.apply("meshai/lab/n0/telemetry", snap().to_payload())
    assert fs.apply("meshai/lab/n1/telemetry", snap(node="n1").to_payload())
    assert fs.apply("meshai/lab/n1/status", b"offline")
    assert not fs.apply("meshai/lab/n2/telemetry", snap().to_payload())  # n0's snapshot on n2's topic
    assert not fs.apply("meshai/lab/n2/telemetry", payload_with(node="n2", tensor=[1.0]))
    assert not fs.apply("meshai/lab/n2/status", b"maybe")
    assert not fs.apply("meshai/other/n0/status", b"online")
    assert not fs.apply("meshai/lab/n0/extra/status", b"online")
    state = fs.nodes()
    assert list(state) == ["lab/n0", "lab/n1"]
    assert state["lab/n0"].status == "online" and state["lab/n0"].snapshot == snap()
    assert state["lab/n1"].status == "offline" and state["lab/n1"].to_dict()["requests"] == 100
    assert fs.rejected == 5


def test_reconnect_backoff_uses_the_injected_sleep_and_close_is_prompt():
    """No broker at all: every connect is refused, the delays follow Backoff, nothing really sleeps."""

    async def main() -> tuple[list[float], Telemetry, float]:
        slept: list[float] = []

        async def fake_sleep(delay: float) -> None:
            slept.append(delay)
            await asyncio.sleep(0)

        rec = TelemetryRecorder("n0", "lab")
        port = _free_port()
        b = Backoff(initial=0.5, factor=2.0, maximum=4.0, jitter=0.5)
        async with Telemetry(
            "127.0.0.1",
            port,
            "lab",
            "n0",
            0.05,
            snapshot=rec.snapshot,
            sleep=fake_sleep,
            backoff=b,
            rng=lambda: 0.0,
        ) as t:
            deadline = time.monotonic() + 10
            while len(slept) < 6 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)  # ticks while down: only the latest snapshot is kept
            assert not t.connected and len(t._latest) == 1
            t0 = time.monotonic()
        return slept, t, time.monotonic() - t0

    slept, t, close_s = asyncio.run(main())
    assert slept[:6] == pytest.approx([0.5, 1.0, 2.0, 4.0, 4.0, 4.0])
    assert t.failed_connects >= 6 and t.connects == 0 and t.published == 0
    assert t.dropped >= 2
    assert close_s < 1.0


# ------------------------------------------------------------------------------- real mosquitto


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Broker:
    """A mosquitto on 127.0.0.1:port with its config, pid and log in a temp dir; no persistence."""

    def __init__(self, directory: Path) -> None:
        assert MOSQUITTO is not None
        self.dir = directory
        self.port = _free_port()
        self.conf = directory / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence false\n"
            "user root\n"  # we run as root in CI: do not switch to a user that cannot write the temp dir
            f"pid_file {directory / 'mosquitto.pid'}\n"
            f"log_dest file {directory / 'mosquitto.log'}\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert self.proc is None
        self.proc = subprocess.Popen(
            [str(MOSQUITTO), "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = (
                    (self.dir / "mosquitto.log").read_text() if (self.dir / "mosquitto.log").exists() else ""
                )
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}: {log[-500:]}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2),
            ):
                return
            time.sleep(0.01)
        raise RuntimeError(f"mosquitto did not listen on 127.0.0.1:{self.port}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    if MOSQUITTO is None:
        pytest.skip("mosquitto binary not installed (apt install mosquitto)")
    b = Broker(tmp_path)
    b.start()
    try:
        yield b
    finally:
        b.stop()


@contextlib.asynccontextmanager
async def subscriber(
    port: int, *topics: str
) -> AsyncIterator[tuple[aiomqtt.Client, asyncio.Queue[tuple[str, bytes, float]]]]:
    """A client subscribed to ``topics`` whose messages land in a queue as (topic, payload, time)."""
    queue: asyncio.Queue[tuple[str, bytes, float]] = asyncio.Queue()
    async with aiomqtt.Client(
        "127.0.0.1", port, identifier=f"test-sub-{os.getpid()}-{time.monotonic_ns()}"
    ) as client:
        for t in topics:
            await client.subscribe(t, qos=1)

        async def pump() -> None:
            async for m in client.messages:
                assert isinstance(m.payload, bytes)
                queue.put_nowait((str(m.topic), m.payload, time.monotonic()))

        task = asyncio.create_task(pump(), name="test-subscriber")
        try:
            yield client, queue
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await task


async def next_on(queue: asyncio.Queue[tuple[str, bytes, float]], topic: str, timeout: float = 5.0) -> bytes:
    deadline = time.monotonic() + timeout
    while True:
        t, payload, _ = await asyncio.wait_for(queue.get(), max(0.01, deadline - time.monotonic()))
        if t == topic:
            return payload


async def retained(port: int, topic: str) -> bytes:
    """The retained message on ``topic`` as a fresh subscriber sees it."""
    async with subscriber(port, topic) as (_, q):
        return await next_on(q, topic, timeout=3.0)


@pytest.mark.process
@needs_broker
def test_snapshots_arrive_at_the_interval_and_pass_the_gate(broker: Broker):
    async def main() -> list[tuple[str, bytes, float]]:
        rec = TelemetryRecorder("n0", "lab", "squeezenet")
        async with subscriber(broker.port, telemetry_topic("lab", "+")) as (_, q):
            async with Telemetry("127.0.0.1", broker.port, "lab", "n0", 0.2, snapshot=rec.snapshot) as t:
                await t.wait_connected(5)
                for i in range(50):
                    rec.record(1.0 + i % 7, ok=i % 25 != 0)
                await asyncio.sleep(1.1)
            got = []
            with contextlib.suppress(TimeoutError):
                while True:
                    got.append(await asyncio.wait_for(q.get(), 0.2))
        return got

    got = asyncio.run(main())
    assert 5 <= len(got) <= 8, [round(g[2], 3) for g in got]
    assert {g[0] for g in got} == {"meshai/lab/n0/telemetry"}
    snaps = [check_payload(g[1]) for g in got]  # every published payload passes the gate
    assert snaps[-1].requests == 50 and snaps[-1].requests_error == 2 and snaps[-1].model == "squeezenet"
    gaps = [b[2] - a[2] for a, b in itertools.pairwise(got[1:])]
    assert all(0.1 < g < 0.35 for g in gaps), gaps


@pytest.mark.process
@needs_broker
def test_status_is_retained_online_then_offline_on_clean_exit(broker: Broker):
    async def main() -> tuple[bytes, bytes, float]:
        rec = TelemetryRecorder("n0", "lab")
        topic = status_topic("lab", "n0")
        async with Telemetry("127.0.0.1", broker.port, "lab", "n0", 5.0, snapshot=rec.snapshot) as t:
            await t.wait_connected(5)
            online = await retained(broker.port, topic)
            t0 = time.monotonic()
        exit_s = time.monotonic() - t0
        return online, await retained(broker.port, topic), exit_s

    online, offline, exit_s = asyncio.run(main())
    assert (online, offline) == (b"online", b"offline")
    assert exit_s < 1.0


CHILD = """
import asyncio, sys
from meshai.telemetry import Telemetry, TelemetryRecorder

async def main() -> None:
    rec = TelemetryRecorder("doomed", "lab")
    async with Telemetry("127.0.0.1", int(sys.argv[1]), "lab", "doomed", 0.2, snapshot=rec.snapshot) as t:
        await t.wait_connected(5)
        print("ready", flush=True)
        await asyncio.sleep(60)

asyncio.run(main())
"""


@pytest.mark.process
@needs_broker
def test_last_will_says_offline_when_the_process_is_sigkilled(broker: Broker):
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(broker.port)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == b"ready", child.stderr.read() if child.stderr else b""

        async def main() -> tuple[bytes, bytes, float]:
            topic = status_topic("lab", "doomed")
            async with subscriber(broker.port, topic) as (_, q):
                before = await next_on(q, topic)
                t0 = time.monotonic()
                os.kill(child.pid, signal.SIGKILL)
                after = await next_on(q, topic, timeout=5.0)
                return before, after, time.monotonic() - t0

        before, after, will_s = asyncio.run(main())
        assert (before, after) == (b"online", b"offline")
        assert will_s < 2.0
        assert asyncio.run(retained(broker.port, status_topic("lab", "doomed"))) == b"offline"
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=5)


@pytest.mark.process
@needs_broker
def test_broker_restart_reconnects_with_backoff_without_blocking_inference(broker: Broker):
    """SIGTERM the broker, start it again on the same port: telemetry resumes, inference never stalls."""

    async def main() -> dict[str, Any]:
        rec = TelemetryRecorder("n0", "lab")
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        max_gap = 0.0

        async def inference() -> None:  # a 1 ms work loop beside telemetry
            nonlocal max_gap
            last = loop.time()
            while not stop.is_set():
                await asyncio.sleep(0.001)
                now = loop.time()
                max_gap = max(max_gap, now - last)
                rec.record((now - last) * 1e3)
                last = now

        worker = asyncio.create_task(inference(), name="test-inference")
        backoff = Backoff(initial=0.05, factor=2.0, maximum=0.4, jitter=0.5)
        async with Telemetry(
            "127.0.0.1", broker.port, "lab", "n0", 0.1, snapshot=rec.snapshot, backoff=backoff
        ) as t:
            await t.wait_connected(5)
            while t.published < 2:
                await asyncio.sleep(0.01)
            t_down = time.monotonic()
            await asyncio.to_thread(broker.stop, signal.SIGTERM)
            while t.connected:
                await asyncio.sleep(0.005)
            detect_s = time.monotonic() - t_down
            await asyncio.sleep(0.8)  # broker away: connects refused, ticks replace each other
            failed, published_before = t.failed_connects, t.published
            assert len(t._latest) <= 1
            await asyncio.to_thread(broker.start)
            t_up = time.monotonic()
            await t.wait_connected(5)
            reconnect_s = (t.last_connected_at or 0.0) - t_up
            async with subscriber(broker.port, telemetry_topic("lab", "n0"), status_topic("lab", "n0")) as (
                _,
                q,
            ):
                status = await next_on(q, status_topic("lab", "n0"))  # retained again after the restart
                fresh = check_payload(await next_on(q, telemetry_topic("lab", "n0")))
            out = {
                "detect_s": detect_s,
                "reconnect_s": reconnect_s,
                "failed": failed,
                "delays": list(t.backoff_delays),
                "dropped": t.dropped,
                "published_before": published_before,
                "published": t.published,
                "connects": t.connects,
                "status": status,
                "fresh_ts": fresh.timestamp,
                "t_up_wall": time.time() - (time.monotonic() - t_up),
            }
        stop.set()
        await worker
        out["max_gap_ms"] = max_gap * 1e3
        return out

    r = asyncio.run(main())
    print(
        f"\nbroker loss seen {r['detect_s'] * 1e3:.1f} ms after SIGTERM to the broker; {r['failed']} refused connects; "
        f"reconnected {r['reconnect_s'] * 1e3:.0f} ms after the broker listened again; "
        f"backoff delays {[round(d, 3) for d in r['delays']]}; dropped {r['dropped']}; "
        f"inference max gap {r['max_gap_ms']:.1f} ms"
    )
    assert r["detect_s"] < 1.0
    assert r["failed"] >= 2 and r["connects"] == 2
    assert all(d <= 0.4 for d in r["delays"])
    assert r["reconnect_s"] < 1.0  # at most one capped backoff delay (0.4 s) plus a connect, with slack
    assert r["status"] == b"online" and r["fresh_ts"] >= r["t_up_wall"] - 0.2
    assert r["published"] > r["published_before"]
    assert r["dropped"] >= 3  # ~8 ticks while away: all but the latest dropped, none queued
    assert r["max_gap_ms"] < 200, r["max_gap_ms"]


@pytest.mark.process
@needs_broker
def test_fleet_state_and_cli_show_the_nodes(broker: Broker):
    cli = _cli_command()

    async def main() -> tuple[dict[str, Any], dict[str, Any], str, tuple[int, str]]:
        recs = [TelemetryRecorder(f"n{i}", "lab", "squeezenet") for i in range(2)]
        for i, r in enumerate(recs):
            for k in range(10 * (i + 1)):
                r.record(2.0 + k, ok=k != 3)
            r.set_drift("brightness", 0.1 * (i + 1))
        async with contextlib.AsyncExitStack() as stack:
            for r in recs:
                t = await stack.enter_async_context(
                    Telemetry("127.0.0.1", broker.port, "lab", r.node, 0.2, snapshot=r.snapshot)
                )
                await t.wait_connected(5)
            state = await fleet_state("127.0.0.1", broker.port, "lab", wait=0.5)
            args = ["--broker", f"127.0.0.1:{broker.port}", "--site", "lab", "--wait", "0.6"]
            js = await _run(*cli, *args, "--json")
            table = await _run(*cli, *args)
        bad = await _run(*cli, "--broker", f"127.0.0.1:{_free_port()}", "--wait", "0", check=False)
        return state, json.loads(js), table, bad

    state, js, table, (bad_rc, bad_err) = asyncio.run(main())
    assert sorted(state) == ["lab/n0", "lab/n1"]
    assert state["lab/n1"].status == "online" and state["lab/n1"].snapshot is not None
    assert state["lab/n1"].snapshot.requests == 20
    nodes = {n["node"]: n for n in js["nodes"]}
    assert sorted(nodes) == ["n0", "n1"] and js["rejected"] == 0
    assert nodes["n0"]["status"] == "online" and nodes["n0"]["requests"] == 10
    assert nodes["n1"]["error_rate"] == pytest.approx(0.05) and nodes["n1"]["drift_max"] == pytest.approx(0.2)
    assert nodes["n0"]["latency_p95_ms"] >= nodes["n0"]["latency_p50_ms"] > 0
    assert "n0" in table and "n1" in table and "online" in table and "p95 ms" in table
    assert (
        bad_rc == 1
        and bad_err.startswith("meshai: error: cannot reach MQTT broker")
        and bad_err.count("\n") == 1
    )


def test_parse_broker():
    assert parse_broker("127.0.0.1:1883") == ("127.0.0.1", 1883)
    assert parse_broker("[::1]:1883") == ("::1", 1883)
    for bad in ("127.0.0.1", ":1883", "h:0", "h:x", "h:70000"):
        with pytest.raises(ConfigError):
            parse_broker(bad)


def test_fleet_state_unreachable_broker_is_a_peer_error():
    with pytest.raises(PeerError, match=r"cannot reach MQTT broker 127\.0\.0\.1"):
        asyncio.run(fleet_state("127.0.0.1", _free_port(), wait=0))


def _cli_command() -> list[str]:
    """``python -m meshai telemetry``, as a user runs it."""
    return [sys.executable, "-m", "meshai", "telemetry"]


async def _run(*argv: str, check: bool = True) -> Any:
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    if check:
        assert proc.returncode == 0, err.decode()
        return out.decode()
    return proc.returncode, err.decode()
