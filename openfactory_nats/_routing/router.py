"""Route asset messages to the cluster that owns them, one connection per cluster."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import CancelledError
from types import TracebackType
from typing import Any

from .._blocking.closing import CLOSE_MARGIN, shut_down
from .._blocking.facade import SyncNatsCluster
from .._blocking.loop import SharedLoop
from .._core.cluster import NatsCluster
from .._errors import ClusterClosedError, ClusterTimeoutError, InvalidMessageError, InvalidTypeError, WrongThreadError
from .._forksafe import renew_after_fork
from .._jetstream.aio import AsyncJetStream
from .._jetstream.handle import JetStream
from .._jetstream.kv_aio import AsyncKeyValue
from .._jetstream.kv_sync import KeyValue
from .._message import Msg
from .._receive.dispatcher import Dispatcher
from .._receive.inbox import DEFAULT_MAX_BYTES, DEFAULT_MAX_MSGS
from .._receive.serving import Handler
from .._receive.subscription import Subscription, open_subscription
from .._send.acked import PubAck
from .._wire import check_timeout
from .ring import HashRing

__all__ = ("ClusterRouter", "SyncClusterRouter", "clusters_from_env")

ENV_PREFIX = "NATS_CLUSTER_"
_AT_EXIT_TIMEOUT = 5.0  # the most a router collected, or open at exit, drains
ENV_REPLICAS = "HASH_RING_REPLICAS"


def _parse_clusters(clusters: Mapping[str, Sequence[str] | str]) -> dict[str, list[str]]:
    if not isinstance(clusters, Mapping):
        raise InvalidTypeError("clusters must be a mapping of cluster name to server URLs")
    parsed: dict[str, list[str]] = {}
    for name, urls in clusters.items():
        items = urls.split(",") if isinstance(urls, str) else list(urls)
        cleaned = [u.strip() for u in items if isinstance(u, str) and u.strip()]
        if not cleaned:
            raise InvalidMessageError(f"cluster {name!r} has no server URLs", cluster=name)
        parsed[name] = cleaned
    if not parsed:
        raise InvalidMessageError("no NATS clusters configured")
    return parsed


def clusters_from_env(env: Mapping[str, str] | None = None) -> tuple[dict[str, list[str]], int]:
    """Read ``NATS_CLUSTER_<NAME>="url1,url2"`` variables and ``HASH_RING_REPLICAS``.

    :returns: the clusters by name and the number of ring replicas (128 by default).
    :raises InvalidMessageError: when no cluster is configured, a cluster has no URL, or
        ``HASH_RING_REPLICAS`` is not a positive integer.
    """
    source = os.environ if env is None else env
    clusters = {key[len(ENV_PREFIX) :]: value for key, value in source.items() if key.startswith(ENV_PREFIX)}
    if not clusters:
        raise InvalidMessageError(f"no NATS clusters configured: set {ENV_PREFIX}<NAME>='nats://host:4222,...'")
    raw = source.get(ENV_REPLICAS, "128").strip() or "128"
    try:
        replicas = int(raw)
    except ValueError:
        raise InvalidMessageError(f"{ENV_REPLICAS} must be a positive integer, not {raw!r}") from None
    if replicas < 1:
        raise InvalidMessageError(f"{ENV_REPLICAS} must be a positive integer, not {raw!r}")
    return _parse_clusters(clusters), replicas


def _raise_failures(results: dict[str, BaseException | None], action: str) -> None:
    """Raise the first cluster's failure (keeping its type), noting every failing cluster."""
    failed = {name: exc for name, exc in results.items() if exc is not None}
    if not failed:
        return
    first = next(iter(failed.values()))
    summary = ", ".join(f"{name} ({type(exc).__name__})" for name, exc in failed.items())
    first.add_note(f"{action} failed for clusters: {summary}")
    raise first


async def _each(awaitables: Mapping[str, Awaitable[None]]) -> dict[str, BaseException | None]:
    names = list(awaitables)
    outcomes = await asyncio.gather(*awaitables.values(), return_exceptions=True)
    result: dict[str, BaseException | None] = {}
    for name, outcome in zip(names, outcomes, strict=True):
        if isinstance(outcome, asyncio.CancelledError):
            raise outcome
        result[name] = outcome if isinstance(outcome, BaseException) else None
    return result


