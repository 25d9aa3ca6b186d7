"""The composition root: the one place that builds the program's parts from the settings.

settings → engine → HTTP client → API client → poller → daemon (and, for ``run``, its
metrics, health and HTTP server). Each part is built the first time something asks for
it, so a verb pays only for what it uses: ``tags`` opens the database and never imports
httpx, ``poll`` never imports APScheduler or prometheus-client. The CLI verbs, the demo
and the test fixtures all build through :class:`App`; nothing else hands settings
values to a constructor.

The stop of a run is one :class:`~daemon.shutdown.Shutdown`, made here before any part
and handed to each one that must stop: the scheduler begins it (SIGTERM), the API
client's waits and deadlines watch it, the retention job checks it between batches.

Only the standard library and :mod:`daemon.shutdown` are imported at module level; the
heavy modules are imported by the property that needs them.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from daemon.errors import ConfigError, StoreError
from daemon.shutdown import Shutdown

if TYPE_CHECKING:
    import ssl

    import httpx
    from sqlalchemy.engine import Engine

    from daemon.answers import Answers
    from daemon.health import Health
    from daemon.http import HttpServer
    from daemon.metrics import Metrics
    from daemon.poller import Poller
    from daemon.scheduler import Daemon
    from daemon.settings import Settings
    from daemon.smspartner import SmsPartnerClient
    from daemon.stoplist_sync import StopListSync


def utcnow() -> datetime:
    """The one real clock; everything else receives ``now`` or a clock."""
    return datetime.now(UTC)


class App:
    """Builds each part on first use, and closes what it built.

    Args:
        settings: the settings; None reads them from the environment on first use.
        clock: the clock every part reads (tests and the demo inject theirs).
        shutdown: the stop shared by the daemon, the API client and the retention job.
        service: build the long-running service of ``run``: the daemon writes the
            heartbeat file and tells systemd how it is, and the API requests, polls and
            mismatched totals are counted in :attr:`metrics`.
        transport: an httpx transport for the API client (tests inject faults with
            ``httpx.MockTransport``); None is a real network connection.
        answers: the poller's memory of large tags' answers (tests choose its size).
        health: what the daemon reports (tests read one they made); None makes one.
        dispatch_interval: seconds between two dispatches of the daemon.
        lease: how long the daemon's claims last unrenewed (None: the scheduler's).
        stop_list_tick: seconds between two looks of the daemon at whether the account's
            STOP list is due a sync (the demo's time runs faster).
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        clock: Callable[[], datetime] = utcnow,
        shutdown: Shutdown | None = None,
        service: bool = False,
        transport: httpx.BaseTransport | None = None,
        answers: Answers | None = None,
        health: Health | None = None,
        dispatch_interval: float = 2.0,
        lease: timedelta | None = None,
        stop_list_tick: float = 60.0,
    ) -> None:
        self._settings = settings
        self.clock = clock
        self.shutdown = shutdown or Shutdown()
        self.service = service
        self._transport = transport
        self._answers = answers
        self._dispatch_interval = dispatch_interval
        self._lease = lease
        self._engine: Engine | None = None
        self._migrated = False
        self._http: httpx.Client | None = None
        self._client: SmsPartnerClient | None = None
        self._poller: Poller | None = None
        self._daemon: Daemon | None = None
        self._health = health
        self._metrics: Metrics | None = None
        self._server: HttpServer | None = None
        self._server_built = False
        self._stop_list: StopListSync | None = None
        self._stop_list_tick = stop_list_tick

    # --- settings and database -----------------------------------------------------------

    @property
    def settings(self) -> Settings:
        """The settings (read from the environment on first use when none were given)."""
        if self._settings is None:
            from daemon.settings import load_settings

            self._settings = load_settings()
        return self._settings

    @property
    def raw_engine(self) -> Engine:
        """The database as it is, not migrated (``db upgrade`` reports what it changes)."""
        if self._engine is None:
            from daemon.db import create_engine

            self._engine = create_engine(self.settings.database_url.get_secret_value())
        return self._engine

    @property
    def engine(self) -> Engine:
        """The database, migrated to head on first use (unless auto-migrate is off).

        Raises:
            StoreError: the database cannot be reached or migrated.
            SchemaOutOfDateError: auto-migration is off and the schema is not at head.
        """
        engine = self.raw_engine
        if not self._migrated:
            import sqlalchemy as sa

            from daemon import migrate

            try:
                migrate.ensure_schema(engine, auto_migrate=self.settings.auto_migrate)
            except sa.exc.SQLAlchemyError as exc:
                raise StoreError(
                    f"cannot open database {self.settings.safe_database_url}: "
                    f"{getattr(exc, 'orig', None) or exc}"
                ) from exc
            self._migrated = True
        return engine

    # --- the provider ----------------------------------------------------------------------

    @property
    def http(self) -> httpx.Client:
        """The HTTP client of the API client (timed by :attr:`metrics` in the service)."""
        if self._http is None:
            import httpx

            self._http = httpx.Client(
                timeout=self.settings.http_timeout_seconds,
                transport=self._transport,
                event_hooks=self.metrics.httpx_event_hooks() if self.service else None,
                verify=_tls_for(self.settings.base_url),
            )
        return self._http

    @property
    def client(self) -> SmsPartnerClient:
        """The SMS Partner client: settings' key, URL, retries, rate limit and page cap;
        its waits and deadlines follow :attr:`shutdown`.

        Raises:
            ConfigError: no API key is configured.
        """
        if self._client is None:
            settings = self.settings
            if settings.api_key is None:
                raise ConfigError(
                    "SMSPARTNER_API_KEY: not set (also read from SMSPARTNER_API_KEY_FILE "
                    "or $CREDENTIALS_DIRECTORY/api_key)"
                )
            from daemon.smspartner import SmsPartnerClient

            self._client = SmsPartnerClient(
                self.http,
                api_key=settings.api_key.get_secret_value(),
                base_url=settings.base_url,
                max_retries=settings.max_retries,
                retry_backoff=settings.retry_backoff_seconds,
                rate_limit_per_second=settings.rate_limit_per_second,
                max_pages=settings.max_pages,
                sleep=self.shutdown.sleep,
                deadline=self.shutdown.deadline,
                on_total_mismatch=self.metrics.observe_total_mismatch if self.service else None,
            )
        return self._client

    @property
    def poller(self) -> Poller:
        """One poll of one tag: the client, the database and the clock.

        The client first: without an API key nothing is opened (or tracked).
        """
        if self._poller is None:
            client = self.client
            from daemon.poller import Poller, tune_gc

            tune_gc()  # a poll keeps many objects alive until it commits
            self._poller = Poller(
                engine=self.engine,
                client=client,
                settings=self.settings,
                clock=self.clock,
                answers=self.answers,
            )
        return self._poller

    @property
    def answers(self) -> Answers:
        """The poller's memory of large tags' answers (shared by every poll)."""
        if self._answers is None:
            from daemon.answers import Answers

            self._answers = Answers()
        return self._answers

    @property
    def stop_list(self) -> StopListSync:
        """The sync of the account's STOP list (``optouts --sync`` and the daemon's job).

        Raises:
            ConfigError: no API key is configured.
        """
        if self._stop_list is None:
            client = self.client
            from daemon.stoplist_sync import StopListSync

            settings = self.settings
            self._stop_list = StopListSync(
                engine=self.engine,
                client=client,
                clock=self.clock,
                zone=settings.provider_zone,
                interval=settings.stop_list_interval,
                on_result=self.metrics.observe_stop_list_sync if self.service else None,
            )
        return self._stop_list

    # --- the daemon ------------------------------------------------------------------------

    @property
    def health(self) -> Health:
        """What the daemon reports to ``/healthz`` and ``/readyz``."""
        if self._health is None:
            from daemon.health import Health

            self._health = Health(self.clock)
        return self._health

    @property
    def metrics(self) -> Metrics:
        """The Prometheus metrics of ``/metrics``."""
        if self._metrics is None:
            from daemon.metrics import Metrics

            self._metrics = Metrics()
        return self._metrics

    @property
    def heartbeat(self) -> Path:
        """Where the service writes its heartbeat for ``check`` (see daemon/health.py)."""
        from daemon.health import heartbeat_path

        return heartbeat_path(self.settings.database_url.get_secret_value())

    @property
    def daemon(self) -> Daemon:
        """The scheduler polling every tracked tag, stopped through :attr:`shutdown`."""
        if self._daemon is None:
            from daemon import retention
            from daemon.health import Notifier
            from daemon.scheduler import LEASE, Daemon

            settings, poller = self.settings, self.poller
            self._daemon = Daemon(
                engine=self.engine,
                poll=poller.poll,
                clock=self.clock,
                health=self.health,
                concurrency=settings.concurrency,
                report_window=settings.report_window,
                on_result=self.metrics.observe_poll if self.service else None,
                notifier=Notifier() if self.service else None,
                heartbeat=self.heartbeat if self.service else None,
                dispatch_interval=self._dispatch_interval,
                maintenance=retention.scheduled_prune(
                    self.engine,
                    settings,
                    self.clock,
                    should_stop=lambda: self.shutdown.stopping,
                ),
                lease=self._lease or LEASE,
                shutdown=self.shutdown,
                stop_list=self.stop_list if settings.stop_list_interval_minutes > 0 else None,
                stop_list_tick=min(self._stop_list_tick, settings.stop_list_interval_minutes * 60),
            )
        return self._daemon

    @property
    def http_server(self) -> HttpServer | None:
        """The health, metrics and ``/tags`` server of the daemon; None when
        ``SMSPARTNER_HTTP_PORT`` is 0. Built, not started."""
        if not self._server_built:
            self._server_built = True
            settings = self.settings
            if settings.http_port:
                from daemon.http import HttpServer

                self._server = HttpServer(
                    host=settings.http_host,
                    port=settings.http_port,
                    engine=self.engine,
                    health=self.health,
                    metrics=self.metrics,
                    settings=settings,
                    clock=self.clock,
                    wake=self.daemon.wake,
                    owner=self.daemon.owner,
                )
        return self._server

    # --- the end ---------------------------------------------------------------------------

    def close(self) -> None:
        """Close what was built: the HTTP client, then every pooled database connection.

        Safe to call twice. The daemon and the HTTP server are stopped by whoever
        started them.
        """
        if self._http is not None:
            self._http.close()
            self._http = None
            self._client = None
            self._poller = None
            self._stop_list = None
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
            self._migrated = False

    def __enter__(self) -> App:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _tls_for(base_url: str) -> ssl.SSLContext | bool:
    """What the HTTP client verifies TLS with: the default (system CAs) for https://.

    httpx loads the CA bundle when the client is built, whatever the URL (30-50 ms, a
    sizeable part of a short command). The client only ever requests the base URL, so
    for an http:// one (the simulator, a local test server) it gets a context that
    trusts no certificate: nothing to load, and a request that did go to https:// would
    fail verification rather than go unverified.
    """
    if base_url.lower().startswith("https://"):
        return True
    import ssl

    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies, against no CA at all
