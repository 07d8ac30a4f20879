"""Prometheus metrics for every cluster of the process: call :func:`register` once.

Needs the optional extra ``openfactory-nats[prometheus]`` (``prometheus_client``); the
rest of the library does not import it.

.. code-block:: python

    from prometheus_client import start_http_server
    from openfactory_nats import prometheus

    prometheus.register()          # the default registry
    start_http_server(9100)        # or serve prometheus_client.make_wsgi_app() at /metrics

Every scrape reads :meth:`~openfactory_nats.NatsCluster.stats` of every
:class:`~openfactory_nats.NatsCluster` alive in the process: those behind each
:class:`~openfactory_nats.SyncNatsCluster` and each router included, whether they were
created before or after :func:`register`. Each sample has the label ``cluster`` (the
cluster's name); instances that share a name are added up. An instance that has been
garbage-collected is no longer reported, so its counters leave the sums (Prometheus sees
a counter reset). In a forked child only the instances used or created in the child are
reported, not the parent's.

The metrics (``_total``: a counter; the others are gauges):

============================================  =======  =====================  ==========================================
metric                                        type     ``stats()`` key        what
============================================  =======  =====================  ==========================================
``openfactory_nats_published_total``          counter  ``published``          messages handed to the NATS client
``openfactory_nats_published_bytes_total``    counter  ``bytes``              their bytes (protocol frames)
``openfactory_nats_acked_total``              counter  ``acked``              publishes confirmed by JetStream
``openfactory_nats_errors_total``             counter  ``errors``             errors reported by the NATS client
``openfactory_nats_reconnects_total``         counter  ``reconnects``         reconnections
``openfactory_nats_disconnects_total``        counter  ``disconnects``        lost connections
``openfactory_nats_replayed_total``           counter  ``replayed``           messages resent after a lost connection
``openfactory_nats_dropped_total``            counter  ``dropped``            messages that could not be delivered
``openfactory_nats_dropped_bytes_total``      counter  ``dropped_bytes``      their bytes
``openfactory_nats_refused_total``            counter  ``refused``            publishes refused, the buffer full
``openfactory_nats_requests_total``           counter  ``requests``           requests sent
``openfactory_nats_late_replies_total``       counter  ``late_replies``       replies after their requester gave up
``openfactory_nats_received_total``           counter  ``received``           messages handed to subscriptions
``openfactory_nats_receive_dropped_total``    counter  ``receive_dropped``    messages dropped by full subscriptions
``openfactory_nats_receive_malformed_total``  counter  ``receive_malformed``  messages dropped, unreadable (not UTF-8)
``openfactory_nats_callback_errors_total``    counter  ``callback_errors``    exceptions raised by callbacks
``openfactory_nats_discarded_total``          counter  ``discarded``          received, discarded: subscription ended
``openfactory_nats_js_processed_total``       counter  ``js_processed``       JetStream pool messages handled (acked)
``openfactory_nats_js_failed_total``          counter  ``js_failed``          JetStream pool handlers that raised
``openfactory_nats_js_ack_errors_total``      counter  ``js_ack_errors``      JetStream acks that could not be sent
``openfactory_nats_queued_messages``          gauge    ``queued``             messages not yet handed to the client
``openfactory_nats_unsent_bytes``             gauge    ``unsent_bytes``       bytes not on the socket (or unconfirmed)
``openfactory_nats_subscriptions``            gauge    ``subscriptions``      subscriptions open
``openfactory_nats_connected``                gauge    -                      instances connected to a server now
============================================  =======  =====================  ==========================================

A ``stats()`` key that this module does not know yet is exported untyped, as
``openfactory_nats_<key>``.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Final, TypeAlias

from ._core import registry
from ._core.lifecycle import ClusterState

if TYPE_CHECKING:
    from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, UnknownMetricFamily
    from prometheus_client.registry import CollectorRegistry

    _Family: TypeAlias = CounterMetricFamily | GaugeMetricFamily | UnknownMetricFamily

__all__ = ("EXTRA", "METRICS", "ClusterCollector", "register", "unregister")

EXTRA: Final = "openfactory-nats[prometheus]"
"""The extra to install for this module: ``pip install 'openfactory-nats[prometheus]'``."""

_PREFIX = "openfactory_nats_"
_COUNTER, _GAUGE = "counter", "gauge"

# stats() key -> (kind, metric name without prefix and without _total, unit, help)
METRICS: Final[dict[str, tuple[str, str, str, str]]] = {
    "published": (_COUNTER, "published", "", "Messages handed to the NATS client."),
    "bytes": (_COUNTER, "published_bytes", "bytes", "Bytes (protocol frames) handed to the NATS client."),
    "acked": (_COUNTER, "acked", "", "Publishes confirmed by JetStream."),
    "errors": (_COUNTER, "errors", "", "Errors reported by the NATS client."),
    "reconnects": (_COUNTER, "reconnects", "", "Reconnections."),
    "disconnects": (_COUNTER, "disconnects", "", "Lost connections."),
    "replayed": (_COUNTER, "replayed", "", "Messages sent again after a lost connection."),
    "dropped": (_COUNTER, "dropped", "", "Messages that could not be delivered (each logged at ERROR)."),
    "dropped_bytes": (_COUNTER, "dropped_bytes", "bytes", "Bytes that could not be delivered."),
    "refused": (_COUNTER, "refused", "", "Publishes refused because the buffer was full."),
    "requests": (_COUNTER, "requests", "", "Requests sent."),
    "late_replies": (_COUNTER, "late_replies", "", "Replies that came after their requester had given up."),
    "received": (_COUNTER, "received", "", "Messages handed to subscriptions."),
    "receive_dropped": (_COUNTER, "receive_dropped", "", "Messages dropped by full subscriptions."),
    "receive_malformed": (
        _COUNTER,
        "receive_malformed",
        "",
        "Messages dropped because they could not be read (subject, reply or status line not UTF-8, broken headers).",
    ),
    "callback_errors": (_COUNTER, "callback_errors", "", "Exceptions raised by subscription callbacks."),
    "discarded": (
        _COUNTER,
        "discarded",
        "",
        "Messages received but discarded because their subscription ended first (pending at unsubscribe, "
        "or when a drain ran out of time).",
    ),
    "js_processed": (_COUNTER, "js_processed", "", "JetStream worker pool messages whose handler returned (acked)."),
    "js_failed": (_COUNTER, "js_failed", "", "JetStream worker pool messages whose handler raised (naked)."),
    "js_ack_errors": (
        _COUNTER,
        "js_ack_errors",
        "",
        "JetStream acknowledgements that could not be sent (the server redelivers those messages).",
    ),
    "queued": (_GAUGE, "queued_messages", "", "Messages queued, not yet handed to the NATS client."),
    "unsent_bytes": (
        _GAUGE,
        "unsent_bytes",
        "bytes",
        "Bytes handed to the NATS client but not yet written to the socket (with replay: not yet confirmed).",
    ),
    "subscriptions": (_GAUGE, "subscriptions", "", "Subscriptions open."),
}
"""How each ``stats()`` key is exported: ``(kind, name, unit, help)``."""

_CONNECTED = ("connected", "Instances connected to a server now.")

_lock = threading.Lock()
_collectors: weakref.WeakKeyDictionary[CollectorRegistry, ClusterCollector] = weakref.WeakKeyDictionary()


class ClusterCollector:
    """A ``prometheus_client`` collector that reads ``stats()`` of every live cluster at
    each scrape. :func:`register` makes and registers one; it needs no other set-up."""

    def describe(self) -> Iterator[_Family]:
        """The metric families, without samples (``prometheus_client`` checks their
        names against the other collectors of the registry)."""
        return iter(self._families().values())

    def collect(self) -> Iterator[_Family]:
        """The metric families with one sample per cluster name."""
        totals: dict[str, dict[str, int]] = {}
        for core in registry.live():
            stats = core.stats()
            stats["connected"] = int(core.state is ClusterState.CONNECTED)
            per_name = totals.setdefault(core.name, {})
            for key, value in stats.items():
                per_name[key] = per_name.get(key, 0) + value
        families = self._families(extra={key for values in totals.values() for key in values})
        for name in sorted(totals):
            for key, value in totals[name].items():
                families[key].add_metric([name], value)
        return iter(families.values())

    @staticmethod
    def _families(extra: set[str] | None = None) -> dict[str, _Family]:
        from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, UnknownMetricFamily

        families: dict[str, _Family] = {}
        for key, (kind, name, unit, doc) in METRICS.items():
            family = CounterMetricFamily if kind == _COUNTER else GaugeMetricFamily
            families[key] = family(_PREFIX + name, doc, labels=["cluster"], unit=unit)
        families["connected"] = GaugeMetricFamily(_PREFIX + _CONNECTED[0], _CONNECTED[1], labels=["cluster"])
        for key in sorted((extra or set()) - families.keys()):
            families[key] = UnknownMetricFamily(_PREFIX + key, f"stats()[{key!r}]", labels=["cluster"])
        return families


def register(registry: CollectorRegistry | None = None) -> ClusterCollector:
    """Export the counters and gauges of every cluster to *registry*.

    Idempotent: a second call with the same registry registers nothing more and returns
    the collector registered by the first.

    :param registry: a ``prometheus_client.CollectorRegistry``; ``None`` means
        ``prometheus_client.REGISTRY``, the default one.
    :returns: the collector registered.
    :raises ImportError: when ``prometheus_client`` is not installed (install
        ``openfactory-nats[prometheus]``).
    :raises ValueError: when another collector of *registry* already exports one of
        the metric names (``prometheus_client``'s ``DuplicateTimeseries``).
    """
    target = _registry_or_default(registry)
    with _lock:
        collector = _collectors.get(target)
        if collector is None:
            collector = ClusterCollector()
            target.register(collector)
            _collectors[target] = collector
        return collector


def unregister(registry: CollectorRegistry | None = None) -> None:
    """Stop exporting to *registry* (``None``: the default one); nothing happens when
    :func:`register` was not called for it.

    :raises ImportError: when ``prometheus_client`` is not installed.
    """
    target = _registry_or_default(registry)
    with _lock:
        collector = _collectors.pop(target, None)
        if collector is not None:
            target.unregister(collector)


def _renew_after_fork() -> None:
    global _lock
    _lock = threading.Lock()  # a parent thread may have held it at the fork


os.register_at_fork(after_in_child=_renew_after_fork)


def _registry_or_default(registry: CollectorRegistry | None) -> CollectorRegistry:
    try:
        from prometheus_client.registry import REGISTRY
    except ImportError as exc:
        raise ImportError(
            f"openfactory_nats.prometheus needs prometheus_client: pip install '{EXTRA}'",
            name="prometheus_client",
        ) from exc
    return REGISTRY if registry is None else registry
