"""Prometheus metrics, on a private registry.

Counters and histograms are fed as things happen (polls, API requests, numbers reaching
a final status); gauges are read from the database when ``/metrics`` is scraped, so
they are true across replicas sharing one database and across restarts. Every metric
lives in this object's own :class:`CollectorRegistry`, never the process-global one, so
several daemons (or tests) in one process do not collide.

No label ever holds a URL, a tag or anything from a request: the API key travels in the
query string, and tags are unbounded (a label per tag would grow the series forever).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import TYPE_CHECKING

import httpx
import sqlalchemy as sa
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from sqlalchemy.engine import Connection

from daemon.db import (
    POLL_OUTCOMES,
    SYNC_OUTCOMES,
    TAG_STATES,
    account_optouts,
    delivery_statuses,
    stop_list_syncs,
    tracked_tags,
)
from daemon.status import PENDING, TagState

if TYPE_CHECKING:
    from daemon.poller import PollResult
    from daemon.stoplist_sync import SyncResult

PREFIX = "smspartner_status_"
#: Where the request hook leaves its start time; read back by the response hook.
_STARTED = "smspartner_status.started"
#: API latency: the client's timeout defaults to 10 s, retries may go beyond.
_API_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: Send → final report: seconds for most, up to the 48-hour window for a few.
_FINAL_BUCKETS = tuple(
    float(s) for s in (10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 43200, 86400, 172800)
)


class Metrics:
    """The daemon's Prometheus metrics (names are public API, see README).

    Thread-safe: prometheus-client's metrics lock internally, and the poll workers, the
    HTTP client hooks and the HTTP server's threads all write here.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        reg = self.registry
        self._polls = Counter(
            PREFIX + "polls", "Polls of one tag, by outcome.", ["outcome"], registry=reg
        )
        for outcome in POLL_OUTCOMES:  # every series exists from the start, at 0
            self._polls.labels(outcome=outcome)
        self._rows_changed = Counter(
            PREFIX + "rows_changed", "Numbers whose stored status changed.", registry=reg
        )
        self._optouts = Counter(PREFIX + "optouts", "New STOP opt-outs recorded.", registry=reg)
        self._total_mismatches = Counter(
            PREFIX + "api_total_mismatches",
            "Fetches whose items disagreed with the provider's total (a hint only: the "
            "pages decide when a fetch ends).",
            registry=reg,
        )
        self._api = Histogram(
            PREFIX + "api_request_seconds",
            "SMS Partner API request latency (to the response headers), by HTTP status "
            '("error" when no response arrived).',
            ["status"],
            buckets=_API_BUCKETS,
            registry=reg,
        )
        self._final = Histogram(
            PREFIX + "time_to_final_seconds",
            "Time from a tag's send to a number's final delivery report.",
            buckets=_FINAL_BUCKETS,
            registry=reg,
        )
        self._waiting = Gauge(
            PREFIX + "numbers_waiting",
            "Numbers still pending (waiting or unknown) in active tags.",
            registry=reg,
        )
        self._oldest = Gauge(
            PREFIX + "oldest_waiting_seconds",
            "Age of the oldest pending number in an active tag (0 when none).",
            registry=reg,
        )
        self._tags = Gauge(PREFIX + "tags", "Tracked tags, by state.", ["state"], registry=reg)
        for state in TAG_STATES:
            self._tags.labels(state=state)
        self._add_stop_list_metrics(reg)

    # --- fed as things happen ---------------------------------------------------------

    def observe_poll(self, result: PollResult) -> None:
        """Count one finished poll, what it changed and the opt-outs it found."""
        self._polls.labels(outcome=result.outcome).inc()
        if result.changed > 0:
            self._rows_changed.inc(result.changed)
        if result.optouts > 0:
            self._optouts.inc(result.optouts)
        self.observe_final_delays(result.final_delays)

    def observe_api_request(self, seconds: float, status: int | None) -> None:
        """Record one API request's latency; ``status`` None means no response came."""
        label = str(status) if status is not None else "error"
        self._api.labels(status=label).observe(max(seconds, 0.0))

    def observe_total_mismatch(self) -> None:
        """Count one fetch whose items disagreed with ``total`` (the API client's
        ``on_total_mismatch``)."""
        self._total_mismatches.inc()

    def httpx_event_hooks(self) -> dict[str, list[Callable[..., None]]]:
        """Hooks for ``httpx.Client(event_hooks=...)`` that time every request.

        The request hook stores a monotonic start time in ``request.extensions``; the
        response hook observes the time to the response headers. A request that never
        gets a response fires no response hook: the caller may report it with
        :meth:`observe_api_request` and ``status=None``.
        """

        def on_request(request: httpx.Request) -> None:
            request.extensions[_STARTED] = time.perf_counter()

        def on_response(response: httpx.Response) -> None:
            started = response.request.extensions.get(_STARTED)
            if isinstance(started, float):
                self.observe_api_request(time.perf_counter() - started, response.status_code)

        return {"request": [on_request], "response": [on_response]}

    def observe_final_delays(self, seconds: Iterable[float]) -> None:
        """Record how long numbers took from send to their final report.

        Negative delays (a provider clock ahead of ``sent_at``) count as 0.
        """
        for value in seconds:
            self._final.observe(max(value, 0.0))

    # --- read from the database at scrape time ----------------------------------------

    def refresh(self, conn: Connection, now: datetime) -> None:
        """Set the gauges from the database: two aggregate queries, no row scans in Python.

        Raises:
            sqlalchemy.exc.DBAPIError: the database failed (the gauges keep their values).
        """
        ds, tt = delivery_statuses.c, tracked_tags.c
        pending = sorted(s.value for s in PENDING)
        waiting_query = (
            sa.select(sa.func.count(), sa.func.min(ds.first_seen_at))
            .select_from(delivery_statuses.join(tracked_tags, tt.tag == ds.tag))
            .where(tt.state == TagState.ACTIVE.value, ds.status.in_(pending))
        )
        waiting, oldest = conn.execute(waiting_query).one()
        states = conn.execute(sa.select(tt.state, sa.func.count()).group_by(tt.state))
        by_state: dict[str, int] = {state: count for state, count in states}

        self._waiting.set(waiting or 0)
        age = (now - oldest).total_seconds() if oldest is not None else 0.0
        self._oldest.set(max(age, 0.0))
        for state in TAG_STATES:  # a CHECK constraint keeps states to these
            self._tags.labels(state=state).set(by_state.get(state, 0))
        self._refresh_stop_list(conn)

    # --- the account's STOP list -------------------------------------------------------

    def _add_stop_list_metrics(self, reg: CollectorRegistry) -> None:
        self._stop_list_syncs = Counter(
            PREFIX + "stop_list_syncs",
            "Syncs of the account's STOP list, by outcome (truncated: an answer not proven "
            "whole, which changed nothing).",
            ["outcome"],
            registry=reg,
        )
        for outcome in SYNC_OUTCOMES:
            self._stop_list_syncs.labels(outcome=outcome)
        self._account_optouts = Gauge(
            PREFIX + "account_optouts",
            "Numbers on the account's STOP list, as the last complete sync saw it.",
            registry=reg,
        )
        self._stop_list_last_ok = Gauge(
            PREFIX + "stop_list_last_success_timestamp_seconds",
            "When the last successful sync of the account's STOP list started (Unix "
            "seconds; 0 when never).",
            registry=reg,
        )

    def observe_stop_list_sync(self, result: SyncResult) -> None:
        """Count one recorded sync of the account's STOP list, by outcome."""
        self._stop_list_syncs.labels(outcome=result.outcome).inc()

    def _refresh_stop_list(self, conn: Connection) -> None:
        """The STOP list's gauges: one count, one max (across replicas, from the tables)."""
        ao, sc = account_optouts.c, stop_list_syncs.c
        listed = conn.scalar(
            sa.select(sa.func.count()).select_from(account_optouts).where(ao.removed_at.is_(None))
        )
        last_ok = conn.scalar(sa.select(sa.func.max(sc.started_at)).where(sc.outcome == "ok"))
        self._account_optouts.set(listed or 0)
        self._stop_list_last_ok.set(last_ok.timestamp() if last_ok is not None else 0)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
