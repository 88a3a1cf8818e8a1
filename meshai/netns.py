"""Emulated hosts on one machine: network namespaces joined by a bridge, links shaped by tc.

``SimNetwork(["n0", "n1", "entry"], link)`` creates one namespace per host, each with an
``eth0`` whose veth peer sits on a bridge in a namespace of its own, and addresses from a
private ``10.213.X.0/24``.  The machine's own namespace, interfaces and routes are never
touched; names carry a random tag, so runs side by side never collide.  Multicast (mDNS)
crosses the bridge.

The link: a rate goes to ``tc tbf`` on every host's ``eth0``; delay, jitter and loss go to
``tc netem`` where the kernel has it.  Whatever the kernel cannot do is left to meshai's own
emulator (``meshai.linkem``): ``emulated()`` is that part, for ``meshai node --link``, and
``kernel`` says who does what.

I/O module: needs root and iproute2 (``netns_unavailable()`` says why not).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Self

from meshai.errors import ConfigError, MeshaiError
from meshai.linkem import MSS, LinkSpec

__all__ = ["NetnsError", "SimNetwork", "enter_namespace", "has_netem", "netns_unavailable"]

CLONE_NEWNET = 0x40000000
_NETNS_DIR = "/var/run/netns"
_PREFIX = "meshai-"
_MAX_HOSTS = 250
_TIMEOUT = 30.0


class NetnsError(MeshaiError):
    """A namespace, link or qdisc could not be set up; the message names the command."""


def _run(argv: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        r = subprocess.run(list(argv), capture_output=True, text=True, timeout=_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetnsError(f"{' '.join(argv)}: {exc}") from exc
    if check and r.returncode != 0:
        raise NetnsError(f"{' '.join(argv)}: {r.stderr.strip() or f'exit status {r.returncode}'}")
    return r


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _run(["ip", *args], check)


def _tc(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _run(["ip", "netns", "exec", ns, "tc", *args], check)


@functools.cache
def _probe() -> tuple[str | None, bool]:
    """(why namespaces are unusable or None, whether tc netem works), from a scratch namespace."""
    if os.geteuid() != 0:
        return "network namespaces need root", False
    if shutil.which("ip") is None:
        return "iproute2 ('ip') is not installed", False
    ns = f"{_PREFIX}{secrets.token_hex(3)}-probe"
    try:
        _ip("netns", "add", ns)
    except NetnsError as exc:
        return f"cannot create a network namespace: {exc}", False
    try:
        try:
            _ip("-n", ns, "link", "add", "a0", "type", "veth", "peer", "name", "b0")
        except NetnsError as exc:
            return f"cannot create a veth pair in a namespace: {exc}", False
        if shutil.which("tc") is None:
            return None, False
        netem = _tc(ns, "qdisc", "add", "dev", "a0", "root", "netem", "delay", "1ms", check=False)
        return None, netem.returncode == 0
    finally:
        _ip("netns", "del", ns, check=False)


def netns_unavailable() -> str | None:
    """Why ``SimNetwork`` cannot work here (not root, no iproute2, no namespaces), or None."""
    return _probe()[0]


def has_netem() -> bool:
    """True when the kernel has the ``netem`` qdisc (probed once, in a scratch namespace)."""
    return _probe()[1]


def _setns(path: str | int) -> None:
    """Move the calling thread into the network namespace at ``path`` (or open fd)."""
    fd = os.open(path, os.O_RDONLY) if isinstance(path, str) else path
    try:
        setns = getattr(os, "setns", None)
        if setns is not None:  # Python >= 3.12
            setns(fd, CLONE_NEWNET)
            return
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path!r}): {os.strerror(err)}")
    finally:
        if isinstance(path, str):
            os.close(fd)


def enter_namespace(name: str) -> None:
    """Move the CALLING THREAD into the network namespace ``name`` (as ``ip netns`` names it), for
    good: threads it starts afterwards inherit it.  ``SimNetwork.enter`` by namespace name, for a
    forked process that has only the name."""
    if not name or "/" in name or name in (".", ".."):
        raise ConfigError(f"bad network namespace name {name!r}")
    try:
        _setns(os.path.join(_NETNS_DIR, name))
    except OSError as exc:
        raise NetnsError(f"cannot enter network namespace {name!r}: {exc}") from exc


def _used_subnets() -> set[int]:
    """Third octets of the 10.213.X.0/24 subnets in use, here or in any namespace."""
    text = _ip("-4", "-o", "addr", "show", check=False).stdout
    text += _ip("-all", "netns", "exec", "ip", "-4", "-o", "addr", "show", check=False).stdout
    return {int(x) for x in re.findall(r"\b10\.213\.(\d{1,3})\.\d{1,3}/", text)}


def _tbf_args(rate_Bps: float) -> list[str]:
    """tbf parameters for ``rate_Bps``: a burst of 5 ms of the rate (at least 4 packets) and a queue
    of 100 ms of it (at least 16 packets), so TCP runs near the rate from 10 kbit to 10 gbit."""
    frame = MSS + 66  # on the wire: TCP/IP headers with timestamps and Ethernet
    burst = max(4 * frame, int(rate_Bps * 0.005))
    limit = burst + max(16 * frame, int(rate_Bps * 0.1))
    return ["tbf", "rate", f"{round(rate_Bps * 8)}bit", "burst", str(burst), "limit", str(limit)]


def _netem_args(spec: LinkSpec) -> list[str]:
    args = ["netem", "delay", f"{spec.delay_s * 1e6:.0f}us"]
    if spec.jitter_s:
        args.append(f"{spec.jitter_s * 1e6:.0f}us")
    if spec.loss and spec.loss_mode == "stall":
        args += ["loss", f"{spec.loss * 100:.6g}%"]
    return args


class SimNetwork:
    """Hosts in network namespaces on one bridge; a context manager that deletes all it made.

    ``hosts`` are names (node names, "entry", …); host ``i`` gets address ``10.213.X.(i+1)``.
    Processes started in a host's namespace must end before the block does.
    """

    def __init__(self, hosts: Sequence[str], link: LinkSpec | None = None) -> None:
        names = list(hosts)
        if not names:
            raise ConfigError("SimNetwork needs at least one host")
        if len(names) > _MAX_HOSTS:
            raise ConfigError(f"SimNetwork takes at most {_MAX_HOSTS} hosts, got {len(names)}")
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ConfigError(f"SimNetwork host names must be unique, got {dup} twice")
        if link is not None and not isinstance(link, LinkSpec):
            raise ConfigError(f"SimNetwork link must be a LinkSpec or None, got {link!r}")
        self.hosts: tuple[str, ...] = tuple(names)
        self.link = link
        self.tag = secrets.token_hex(3)
        self.bridge = f"{_PREFIX}{self.tag}-br"
        self.subnet = ""  # "10.213.X", chosen on entry
        self._ns = {h: f"{_PREFIX}{self.tag}-h{i}" for i, h in enumerate(names)}
        self._created: list[str] = []
        self.kernel: dict[str, str] = self._plan(netem=False, tbf=False)
        """Who emulates each part of the link: "tbf", "netem", "meshai" (its own emulator, see
        ``emulated()``) or "none" (the spec does not ask for it)."""

    # ----- public

    def namespace(self, host: str) -> str:
        """The network namespace name of ``host``."""
        try:
            return self._ns[host]
        except KeyError:
            raise ConfigError(f"unknown host {host!r}: expected one of {list(self.hosts)}") from None

    def address(self, host: str) -> str:
        """The IPv4 address of ``host``'s ``eth0``."""
        self.namespace(host)  # ConfigError for an unknown host
        if not self.subnet:
            raise NetnsError("SimNetwork is not set up: use it as a context manager")
        return f"{self.subnet}.{self.hosts.index(host) + 1}"

    @property
    def namespaces(self) -> list[str]:
        """Every namespace this network creates: the bridge's, then one per host."""
        return [self.bridge, *self._ns.values()]

    def exec_prefix(self, host: str) -> list[str]:
        """argv prefix that runs a command in ``host``'s namespace (``ip netns exec NS``)."""
        return ["ip", "netns", "exec", self.namespace(host)]

    def enter(self, host: str) -> None:
        """Move the CALLING THREAD into ``host``'s namespace (for good: the first step of a forked
        node process; threads it starts afterwards inherit it)."""
        enter_namespace(self.namespace(host))

    @contextlib.contextmanager
    def entered(self, host: str) -> Iterator[None]:
        """Run the block with the calling thread in ``host``'s namespace, then move it back."""
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            self.enter(host)
            try:
                yield
            finally:
                _setns(own)
        finally:
            os.close(own)

    def partition(self, host: str) -> None:
        """Cut ``host`` off the bridge (its ``eth0`` down): packets to and from it are lost."""
        _ip("-n", self.namespace(host), "link", "set", "eth0", "down")

    def heal(self, host: str) -> None:
        """Reconnect ``host`` (its ``eth0`` up again)."""
        _ip("-n", self.namespace(host), "link", "set", "eth0", "up")

    def qdiscs(self, host: str) -> str:
        """``tc qdisc show dev eth0`` in ``host``'s namespace."""
        return _tc(self.namespace(host), "qdisc", "show", "dev", "eth0").stdout

    def emulated(self) -> LinkSpec | None:
        """The part of the link meshai's own emulator must still do (for ``meshai node --link``),
        or None when the kernel does it all or there is no link."""
        link = self.link
        if link is None:
            return None
        if self.kernel["rate"] == "tbf":
            link = dataclasses.replace(link, rate_Bps=None)
        if self.kernel["delay"] == "netem":
            link = dataclasses.replace(link, delay_s=0.0, jitter_s=0.0)
        if self.kernel["loss"] == "netem":
            link = dataclasses.replace(link, loss=0.0, loss_mode="stall")
        return None if link.noop else link

    # ----- set-up and tear-down

    def __enter__(self) -> Self:
        try:
            self._create()
        except BaseException:
            self._delete()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._delete()

    def _create(self) -> None:
        if self._created:
            raise NetnsError("SimNetwork is already set up")
        reason = netns_unavailable()
        if reason is not None:
            raise NetnsError(f"cannot emulate a network here: {reason}")
        free = sorted(set(range(1, 255)) - _used_subnets())
        if not free:
            raise NetnsError("every subnet 10.213.X.0/24 is in use")
        self.subnet = f"10.213.{free[secrets.randbelow(len(free))]}"
        br = self.bridge
        self._add_namespace(br)
        _ip("-n", br, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        _ip("-n", br, "link", "set", "br0", "up")
        _ip("-n", br, "link", "set", "lo", "up")
        for i, host in enumerate(self.hosts):
            ns, port = self._ns[host], f"p{i}"
            self._add_namespace(ns)
            # made inside the host namespace, its peer straight into the bridge's: the machine's own
            # namespace never sees either end
            _ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", br)
            _ip("-n", br, "link", "set", port, "master", "br0")
            _ip("-n", br, "link", "set", port, "up")
            _ip("-n", ns, "addr", "add", f"{self.address(host)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        self._shape()

    def _add_namespace(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self._created.append(ns)

    def _delete(self) -> None:
        """Delete every namespace this network created (their veths and the bridge go with them)."""
        while self._created:
            _ip("netns", "del", self._created.pop(), check=False)

    def _plan(self, netem: bool, tbf: bool) -> dict[str, str]:
        link = self.link
        if link is None:
            return {"rate": "none", "delay": "none", "loss": "none"}
        return {
            "rate": "none" if link.rate_Bps is None else "tbf" if tbf else "meshai",
            "delay": "none" if not (link.delay_s or link.jitter_s) else "netem" if netem else "meshai",
            "loss": "none" if not link.loss else "netem" if netem and link.loss_mode == "stall" else "meshai",
        }

    def _shape(self) -> None:
        """Put the link on every host's eth0: netem (delay, jitter, stall-mode loss) where the kernel
        has it, tbf for the rate; what fails here is left to meshai's emulator."""
        link = self.link
        if link is None or shutil.which("tc") is None:
            self.kernel = self._plan(netem=False, tbf=False)
            return
        plan = self._plan(netem=True, tbf=True)
        want_netem = "netem" in (plan["delay"], plan["loss"])
        want_tbf = plan["rate"] == "tbf"
        if not (want_netem or want_tbf):
            self.kernel = plan
            return
        first = self._ns[self.hosts[0]]
        netem = want_netem and self._add_qdiscs(first, netem=True, tbf=want_tbf)
        tbf = want_tbf and (netem or self._add_qdiscs(first, netem=False, tbf=True))
        for host in self.hosts[1:]:
            if netem or tbf:
                self._add_qdiscs(self._ns[host], netem=netem, tbf=tbf, check=True)
        self.kernel = self._plan(netem=netem, tbf=tbf)

    def _add_qdiscs(self, ns: str, netem: bool, tbf: bool, check: bool = False) -> bool:
        """Root qdiscs on ``ns``'s eth0: netem (with tbf beneath it) or tbf alone; False if refused."""
        assert self.link is not None
        rate = self.link.rate_Bps
        steps: list[list[str]] = []
        if netem:
            steps.append(["root", "handle", "1:", *_netem_args(self.link)])
            if tbf and rate is not None:
                steps.append(["parent", "1:1", "handle", "10:", *_tbf_args(rate)])
        elif tbf and rate is not None:
            steps.append(["root", "handle", "1:", *_tbf_args(rate)])
        for step in steps:
            r = _tc(ns, "qdisc", "add", "dev", "eth0", *step, check=check)
            if r.returncode != 0:
                _tc(ns, "qdisc", "del", "dev", "eth0", "root", check=False)
                return False
        return True
