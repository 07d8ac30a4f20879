"""Pull subscriptions: fetching a batch of messages from a JetStream consumer.

A pull subscription is a subscription of the cluster's receive path to an inbox of its
own, ``_INBOX.<random>.*``; each pull request (``$JS.API.CONSUMER.MSG.NEXT.<stream>.
<consumer>``) gets a reply subject ``<inbox>.<n>`` of that inbox. The server sends the
messages to that subject (they arrive with their own subject and an ack subject) and ends
a request with a status message on it: 404 (nothing there), 408 (it expired), 409 (the
consumer is gone, or a limit was reached), 100 (a heartbeat).

A fetch, as nats-py's: first a ``no_wait`` request for the whole batch (what is stored
comes at once, then a 404 or 408); if that gave nothing, a request for one message that
lingers on the server until the fetch's timeout is nearly over; once that one came, a
``no_wait`` request for the rest. Every request carries an expiry within the fetch's
timeout (a ``no_wait`` request at most :data:`NO_WAIT_EXPIRES`: the server holds even
those while the consumer's ``max_ack_pending`` is reached, and would otherwise send their
messages later, to nobody), so nothing lingers on the server after a fetch returns;
what an interrupted request still sends (a reconnection, a stopped server) waits in the
inbox and is the next fetch's first. A fetch without time for a request returns only
what is in the inbox. :func:`fetch_life` is that logic, once, for the blocking and the
asyncio driver.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Generator

from .._errors import ConsumerNotFoundError, JetStreamError
from .._message import Msg

__all__ = ("CHECK", "WAIT", "PullState", "fetch_life")

#: What the driver is asked for: the next message within a time (it sends back the
#: message, or None when none came), or a check that the consumer exists (it raises).
WAIT, CHECK = 0, 1
FetchStep = tuple[int, float]
FetchLife = Generator[FetchStep, "Msg | None", list[Msg]]

_MESSAGE, _END, _OTHER, _NO_RESPONDERS = 0, 1, 2, 3
_FULL, _TIMEOUT = 4, 5
#: A wait is cut into slices this long, to see a reconnection (the server may have lost
#: the request) and ask again.
SLICE = 0.5
_MIN_LINGER = 0.005
#: The expiry of a ``no_wait`` request (s): with nothing stored the server waits that long;
#: with messages it cannot deliver yet (``max_ack_pending``), it gives up then too.
NO_WAIT_EXPIRES = 0.01
_RETRY_PAUSE = 0.05


class PullState:
    """A pull subscription's inbox and its requests (one fetch at a time)."""

    def __init__(self, next_subject: str) -> None:
        #: ``$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>``
        self.next_subject = next_subject
        self.prefix = f"_INBOX.{secrets.token_hex(11)}"
        self._n = 0
        #: The reply subject of the request in force.
        self.current = ""

    @property
    def subject(self) -> str:
        """The inbox subscription's filter."""
        return f"{self.prefix}.*"

    def request(self, batch: int, expires: float | None, no_wait: bool) -> tuple[str, bytes]:
        """A new request: its reply subject and payload (it is now the one in force)."""
        self._n += 1
        self.current = f"{self.prefix}.{self._n}"
        body: dict[str, object] = {"batch": batch}
        if expires is not None:
            body["expires"] = int(expires * 1e9)
        if no_wait:
            body["no_wait"] = True
        return self.current, json.dumps(body, separators=(",", ":")).encode()

    def classify(self, msg: Msg, cluster: str) -> int:
        """What *msg* is to the fetch in progress.

        :raises ConsumerNotFoundError: the server says the consumer was deleted.
        :raises JetStreamError: the server refused the request (a push consumer, a bad request).
        """
        reply = msg.reply
        if reply is not None and reply.startswith("$JS.ACK."):
            return _MESSAGE
        headers = msg.headers
        status = headers.get("Status") if headers is not None else None
        if status is None or status == "100" or msg.subject != self.current:
            return _OTHER  # a heartbeat, or the end of a request no longer in force
        if status in ("404", "408"):
            return _END
        if status == "503":
            return _NO_RESPONDERS
        description = headers.get("Description", "") if headers is not None else ""
        if status == "409" and "deleted" in description.lower():
            raise ConsumerNotFoundError(
                f"cluster {cluster!r}: the consumer was deleted ({description})",
                cluster=cluster,
                code=409,
                description=description,
            )
        if status == "409" and not any(w in description.lower() for w in ("push", "not a pull")):
            return _END  # a limit (max waiting, max batch), a leader change: ask again
        raise JetStreamError(
            f"cluster {cluster!r}: pull request refused: {status} {description}",
            cluster=cluster,
            code=int(status) if status.isdigit() else 0,
            description=description,
        )


