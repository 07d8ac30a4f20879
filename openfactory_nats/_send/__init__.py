"""The send path: publishing threads hand frames to the bounded :mod:`.outbox`; the
:mod:`.pump` moves them into the nats-py client on the event loop, with flow control,
confirmation and replay (:mod:`.transport`: waiting on the socket; :mod:`.public`: the
path through nats-py's public API); :mod:`.acked` publishes into JetStream with an
acknowledgement."""