class ClusterRouter:
    """Publish each asset's messages to the cluster that owns the asset (asyncio).

    :param clusters: ``{name: [url, ...]}`` (a comma-separated string works too).
    :param logger: the logger of every cluster.
    :param replicas: virtual nodes per cluster on the hash ring.
    :param options: as for :class:`NatsCluster`, applied to every cluster.
    """

    def __init__(
        self,
        clusters: Mapping[str, Sequence[str] | str],
        logger: logging.Logger,
        *,
        replicas: int = 128,
        **options: Any,
    ) -> None:
        parsed = _parse_clusters(clusters)
        self.ring = HashRing(parsed, replicas)
        self.clusters = {name: NatsCluster(name, urls, logger, **options) for name, urls in parsed.items()}

    @classmethod
    def from_env(cls, logger: logging.Logger, *, env: Mapping[str, str] | None = None, **options: Any) -> ClusterRouter:
        """Build from ``NATS_CLUSTER_<NAME>`` and ``HASH_RING_REPLICAS`` (see :func:`clusters_from_env`)."""
        clusters, replicas = clusters_from_env(env)
        return cls(clusters, logger, replicas=replicas, **options)

    def cluster_for(self, key: str | bytes) -> str:
        """The name of the cluster that owns *key*."""
        return self.ring.get(key)

    def jetstream(self, key: str | bytes) -> AsyncJetStream:
        """The JetStream handle of the cluster that owns *key* (an asset)."""
        return self.clusters[self.ring.get(key)].jetstream()

    async def key_value(self, key: str | bytes, bucket: str, *, timeout: float | None = None) -> AsyncKeyValue:
        """The key-value bucket *bucket* on the cluster that owns *key* (an asset).

        :raises BucketNotFoundError: when that cluster has no such bucket.
        """
        return await self.jetstream(key).key_value(bucket, timeout=timeout)

    async def connect(self) -> None:
        """Connect every cluster; the first failure is raised once all have tried."""
        _raise_failures(await _each({n: c.connect() for n, c in self.clusters.items()}), "connect")

    async def publish(
        self,
        key: str | bytes,
        subject: str,
        payload: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
        ack: bool = False,
        msg_id: str | None = None,
    ) -> PubAck | None:
        """Publish to the cluster that owns *key* (see :meth:`NatsCluster.publish`)."""
        cluster = self.clusters[self.ring.get(key)]
        if ack:
            return await cluster.publish(subject, payload, headers=headers, timeout=timeout, ack=True, msg_id=msg_id)
        await cluster.publish(subject, payload, headers=headers, timeout=timeout)
        return None

    async def flush(self, timeout: float = 10.0) -> None:
        """Flush every cluster at once; the first failure is raised once all are done."""
        wait = check_timeout(timeout)
        _raise_failures(await _each({n: c.flush(wait) for n, c in self.clusters.items()}), "flush")

    async def close(self) -> None:
        """Close every cluster at once (each bounded by its ``drain_timeout``)."""
        await _each({n: c.close() for n, c in self.clusters.items()})

    def stats(self) -> dict[str, dict[str, int]]:
        """Each cluster's counters, by name."""
        return {name: cluster.stats() for name, cluster in self.clusters.items()}


