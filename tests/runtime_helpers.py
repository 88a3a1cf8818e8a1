"""Helpers for the real-process runtime tests: CLI runs, node processes we own, /proc checks, an
event loop in a thread.

Every process here is started by the tests and ended by its pid (SIGTERM, then SIGKILL); nothing is
ever looked up or killed by name.  Each swarm gets a mesh id of its own (``unique_mesh``), so
swarms running side by side — other tests, other engineers — never see each other.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from meshai.sim import NODE_COMM

T = TypeVar("T")

MESHAI = [sys.executable, "-m", "meshai"]


_SECRETS: Any = None


def test_secrets() -> Any:
    """This test process's throwaway mesh (CA, identities, fleet key), made on first use."""
    global _SECRETS
    if _SECRETS is None:
        import atexit
        import shutil
        import tempfile

        from meshai.sim import MeshSecrets

        work = Path(tempfile.mkdtemp(prefix="meshai-test-pki-"))
        atexit.register(shutil.rmtree, work, True)
        _SECRETS = MeshSecrets(work)
    return _SECRETS


test_secrets.__test__ = False  # type: ignore[attr-defined]  # not a test, despite its name


def unique_mesh() -> str:
    """A fresh mesh id (1-10 of [a-z0-9]): a private mDNS service type for one swarm."""
    return "t" + secrets.token_hex(4)


