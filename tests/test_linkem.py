"""meshai's own link emulator: the spec language, the shaper as data, and the transport shaped by it
over real sockets on 127.0.0.1 (delay, order, copies, rate and backpressure, drops, link down / up,
and the signals ``meshai node --link`` listens to, in a child process)."""

from __future__ import annotations

import asyncio
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from loop_helpers import (
    FAST,
    HOST,
    Inbox,
    close_writer,
    connect_client,
    echo_handler,
    hello,
    raw_client,
    serving,
)
from loop_helpers import run as run_clean

from meshai import linkem
from meshai.errors import ConfigError, PeerError
from meshai.linkem import MIN_RTO_S, MSS, LinkShaper, LinkSpec, parse_link
from meshai.protocol import (
    Control,
    ControlReply,
    Infer,
    encode,
)
from meshai.security import self_signed_tls
from meshai.transport import WRITE_HIGH_WATER, ChannelOptions, connect

T = TypeVar("T")
MB = 1_000_000
MiB = 1024 * 1024


pytestmark = pytest.mark.usefixtures("clean_linkem")


def run(coro: Coroutine[Any, Any, T], timeout: float = 20.0) -> T:
    """``loop_helpers.run`` with room for emulated delays."""
    return run_clean(coro, timeout)


# --------------------------------------------------------------------------- the spec language

GOOD = [
    ("delay=20ms", LinkSpec(delay_s=0.02)),
    ("jitter=5ms", LinkSpec(jitter_s=0.005)),  # jitter without delay is fine
    ("delay=250us,jitter=1.5s", LinkSpec(delay_s=0.00025, jitter_s=1.5)),
    ("rate=100mbit", LinkSpec(rate_Bps=12.5 * MB)),
    ("rate=8kbit", LinkSpec(rate_Bps=1000)),
    ("rate=1gbit", LinkSpec(rate_Bps=125 * MB)),
    ("rate=2mbps", LinkSpec(rate_Bps=2 * MB)),  # tc: bps means BYTES per second
    ("rate=3kbps", LinkSpec(rate_Bps=3000)),
    ("rate=100bps", LinkSpec(rate_Bps=100)),
    ("rate=1mibit", LinkSpec(rate_Bps=MiB / 8)),
    ("loss=1%", LinkSpec(loss=0.01)),
    ("loss=0.01", LinkSpec(loss=0.01)),
    ("loss=100%,loss-mode=drop", LinkSpec(loss=1.0, loss_mode="drop")),
    ("loss=0", LinkSpec()),
    (
        " delay = 20ms , jitter=5ms,RATE=100Mbit,loss=1%,loss-mode=stall",
        LinkSpec(delay_s=0.02, jitter_s=0.005, rate_Bps=12.5 * MB, loss=0.01),
    ),
]


@pytest.mark.parametrize(("text", "spec"), GOOD, ids=[t for t, _ in GOOD])
def test_good_specs_parse_and_round_trip(text: str, spec: LinkSpec) -> None:
    assert parse_link(text) == spec
    assert parse_link(str(spec)) == spec
    assert spec.to_dict()["spec"] == str(spec)


@pytest.mark.parametrize(
    "spec",
    [
        LinkSpec(),
        LinkSpec(delay_s=0.0123456789, jitter_s=1e-7),
        LinkSpec(rate_Bps=12345.678),
        LinkSpec(rate_Bps=1e-3),
        LinkSpec(loss=0.00123, loss_mode="drop"),
        LinkSpec(loss=1 / 3),
        LinkSpec(delay_s=2.5, jitter_s=0.001, rate_Bps=125_000, loss=0.2),
    ],
)
def test_odd_values_round_trip_exactly(spec: LinkSpec) -> None:
    assert parse_link(str(spec)) == spec


