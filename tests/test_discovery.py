"""Discovery: adverts and their TXT form, peer lists, the static backend, and real mDNS on loopback."""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshai.discovery import (
    SERVICE_TYPE,
    Advert,
    MdnsDiscovery,
    PeerEvent,
    StaticDiscovery,
    choose_address,
    make_discovery,
    parse_peer_list,
)
from meshai.errors import ConfigError, PeerError

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def unique_type() -> str:
    """A service type of our own, so that other tests' nodes on this loopback stay invisible."""
    return f"_mt-{secrets.token_hex(4)}._tcp.local."


async def next_event(events: AsyncIterator[PeerEvent], timeout: float = 3.0) -> PeerEvent:
    return await asyncio.wait_for(anext(events), timeout)


ADVERT = Advert(
    node_id="cam-1",
    host="10.77.0.2",
    port=7000,
    protocol_version=1,
    summary={"accel": "npu", "precisions": "fp32,int8", "mem_mb": "2048"},
    fingerprint="sha256:" + "ab" * 32,
)


# --------------------------------------------------------------------------- adverts and TXT


def test_advert_txt_round_trip() -> None:
    txt = ADVERT.to_txt()
    assert txt[b"id"] == b"cam-1" and txt[b"port"] == b"7000" and txt[b"pv"] == b"1"
    assert txt[b"c.accel"] == b"npu" and txt[b"fp"] == ADVERT.fingerprint.encode()
    assert all(len(k) + 1 + len(v) <= 255 for k, v in txt.items())
    assert Advert.from_txt(txt, "10.77.0.2") == ADVERT
    plain = Advert("n0", "127.0.0.1", 1, 0, {})
    assert b"fp" not in plain.to_txt()
    assert Advert.from_txt(plain.to_txt(), "127.0.0.1") == plain


@given(
    node_id=st.from_regex(r"[a-z0-9][a-z0-9.:-]{0,20}", fullmatch=True),
    port=st.integers(1, 65535),
    pv=st.integers(0, 65535),
    summary=st.dictionaries(
        st.from_regex(r"[a-z0-9][a-z0-9_.-]{0,10}", fullmatch=True),
        st.text(
            st.characters(codec="utf-8", categories=["L", "N", "P"], include_characters=" "), max_size=16
        ),
        max_size=8,
    ),
)
def test_advert_txt_round_trip_property(node_id: str, port: int, pv: int, summary: dict[str, str]) -> None:
    advert = Advert(node_id, "192.168.1.9", port, pv, summary)
    assert Advert.from_txt(advert.to_txt(), "192.168.1.9") == advert


def test_advert_is_frozen_hashable_and_owns_its_summary() -> None:
    summary = {"accel": "cpu"}
    advert = Advert("n0", "127.0.0.1", 7000, 1, summary)
    summary["accel"] = "gpu"
    assert advert.summary == {"accel": "cpu"}
    assert hash(advert) == hash(Advert("n0", "127.0.0.1", 7000, 1, {"accel": "cpu"}))
    with pytest.raises(AttributeError):
        advert.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"node_id": ""}, "node id"),
        ({"node_id": "a b"}, "'a b'"),
        ({"node_id": "x" * 64}, "node id"),
        ({"host": ""}, "host"),
        ({"host": "bad host"}, "'bad host'"),
        ({"port": 0}, "got 0"),
        ({"port": 65536}, "got 65536"),
        ({"protocol_version": -1}, "got -1"),
        ({"summary": {"Accel": "cpu"}}, "'Accel'"),
        ({"summary": {"accel": "x" * 65}}, "'accel'"),
        ({"summary": {"accel": "a\nb"}}, "'accel'"),
        ({"summary": {f"k{i}": "v" for i in range(17)}}, "17 entries"),
        ({"fingerprint": "f" * 129}, "fingerprint"),
    ],
)
def test_advert_rejects_bad_values(kwargs: dict[str, Any], needle: str) -> None:
    fields: dict[str, Any] = {
        "node_id": "n0",
        "host": "127.0.0.1",
        "port": 7000,
        "protocol_version": 1,
        "summary": {},
    }
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        Advert(**(fields | kwargs))


