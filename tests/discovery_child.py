"""One mDNS node in its own process, for tests/test_discovery_processes.py.

Registers an advert on 127.0.0.1, browses, and prints JSON lines on stdout:
{"event": "registered"}, then {"event": "saw_all"} once it knows `--expect` peers,
and {"event": "exited"} after a clean exit on SIGTERM (goodbyes sent).
Times are time.monotonic(), which all processes on one Linux host share.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import time
from typing import Any

from meshai.discovery import Advert, MdnsDiscovery
from meshai.errors import PeerError


def say(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, "t": time.monotonic(), **fields}), flush=True)


async def watch(discovery: MdnsDiscovery, expect: int, timeout: float) -> None:
    try:
        peers = await discovery.wait_for(expect, timeout)
        say("saw_all", peers=sorted(peers))
    except PeerError as exc:
        say("timeout", error=str(exc))


async def main(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with MdnsDiscovery(("127.0.0.1",), service_type=args.service_type) as discovery:
        advert = Advert(args.node_id, "127.0.0.1", args.port, 1, {"accel": "cpu", "mem_mb": "1024"})
        await discovery.register(advert)
        say("registered")
        watcher = asyncio.create_task(watch(discovery, args.expect, args.timeout))
        await stop.wait()
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    say("exited")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--service-type", required=True)
    parser.add_argument("--node-id", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--expect", type=int, required=True)
    parser.add_argument("--timeout", type=float, default=10.0)
    asyncio.run(main(parser.parse_args()))
