"""Loss and duplicates when the client's node of a 3-node cluster fails.

Threads publish 1,000 msgs/s through one node; the node is killed (SIGKILL), shut down
(SIGTERM) or put in lame-duck mode (SIGUSR2) mid-way; an independent subscriber on another
node counts. Run from the repository root: ``python benchmarks/faults.py [rounds]
[--no-replay]`` (``--no-replay``: at-most-once, ``replay_unconfirmed=False``).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.servers import NatsServer, wait_for_mesh  # noqa: E402
from tests.test_faults import run_node_failure  # noqa: E402


def cluster3() -> list[NatsServer]:
    """Three nodes on ports nats-server picks, each routed to those started before it."""
    nodes: list[NatsServer] = []
    for i in range(3):
        routes = [n.cluster_port for n in nodes if n.cluster_port]
        nodes.append(NatsServer(name=f"node{i}", cluster_port=0, routes=routes).start())
    wait_for_mesh(nodes)
    return nodes


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    rounds = int(args[0]) if args else 3
    replay = "--no-replay" not in sys.argv
    logger = logging.getLogger("faults")
    print(f"{'fault':<8} {'sent':>6} {'lost':>5} {'dup':>5} {'replayed':>8} {'errors':>6} {'slowest ms':>10}")
    for fault in ("kill", "term", "ldm"):
        for _ in range(rounds):
            nodes = cluster3()
            try:
                r = run_node_failure(nodes, logger, fault, replay_unconfirmed=replay)
            finally:
                for node in nodes:
                    node.close()
            print(
                f"{fault:<8} {r['sent']:>6} {r['lost']:>5} {r['duplicates']:>5} {r['replayed']:>8} "
                f"{r['errors']:>6} {r['slowest_ms']:>10}"
            )


if __name__ == "__main__":
    main()