def test_spec_string_and_dict() -> None:
    spec = parse_link("loss-mode=drop,loss=1%,rate=100mbit,jitter=5ms,delay=20ms")
    assert str(spec) == "delay=20ms,jitter=5ms,rate=100mbit,loss=1%,loss-mode=drop"
    assert spec.to_dict() == {
        "delay_s": 0.02,
        "jitter_s": 0.005,
        "rate_Bps": 12.5 * MB,
        "loss": 0.01,
        "loss_mode": "drop",
        "spec": "delay=20ms,jitter=5ms,rate=100mbit,loss=1%,loss-mode=drop",
    }
    assert LinkSpec().noop and not LinkSpec(jitter_s=0.001).noop and not LinkSpec(rate_Bps=1).noop
    assert LinkSpec(delay_s=0.001).rto_s == MIN_RTO_S
    assert LinkSpec(delay_s=0.3, jitter_s=0.1).rto_s == pytest.approx(0.8)


BAD = [
    ("", "empty"),
    ("   ", "empty"),
    ("delay", "'delay'"),
    ("delay=", "'delay='"),
    ("=5ms", "'=5ms'"),
    ("delay=20ms,,rate=1mbit", "''"),
    ("delay=-5ms", "delay '-5ms'"),
    ("delay=5", "delay '5'"),
    ("delay=5min", "delay '5min'"),
    ("jitter=fast", "jitter 'fast'"),
    ("rate=100", "rate '100'"),
    ("rate=0mbit", "rate '0mbit'"),
    ("rate=-1mbit", "rate '-1mbit'"),
    ("rate=10mb", "rate '10mb'"),
    ("loss=101%", "loss '101%'"),
    ("loss=2", "loss '2'"),
    ("loss=-1%", "loss '-1%'"),
    ("loss=1ms", "loss '1ms'"),
    ("loss-mode=maybe", "loss-mode 'maybe'"),
    ("speed=1mbit", "'speed'"),
    ("delay=1ms,delay=2ms", "'delay' twice"),
]


