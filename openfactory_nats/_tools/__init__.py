"""The tools built on the library: the command line (:mod:`.cli`), the demo, the
benchmarks, and an embedded nats-server on loopback. The library never imports them."""
