"""The blocking facade: :class:`~openfactory_nats.SyncNatsCluster` (:mod:`.facade`) runs
the asyncio core on a daemon thread's event loop (:mod:`.loop`) and gives threads
thread-safe calls, each with a timeout (:mod:`.portal`); it also renews itself in a
forked child (:mod:`.forking`). Facades and routers close through one path
(:mod:`.closing`)."""