@pytest.mark.parametrize(("text", "named"), BAD, ids=[t or "<empty>" for t, _ in BAD])
def test_bad_specs_raise_config_error_naming_the_culprit(text: str, named: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_link(text)
    assert named in str(info.value)


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"delay_s": -1}, "delay_s"),
        ({"jitter_s": math.nan}, "jitter_s"),
        ({"loss": 1.5}, "loss"),
        ({"rate_Bps": 0}, "rate_Bps"),
        ({"rate_Bps": math.inf}, "rate_Bps"),
        ({"loss_mode": "lose"}, "loss_mode"),
        ({"delay_s": True}, "delay_s"),
    ],
)
def test_link_spec_validates_its_fields(fields: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        LinkSpec(**fields)


# --------------------------------------------------------------------------- the shaper as data


def test_delay_and_jitter_stay_in_bounds_and_vary() -> None:
    shaper = LinkShaper(LinkSpec(delay_s=0.05, jitter_s=0.01), seed=1)
    travel = []
    for i in range(500):
        now = i * 1.0  # far apart: no queueing, so each release is now + delay ± jitter
        r = shaper.schedule(now, 1000)
        assert not r.drop and not r.stalled
        travel.append(r.release_at - now)
    assert min(travel) >= 0.04 - 1e-12 and max(travel) <= 0.06 + 1e-12
    assert max(travel) - min(travel) > 0.015  # it does jitter


def test_jitter_larger_than_delay_never_goes_below_zero() -> None:
    shaper = LinkShaper(LinkSpec(delay_s=0.001, jitter_s=0.02), seed=2)
    for i in range(200):
        assert shaper.schedule(i * 1.0, 10).release_at >= i * 1.0


def test_releases_never_reorder() -> None:
    shaper = LinkShaper(LinkSpec(delay_s=0.01, jitter_s=0.05, loss=0.1), seed=3)
    releases = [shaper.schedule(i * 0.001, 500).release_at for i in range(2000)]
    assert releases == sorted(releases)


def test_rate_serialises_frames_one_after_another() -> None:
    shaper = LinkShaper(LinkSpec(rate_Bps=MB), seed=0)
    releases = [shaper.schedule(0.0, 125_000).release_at for _ in range(10)]
    assert releases == pytest.approx([0.125 * (i + 1) for i in range(10)])
    assert releases[-1] == pytest.approx(1.25)
    # an idle link starts sending at once; the delay comes on top of the serialisation
    shaper = LinkShaper(LinkSpec(rate_Bps=MB, delay_s=0.02), seed=0)
    assert shaper.schedule(5.0, 10_000).release_at == pytest.approx(5.03)
    assert shaper.schedule(5.0, 10_000).release_at == pytest.approx(5.04)
    assert shaper.schedule(9.0, 10_000).release_at == pytest.approx(9.03)


def test_zero_loss_never_stalls_or_drops() -> None:
    shaper = LinkShaper(LinkSpec(delay_s=0.01, jitter_s=0.005), seed=4)
    for i in range(10_000):
        r = shaper.schedule(i * 0.01, 64 * 1024)
        assert not r.stalled and not r.drop


def test_loss_stalls_by_a_retransmission_timeout_and_later_frames_wait() -> None:
    spec = LinkSpec(delay_s=0.01, loss=0.5)
    shaper = LinkShaper(spec, seed=5)
    stalled = 0
    for i in range(200):
        now = i * 10.0
        r = shaper.schedule(now, MSS)  # one packet: hit with probability `loss`
        assert not r.drop
        if r.stalled:
            stalled += 1
            assert r.release_at == pytest.approx(now + 0.01 + spec.rto_s)
            behind = shaper.schedule(now + 0.001, 10)  # sent just after, arrives only after it
            assert behind.release_at >= r.release_at
        else:
            assert r.release_at == pytest.approx(now + 0.01)
    assert 60 < stalled < 140
    # same seed, same fate
    a, b = LinkShaper(spec, seed=9), LinkShaper(spec, seed=9)
    assert [a.schedule(i, 5000) for i in range(100)] == [b.schedule(i, 5000) for i in range(100)]


def test_bigger_frames_span_more_packets_and_are_hit_more_often() -> None:
    spec = LinkSpec(loss=0.01)
    shaper = LinkShaper(spec, seed=6)
    n = 4000
    small = sum(shaper.schedule(i * 10.0, MSS).stalled for i in range(n))
    big = sum(shaper.schedule(1e6 + i * 10.0, 100 * MSS).stalled for i in range(n))
    assert small / n == pytest.approx(0.01, abs=0.01)
    assert big / n == pytest.approx(1 - 0.99**100, abs=0.05)  # about 0.63


def test_drop_mode_drops_the_connection() -> None:
    assert LinkShaper(LinkSpec(loss=1.0, loss_mode="drop")).schedule(0.0, 1).drop
    shaper = LinkShaper(LinkSpec(loss=0.2, loss_mode="drop"), seed=7)
    fates = [shaper.schedule(i * 1.0, MSS) for i in range(100)]
    assert 5 < sum(r.drop for r in fates) < 40
    assert not any(r.stalled for r in fates)


def test_chunk_size_follows_the_rate() -> None:
    assert LinkShaper(LinkSpec(delay_s=0.01)).chunk_bytes is None
    assert LinkShaper(LinkSpec(rate_Bps=12.5 * MB)).chunk_bytes == 250_000
    assert LinkShaper(LinkSpec(rate_Bps=1250)).chunk_bytes == MSS


# --------------------------------------------------------------------------- process-global state


def test_install_shaped_and_new_shapers() -> None:
    assert linkem.installed() is None and linkem.new_shaper() is None
    spec = LinkSpec(delay_s=0.01)
    with linkem.shaped(spec, seed=3) as got:
        assert got is spec and linkem.installed() is spec
        s1 = linkem.new_shaper()
        assert s1 is not None and s1.spec is spec
        inner = LinkSpec(rate_Bps=1000)
        with linkem.shaped(inner):
            assert linkem.installed() is inner
        assert linkem.installed() is spec
    assert linkem.installed() is None
    jittery = LinkSpec(delay_s=0.01, jitter_s=0.01)
    fates = []
    for _ in range(2):  # the same seed gives the same connections the same fate
        linkem.install(jittery, seed=3)
        shaper = linkem.new_shaper()
        assert shaper is not None and shaper.spec is jittery
        fates.append([shaper.schedule(i, 1).release_at for i in range(20)])
    assert fates[0] == fates[1]
    linkem.uninstall()
    assert linkem.installed() is None and linkem.new_shaper() is None
    with pytest.raises(ConfigError):
        linkem.install("delay=1ms")  # type: ignore[arg-type]


def test_link_down_and_up_notify_listeners_and_hold_unshaped_channels() -> None:
    seen: list[bool] = []
    unsubscribe = linkem.subscribe(seen.append)
    try:
        linkem.link_down()
        linkem.link_down()  # no change, no call
        assert linkem.is_down()
        shaper = linkem.new_shaper()  # a pass-through shaper, so frames can be held
        assert shaper is not None and shaper.spec.noop
        linkem.link_up()
        assert not linkem.is_down() and linkem.new_shaper() is None
    finally:
        unsubscribe()
    assert seen == [True, False]
    linkem.link_down()
    assert seen == [True, False]


# --------------------------------------------------------------------------- the transport, shaped


def test_delay_applies_each_way_and_messages_arrive_complete_in_order() -> None:
    async def main() -> None:
        inbox = Inbox(timeout=5.0)
        with linkem.shaped(LinkSpec(delay_s=0.05), seed=1):
            async with serving(inbox) as srv:
                t0 = time.perf_counter()
                client = await connect(HOST, srv.port, hello("c", "client"))
                assert time.perf_counter() - t0 >= 0.1  # hello there and back
                server_side = await inbox.next()

                t0 = time.perf_counter()
                await client.send(Control("ping", {}))
                msg = await asyncio.wait_for(server_side.recv(), 3.0)
                await server_side.send(ControlReply("ping", True, {}))
                back = await asyncio.wait_for(client.recv(), 3.0)
                rtt = time.perf_counter() - t0
                assert isinstance(msg, Control) and isinstance(back, ControlReply)
                assert rtt >= 0.1, f"round trip took {rtt:.3f} s: the emulator's delay was not applied"

                # 200 messages of varied sizes from ONE reused buffer: the emulator must copy
                rng = np.random.default_rng(0)
                sizes = [int(s) for s in rng.integers(0, 300_000, 200)]
                buf = np.empty(max(sizes), np.uint8)
                buf[:] = 255
                await client.send(Infer(10**6, "d", {"x": buf[:10]}))
                assert client.held_bytes > 0  # in flight for 50 ms

                async def produce() -> None:
                    for i, n in enumerate(sizes):
                        buf[:n] = i % 251
                        await client.send(Infer(i, "d", {"x": buf[:n]}))

                producer = asyncio.create_task(produce())
                first = await asyncio.wait_for(server_side.recv(), 5.0)
                assert isinstance(first, Infer) and first.tensors["x"].tolist() == [255] * 10
                for i, n in enumerate(sizes):
                    got = await asyncio.wait_for(server_side.recv(), 5.0)
                    assert isinstance(got, Infer) and got.request_id == i
                    x = got.tensors["x"]
                    assert x.shape == (n,) and bool(np.all(x == i % 251)), f"message {i} corrupted"
                await asyncio.wait_for(producer, 5.0)
                await client.close()
                assert client.held_bytes == 0

    run(main())


def test_rate_limits_throughput_and_held_bytes_block_the_sender() -> None:
    rate = 8 * MB
    frame = MiB
    total = 12

    async def main() -> None:
        inbox = Inbox(timeout=5.0)
        with linkem.shaped(LinkSpec(rate_Bps=rate), seed=2):
            async with serving(inbox) as srv:
                client = await connect(HOST, srv.port, hello("c", "client"))
                server_side = await inbox.next()
                x = np.ones(frame // 4, np.float32)
                sent = 0
                peak_held = 0

                async def produce() -> None:
                    nonlocal sent, peak_held
                    for i in range(total):
                        await client.send(Infer(i, "d", {"x": x}))
                        sent += 1
                        peak_held = max(peak_held, client.held_bytes)

                t0 = time.perf_counter()
                producer = asyncio.create_task(produce())
                await asyncio.sleep(0.3)
                assert sent < total, "the sender never waited for the emulated link"
                for i in range(total):
                    msg = await asyncio.wait_for(server_side.recv(), 5.0)
                    assert isinstance(msg, Infer) and msg.request_id == i
                    np.testing.assert_array_equal(msg.tensors["x"], x)
                elapsed = time.perf_counter() - t0
                await asyncio.wait_for(producer, 3.0)
                assert peak_held <= WRITE_HIGH_WATER + frame + 4096, peak_held
                need = total * frame / rate
                assert elapsed >= 0.95 * need, f"{total} MiB at {rate} B/s took only {elapsed:.2f} s"
                assert not server_side.closed.is_set()  # big frames trickle: no silence, no timeout
                await client.close()

    run(main())


def test_drop_mode_closes_the_channel_naming_the_emulator() -> None:
    async def main() -> None:
        inbox = Inbox(timeout=5.0)
        async with serving(inbox) as srv:
            dropping = linkem.shaped(LinkSpec(loss=1.0, loss_mode="drop"))
            with dropping, pytest.raises(PeerError, match="link emulator dropped the connection"):
                await connect(HOST, srv.port, hello("c", "client"))
            # after the handshake: every packet lost from now on
            client = await connect(HOST, srv.port, hello("c2", "client"))
            server_side = await inbox.next()
            client._shaper = LinkShaper(LinkSpec(loss=1.0, loss_mode="drop"))
            with pytest.raises(PeerError, match="link emulator"):
                await client.send(Control("ping", {}))
            assert client.closed.is_set() and "link emulator" in client.close_reason
            assert "loss=100%" in client.close_reason
            await asyncio.wait_for(server_side.closed.wait(), 3.0)
            assert "without goodbye" in server_side.close_reason or "lost" in server_side.close_reason
            await client.close()

    run(main())


def test_link_down_holds_traffic_until_peers_declare_it_dead() -> None:
    async def main() -> None:
        inbox = Inbox(timeout=5.0)
        async with serving(inbox, **FAST) as srv:
            client = await connect(HOST, srv.port, hello("c", "client"), **FAST)
            server_side = await inbox.next()
            linkem.link_down()
            await asyncio.sleep(0)  # channels follow the link state in their own loop
            t0 = time.perf_counter()
            await client.send(Control("lost", {}))
            assert client.held_bytes > 0
            await asyncio.wait_for(server_side.closed.wait(), 0.3 + 1.0)
            assert time.perf_counter() - t0 <= 0.3 + 1.0
            assert "silent" in server_side.close_reason
            assert server_side.buffered_bytes == 0  # nothing was delivered
            await asyncio.wait_for(client.closed.wait(), 1.0)
            assert "silent" in client.close_reason
            linkem.link_up()
            await client.close()

    run(main())


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
def test_link_up_releases_what_was_held(tls: bool, tmp_path: Path) -> None:
    server_ctx, client_ctx = self_signed_tls(tmp_path, HOST) if tls else (None, None)

    async def main() -> None:
        inbox = Inbox(timeout=5.0)
        # dead_after (2 s) outlasts the cut; a delay on top, so held frames are shaped frames too
        with linkem.shaped(LinkSpec(delay_s=0.01)):
            async with serving(inbox, ssl=server_ctx) as srv:
                client = await connect_client(srv.port, client_ctx)
                server_side = await inbox.next()
                linkem.link_down()
                await asyncio.sleep(0)
                await client.send(Control("held", {"n": 1}))
                await server_side.send(Control("held back", {}))
                await asyncio.sleep(0.3)
                assert server_side.buffered_bytes == 0 and client.buffered_bytes == 0
                assert client.held_bytes > 0 and server_side.held_bytes > 0
                linkem.link_up()
                assert await asyncio.wait_for(server_side.recv(), 2.0) == Control("held", {"n": 1})
                assert await asyncio.wait_for(client.recv(), 2.0) == Control("held back", {})
                assert client.held_bytes == 0 and not client.closed.is_set()
                await client.send(Control("after", {}))
                assert await asyncio.wait_for(server_side.recv(), 2.0) == Control("after", {})
                await client.close()

    run(main())


def test_bytes_arriving_while_the_link_is_down_wait_until_it_is_up() -> None:
    """A raw peer (not subject to the emulator) keeps sending: nothing is processed while down."""

    async def main() -> None:
        inbox = Inbox(timeout=5.0)
        async with serving(inbox) as srv:
            _, writer = await raw_client(srv.port)
            server_side = await inbox.next()
            linkem.link_down()
            await asyncio.sleep(0)
            before = server_side.bytes_received
            writer.write(b"".join(bytes(p) for p in encode(Control("while down", {}))))
            await writer.drain()
            await asyncio.sleep(0.3)
            assert server_side.buffered_bytes == 0 and server_side.bytes_received == before
            linkem.link_up()
            assert await asyncio.wait_for(server_side.recv(), 2.0) == Control("while down", {})
            await close_writer(writer)

    run(main())


def test_unshaped_channels_take_the_fast_path() -> None:
    async def main() -> None:
        async with serving(echo_handler) as srv:
            client = await connect(HOST, srv.port, hello("c", "client"))
            assert client._shaper is None
            await client.send(Control("ping", {}))
            assert await asyncio.wait_for(client.recv(), 3.0) == ControlReply("ping", True, {})
            assert client.held_bytes == 0
            await client.close()

    run(main())


# --------------------------------------------------------------------------- signals, in a child process

CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from meshai import linkem
    from meshai.protocol import PROTOCOL_VERSION, Hello
    from meshai.transport import Server

    async def handler(ch):
        async for _ in ch:
            pass

    async def main():
        linkem.install(linkem.parse_link("delay=1ms"), 0)
        linkem.install_signal_handlers()
        hello = Hello("child", PROTOCOL_VERSION, "node", {}, "127.0.0.1:9")
        opts = {"heartbeat_interval": 0.05, "dead_after": 0.5}
        async with Server("127.0.0.1", 0, lambda: hello, handler, **opts) as srv:
            print(srv.port, flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

    asyncio.run(main())
    """
)


def test_sigusr1_takes_a_node_off_the_link_and_sigusr2_brings_it_back() -> None:
    fast: ChannelOptions = {"heartbeat_interval": 0.05, "dead_after": 0.5}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline())

        async def main() -> None:
            ch = await connect(HOST, port, hello("c", "client"), **fast)
            os.kill(child.pid, signal.SIGUSR1)
            t0 = time.perf_counter()
            await asyncio.wait_for(ch.closed.wait(), 0.5 + 1.5)
            assert "silent" in ch.close_reason, ch.close_reason
            assert time.perf_counter() - t0 <= 0.5 + 1.5
            with pytest.raises(PeerError, match="no hello"):
                await connect(HOST, port, hello("c2", "client"), timeout=0.5, **fast)
            os.kill(child.pid, signal.SIGUSR2)
            again = await connect(HOST, port, hello("c3", "client"), timeout=3.0, **fast)
            await asyncio.sleep(0.7)  # longer than dead_after: heartbeats flow both ways again
            assert not again.closed.is_set()
            await again.close()
            await ch.close()

        run(main())
    finally:
        if child.stdin is not None:
            child.stdin.close()
        try:
            child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def test_node_rejects_a_bad_link_spec_in_one_line() -> None:
    env = {**os.environ, "MESHAI_INSECURE": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "meshai", "node", "--name", "x", "--insecure", "--link", "delay=soon"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert r.returncode != 0
    assert "delay 'soon'" in r.stderr and "Traceback" not in r.stderr