GOOD_TXT = {b"id": b"n0", b"port": b"7000", b"pv": b"1", b"c.accel": b"cpu"}


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({b"c.accel": b"x" * 10_000}, "10000 bytes"),
        ({b"id": b"n" * 5_000}, "5000 bytes"),
        ({b"fp": b"f" * 1_000}, "'fp'"),
        ({b"c." + b"k" * 300: b"v"}, "too long"),
        ({b"port": b"0"}, "port"),
        ({b"port": b"65536"}, "65536"),
        ({b"port": b"-1"}, "'-1'"),
        ({b"port": b"+80"}, "'\\+80'"),
        ({b"port": b" 80"}, "' 80'"),
        ({b"port": b"http"}, "'http'"),
        ({b"port": None}, "no 'port'"),
        ({b"pv": b"1.0"}, "protocol version"),
        ({b"id": b"\xff\xfe"}, "utf-8"),
        ({b"c.accel": b"\xc3"}, "utf-8"),
        ({b"c.\xff": b"cpu"}, "utf-8"),
        ({b"id": b"a b"}, "node id"),
        ({b"id": None}, "no 'id'"),
        ({b"c.accel": b"a\x00b"}, "accel"),
        ({b"c.ACCEL": b"cpu"}, "'ACCEL'"),
        ({f"c.k{i}".encode(): b"v" for i in range(40)}, "entries"),
    ],
)
def test_malformed_txt_is_rejected_with_peer_error(changes: dict[bytes, bytes | None], needle: str) -> None:
    txt = GOOD_TXT | changes
    with pytest.raises(PeerError, match=needle) as info:
        Advert.from_txt(txt, "127.0.0.1")
    assert "127.0.0.1" in str(info.value)


@pytest.mark.parametrize("missing", [b"id", b"port", b"pv"])
def test_txt_missing_required_entry(missing: bytes) -> None:
    txt = {k: v for k, v in GOOD_TXT.items() if k != missing}
    with pytest.raises(PeerError, match=f"no '{missing.decode()}'"):
        Advert.from_txt(txt, "127.0.0.1")


def test_txt_unknown_keys_are_ignored() -> None:
    advert = Advert.from_txt(GOOD_TXT | {b"future": b"thing", b"flag": None}, "127.0.0.1")
    assert advert == Advert("n0", "127.0.0.1", 7000, 1, {"accel": "cpu"})


@given(
    st.dictionaries(
        st.one_of(st.sampled_from([b"id", b"port", b"pv", b"fp", b"c.accel"]), st.binary(max_size=40)),
        st.one_of(st.none(), st.binary(max_size=300), st.sampled_from([b"n0", b"7000", b"1"])),
        max_size=40,
    )
)
def test_txt_parser_raises_only_peer_error(properties: dict[bytes, bytes | None]) -> None:
    try:
        advert = Advert.from_txt(properties, "127.0.0.1")
    except PeerError:
        return
    assert Advert.from_txt(advert.to_txt(), "127.0.0.1") == advert


# --------------------------------------------------------------------------- peer lists, addresses