class SyncClusterRouter:
    """Publish each asset's messages to the cluster that owns the asset, from any thread.

    Every cluster is a :class:`SyncNatsCluster`; all of them share one background event
    loop thread. A cluster that is down, stalled or partitioned only affects publishes
    routed to it: those are buffered, then refused with ``BufferFullError`` (or
    ``ConnectError`` when it was never reached), while the other clusters go on.

    :param timeout: the default timeout of every blocking call.
    :param options: as for :class:`SyncNatsCluster`, applied to every cluster.
    """

    def __init__(
        self,
        clusters: Mapping[str, Sequence[str] | str],
        logger: logging.Logger,
        *,
        replicas: int = 128,
        timeout: float = 10.0,
        **options: Any,
    ) -> None:
        parsed = _parse_clusters(clusters)
        self.ring = HashRing(parsed, replicas)
        self._timeout = check_timeout(timeout)
        self._loop = SharedLoop("openfactory-nats-router")
        self._close_lock = threading.Lock()
        self._dispatchers: list[Dispatcher] = []
        self._clusters = {
            name: SyncNatsCluster(name, urls, logger, timeout=timeout, _shared_loop=self._loop, **options)
            for name, urls in parsed.items()
        }
        self._finalizer = weakref.finalize(
            self,
            shut_down,
            [cluster._holdings for cluster in self._clusters.values()],
            self._loop.runner,
            min(self._timeout, _AT_EXIT_TIMEOUT),
            owns_loop=True,
            dispatchers=self._dispatchers,
            collected=True,
        )
        renew_after_fork(self)

    def _renew_after_fork(self) -> None:
        self._close_lock = threading.Lock()  # a parent thread may have been closing at the fork

    @classmethod
    def from_env(
        cls, logger: logging.Logger, *, env: Mapping[str, str] | None = None, **options: Any
    ) -> SyncClusterRouter:
        """Build from ``NATS_CLUSTER_<NAME>`` and ``HASH_RING_REPLICAS`` (see :func:`clusters_from_env`)."""
        clusters, replicas = clusters_from_env(env)
        return cls(clusters, logger, replicas=replicas, **options)

    def __enter__(self) -> SyncClusterRouter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def clusters(self) -> Mapping[str, SyncNatsCluster]:
        """The clusters by name."""
        return dict(self._clusters)

    def cluster_for(self, key: str | bytes) -> str:
        """The name of the cluster that owns *key*."""
        return self.ring.get(key)

    def jetstream(self, key: str | bytes) -> JetStream:
        """The JetStream handle of the cluster that owns *key* (an asset)."""
        return self._clusters[self.ring.get(key)].jetstream()

    def key_value(self, key: str | bytes, bucket: str, *, timeout: float | None = None) -> KeyValue:
        """The key-value bucket *bucket* on the cluster that owns *key* (an asset).

        :raises BucketNotFoundError: when that cluster has no such bucket.
        """
        return self.jetstream(key).key_value(bucket, timeout=timeout)

    def publish(
        self,
        key: str | bytes,
        subject: str,
        payload: bytes,
        timeout: float | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        ack: bool = False,
        msg_id: str | None = None,
    ) -> PubAck | None:
        """Publish to the cluster that owns *key* (see :meth:`SyncNatsCluster.publish`)."""
        cluster = self._clusters[self.ring.get(key)]
        if ack:
            return cluster.publish(subject, payload, timeout, headers=headers, ack=True, msg_id=msg_id)
        cluster.publish(subject, payload, timeout, headers=headers)
        return None

    def subscribe(
        self,
        key: str | bytes,
        subject: str,
        callback: Callable[[Msg], object] | None = None,
        **options: Any,
    ) -> Subscription:
        """Subscribe on the cluster that owns *key* (see :meth:`SyncNatsCluster.subscribe`)."""
        return self._clusters[self.ring.get(key)].subscribe(subject, callback, **options)

    def request(
        self,
        key: str | bytes,
        subject: str,
        payload: bytes = b"",
        timeout: float | None = None,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> Msg:
        """Send a request on the cluster that owns *key* (see :meth:`SyncNatsCluster.request`)."""
        return self._clusters[self.ring.get(key)].request(subject, payload, timeout, headers=headers)

    def serve(self, key: str | bytes, subject: str, handler: Handler, **options: Any) -> Subscription:
        """Answer requests on the cluster that owns *key* (see :meth:`SyncNatsCluster.serve`)."""
        return self._clusters[self.ring.get(key)].serve(subject, handler, **options)

    def subscribe_all(
        self,
        subject: str,
        callback: Callable[[Msg], object] | None = None,
        *,
        queue: str | None = None,
        max_pending_msgs: int = DEFAULT_MAX_MSGS,
        max_pending_bytes: int = DEFAULT_MAX_BYTES,
        dispatcher: Dispatcher | None = None,
        timeout: float | None = None,
    ) -> Subscription:
        """Subscribe on every cluster; one subscription delivers what any of them
        receives (a dashboard following ``*.Availability`` of all assets). A cluster's
        outage does not stop delivery from the others. Options as for
        :meth:`SyncNatsCluster.subscribe`."""
        return open_subscription(
            list(self._clusters.values()),
            "router",
            subject,
            callback,
            queue=queue,
            max_pending_msgs=max_pending_msgs,
            max_pending_bytes=max_pending_bytes,
            dispatcher=dispatcher,
            timeout=self._wait(timeout),
        )

    def dispatcher(self, threads: int = 4) -> Dispatcher:
        """Worker threads to share among subscriptions (see
        :meth:`SyncNatsCluster.dispatcher`); closed with the router."""
        made = Dispatcher(threads, name="openfactory-nats-router-dispatcher")
        self._dispatchers.append(made)
        return made

    def _all(self, action: str, make: Any, timeout: float) -> None:
        runner = self._loop.current()
        if runner.in_loop_thread():
            raise WrongThreadError("This method cannot be called from the event loop thread")
        cores = {name: cluster.cluster for name, cluster in self._clusters.items()}
        for core in cores.values():
            core.check_open()
        coro = _each({n: make(core) for n, core in cores.items()})
        try:
            future = runner.submit(coro)
        except RuntimeError:  # the loop has stopped: the router is closing
            coro.close()
            raise ClusterClosedError(f"{action}: the router is closed") from None
        try:
            results = future.result(timeout)
        except TimeoutError:
            if future.done() and not future.cancelled():
                raise
            future.cancel()
            raise ClusterTimeoutError(f"{action} of all clusters did not finish within {timeout:g} s") from None
        except CancelledError:  # close() stopped the loop under the call
            raise ClusterClosedError(f"{action}: the router was closed meanwhile") from None
        _raise_failures(results, action)

    def connect(self, timeout: float | None = None) -> None:
        """Connect every cluster at once; the first failure is raised once all have tried."""
        wait = self._wait(timeout)
        self._all("connect", lambda core: core.connect(), wait)

    def flush(self, timeout: float | None = None) -> None:
        """Flush every cluster at once; the first failure is raised once all are done."""
        wait = self._wait(timeout)
        self._all("flush", lambda core: core.flush(wait), wait + 1.0)

    def close(self, timeout: float | None = None) -> None:
        """Close every cluster at once, then stop the shared loop thread.

        Idempotent and safe from many threads at once: a call made while another one
        closes waits for it to finish.

        :raises WrongThreadError: on the event-loop thread.
        :raises ClusterTimeoutError: when another close, still running, did not finish
            within *timeout* s plus a margin (4 s); it goes on closing.
        """
        wait = self._wait(timeout)
        runner = self._loop.current()
        if runner.in_loop_thread():
            raise WrongThreadError("This method cannot be called from the event loop thread")
        if not self._close_lock.acquire(timeout=wait + 2 * CLOSE_MARGIN):
            raise ClusterTimeoutError(f"another close() of the router did not finish within {wait:g} s")
        try:
            # The clusters' own holdings: as if each was closed, but all at once (a
            # stalled cluster must not eat the others' time), and the loop they share last.
            for cluster in self._clusters.values():
                if cluster._forked:  # a forked child's: made again here, so that it ends closed too
                    cluster._renew_after_fork()
            holdings = [cluster._holdings for cluster in self._clusters.values()]
            if not shut_down(holdings, runner, wait, owns_loop=True, dispatchers=self._dispatchers):
                raise ClusterTimeoutError(
                    f"another close() of a cluster of the router did not finish within {wait:g} s"
                )
            self._finalizer.detach()
        finally:
            self._close_lock.release()

    def stats(self) -> dict[str, dict[str, int]]:
        """Each cluster's counters, by name."""
        return {name: cluster.stats() for name, cluster in self._clusters.items()}

    def _wait(self, timeout: float | None) -> float:
        return self._timeout if timeout is None else check_timeout(timeout)
