"""NATS services from blocking code (ADR-32): :class:`Service`, its :class:`ServiceGroup`\\ s
and :class:`Endpoint`\\ s.

An endpoint is a ``serve`` subscription (in a queue group, ``q`` by default) whose
handler is wrapped to keep the endpoint's stats and to answer errors as the ADR says. A
service answers discovery (PING, INFO, STATS on its nine ``$SRV`` subjects) with
callbacks on one dispatcher thread of its own. Everything is made through the blocking
cluster's public surface, so that it ends with the cluster: a closed cluster's service
answers nothing any more.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Protocol

from .._errors import (
    ClusterClosedError,
    ClusterTimeoutError,
    InvalidMessageError,
    InvalidTypeError,
    NatsClusterError,
)
from .._filters import validate_filter
from .._forksafe import renew_after_fork
from .._message import Msg
from .._wire import check_timeout
from .discovery import (
    INFO_TYPE,
    PING_TYPE,
    STATS_TYPE,
    check_metadata,
    check_name,
    check_version,
    control_subjects,
    new_id,
    rfc3339,
)
from .dispatcher import Dispatcher
from .endpoint import Endpoint
from .serving import Handler, check_workers
from .subscription import Subscription

__all__ = ("DEFAULT_QUEUE_GROUP", "Endpoint", "Host", "Service", "ServiceGroup")

#: The queue group of an endpoint unless told otherwise (as in every NATS client).
DEFAULT_QUEUE_GROUP = "q"


class Validator(Protocol):
    """What checks a message as the publish path does (:class:`~openfactory_nats.NatsCluster`)."""

    def prepare(self, subject: object, payload: object, headers: object) -> int: ...


class Host(Protocol):
    """The blocking cluster a service runs on (:class:`~openfactory_nats.SyncNatsCluster`)."""

    @property
    def name(self) -> str: ...

    @property
    def cluster(self) -> Validator: ...

    def subscribe(
        self,
        subject: str,
        callback: Callable[[Msg], object] | None = None,
        *,
        dispatcher: Dispatcher | None = None,
        timeout: float | None = None,
    ) -> Subscription: ...

    def serve(
        self,
        subject: str,
        handler: Handler,
        *,
        queue: str | None = None,
        workers: int = 1,
        timeout: float | None = None,
    ) -> Subscription: ...

    def dispatcher(self, threads: int = 4) -> Dispatcher: ...


class ServiceGroup:
    """Endpoints under a common subject prefix (:meth:`Service.group`)."""

    def __init__(self, service: Service, prefix: str, queue_group: str) -> None:
        self.service = service
        #: Prepended, with a dot, to the subjects of its endpoints.
        self.prefix = prefix
        self.queue_group = queue_group

    def __repr__(self) -> str:
        return f"<ServiceGroup {self.prefix!r} of {self.service.name!r}>"

    def endpoint(
        self,
        name: str,
        handler: Handler,
        *,
        subject: str | None = None,
        queue_group: str | None = None,
        workers: int = 1,
        metadata: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> Endpoint:
        """Add an endpoint answering ``<prefix>.<subject>`` (see :meth:`Service.endpoint`)."""
        check_name("endpoint name", name)
        tail = name if subject is None else subject
        if not isinstance(tail, str):
            validate_filter(tail)  # raises the type error
        return self.service._add(
            name, handler, f"{self.prefix}.{tail}", queue_group or self.queue_group, workers, metadata, timeout
        )

    def group(self, name: str, *, queue_group: str | None = None) -> ServiceGroup:
        """A group inside this one: its prefix is ``<prefix>.<name>``."""
        if not isinstance(name, str):  # an f-string would take anything
            raise InvalidTypeError(f"a group's name must be a str, not {type(name).__name__}")
        return ServiceGroup(self.service, _check_prefix(f"{self.prefix}.{name}"), queue_group or self.queue_group)


class Service:
    """A NATS service (ADR-32) made by :meth:`SyncNatsCluster.service`, named *name*
    (``[A-Za-z0-9_-]``) at *version* (semantic): it answers discovery on
    ``$SRV.PING|INFO|STATS`` from the start, by any NATS client, and the requests to each
    endpoint added with :meth:`endpoint` and :meth:`group`, until :meth:`stop` or the
    cluster's ``close()``. As a context manager it stops on exit.

    :ivar id: this instance's id (every instance of a service has its own).
    """

    def __init__(
        self,
        host: Host,
        name: str,
        version: str,
        *,
        description: str = "",
        metadata: Mapping[str, str] | None = None,
        queue_group: str = DEFAULT_QUEUE_GROUP,
        logger: logging.Logger,
        timeout: float | None = None,
    ) -> None:
        self.name = check_name("service name", name)
        self.version = check_version(version)
        if not isinstance(description, str):
            raise InvalidTypeError(f"description must be a str, not {type(description).__name__}")
        self.description = description
        self.metadata = check_metadata(metadata)
        self.queue_group = queue_group
        validate_filter(queue_group)
        self.logger = logger
        self.id = new_id()
        self._host = host
        self._lock = threading.Lock()
        self._endpoints: list[Endpoint] = []
        #: Names of the endpoints being subscribed (outside the lock: a stop() keeps its timeout).
        self._adding: set[str] = set()
        self._stopped = False
        #: The process that made it: a forked child's copy answers nothing.
        self._pid = os.getpid()
        self._started = time.time()
        wait = None if timeout is None else check_timeout(timeout)  # for the nine subscriptions in all
        deadline = None if wait is None else time.monotonic() + wait
        self._dispatcher = host.dispatcher(1)
        self._discovery: list[Subscription] = []
        answers: dict[str, Callable[[], dict[str, Any]]] = {"PING": self.ping, "INFO": self.info, "STATS": self.stats}
        try:
            for verb, subject in control_subjects(self.name, self.id):
                callback = _Answer(answers[verb], self, verb)
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                self._discovery.append(host.subscribe(subject, callback, dispatcher=self._dispatcher, timeout=left))
        except BaseException:
            self._end_discovery(1.0)
            raise
        renew_after_fork(self)

    def _renew_after_fork(self) -> None:
        # A parent thread (adding an endpoint, stopping) may have held it at the fork: the
        # child's stop() goes through it.
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<Service {self.name!r} {self.version} id={self.id!r} endpoints={len(self._endpoints)}>"

    def __enter__(self) -> Service:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        """The endpoints, in the order they were added."""
        return tuple(self._endpoints)

    @property
    def running(self) -> bool:
        """True until :meth:`stop`, or the cluster's ``close()``."""
        return not self._stopped and all(sub.is_open for sub in self._discovery)

    def endpoint(
        self,
        name: str,
        handler: Handler,
        *,
        subject: str | None = None,
        queue_group: str | None = None,
        workers: int = 1,
        metadata: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> Endpoint:
        """Answer the requests sent to *subject* (default: *name*; wildcards allowed):
        ``handler(msg)`` runs on *workers* threads, as with ``serve``, and returns the
        reply, ``bytes`` or ``(bytes, headers)``. Raising ``ServiceError(code,
        description)`` answers with that error; any other exception, or a reply of the
        wrong type, answers 500 and is logged. Errors count in the stats
        (``num_errors``, ``last_error``). Requests are spread over the instances of the
        *queue_group* (the service's, ``q`` by default). Returns once subscribed.

        :raises InvalidMessageError, InvalidTypeError: for a bad name (``[A-Za-z0-9_-]``),
            subject, queue group, metadata or handler, or a name the service has already.
        :raises ClusterClosedError: once the service is stopped (also while this call
            subscribed), or in a forked child (the service is the parent's).
        :raises ConnectError, ClusterTimeoutError, WrongThreadError: as ``serve``.
        """
        check_name("endpoint name", name)
        return self._add(
            name,
            handler,
            name if subject is None else subject,
            queue_group or self.queue_group,
            workers,
            metadata,
            timeout,
        )

    def group(self, name: str, *, queue_group: str | None = None) -> ServiceGroup:
        """Endpoints under the subject prefix *name* (``group("cmd").endpoint("restart",
        f)`` answers ``cmd.restart``); *name* may have several tokens, and ``*`` wildcards."""
        return ServiceGroup(self, _check_prefix(name), queue_group or self.queue_group)

    def _add(
        self,
        name: str,
        handler: Handler,
        subject: str,
        queue_group: str,
        workers: int,
        metadata: Mapping[str, str] | None,
        timeout: float | None,
    ) -> Endpoint:
        subject = validate_filter(subject)
        validate_filter(queue_group)
        made = Endpoint(
            self.name,
            self.logger,
            name,
            handler,
            subject,
            queue_group,
            check_metadata(metadata),
            self._host.cluster.prepare,
        )
        check_workers(handler, workers)
        if self._pid != os.getpid():
            raise ClusterClosedError(
                f"service {self.name!r} was made by the parent process and answers nothing in a "
                "forked child; make a service in the child",
                cluster=self._host.name,
            )
        with self._lock:
            if self._stopped:
                raise ClusterClosedError(f"service {self.name!r} is stopped", cluster=self._host.name)
            if name in self._adding or any(e.name == name for e in self._endpoints):
                raise InvalidMessageError(f"service {self.name!r} has an endpoint named {name!r} already")
            self._adding.add(name)
        try:  # not under the lock: a stop() meanwhile keeps its own timeout
            made.subscription = self._host.serve(
                subject, made.handle, queue=queue_group, workers=workers, timeout=timeout
            )
            with self._lock:
                stopped = self._stopped
                if not stopped:
                    self._endpoints.append(made)
        finally:
            with self._lock:
                self._adding.discard(name)
        if stopped:  # stop() ran meanwhile and could not see this one: it ends here
            try:
                made.subscription.unsubscribe(timeout)
            except NatsClusterError as exc:  # it ends with the cluster anyway
                self.logger.warning("service %s: could not unsubscribe %r: %s", self.name, subject, exc)
            raise ClusterClosedError(f"service {self.name!r} was stopped", cluster=self._host.name)
        return made

    # -- the ADR-32 responses ------------------------------------------------------------
    def ping(self) -> dict[str, Any]:
        """The PING response."""
        return {"type": PING_TYPE, **self._identity()}

    def info(self) -> dict[str, Any]:
        """The INFO response: the service and its endpoints."""
        return {
            "type": INFO_TYPE,
            **self._identity(),
            "description": self.description,
            "endpoints": [e.info() for e in self.endpoints],
        }

    def stats(self) -> dict[str, Any]:
        """The STATS response: per endpoint ``num_requests``, ``num_errors``,
        ``last_error``, ``processing_time`` and ``average_processing_time`` (ns)."""
        return {
            "type": STATS_TYPE,
            **self._identity(),
            "started": rfc3339(self._started),
            "endpoints": [e.stats() for e in self.endpoints],
        }

    def _identity(self) -> dict[str, Any]:
        return {"name": self.name, "id": self.id, "version": self.version, "metadata": dict(self.metadata)}

    def reset(self) -> None:
        """Zero the stats of every endpoint (``started`` stays the instance's start)."""
        for endpoint in self.endpoints:
            endpoint.reset()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop: each endpoint stops receiving and answers what it received already, for
        up to *timeout* s in all; then the service stops answering discovery.
        Idempotent; nothing to do once the cluster is closed.

        :raises ClusterTimeoutError: when requests were still being handled after
            *timeout* s (their handlers go on; their replies are still sent).
        :raises ClusterUnavailableError: when the connection was lost and not back
            within *timeout* s (the service is stopped all the same; what the server
            had sent meanwhile is not received).
        :raises WrongThreadError: on the event-loop thread.
        """
        wait = check_timeout(timeout)
        deadline = time.monotonic() + wait
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            endpoints = list(self._endpoints)
        late: NatsClusterError | None = None
        for endpoint in endpoints:
            if endpoint.subscription is None:
                continue
            try:
                endpoint.subscription.drain(max(0.0, deadline - time.monotonic()))
            except NatsClusterError as exc:  # the others are drained all the same
                late = late or exc
        current = threading.current_thread()
        threads = [t for e in endpoints if e.subscription is not None for t in e.subscription.workers]
        busy = [t for t in threads if t.is_alive() and t is not current]
        self._end_discovery(max(0.0, deadline - time.monotonic()))
        if busy and late is None:
            late = ClusterTimeoutError(
                f"service {self.name!r}: {len(busy)} handler(s) still running after {wait:g} s",
                cluster=self._host.name,
            )
        if late is not None:
            raise late

    def _end_discovery(self, timeout: float) -> None:
        for sub in self._discovery:
            try:
                sub.unsubscribe(timeout)
            except NatsClusterError as exc:  # it ends with the cluster anyway
                self.logger.warning("service %s: could not unsubscribe %r: %s", self.name, sub.subject, exc)
        self._dispatcher.close(timeout)


class _Answer:
    """The callback of one discovery subscription: answer with the service's response."""

    __slots__ = ("response", "service", "verb")

    def __init__(self, response: Callable[[], dict[str, Any]], service: Service, verb: str) -> None:
        self.response = response
        self.service = service
        self.verb = verb

    def __call__(self, msg: Msg) -> None:
        if msg.reply is None:
            return
        try:
            msg.respond(json.dumps(self.response()).encode())
        except NatsClusterError as exc:
            self.service.logger.warning("service %s: could not answer %s: %s", self.service.name, self.verb, exc)


def _check_prefix(prefix: str) -> str:
    checked = validate_filter(prefix)
    if checked.endswith(">"):
        raise InvalidMessageError(f"a group's prefix cannot end with '>': {prefix[:80]!r}")
    return checked