def test_parse_peer_list() -> None:
    assert parse_peer_list("a:1,b.example:2") == [("a", 1), ("b.example", 2)]
    assert parse_peer_list(" 10.0.0.1:7000 , [::1]:7001 ") == [("10.0.0.1", 7000), ("::1", 7001)]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("a:1,,b:2", "entry 2 is empty"),
        ("a:1,", "entry 2 is empty"),
        ("node7", "'node7' has no port"),
        ("node7:", "port '' is not a number"),
        (":7000", "no host"),
        ("a:0", "got 0"),
        ("a:65536", "got 65536"),
        ("a:http", "'http'"),
        ("a:-5", "'-5'"),
        ("::1:7000", "brackets"),
        ("[::1]", "no port"),
        ("[nope]:1", "not an IPv6"),
        ("bad host:80", "'bad host'"),
        ("a:1,a:1", "twice"),
    ],
)
def test_parse_peer_list_errors(text: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        parse_peer_list(text)


def test_choose_address_prefers_our_subnet() -> None:
    veth = [ipaddress.IPv4Network("10.77.0.0/24")]
    loop = [ipaddress.IPv4Network("127.0.0.0/8")]
    assert choose_address(["127.0.0.1", "192.0.2.5", "10.77.0.3"], veth) == "10.77.0.3"
    assert choose_address(["10.77.0.3", "127.0.0.1"], loop) == "127.0.0.1"
    assert choose_address(["127.0.0.1", "192.0.2.5"], veth) == "192.0.2.5"
    assert choose_address(["127.0.0.1"], veth) == "127.0.0.1"
    assert choose_address(["fe80::1", "junk"], veth) is None


# --------------------------------------------------------------------------- static backend


def test_static_discovery() -> None:
    async def scenario() -> None:
        static = StaticDiscovery(["10.0.0.1:7000", "10.0.0.2:7000", "10.0.0.3:7000"])
        events = static.events()
        with pytest.raises(PeerError, match="not running"):
            await static.wait_for(1, 0.1)
        async with static:
            assert set(static.peers()) == {"10.0.0.1:7000", "10.0.0.2:7000", "10.0.0.3:7000"}
            assert static.peers()["10.0.0.1:7000"] == Advert("10.0.0.1:7000", "10.0.0.1", 7000, 0, {})
            assert [(await next_event(events)).kind for _ in range(3)] == ["added"] * 3
            assert len(await static.wait_for(3, 0.1)) == 3

            # A hello arrives: the placeholder gives way to the real node, at the listed address.
            hello = Advert("n1", "0.0.0.0", 9999, 1, {"accel": "gpu"})
            real = static.resolve("10.0.0.1:7000", hello)
            assert (real.node_id, real.host, real.port) == ("n1", "10.0.0.1", 7000)
            assert (await next_event(events)) == PeerEvent("removed", static._placeholder(("10.0.0.1", 7000)))
            assert (await next_event(events)) == PeerEvent("added", real)
            updated = static.resolve(("10.0.0.1", 7000), Advert("n1", "x", 1, 1, {"accel": "npu"}))
            assert (await next_event(events)) == PeerEvent("updated", updated)
            with pytest.raises(PeerError, match=r"10\.9\.9\.9:1 is not in the static peer list"):
                static.resolve("10.9.9.9:1", hello)

            # Declared dead: removed, and the listed address is offered again.
            assert static.forget("n1")
            assert (await next_event(events)).kind == "removed"
            assert (await next_event(events)) == PeerEvent("added", static._placeholder(("10.0.0.1", 7000)))
            assert not static.forget("nobody")

            # The list may include ourselves: registering drops that entry.
            await static.register(Advert("me", "10.0.0.3", 7000, 1, {}))
            assert (await next_event(events)).advert.node_id == "10.0.0.3:7000"
            assert "10.0.0.3:7000" not in static.peers()
            static.resolve("10.0.0.2:7000", Advert("me", "10.0.0.2", 7000, 1, {}))
            assert set(static.peers()) == {"10.0.0.1:7000"}

            with pytest.raises(PeerError, match=r"found 1 of 4 peers within 0.05 s \(10.0.0.1:7000\)"):
                await static.wait_for(4, 0.05)
        assert [e async for e in events][-1].kind == "removed"  # the stream ends on exit

    run(scenario())


def test_static_discovery_arguments() -> None:
    assert StaticDiscovery("a:1,b:2").addresses == (("a", 1), ("b", 2))
    with pytest.raises(ConfigError, match="empty"):
        StaticDiscovery("")
    with pytest.raises(ConfigError, match="at least one"):
        StaticDiscovery([])
    with pytest.raises(ConfigError, match="longer than 63"):
        StaticDiscovery([f"{'a' * 60}.example:7000"])


def test_make_discovery() -> None:
    assert isinstance(make_discovery("static", peers="a:1"), StaticDiscovery)
    mdns = make_discovery("mdns", ["127.0.0.1"])
    assert isinstance(mdns, MdnsDiscovery) and mdns.service_type == SERVICE_TYPE
    with pytest.raises(ConfigError, match="'carrier-pigeon'"):
        make_discovery("carrier-pigeon", ["127.0.0.1"])
    with pytest.raises(ConfigError, match="only used with discovery mode 'static'"):
        make_discovery("mdns", ["127.0.0.1"], ["a:1"])
    with pytest.raises(ConfigError, match="empty"):
        make_discovery("static", ["127.0.0.1"], "")


@pytest.mark.parametrize(
    ("interfaces", "needle"),
    [([], "at least one"), (["0.0.0.0"], "0.0.0.0"), (["eth0"], "'eth0'"), (["::1"], "'::1'")],
)
def test_mdns_rejects_bad_interfaces(interfaces: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        MdnsDiscovery(interfaces)


def test_mdns_rejects_an_address_that_is_not_ours() -> None:
    async def scenario() -> None:
        async with MdnsDiscovery(["198.51.100.77"], service_type=unique_type()):
            pass

    with pytest.raises(ConfigError, match=r"198\.51\.100\.77 is not assigned"):
        run(scenario())


# --------------------------------------------------------------------------- real mDNS on loopback


def test_mdns_two_instances_in_one_process() -> None:
    async def scenario() -> None:
        stype = unique_type()
        a_advert = Advert("n0", "127.0.0.1", 7000, 1, {"accel": "cpu"})
        b_advert = Advert("n1", "127.0.0.1", 7001, 1, {"accel": "gpu"})
        async with MdnsDiscovery(service_type=stype) as b:
            b_events = b.events()
            await b.register(b_advert)
            async with MdnsDiscovery(["127.0.0.1"], service_type=stype) as a:
                await a.register(a_advert)
                assert await a.wait_for(1, 3.0) == {"n1": b_advert}
                assert await b.wait_for(1, 3.0) == {"n0": a_advert}
                assert (await next_event(b_events)) == PeerEvent("added", a_advert)

                changed = Advert("n0", "127.0.0.1", 7000, 1, {"accel": "npu", "mem_mb": "512"})
                await a.register(changed)
                assert (await next_event(b_events)) == PeerEvent("updated", changed)
                assert b.peers() == {"n0": changed}

                # forget() (heartbeats said dead) removes it; an identical re-announcement is new again.
                assert b.forget("n0")
                assert (await next_event(b_events)) == PeerEvent("removed", changed)
                assert b.peers() == {}
                await asyncio.sleep(0.9)  # zeroconf drops a packet identical to one from < 0.8 s ago
                await a.register(changed)
                assert (await next_event(b_events)) == PeerEvent("added", changed)
                left = time.monotonic()
            event = await next_event(b_events, timeout=1.0)
            gone_after = time.monotonic() - left
            assert event == PeerEvent("removed", changed)
            assert gone_after < 1.0, f"goodbye took {gone_after:.3f} s"
            await asyncio.sleep(0.4)  # no answer zeroconf queued before the goodbye may bring it back
            assert b.peers() == {}

    run(scenario())


def test_mdns_wait_for_timeout_names_what_was_found() -> None:
    async def scenario() -> None:
        stype = unique_type()
        async with (
            MdnsDiscovery(service_type=stype) as a,
            MdnsDiscovery(service_type=stype) as b,
        ):
            await a.register(Advert("n0", "127.0.0.1", 7000, 1, {}))
            await b.wait_for(1, 3.0)
            started = time.monotonic()
            with pytest.raises(PeerError, match=r"found 1 of 3 peers within 0.3 s \(n0\)"):
                await b.wait_for(3, 0.3)
            assert 0.3 <= time.monotonic() - started < 1.0
            with pytest.raises(ConfigError, match="timeout"):
                await b.wait_for(1, 0)
            assert a.peers() == {}  # our own advert is never a peer

    run(scenario())


def test_mdns_register_requires_running() -> None:
    async def scenario() -> None:
        discovery = MdnsDiscovery(service_type=unique_type())
        with pytest.raises(PeerError, match="not running"):
            await discovery.register(Advert("n0", "127.0.0.1", 7000, 1, {}))

    run(scenario())
