"""The composition root, daemon/app.py: what is built when, and who shares the stop."""

from __future__ import annotations

import ssl
import threading
import time
from pathlib import Path

import httpx
import pytest

from daemon.app import App
from daemon.errors import ConfigError, PollAbandoned
from daemon.settings import load_settings

KEY = "unit-test-key-0001"


def test_an_app_builds_nothing_until_asked(tmp_path: Path) -> None:
    settings = load_settings({}, database_url=f"sqlite:///{tmp_path / 'x.db'}")
    with App(settings):
        pass
    assert not (tmp_path / "x.db").exists()  # no engine, no file


def test_without_an_api_key_no_client_and_no_database(tmp_path: Path) -> None:
    """``poll`` without a key must not create (or track into) a database."""
    app = App(load_settings({}, database_url=f"sqlite:///{tmp_path / 'x.db'}"))
    with pytest.raises(ConfigError, match="SMSPARTNER_API_KEY: not set"):
        app.poller  # noqa: B018 (a property that builds)
    app.close()
    assert not (tmp_path / "x.db").exists()


def test_the_client_and_the_daemon_share_one_stop(tmp_path: Path) -> None:
    """A stop begun by the daemon (SIGTERM) cuts the client's wait short: the provider
    asked for 60 s before a retry, and the poll is abandoned at once instead."""
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(429, headers={"Retry-After": "60"})

    settings = load_settings(
        {},
        api_key=KEY,
        base_url="http://provider.test/v1",
        database_url=f"sqlite:///{tmp_path / 'x.db'}",
        rate_limit_per_second=0,
        max_retries=1,
    )
    with App(settings, transport=httpx.MockTransport(handler)) as app:
        daemon = app.daemon
        assert daemon.shutdown is app.shutdown
        timer = threading.Timer(0.2, daemon.stop)
        timer.start()
        started = time.monotonic()
        with pytest.raises(PollAbandoned, match="stopping"):
            app.poller.poll("nothing-tracked")
        timer.join()
    assert time.monotonic() - started < 5
    assert len(requests) == 1  # the retry never came: the stop came first


def test_only_the_service_counts_requests_in_its_metrics(tmp_path: Path) -> None:
    settings = load_settings(
        {}, api_key=KEY, base_url="http://x.test/v1", database_url=f"sqlite:///{tmp_path}/x.db"
    )
    with App(settings) as plain, App(settings, service=True) as service:
        assert not plain.http.event_hooks["request"]
        assert service.http.event_hooks["request"]


def _tls_context(client: httpx.Client) -> ssl.SSLContext:
    """The TLS context the client's connections would use (httpx keeps it in its pool)."""
    context = client._transport._pool._ssl_context  # type: ignore[attr-defined]
    assert isinstance(context, ssl.SSLContext)
    return context


def test_an_http_base_url_loads_no_ca_bundle_and_https_keeps_verifying(tmp_path: Path) -> None:
    """Loading the CA bundle cost every ``poll`` 30-50 ms, even against http:// where no
    TLS happens. An http:// client now gets a context that trusts nothing (a stray
    https:// request would fail, never go unverified); https:// keeps the system CAs."""
    db = f"sqlite:///{tmp_path}/x.db"
    plain = load_settings({}, api_key=KEY, base_url="http://x.test/v1", database_url=db)
    secure = load_settings({}, api_key=KEY, base_url="https://x.test/v1", database_url=db)
    with App(plain) as http_app, App(secure) as https_app:
        bare = _tls_context(http_app.http)
        assert bare.cert_store_stats()["x509_ca"] == 0
        assert bare.verify_mode == ssl.CERT_REQUIRED and bare.check_hostname
        verified = _tls_context(https_app.http)
        assert verified.cert_store_stats()["x509_ca"] > 0
        assert verified.verify_mode == ssl.CERT_REQUIRED and verified.check_hostname
