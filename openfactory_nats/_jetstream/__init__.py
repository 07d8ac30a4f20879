"""JetStream: streams and consumers, pull subscriptions, acknowledgements and worker pools.

``api`` speaks the JetStream JSON API (pure: no I/O); ``msg`` is the received message and
its acknowledgements; ``pull`` the pull subscription and its fetch; ``consume`` the worker
pool; ``handle`` the blocking handle users get from ``SyncNatsCluster.jetstream()``, and
``aio`` the asyncio one from ``NatsCluster.jetstream()``.
"""
