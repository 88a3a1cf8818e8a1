"""Measure tensor throughput of ``meshai.transport.Channel`` against a raw asyncio socket, on loopback.

Not a test.  Run ``python tests/transport_probe.py [--mib 256] [--repeat 5] [--json]``.  The receiver
runs in a child process (so sender and receiver each get a core); for each of plain TCP and TLS and
for 4 MiB and 64 KiB float32 tensors it sends ``--mib`` MiB one way, then waits for an acknowledgement,
and reports the best MB/s of ``--repeat`` runs (taking turns):

- ``channel``: ``Channel.send(Infer(...))`` → a ``Server`` whose handler receives every message;
- ``raw``: asyncio streams, ``writer.write(memoryview(array))`` + ``drain()`` with the same 4 MiB
  write high-water mark → ``reader.readexactly(nbytes)`` + ``np.frombuffer``: no framing, no checks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import ssl
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # idle BLAS threads spin and steal a core on small hosts

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meshai.protocol import PROTOCOL_VERSION, Control, ControlReply, Hello, Infer
from meshai.transport import WRITE_HIGH_WATER, Channel, Server, connect

HOST = "127.0.0.1"
_KINDS = ("channel", "raw", "sink")
_COUNT = struct.Struct(">QQ")  # raw mode: message count, bytes per message
_STREAM_LIMIT = 64 * 1024 * 1024  # StreamReader's default 64 KiB limit would throttle 4 MiB reads


def _hello(node_id: str, role: str) -> Hello:
    return Hello(node_id, PROTOCOL_VERSION, role, {}, f"{HOST}:1" if role == "node" else "")


def _contexts(certdir: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    cert, key = certdir / "cert.pem", certdir / "key.pem"
    if not cert.exists():
        _make_cert(cert, key)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(cafile=str(cert))
    return server, client


def _make_cert(cert_path: Path, key_path: Path) -> None:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )


# --------------------------------------------------------------------------- receiver (child process)


async def _serve(kind: str, certdir: Path | None) -> None:
    server_ctx = _contexts(certdir)[0] if certdir else None
    stop = asyncio.Event()

    async def on_channel(ch: Channel) -> None:
        total = 0
        async for msg in ch:
            if isinstance(msg, Infer):
                total += msg.tensors["x"].nbytes
            elif isinstance(msg, Control):
                await ch.send(ControlReply("done", True, {"bytes": total}))
                total = 0

    async def on_raw(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                count, nbytes = _COUNT.unpack(await reader.readexactly(_COUNT.size))
                total = 0
                for _ in range(count):
                    total += np.frombuffer(await reader.readexactly(nbytes), np.float32).nbytes
                writer.write(_COUNT.pack(count, total))
        writer.close()

    if kind == "channel":
        async with Server(HOST, 0, lambda: _hello("probe-rx", "node"), on_channel, ssl=server_ctx) as srv:
            print(srv.port, flush=True)
            await stop.wait()
    else:
        if kind == "raw":
            raw = await asyncio.start_server(on_raw, HOST, 0, ssl=server_ctx, limit=_STREAM_LIMIT)
        else:
            raw = await asyncio.get_running_loop().create_server(_Sink, HOST, 0, ssl=server_ctx)
        async with raw:
            print(raw.sockets[0].getsockname()[1], flush=True)
            await stop.wait()


class _Sink(asyncio.BufferedProtocol):
    """The ceiling: receive each message straight into a fresh array, no framing, no checks."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.head = memoryview(bytearray(_COUNT.size))
        self.filled = 0
        self.left = 0  # messages still expected
        self.target = self.head
        self.total = 0

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.target[self.filled :]

    def buffer_updated(self, nbytes: int) -> None:
        self.filled += nbytes
        if self.filled < len(self.target):
            return
        if self.target is self.head:
            self.left, self.nbytes = _COUNT.unpack(self.head)
            self.total = 0
        else:
            self.total += len(self.target)
            self.left -= 1
        if self.left:
            self.target = np.empty(self.nbytes, np.uint8).data
        else:
            assert isinstance(self.transport, asyncio.Transport)
            self.transport.write(_COUNT.pack(0, self.total))
            self.target = self.head
        self.filled = 0


