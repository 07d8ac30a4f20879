"""A Flask app that publishes to NATS from its request handlers, and asks a NATS service.

Run it under gunicorn with several workers and threads; ``--preload`` imports this module
(and connects) in the master process before the workers are forked, which the library
handles: each worker gets its own connection on first use.

    NATS_URL=nats://127.0.0.1:4222 gunicorn --preload -w 2 --threads 4 examples.flask_app:app

``GET /assets/<id>/state`` asks the service answering ``assets.<id>.state`` (try
``openfactory-nats reply --servers $NATS_URL --text '{"state": "ok"}' 'assets.*.state'``):
503 when nobody serves it, 504 when it does not answer within 2 s.

``GET /metrics`` exports the library's counters for Prometheus (``pip install
'openfactory-nats[prometheus]'``). Each gunicorn worker is a process of its own with its
own connection and counters, and a scrape reaches whichever worker accepts it: give each
worker a port of its own to scrape (``prometheus_client.start_http_server`` in a
``post_fork`` hook), or run one worker per container.
"""

from __future__ import annotations

import logging
import os

from flask import Flask, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from openfactory_nats import ClusterTimeoutError, NoRespondersError, ServiceError, SyncNatsCluster, prometheus

logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO"))
log = logging.getLogger("flask_app")

nats = SyncNatsCluster("web", os.environ.get("NATS_URL", "nats://127.0.0.1:4222").split(","), log, timeout=5.0)
nats.connect()  # connect at import time: under --preload this happens before the fork

prometheus.register()  # every cluster of the process, in prometheus_client's default registry

app = Flask(__name__)


@app.get("/metrics")
def metrics() -> tuple[bytes, int, dict[str, str]]:
    return generate_latest(), 200, {"Content-Type": CONTENT_TYPE_LATEST}


@app.post("/assets/<asset_id>")
def publish_asset(asset_id: str) -> tuple[dict[str, object], int]:
    try:
        nats.publish(f"assets.{asset_id}", request.get_data())
    except (ValueError, TypeError) as exc:
        return {"error": str(exc)}, 400
    except (RuntimeError, TimeoutError) as exc:
        return {"error": str(exc)}, 503
    return {"published": asset_id, "pid": os.getpid()}, 202


@app.get("/assets/<asset_id>/state")
def asset_state(asset_id: str) -> tuple[bytes | dict[str, object], int]:
    """The asset's state, as the service answering ``assets.<id>.state`` replies."""
    try:
        reply = nats.request(f"assets.{asset_id}.state", b"", timeout=2)
    except (ValueError, TypeError) as exc:
        return {"error": str(exc)}, 400
    except NoRespondersError:
        return {"error": "no service answers for this asset"}, 503
    except ClusterTimeoutError:
        return {"error": "the service did not answer in time"}, 504
    except ServiceError as exc:
        return {"error": exc.description, "code": exc.code}, 502
    except RuntimeError as exc:
        return {"error": str(exc)}, 503
    return reply.data, 200
