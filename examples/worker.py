"""A worker that follows assets: one subscription per asset, callbacks on a few shared
threads, and a blocking loop over a work queue.

    NATS_URL=nats://127.0.0.1:4222 python examples/worker.py 4a9f0c2e-asset 7b1d4c3e-asset
"""

from __future__ import annotations

import logging
import os
import sys

from openfactory_nats import ClusterTimeoutError, Msg, SyncNatsCluster

logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO"))
log = logging.getLogger("worker")


def on_asset_message(msg: Msg) -> None:
    # Runs on a dispatcher thread, never on the event loop: it may block, publish,
    # subscribe or unsubscribe. Messages of one asset arrive in order, one at a time.
    log.info("%s: %s", msg.subject, msg.data[:80])


def main(assets: list[str]) -> None:
    with SyncNatsCluster("C1", os.environ.get("NATS_URL", "nats://127.0.0.1:4222").split(","), log) as nats:
        shared = nats.dispatcher(threads=4)  # 4 threads, however many assets
        for asset in assets:
            nats.subscribe(f"{asset}.*", on_asset_message, dispatcher=shared)
        with nats.subscribe("jobs.>", queue="workers") as jobs:  # pull: spread over the workers
            while True:
                try:
                    job = jobs.next_msg(timeout=5.0)
                except ClusterTimeoutError:
                    log.info("idle; %s", nats.stats())
                    continue
                log.info("job %s", job.subject)
                if job.reply:
                    job.respond(b"done")


if __name__ == "__main__":
    main(sys.argv[1:] or ["4a9f0c2e-asset"])
