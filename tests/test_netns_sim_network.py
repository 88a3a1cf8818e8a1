"""``meshai.netns.SimNetwork``: emulated hosts in network namespaces on one bridge.

Namespaces exist for the block and are gone after it (also after an error, also when creation
fails halfway); TCP and multicast cross the bridge between hosts; a partition cuts a host off and
healing brings it back; a rate goes to tc tbf and ``emulated()`` leaves meshai's emulator only what
the kernel does not do; meshai's transport runs across two hosts with that remainder installed.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

import meshai.netns as netns_mod
from meshai import linkem
from meshai.errors import ConfigError
from meshai.linkem import LinkSpec, parse_link
from meshai.netns import NetnsError, SimNetwork, enter_namespace, has_netem, netns_unavailable
from meshai.protocol import PROTOCOL_VERSION, Control, ControlReply, Hello
from meshai.transport import Channel, Server, connect

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120), pytest.mark.usefixtures("clean_linkem")]

_REASON = netns_unavailable()
needs_netns = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def net_ns_id() -> str:
    return os.readlink("/proc/thread-self/ns/net")


class Listener:
    """A TCP server in ``host``'s namespace (a thread of its own that entered it)."""

    def __init__(self, net: SimNetwork, host: str) -> None:
        self.accepted = 0
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self.port = 0
        self._thread = threading.Thread(target=self._serve, args=(net, host), daemon=True)
        self._thread.start()
        assert self._ready.wait(10), "listener did not start"
        if self._error is not None:
            raise self._error

    def _serve(self, net: SimNetwork, host: str) -> None:
        try:
            net.enter(host)  # this thread only
            with socket.socket() as s:
                s.bind((net.address(host), 0))
                s.listen()
                s.settimeout(0.1)
                self.port = s.getsockname()[1]
                self._ready.set()
                while not self._stop.is_set():
                    try:
                        conn, _ = s.accept()
                    except TimeoutError:
                        continue
                    with conn:
                        conn.sendall(b"hi")
                    self.accepted += 1
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def try_connect(net: SimNetwork, host: str, addr: str, port: int, timeout: float) -> bytes:
    with net.entered(host), socket.create_connection((addr, port), timeout=timeout) as c:
        return c.recv(16)


def until(check: Callable[[], Any], within: float) -> Any:
    deadline = time.monotonic() + within
    while True:
        try:
            return check()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


# --------------------------------------------------------------------------- no root needed


def test_bad_arguments_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="at least one host"):
        SimNetwork([])
    with pytest.raises(ConfigError, match=r"\['a'\] twice"):
        SimNetwork(["a", "b", "a"])
    with pytest.raises(ConfigError, match="LinkSpec"):
        SimNetwork(["a"], "delay=1ms")  # type: ignore[arg-type]
    net = SimNetwork(["a", "b"])
    with pytest.raises(ConfigError, match="unknown host 'c'"):
        net.namespace("c")
    with pytest.raises(NetnsError, match="context manager"):
        net.address("a")
    assert net.kernel == {"rate": "none", "delay": "none", "loss": "none"} and net.emulated() is None
    assert len(set(net.namespaces)) == 3 and all(n.startswith(f"meshai-{net.tag}-") for n in net.namespaces)


# --------------------------------------------------------------------------- namespaces


@needs_netns
def test_namespaces_live_for_the_block_only_even_after_an_error() -> None:
    with SimNetwork(["n0", "n1", "entry"]) as net:
        assert set(net.namespaces) <= netns_names()
        addrs = [net.address(h) for h in ("n0", "n1", "entry")]
        assert len(set(addrs)) == 3 and all(a.startswith(net.subnet + ".") for a in addrs)
        assert net.subnet.startswith("10.213.")
        assert net.kernel == {"rate": "none", "delay": "none", "loss": "none"}
        assert net.emulated() is None
    assert not set(net.namespaces) & netns_names()

    with pytest.raises(RuntimeError, match="boom"), SimNetwork(["a", "b"]) as net2:
        assert set(net2.namespaces) <= netns_names()
        raise RuntimeError("boom")
    assert not set(net2.namespaces) & netns_names()