def fetch_life(
    state: PullState,
    batch: int,
    wait: float,
    clock: Callable[[], float],
    send: Callable[[str, bytes], None],
    epoch: Callable[[], int],
    cluster: str,
) -> FetchLife:
    """One fetch (see the module docstring): yields what it waits for and returns the
    messages. *send(reply, payload)* queues a pull request; *epoch()* counts the
    reconnections."""
    deadline = clock() + wait
    got: list[Msg] = []
    while len(got) < batch:  # what interrupted requests left in the inbox
        msg = yield WAIT, 0.0
        if msg is None:
            break
        if state.classify(msg, cluster) == _MESSAGE:
            got.append(msg)
    if len(got) >= batch or wait <= _MIN_LINGER:
        return got
    ask = _Round(state, got, deadline, clock, send, epoch, cluster)
    outcome = yield from ask.run(batch, None, no_wait=True)
    while not got:
        if outcome == _NO_RESPONDERS:  # no consumer, or JetStream not back yet after a restart
            yield CHECK, 0.0
            outcome = yield from ask.pause(_RETRY_PAUSE)
            if got:
                break
        linger = deadline - clock()
        linger -= min(0.05, linger / 10)
        if linger < _MIN_LINGER or outcome == _TIMEOUT:
            return got
        outcome = yield from ask.run(1, linger, no_wait=False)
    if len(got) < batch and outcome != _TIMEOUT:
        yield from ask.run(batch, None, no_wait=True)
    return got


class _Round:
    """Requests of one fetch and the waits for their messages."""

    def __init__(
        self,
        state: PullState,
        got: list[Msg],
        deadline: float,
        clock: Callable[[], float],
        send: Callable[[str, bytes], None],
        epoch: Callable[[], int],
        cluster: str,
    ) -> None:
        self.state = state
        self.got = got
        self.deadline = deadline
        self.clock = clock
        self.send = send
        self.epoch = epoch
        self.cluster = cluster

    def _ask(self, target: int, expires: float | None, no_wait: bool) -> int:
        if expires is None:
            expires = NO_WAIT_EXPIRES
        expires = max(_MIN_LINGER, min(expires, self.deadline - self.clock()))
        self.send(*self.state.request(target - len(self.got), expires, no_wait))
        return self.epoch()

    def run(self, target: int, expires: float | None, *, no_wait: bool) -> Generator[FetchStep, Msg | None, int]:
        """Ask for ``target - len(got)`` messages; wait until *target*, the request's end,
        or the deadline."""
        started = self.clock()
        mark = self._ask(target, expires, no_wait)
        got = self.got
        while len(got) < target:
            left = self.deadline - self.clock()
            if left <= 0:
                return _TIMEOUT
            msg = yield WAIT, min(left, SLICE)
            if msg is None:
                if self.epoch() != mark:  # reconnected: the server may have lost the request
                    spent = self.clock() - started
                    mark = self._ask(target, None if expires is None else expires - spent, no_wait)
                continue
            kind = self.state.classify(msg, self.cluster)
            if kind == _MESSAGE:
                got.append(msg)
            elif kind in (_END, _NO_RESPONDERS):
                return kind
        return _FULL

    def pause(self, seconds: float) -> Generator[FetchStep, Msg | None, int]:
        """Wait a moment (keeping what comes meanwhile)."""
        until = min(self.deadline, self.clock() + seconds)
        while (left := until - self.clock()) > 0:
            msg = yield WAIT, left
            if msg is not None and self.state.classify(msg, self.cluster) == _MESSAGE:
                self.got.append(msg)
        return _TIMEOUT if self.clock() >= self.deadline else _END
