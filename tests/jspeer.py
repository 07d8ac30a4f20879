"""The other side of JetStream tests: nats-py's own async JetStream API on a loop of its own."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import nats
from nats.js.api import ConsumerInfo, StreamInfo

__all__ = ("Peer", "wait_until")

T = TypeVar("T")


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, every: float = 0.02) -> bool:
    """Poll *predicate* until it is true (True) or *timeout* s passed (False)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(every)
    return True


class Peer:
    """A nats-py client and its JetStream context on a thread and event loop of their own:
    publishes into streams, consumes from them, and reads stream and consumer state."""

    def __init__(self, url: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="test-js-peer", daemon=True)
        self._thread.start()

        async def quiet(*_: Any) -> None:
            pass

        self.nc: Any = self.run(nats.connect(url, error_cb=quiet, max_reconnect_attempts=-1, reconnect_time_wait=0.1))
        self.js: Any = self.nc.jetstream()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 15.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def publish(self, subject: str, data: bytes, headers: dict[str, str] | None = None) -> Any:
        """A JetStream publish (its PubAck)."""
        return self.run(self.js.publish(subject, data, headers=headers))

    def publish_many(self, items: list[tuple[str, bytes]], window: int = 200) -> list[Any]:
        """JetStream publishes, *window* at a time; their PubAcks in order."""

        async def go() -> list[Any]:
            acks: list[Any] = []
            for i in range(0, len(items), window):
                chunk = items[i : i + window]
                acks += await asyncio.gather(*(self.js.publish(s, d) for s, d in chunk))
            return acks

        return self.run(go(), timeout=60.0)

    def stream_info(self, name: str) -> StreamInfo:
        return self.run(self.js.stream_info(name))

    def consumer_info(self, stream: str, consumer: str) -> ConsumerInfo:
        return self.run(self.js.consumer_info(stream, consumer))

    def fetch(self, subject: str, durable: str, stream: str, batch: int = 1, timeout: float = 2.0) -> list[Any]:
        """Fetch with nats-py's pull consumer ([] when nothing came); the messages are not acked."""

        async def go() -> list[Any]:
            psub = await self.js.pull_subscribe(subject, durable, stream=stream)
            try:
                return list(await psub.fetch(batch, timeout=timeout))
            except nats.errors.TimeoutError:
                return []
            finally:
                await psub.unsubscribe()

        return self.run(go(), timeout=timeout + 10.0)

    def ack(self, msgs: list[Any]) -> None:
        async def go() -> None:
            for m in msgs:
                await m.ack_sync()

        self.run(go())

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.run(self.nc.close(), 5.0)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()