@needs_netns
def test_creation_failing_halfway_leaves_nothing_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    real = netns_mod._ip
    net = SimNetwork(["a", "b", "c"])

    def failing(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        if args[:1] == ("-n",) and args[1] == net.namespace("b") and "addr" in args:
            raise NetnsError("ip addr add: injected failure")
        return real(*args, check=check)

    monkeypatch.setattr(netns_mod, "_ip", failing)
    with pytest.raises(NetnsError, match="injected"), net:
        pass
    assert not set(net.namespaces) & netns_names()


@needs_netns
def test_tcp_crosses_the_bridge_and_the_calling_thread_comes_back() -> None:
    own = net_ns_id()
    with SimNetwork(["a", "b"]) as net:
        listener = Listener(net, "a")
        try:
            assert net_ns_id() == own  # the listener's thread moved, not ours
            assert try_connect(net, "b", net.address("a"), listener.port, 2.0) == b"hi"
            assert net_ns_id() == own
            with net.entered("b"):
                assert net_ns_id() != own
                with socket.socket() as s:  # a's address is not ours in b
                    with pytest.raises(OSError):
                        s.bind((net.address("a"), 0))
                    s.bind((net.address("b"), 0))
            assert net_ns_id() == own
            assert listener.accepted == 1
        finally:
            listener.stop()


@needs_netns
@pytest.mark.parametrize("by_name", [False, True], ids=["enter", "enter_namespace"])
def test_a_forked_process_enters_a_host_for_good(by_name: bool) -> None:
    with SimNetwork(["a", "b"]) as net:
        pid = os.fork()
        if pid == 0:  # the child: enter, then bind the host's address (only possible inside)
            code = 1
            try:
                if by_name:
                    enter_namespace(net.namespace("a"))
                else:
                    net.enter("a")
                with socket.socket() as s:
                    s.bind((net.address("a"), 0))
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    with pytest.raises(NetnsError, match=net.namespace("a")):
        enter_namespace(net.namespace("a"))  # gone
    with pytest.raises(ConfigError):
        enter_namespace("../etc")


@needs_netns
def test_multicast_crosses_the_bridge() -> None:
    group, port = "224.0.0.251", 5353
    with SimNetwork(["a", "b"]) as net:
        got: list[bytes] = []
        ready = threading.Event()

        def receive() -> None:
            net.enter("a")
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("", port))
                mreq = struct.pack("4s4s", socket.inet_aton(group), socket.inet_aton(net.address("a")))
                s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
                s.settimeout(5)
                ready.set()
                got.append(s.recv(100))

        t = threading.Thread(target=receive, daemon=True)
        t.start()
        assert ready.wait(5)
        with net.entered("b"), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(net.address("b")))
            for _ in range(10):
                s.sendto(b"mdns?", (group, port))
                t.join(0.2)
                if got:
                    break
        t.join(5)
        assert got == [b"mdns?"]


@needs_netns
def test_partition_cuts_a_host_off_and_heal_brings_it_back() -> None:
    with SimNetwork(["a", "b", "c"]) as net:
        listener = Listener(net, "a")
        try:
            addr = net.address("a")
            assert try_connect(net, "b", addr, listener.port, 2.0) == b"hi"
            net.partition("a")
            with pytest.raises(OSError):  # a timeout, or no route once ARP gives up
                try_connect(net, "b", addr, listener.port, 1.0)
            net.heal("a")
            assert until(lambda: try_connect(net, "b", addr, listener.port, 1.0), 10.0) == b"hi"
        finally:
            listener.stop()


# --------------------------------------------------------------------------- the link


@needs_netns
@pytest.mark.parametrize("rate", ["100mbit", "10kbit"])
def test_rate_goes_to_tbf_and_emulated_keeps_the_rest(rate: str) -> None:
    link = parse_link(f"delay=20ms,jitter=2ms,rate={rate},loss=1%")
    with SimNetwork(["a", "b"], link) as net:
        assert net.kernel["rate"] == "tbf"
        for host in ("a", "b"):
            assert "tbf" in net.qdiscs(host), net.qdiscs(host)
        if has_netem():
            assert net.kernel == {"rate": "tbf", "delay": "netem", "loss": "netem"}
            assert net.emulated() is None
        else:
            assert net.kernel == {"rate": "tbf", "delay": "meshai", "loss": "meshai"}
            assert net.emulated() == LinkSpec(delay_s=0.02, jitter_s=0.002, loss=0.01)
        # the qdisc survives a partition and heal
        net.partition("a")
        net.heal("a")
        assert "tbf" in net.qdiscs("a")
    assert not set(net.namespaces) & netns_names()


