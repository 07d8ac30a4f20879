"""Real nats-server processes, a cuttable loopback proxy and an independent subscriber."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Self

import nats

from openfactory_nats._tools.embedded import EmbeddedServer, free_port

__all__ = (
    "NatsServer",
    "SilentServer",
    "Subscriber",
    "TcpProxy",
    "create_stream",
    "free_port",
    "stream_count",
    "wait_for_mesh",
)


class NatsServer(EmbeddedServer):
    """An embedded server with the fault controls tests need, restartable on its ports.

    ``cluster_port=0`` lets nats-server pick the route port on the first start (restarts
    reuse it); None runs without clustering. *routes* are the cluster ports of other nodes.
    """

    def __init__(
        self,
        *,
        name: str = "n",
        jetstream: bool = False,
        store_dir: str | None = None,
        cluster_port: int | None = None,
        routes: list[int] | None = None,
        config: str | None = None,
        extra: list[str] | None = None,
        ready_timeout: float = 10.0,
    ) -> None:
        super().__init__(name, extra, ready_timeout)
        self.cluster_port = cluster_port
        self.routes = routes or []
        self.jetstream = jetstream
        self.store_dir = store_dir
        self.config = config

    def args(self) -> list[str]:
        args = super().args()
        if self.config:
            args += ["-c", self.config]
        if self.jetstream:
            if self.store_dir is None:  # chosen once, so a restart finds its streams again
                self.store_dir = tempfile.mkdtemp(prefix="nats-js-")
            args += ["-js", "-sd", self.store_dir]
        if self.cluster_port is not None:
            args += ["--cluster_name", "test", "--cluster", f"nats://127.0.0.1:{self.cluster_port or -1}"]
            if self.routes:
                args += ["--routes", ",".join(f"nats://127.0.0.1:{p}" for p in self.routes)]
        return args

    def start(self) -> Self:
        super().start()
        if self.cluster_port == 0:
            port = self.listen_port("cluster")
            if port is None:
                raise RuntimeError(f"nats-server {self.name} reported no cluster port: {self.listening}")
            self.cluster_port = port
        return self

    def pause(self) -> None:
        """SIGSTOP, and wait until the kernel reports the process stopped: the signal is
        asynchronous, and a server still running for a moment would answer a PING."""
        self.send_signal(signal.SIGSTOP)
        if self.proc is None:
            return
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
            except OSError:
                return
            if stat.rsplit(")", 1)[1].split()[0] == "T":
                return
            time.sleep(0.001)
        raise RuntimeError(f"nats-server {self.name} did not stop within 5 s of SIGSTOP")

    def resume(self) -> None:
        self.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        self.stop()
        self.start()

    def monitor(self, path: str) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor_port}/{path}", timeout=5) as r:
            result: dict[str, Any] = json.loads(r.read())
            return result

    def peers(self) -> set[str]:
        """Names of the servers this one has routes to (a pair has several pooled routes)."""
        return {route["remote_name"] for route in self.monitor("routez")["routes"]}


def wait_for_mesh(nodes: list[NatsServer], timeout: float = 10) -> None:
    """Wait until every node has routes to all the others.

    :raises RuntimeError: when the cluster has not formed within *timeout* seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        missing = {n.name: {o.name for o in nodes if o is not n} - n.peers() for n in nodes}
        if not any(missing.values()):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"cluster not formed within {timeout:g} s; missing routes: {missing}")
        time.sleep(0.05)


class TcpProxy:
    """A loopback TCP proxy in front of a server; :meth:`cut` partitions the link while
    the server stays up, :meth:`restore` heals it."""

    def __init__(self, target_port: int, delay: float = 0.0) -> None:
        self.target_port = target_port
        #: Seconds each chunk is held before it is passed on (a slow link).
        self.delay = delay
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._cut = False
        self._blackhole = False
        self._closed = False
        #: Sockets whose pipes stopped reading (see :meth:`stall`).
        self._stalled: set[int] = set()
        self._thread = threading.Thread(target=self._accept, name="test-proxy", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                if self._cut or self._closed:
                    client.close()
                    continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                while id(src) in self._stalled and not self._closed:
                    time.sleep(0.01)
                data = src.recv(65536)
                if not data:
                    break
                if self.delay:
                    time.sleep(self.delay)
                if not self._blackhole:
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        with self._lock:
            self._cut = True
            conns, self._conns = self._conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def stall(self) -> None:
        """The connections open now stop reading (either way), and stay open: a peer that
        takes nothing and says nothing. New connections are not affected."""
        with self._lock:
            self._stalled.update(id(s) for s in self._conns)

    def hang_up(self) -> None:
        """Half-close the client side of the connections open now: the client reads EOF,
        while what it writes is (if stalled) never read."""
        with self._lock:
            clients = self._conns[0::2]  # accepted in pairs: (client, upstream)
        for s in clients:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_WR)

    def blackhole(self) -> None:
        """A silent partition: connections stay open, but nothing gets through either way."""
        self._blackhole = True

    def restore(self) -> None:
        with self._lock:
            self._cut = False
        self._blackhole = False

    def close(self) -> None:
        self._closed = True
        self.cut()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
        self._listener.close()
        self._thread.join(5)


class SilentServer:
    """Accepts TCP connections and never speaks NATS."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self.url = f"nats://127.0.0.1:{self.port}"
        self._held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self._held.append(conn)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
        self._listener.close()
        for conn in self._held:
            conn.close()
        self._thread.join(5)


class Subscriber:
    """An independent nats-py subscriber on its own thread and event loop."""

    def __init__(self, url: str, subject: str) -> None:
        self.messages: list[Any] = []
        self._cond = threading.Condition()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="test-subscriber", daemon=True)
        self._thread.start()
        self._nc: Any = self._run(self._start(url, subject))

    def _run(self, coro: Any, timeout: float = 10) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _start(self, url: str, subject: str) -> Any:
        async def on_msg(msg: Any) -> None:
            with self._cond:
                self.messages.append(msg)
                self._cond.notify_all()

        async def quiet(*_: Any) -> None:
            pass

        nc = await nats.connect(url, error_cb=quiet, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
        await nc.subscribe(subject, cb=on_msg, pending_msgs_limit=-1, pending_bytes_limit=-1)
        await nc.flush()
        return nc

    def wait_for(self, count: int, timeout: float = 10) -> list[Any]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.messages) < count and time.monotonic() < deadline:
                self._cond.wait(deadline - time.monotonic())
            return list(self.messages)

    def settle(self, quiet: float = 0.3, timeout: float = 10) -> list[Any]:
        """Wait until no message arrived for *quiet* seconds."""
        deadline = time.monotonic() + timeout
        last = -1
        while time.monotonic() < deadline:
            with self._cond:
                n = len(self.messages)
            if n == last:
                break
            last = n
            time.sleep(quiet)
        with self._cond:
            return list(self.messages)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._run(self._nc.close(), 5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


def create_stream(url: str, name: str, subjects: list[str]) -> None:
    """Create a JetStream stream with an independent nats-py client."""

    async def run() -> None:
        nc = await nats.connect(url)
        try:
            await nc.jetstream().add_stream(name=name, subjects=subjects)
        finally:
            await nc.close()

    asyncio.run(run())


def stream_count(url: str, name: str) -> int:
    """How many messages a stream holds, asked with an independent nats-py client."""

    async def run() -> int:
        nc = await nats.connect(url)
        try:
            return int((await nc.jetstream().stream_info(name)).state.messages)
        finally:
            await nc.close()

    return asyncio.run(run())
