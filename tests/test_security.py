"""Authentication, TLS, and credentials kept out of logs, errors and reprs."""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
from pathlib import Path
from typing import Any

import nkeys
import pytest
import trustme

from openfactory_nats import ConnectError, NatsCluster, SyncNatsCluster

from .servers import NatsServer, free_port

SECRET = "S3cr3t-pa55word"
TOKEN = "t0ken-7f3a9c"


def start(tmp_path: Path, name: str, config: str, **kw: Any) -> NatsServer:
    conf = tmp_path / f"{name}.conf"
    conf.write_text(config)
    return NatsServer(name=name, config=str(conf), **kw).start()


def roundtrip(url: str | list[str], logger: logging.Logger, **options: Any) -> None:
    with SyncNatsCluster("SEC", url, logger, timeout=5.0, connect_timeout=3.0, **options) as client:
        client.publish("secure.ping", b"x")
        client.flush(5)
        assert client.stats()["published"] == 1


def assert_refused_fast(url: str | list[str], logger: logging.Logger, match: str, **options: Any) -> ConnectError:
    started = time.monotonic()
    with SyncNatsCluster("SEC", url, logger, timeout=5.0, connect_timeout=5.0, **options) as client:
        with pytest.raises(ConnectError, match=match) as info:
            client.connect()
    assert time.monotonic() - started < 3.0  # not the whole connect_timeout: refusals are final
    return info.value


def test_user_and_password(tmp_path: Path, logger: logging.Logger) -> None:
    srv = start(tmp_path, "userpass", f'authorization {{ user: alice, password: "{SECRET}" }}\n')
    try:
        roundtrip(f"nats://alice:{SECRET}@127.0.0.1:{srv.port}", logger)
        roundtrip(srv.url, logger, user="alice", password=SECRET)
        err = assert_refused_fast(srv.url, logger, "(?i)authorization", user="alice", password="wrong")
        assert "wrong" not in str(err)
    finally:
        srv.close()


def test_token(tmp_path: Path, logger: logging.Logger) -> None:
    srv = start(tmp_path, "token", f'authorization {{ token: "{TOKEN}" }}\n')
    try:
        roundtrip(srv.url, logger, token=TOKEN)
        roundtrip(f"nats://{TOKEN}@127.0.0.1:{srv.port}", logger)
        assert_refused_fast(srv.url, logger, "(?i)authorization", token="nope")
    finally:
        srv.close()


def test_nkey(tmp_path: Path, logger: logging.Logger) -> None:
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    srv = start(tmp_path, "nkey", f"authorization {{ users: [ {{ nkey: {public} }} ] }}\n")
    try:
        roundtrip(srv.url, logger, nkeys_seed_str=seed.decode())
        other = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER).decode()
        assert_refused_fast(srv.url, logger, "(?i)authorization", nkeys_seed_str=other)
    finally:
        srv.close()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def tls_server(tmp_path: Path, ca: trustme.CA, *hosts: str) -> NatsServer:
    cert = ca.issue_cert(*hosts)
    cert_file, key_file = tmp_path / "server.pem", tmp_path / "server.key"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    return start(tmp_path, "tls", f'tls {{ cert_file: "{cert_file}"\n key_file: "{key_file}" }}\n')


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ca.configure_trust(ctx)
    return ctx


def test_tls_with_hostname_verification(tmp_path: Path, ca: trustme.CA, logger: logging.Logger) -> None:
    srv = tls_server(tmp_path, ca, "localhost", "127.0.0.1")
    try:
        roundtrip(f"tls://localhost:{srv.port}", logger, tls=client_context(ca))
        # A TLS-required server reached with a plain URL: the client upgrades.
        roundtrip(f"nats://127.0.0.1:{srv.port}", logger, tls=client_context(ca))
        # An untrusted certificate is a clear, immediate error.
        err = assert_refused_fast(
            f"tls://localhost:{srv.port}", logger, "(?i)certificate", tls=client_context(trustme.CA())
        )
        assert "certificate verify failed" in str(err)
    finally:
        srv.close()


def test_tls_hostname_mismatch_is_refused(tmp_path: Path, ca: trustme.CA, logger: logging.Logger) -> None:
    srv = tls_server(tmp_path, ca, "other.example")
    try:
        err = assert_refused_fast(f"tls://localhost:{srv.port}", logger, "(?i)certificate", tls=client_context(ca))
        assert "hostname" in str(err).lower() or "match" in str(err).lower()
    finally:
        srv.close()


def test_credentials_never_appear_in_logs_errors_or_reprs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, logger: logging.Logger
) -> None:
    srv = start(tmp_path, "secret", f'authorization {{ user: alice, password: "{SECRET}" }}\n')
    url = f"nats://alice:{SECRET}@127.0.0.1:{srv.port}"
    texts: list[str] = []
    try:
        with caplog.at_level(logging.DEBUG):  # every logger, nats-py's and asyncio's included
            cluster = SyncNatsCluster("SEC", [url], logger, reconnect_time_wait=0.1, timeout=5.0)
            texts += [repr(cluster), str(cluster), repr(cluster.cluster), str(cluster.cluster)]
            cluster.connect()
            cluster.publish("s", b"1")
            srv.kill()  # an outage and a reconnection
            for _ in range(200):
                if not cluster.is_connected:
                    break
                time.sleep(0.01)
            cluster.publish("s", b"2")
            time.sleep(0.3)
            srv.start()
            cluster.flush(10)
            texts += [repr(cluster), str(cluster.stats())]
            cluster.close()
            unreachable = f"nats://alice:{SECRET}@127.0.0.1:{free_port()}"
            with SyncNatsCluster("U", [unreachable], logger, connect_timeout=0.3) as blocking:
                with pytest.raises(ConnectError) as info:
                    blocking.connect()
                texts += [str(info.value), repr(info.value)]
            with pytest.raises(ConnectError) as info:
                asyncio.run(NatsCluster("U", unreachable, logger, connect_timeout=0.3).connect())
            texts += [str(info.value), repr(info.value)]
        for record in caplog.records:
            texts.append(record.getMessage())
            if record.exc_info:
                texts.append(logging.Formatter().formatException(record.exc_info))
        assert any("reconnected to" in t for t in texts)
        assert any("alice:***@" in t for t in texts)
        leaks = [t for t in texts if SECRET in t]
        assert leaks == []
    finally:
        srv.close()