# --------------------------------------------------------------------------- sender (this process)


async def _send_channel(port: int, client_ctx: ssl.SSLContext | None, arr: np.ndarray, count: int) -> float:
    ch = await connect(
        HOST,
        port,
        _hello("probe-tx", "client"),
        ssl=client_ctx,
        server_hostname="localhost" if client_ctx else None,
    )
    start = time.perf_counter()
    for i in range(count):
        await ch.send(Infer(i, "probe", {"x": arr}))
    await ch.send(Control("done"))
    reply = await ch.recv()
    elapsed = time.perf_counter() - start
    assert isinstance(reply, ControlReply) and reply.body["bytes"] == count * arr.nbytes, reply
    await ch.close()
    return elapsed


async def _send_raw(port: int, client_ctx: ssl.SSLContext | None, arr: np.ndarray, count: int) -> float:
    reader, writer = await asyncio.open_connection(
        HOST, port, ssl=client_ctx, server_hostname="localhost" if client_ctx else None, limit=_STREAM_LIMIT
    )
    writer.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
    view = arr.data.cast("B")
    start = time.perf_counter()
    writer.write(_COUNT.pack(count, arr.nbytes))
    for _ in range(count):
        writer.write(view)
        await writer.drain()
    _, total = _COUNT.unpack(await reader.readexactly(_COUNT.size))
    elapsed = time.perf_counter() - start
    assert total == count * arr.nbytes
    writer.close()
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        await writer.wait_closed()
    return elapsed


def _measure(certdir: Path | None, nbytes: int, mib: int, repeat: int) -> dict[str, float]:
    """Best MB/s of each kind; the kinds take turns so that a noisy moment hits them alike."""
    children: dict[str, subprocess.Popen[str]] = {}
    try:
        ports = {}
        for kind in _KINDS:
            cmd = [sys.executable, __file__, "--serve", kind]
            if certdir is not None:
                cmd += ["--certdir", str(certdir)]
            children[kind] = child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
            assert child.stdout is not None
            ports[kind] = int(child.stdout.readline())
        client_ctx = _contexts(certdir)[1] if certdir else None
        arr = np.random.default_rng(0).standard_normal(nbytes // 4, dtype=np.float32)
        count = max(1, mib * 1024 * 1024 // nbytes)
        best = dict.fromkeys(_KINDS, float("inf"))
        for _ in range(repeat):
            for kind in _KINDS:
                send = _send_channel if kind == "channel" else _send_raw  # raw and sink share the sender
                best[kind] = min(best[kind], asyncio.run(send(ports[kind], client_ctx, arr, count)))
        return {kind: count * nbytes / t / 1e6 for kind, t in best.items()}
    finally:
        for child in children.values():
            child.terminate()
            child.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mib", type=int, default=256, help="MiB sent per run (default 256)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per figure; the best counts (default 5)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--serve", choices=_KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--certdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(_serve(args.serve, args.certdir))
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for tls in (False, True):
            certdir = Path(tmp) if tls else None
            for nbytes in (4 * 1024 * 1024, 64 * 1024):
                figures = _measure(certdir, nbytes, args.mib, args.repeat)
                row = {
                    "transport": "tls" if tls else "tcp",
                    "tensor_bytes": nbytes,
                    "channel_MBps": round(figures["channel"], 1),
                    "raw_MBps": round(figures["raw"], 1),
                    "sink_MBps": round(figures["sink"], 1),
                    "ratio": round(figures["channel"] / figures["raw"], 2),
                    "ratio_to_sink": round(figures["channel"] / figures["sink"], 2),
                }
                results.append(row)
                if not args.json:
                    print(
                        f"{row['transport']:>3} {nbytes // 1024:>5} KiB: channel {row['channel_MBps']:8.1f} MB/s"
                        f"  raw {row['raw_MBps']:8.1f} MB/s  sink {row['sink_MBps']:8.1f} MB/s"
                        f"  ratio {row['ratio']:.2f} (to sink {row['ratio_to_sink']:.2f})",
                        flush=True,
                    )
    if args.json:
        print(json.dumps({"python": sys.version.split()[0], "cpus": os.cpu_count(), "results": results}))


if __name__ == "__main__":
    main()