def child_env() -> dict[str, str]:
    """Environment for child processes: one OpenMP thread, no progress bars."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["MESHAI_PROGRESS"] = "0"
    return env


def meshai(
    *args: str, timeout: float = 120.0, prefix: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    """Run ``meshai ARGS`` as a user would (a real subprocess) and capture its output."""
    return subprocess.run(
        [*prefix, *MESHAI, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env(),
        stdin=subprocess.DEVNULL,
    )


def assert_one_line_error(r: subprocess.CompletedProcess[str], *fragments: str) -> None:
    """A failed command: non-zero exit, exactly one line on stderr naming the problem, no traceback."""
    assert r.returncode != 0, f"expected failure, got exit 0: {r.stdout[:500]}"
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{r.stderr}"
    assert "Traceback" not in r.stderr
    assert lines[0].startswith("meshai: error:"), lines[0]
    for f in fragments:
        assert f in lines[0], f"{f!r} not in {lines[0]!r}"


# ------------------------------------------------------------------------------------------- /proc


def cmdline(pid: int) -> list[str]:
    """A process's argv ([] if it is gone or unreadable)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def parent_pid(pid: int) -> int | None:
    """The parent pid of a live process, or None."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("PPid:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def is_zombie(pid: int) -> bool:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("State:"):
                return "Z" in line.split()[1]
    except OSError:
        return False
    return False


def all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def is_node_cmd(argv: Sequence[str]) -> bool:
    """True for a ``meshai node`` command line (``python -m meshai node …`` or ``meshai node …``)."""
    for i, a in enumerate(argv[:-1]):
        if (a == "meshai" or a.endswith("/meshai")) and argv[i + 1] == "node":
            return True
    return False


def is_node_process(pid: int) -> bool:
    """True for a node process: a ``meshai node`` command line, or a node forked by ``meshai sim``'s fork
    server (named ``meshai-node``)."""
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return False
    return comm == NODE_COMM.decode() or is_node_cmd(cmdline(pid))


def mesh_of(argv: Sequence[str]) -> str | None:
    """The ``--mesh`` value of a command line."""
    for i, a in enumerate(argv[:-1]):
        if a == "--mesh":
            return argv[i + 1]
    return None


def live_node_pids(mesh: str) -> list[int]:
    """Pids of running (not zombie) ``meshai node`` processes of mesh ``mesh``."""
    out = []
    for pid in all_pids():
        argv = cmdline(pid)
        if argv and is_node_cmd(argv) and mesh_of(argv) == mesh and not is_zombie(pid):
            out.append(pid)
    return out


class WatchedRun:
    """Run a meshai command that starts node processes itself (``meshai sim``) and watch /proc for its
    child ``meshai node`` processes while it runs, so that afterwards we can prove every one is gone."""

    def __init__(self, *args: str, timeout: float = 180.0, command: Sequence[str] = MESHAI) -> None:
        self.args = args
        self.timeout = timeout
        self.command = list(command)  # what runs ARGS: ``python -m meshai`` unless told (e.g. a script)
        self.node_pids: set[int] = set()
        self.stderr_files: set[str] = set()  # where the node processes' stderr went (their logs)

    def run(self) -> subprocess.CompletedProcess[str]:
        proc = subprocess.Popen(
            [*self.command, *self.args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=child_env(),
        )
        out: list[str] = []
        err: list[str] = []
        readers = [
            threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True),  # type: ignore[union-attr]
            threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True),  # type: ignore[union-attr]
        ]
        for t in readers:
            t.start()
        deadline = time.monotonic() + self.timeout
        try:
            while proc.poll() is None:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{' '.join([*self.command, *self.args])} ran over {self.timeout} s")
                self._scan(proc.pid)
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for t in readers:
                t.join(5)
        return subprocess.CompletedProcess(proc.args, proc.returncode, "".join(out), "".join(err))

    def _scan(self, parent: int) -> None:
        for pid in all_pids():
            if pid in self.node_pids or not is_node_process(pid):
                continue
            up = parent_pid(pid)  # a node is the run's child, or its fork server's (the run's grandchild)
            if up != parent and (up is None or parent_pid(up) != parent):
                continue
            self.node_pids.add(pid)
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/2")
                if target.startswith("/"):
                    self.stderr_files.add(target)

    def leftovers(self, grace: float = 5.0) -> list[int]:
        """Node processes of the watched run still alive after ``grace`` seconds."""
        return wait_gone(self.node_pids, grace)


def wait_gone(pids: Iterable[int], grace: float = 5.0) -> list[int]:
    """Those of ``pids`` that are still live node processes after ``grace`` seconds."""
    deadline = time.monotonic() + grace
    while True:
        alive = [p for p in pids if is_node_process(p) and not is_zombie(p)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


# ------------------------------------------------------------------------------- node processes


class Nodes:
    """``meshai node --json`` processes this test starts: ready lines read, ended by pid on exit."""

    def __init__(self, mesh: str, prefix: Sequence[str] = ()) -> None:
        self.mesh = mesh
        self.prefix = list(prefix)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.ready: dict[str, dict[str, Any]] = {}
        self.logs: dict[str, Path] = {}
        self._logdir = Path(os.environ.get("TMPDIR", "/tmp"))

    def start(
        self, name: str, *args: str, profile: str = "cpu", prefix: Sequence[str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start one node (``--name name --profile profile --mesh <mesh> --json`` plus ``args``)."""
        log = self._logdir / f"meshai-test-{self.mesh}-{name}.log"
        self.logs[name] = log
        cmd = [
            *(self.prefix if prefix is None else prefix),
            *MESHAI,
            "node",
            "--name",
            name,
            "--profile",
            profile,
            "--mesh",
            self.mesh,
            "--json",
            *args,
        ]
        if "--insecure" not in args and "--identity" not in args:
            cmd += ["--identity", str(test_secrets().issue(name))]
        with open(log, "wb") as f:
            p = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=f,
                stdin=subprocess.DEVNULL,
                env=child_env(),
                start_new_session=True,
            )
        self.procs[name] = p
        return p

    def wait_ready(self, timeout: float = 30.0) -> dict[str, dict[str, Any]]:
        """Read every node's JSON ready line (its address and pid)."""
        deadline = time.monotonic() + timeout
        for name, p in self.procs.items():
            if name in self.ready:
                continue
            assert p.stdout is not None
            line = b""
            while not line.endswith(b"\n"):
                left = deadline - time.monotonic()
                if p.poll() is not None:
                    raise AssertionError(f"node {name} exited with {p.returncode}: {self.tail(name)}")
                if left <= 0:
                    raise AssertionError(f"node {name} printed no ready line within {timeout} s")
                r, _, _ = select.select([p.stdout], [], [], min(left, 0.2))
                if r:
                    chunk = os.read(p.stdout.fileno(), 4096)
                    if not chunk:
                        raise AssertionError(f"node {name} closed stdout: {self.tail(name)}")
                    line += chunk
            self.ready[name] = json.loads(line.decode().splitlines()[0])
        return self.ready

    def address(self, name: str) -> str:
        return str(self.wait_ready()[name]["address"])

    def tail(self, name: str) -> str:
        with contextlib.suppress(OSError):
            return self.logs[name].read_text(errors="replace")[-2000:]
        return ""

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        p = self.procs[name]
        if p.poll() is None:
            os.kill(p.pid, sig)

    def alive(self, name: str) -> bool:
        return self.procs[name].poll() is None

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM every process we started (clean goodbye), SIGKILL what is left after ``grace``."""
        for p in self.procs.values():
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGTERM)
                    os.kill(p.pid, signal.SIGCONT)  # a stopped process takes SIGTERM once continued
        deadline = time.monotonic() + grace
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
                p.wait()
            if p.stdout is not None:
                p.stdout.close()
        for log in self.logs.values():
            with contextlib.suppress(OSError):
                log.unlink()

    def __enter__(self) -> Nodes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------------------- event loop thread


class LoopThread:
    """An asyncio event loop running in a daemon thread, shared by the tests of one module.

    A Mesh lives on it for the whole module, so its channels keep sending heartbeats while the test
    thread computes references (onnxruntime releases the GIL).
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="meshai-test-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 120.0) -> T:
        """Run ``coro`` on the loop and wait for its result."""
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise

    def close(self) -> None:
        async def _cancel_rest() -> None:
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in rest:
                t.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

        with contextlib.suppress(Exception):
            self.run(_cancel_rest(), timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()


# --------------------------------------------------------------------------------- comparisons


def assert_outputs_equal(
    got: dict[str, np.ndarray], want: dict[str, np.ndarray], names: Sequence[str], tol: float = 1e-4
) -> None:
    """Graph outputs: same shape and dtype, max abs diff < tol."""
    from meshai.tensors import max_abs_diff

    for t in names:
        a, b = np.asarray(got[t]), np.asarray(want[t])
        assert a.shape == b.shape and a.dtype == b.dtype, (t, a.shape, b.shape, a.dtype, b.dtype)
        d = max_abs_diff({t: a}, {t: b})
        assert d < tol, f"output {t!r}: max abs diff {d}"


def assert_cut_close(
    got: dict[str, np.ndarray], want: dict[str, np.ndarray], names: Sequence[str], tol: float = 1e-4
) -> None:
    """Tensors crossing a cut: within ``tol`` relative to their scale (the light models' activations
    reach 1e8 with their constant weights, where float32 rounding alone is hundreds)."""
    from meshai.tensors import max_abs_diff

    for t in names:
        a, b = np.asarray(got[t]), np.asarray(want[t])
        assert a.shape == b.shape and a.dtype == b.dtype, (t, a.shape, b.shape, a.dtype, b.dtype)
        scale = max(1.0, float(np.max(np.abs(b)))) if b.dtype.kind == "f" and b.size else 1.0
        d = max_abs_diff({t: a}, {t: b})
        assert d < tol * scale, f"cut tensor {t!r}: max abs diff {d} (scale {scale:g})"


# ------------------------------------------------------------------------------- a real Prometheus

PROMETHEUS_BIN = shutil.which("prometheus")


@contextlib.contextmanager
def prometheus_server(
    directory: Path, targets: Sequence[str], rule_files: Sequence[Path] = ()
) -> Iterator[str]:
    """A Prometheus on 127.0.0.1 scraping ``targets`` every second (temp data dir in ``directory``),
    ended by pid when the block exits; yields its base URL once it is ready."""
    import socket
    import urllib.request

    assert PROMETHEUS_BIN is not None, "prometheus is not installed"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    config = directory / "prometheus.yml"
    rules = f"rule_files: {json.dumps([str(r) for r in rule_files])}\n" if rule_files else ""
    config.write_text(
        "global: {scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}\n"
        + rules
        + "scrape_configs:\n"
        "  - job_name: meshai\n"
        f"    static_configs: [{{targets: {json.dumps(list(targets))}}}]\n"
    )
    log = (directory / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            PROMETHEUS_BIN,
            f"--config.file={config}",
            f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        cwd=directory,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(base + "/-/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"Prometheus did not become ready: {(directory / 'prometheus.log').read_text()[-500:]}"
                )
            time.sleep(0.2)
        yield base
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        log.close()