@needs_netns
@pytest.mark.parametrize("netem_works", [True, False], ids=["netem", "no-netem"])
def test_netem_is_used_where_the_kernel_has_it(monkeypatch: pytest.MonkeyPatch, netem_works: bool) -> None:
    """This kernel lacks netem: a stand-in ``tc`` shows what SimNetwork does on one that has it."""
    calls: list[tuple[str, ...]] = []

    def fake_tc(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        calls.append((ns, *args))
        refused = "netem" in args and not netem_works
        if refused and check:
            raise NetnsError("tc: Specified qdisc kind is unknown.")
        return subprocess.CompletedProcess(["tc", *args], 2 if refused else 0, "", "")

    monkeypatch.setattr(netns_mod, "_tc", fake_tc)
    link = parse_link("delay=20ms,jitter=5ms,rate=10mbit,loss=1%")
    with SimNetwork(["a", "b"], link) as net:
        adds = [c for c in calls if c[1:3] == ("qdisc", "add")]
        if netem_works:
            assert net.kernel == {"rate": "tbf", "delay": "netem", "loss": "netem"}
            assert net.emulated() is None
            for host in ("a", "b"):  # netem at the root, tbf beneath it, on every host
                mine = [c[3:] for c in adds if c[0] == net.namespace(host)]
                assert mine[0][:5] == ("dev", "eth0", "root", "handle", "1:")
                assert mine[0][5:] == ("netem", "delay", "20000us", "5000us", "loss", "1%")
                assert mine[1][:5] == ("dev", "eth0", "parent", "1:1", "handle") and "tbf" in mine[1]
        else:
            assert net.kernel == {"rate": "tbf", "delay": "meshai", "loss": "meshai"}
            assert net.emulated() == LinkSpec(delay_s=0.02, jitter_s=0.005, loss=0.01)
            assert not any("netem" in c for c in adds if c[0] != net.namespace("a"))  # tried once only
            assert all("tbf" in [c for c in adds if c[0] == net.namespace(h)][-1] for h in ("a", "b"))
    # drop-mode loss is meshai's even where netem does the delay
    calls.clear()
    with SimNetwork(["a"], parse_link("delay=5ms,loss=1%,loss-mode=drop")) as net:
        delay = "netem" if netem_works else "meshai"
        assert net.kernel == {"rate": "none", "delay": delay, "loss": "meshai"}
        expected = LinkSpec(loss=0.01, loss_mode="drop")
        if not netem_works:
            expected = LinkSpec(delay_s=0.005, loss=0.01, loss_mode="drop")
        assert net.emulated() == expected


@needs_netns
def test_drop_mode_loss_stays_with_meshai() -> None:
    link = parse_link("loss=1%,loss-mode=drop")
    with SimNetwork(["a"], link) as net:
        assert net.kernel == {"rate": "none", "delay": "none", "loss": "meshai"}
        assert net.emulated() == link
        assert "tbf" not in net.qdiscs("a") and "netem" not in net.qdiscs("a")


@needs_netns
def test_transport_between_hosts_with_the_emulated_remainder() -> None:
    """Server in host a (a thread and loop of its own), client in host b; both shaped by ``emulated()``."""
    link = parse_link("delay=30ms,rate=100mbit")
    with SimNetwork(["a", "b"], link) as net:
        remainder = net.emulated()
        assert remainder is None or remainder.rate_Bps is None  # tbf took the rate
        linkem.install(remainder, seed=1)
        ready = threading.Event()
        box: dict[str, Any] = {}

        async def echo(ch: Channel) -> None:
            async for msg in ch:
                if isinstance(msg, Control):
                    await ch.send(ControlReply(msg.op, True, msg.body))

        async def serve() -> None:
            box["loop"], box["done"] = asyncio.get_running_loop(), asyncio.Event()
            hello = Hello("srv", PROTOCOL_VERSION, "node", {}, f"{net.address('a')}:1")
            async with Server(net.address("a"), 0, lambda: hello, echo) as srv:
                box["port"] = srv.port
                ready.set()
                await box["done"].wait()

        def server_thread() -> None:
            net.enter("a")
            asyncio.run(serve())

        async def client() -> float:
            hello = Hello("c", PROTOCOL_VERSION, "client", {}, "")
            ch = await connect(net.address("a"), box["port"], hello)
            t0 = time.perf_counter()
            await ch.send(Control("ping", {"n": 1}))
            reply = await asyncio.wait_for(ch.recv(), 5.0)
            rtt = time.perf_counter() - t0
            assert reply == ControlReply("ping", True, {"n": 1})
            await ch.close()
            return rtt

        t = threading.Thread(target=server_thread, daemon=True)
        t.start()
        try:
            assert ready.wait(10), "server did not start"
            with net.entered("b"):
                rtt = asyncio.run(client())
        finally:
            if "loop" in box:
                box["loop"].call_soon_threadsafe(box["done"].set)
            t.join(10)
        assert not t.is_alive()
        assert rtt >= 0.06, f"round trip {rtt:.3f} s: 2 x 30 ms of delay were not applied"
