"""Publish rate to a healthy cluster while the router's other clusters fail.

Three embedded nats-servers act as three clusters. One thread publishes 100,000 messages
to assets of cluster C3 through ``SyncClusterRouter``: first with all clusters up, then
with C1 killed and C2 stalled (SIGSTOP) while a second thread keeps publishing to C1's
and C2's assets (and gets ``BufferFullError`` or ``ConnectError``). Rates are medians of
3 rounds. Run: ``python benchmarks/router_isolation.py``.
"""

from __future__ import annotations

import logging
import signal
import statistics
import threading
import time
import uuid

from openfactory_nats import BufferFullError, ConnectError, SyncClusterRouter
from openfactory_nats._tools.embedded import EmbeddedServer

N = 100_000
PAYLOAD = b"x" * 128


def measure(router: SyncClusterRouter, assets: list[str]) -> float:
    started = time.perf_counter()
    for i in range(N):
        asset = assets[i % len(assets)]
        router.publish(asset, f"{asset}.v", PAYLOAD)
    router.clusters["C3"].flush(30)
    return N / (time.perf_counter() - started)


def main() -> None:
    log = logging.getLogger("isolation")
    servers = {f"C{i}": EmbeddedServer(f"C{i}").start() for i in (1, 2, 3)}
    try:
        router = SyncClusterRouter(
            {n: [s.url] for n, s in servers.items()}, log, reconnect_time_wait=0.2, max_pending_bytes=1 << 20
        )
        router.connect()
        ids = [str(uuid.uuid4()) for _ in range(3000)]
        own = {n: [a for a in ids if router.cluster_for(a) == n] for n in servers}
        healthy = [measure(router, own["C3"]) for _ in range(3)]
        servers["C1"].kill()
        assert servers["C2"].proc is not None
        servers["C2"].proc.send_signal(signal.SIGSTOP)
        stop = threading.Event()
        refused = 0

        def hammer() -> None:
            nonlocal refused
            while not stop.is_set():
                for name in ("C1", "C2"):
                    try:
                        for asset in own[name][:20]:
                            router.publish(asset, f"{asset}.v", b"y" * 10_000, timeout=0.05)
                    except (BufferFullError, ConnectError):
                        refused += 1

        thread = threading.Thread(target=hammer)
        thread.start()
        time.sleep(0.5)
        failing = [measure(router, own["C3"]) for _ in range(3)]
        stop.set()
        thread.join()
        servers["C2"].proc.send_signal(signal.SIGCONT)
        router.close(5)
        h, f = statistics.median(healthy), statistics.median(failing)
        print(f"C3 alone, all clusters up:          {h:>12,.0f} msgs/s")
        print(f"C3 with C1 killed and C2 stalled:   {f:>12,.0f} msgs/s  ({f / h:.2f}x)")
        print(f"publishes to C1/C2 refused meanwhile: {refused}")
    finally:
        for server in servers.values():
            server.close()


if __name__ == "__main__":
    main()
