"""The installed nats-py is one that setup.cfg admits, and the batched fast path is on with it.

The fast path reads private attributes of nats-py's client (see ``_natsio/internals.py``). When a
nats-py release moves them, the library falls back to the public API with a warning; it
still works, only slower, so no other test would notice. These tests fail instead, on
every nats-py that CI installs (noxfile.py: the floor and the newest of the range).
"""

from __future__ import annotations

import configparser
import importlib.metadata
import logging
import threading
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client
from packaging.requirements import Requirement
from packaging.version import Version

from openfactory_nats import SyncNatsCluster
from openfactory_nats._natsio import internals
from openfactory_nats._receive.receivers import Receiver

from .servers import NatsServer

ROOT = Path(__file__).resolve().parent.parent


def nats_requirement() -> Requirement:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    lines = [line.split("#", 1)[0].strip() for line in config["options"]["install_requires"].splitlines()]
    (line,) = [line for line in lines if line.startswith("nats-py")]
    return Requirement(line)


def test_the_installed_nats_py_is_admitted_by_setup_cfg() -> None:
    installed = Version(importlib.metadata.version("nats-py"))
    requirement = nats_requirement()
    assert requirement.specifier.contains(installed), f"nats-py {installed} is outside {requirement}"


def test_the_fast_path_is_supported_by_the_installed_nats_py(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENFACTORY_NATS_PUBLIC_API", raising=False)
    assert internals.supports_fast_path(), (
        f"nats-py {importlib.metadata.version('nats-py')} lacks the internals of the batched fast path "
        "(openfactory_nats/_natsio/internals.py): fix it or exclude this version in setup.cfg"
    )


def test_a_cluster_publishes_and_receives_on_the_fast_path(
    server: NatsServer,
    logger: logging.Logger,
    subscriber_factory: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """On a real server: publishing never calls nats-py's per-message ``publish``;
    receiving (replies included) never builds a nats-py message or goes through the
    per-message callback or queue; and nothing warns."""
    monkeypatch.delenv("OPENFACTORY_NATS_PUBLIC_API", raising=False)
    public_calls: list[str] = []
    original_publish = Client.publish
    original_on_msg = Receiver._on_msg
    original_put = Receiver.put_nowait
    original_build = Client._build_message
    clients: list[Client] = []

    def counting_build(self: Client, *args: Any, **kwargs: Any) -> Any:
        if self in clients:
            public_calls.append("Client._build_message")
        return original_build(self, *args, **kwargs)

    def counting_put(self: Receiver, msg: Any) -> None:
        public_calls.append("Receiver.put_nowait")
        original_put(self, msg)

    async def counting_publish(self: Client, *args: Any, **kwargs: Any) -> None:
        public_calls.append("Client.publish")
        await original_publish(self, *args, **kwargs)

    async def counting_on_msg(self: Receiver, msg: Any) -> None:
        public_calls.append("Receiver._on_msg")
        await original_on_msg(self, msg)

    monkeypatch.setattr(Client, "publish", counting_publish)
    monkeypatch.setattr(Receiver, "_on_msg", counting_on_msg)
    monkeypatch.setattr(Receiver, "put_nowait", counting_put)
    monkeypatch.setattr(Client, "_build_message", counting_build)
    outside = subscriber_factory(server.url, "fast.>")
    with caplog.at_level(logging.WARNING), SyncNatsCluster("fast", [server.url], logger) as nats:
        assert nats.cluster._fast is True
        nats.connect()
        assert nats.cluster.nc is not None
        clients.append(nats.cluster.nc)
        nats.serve("fast-service", lambda msg: b"re:" + msg.data)
        assert [nats.request("fast-service", b"%d" % i).data for i in range(10)] == [b"re:%d" % i for i in range(10)]
        with nats.subscribe("fast.>") as sub:

            def publish(thread: int) -> None:
                for i in range(1000):
                    nats.publish(f"fast.{thread}", b"%d" % i)

            threads = [threading.Thread(target=publish, args=(t,)) for t in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            nats.flush()
            received = [sub.next_msg(timeout=10) for _ in range(2000)]
        stats = nats.stats()
    got = outside.wait_for(2000)
    for thread in range(2):
        assert [m.data for m in got if m.subject == f"fast.{thread}"] == [b"%d" % i for i in range(1000)]
        assert [m.data for m in received if m.subject == f"fast.{thread}"] == [b"%d" % i for i in range(1000)]
    # 2000 messages, 10 requests and 10 replies out; 2000 messages and 10 requests in
    # (the replies come through the library's inbox, not a user's subscription).
    assert stats["published"] == 2020 and stats["received"] == 2010
    assert public_calls == []
    assert not [r for r in caplog.records if "public publish API" in r.getMessage()]
