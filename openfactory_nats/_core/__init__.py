"""The asyncio core: :class:`~openfactory_nats.NatsCluster` (:mod:`.cluster`), its life
cycle (:mod:`.lifecycle`), its nats-py client from connecting to closing
(:mod:`.connection`), its send side (:mod:`.outgoing`), its receive side
(:mod:`.incoming`), and the registry of live cores that exporters read
(:mod:`.registry`). It runs on an event loop and never blocks."""
