"""The one door into nats-py: making a client and turning its callbacks into events
(:mod:`.client`), PING/PONG round trips (:mod:`.pings`), and every place that reads or
wraps a private attribute of nats-py's client (:mod:`.internals`). Nothing else in the
library touches nats-py's private state."""
