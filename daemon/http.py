"""The HTTP surface of ``run``: probes, metrics and ``/tags``, on the standard library.

Routes (design.md, "Interfaces")::

    GET    /healthz      200 {"status": "ok"} | 503 {"status": "stalled"}
    GET    /readyz       200 {"status": "ready"} | 503 {"status": "not ready", "problems": [...]}
    GET    /metrics      Prometheus text (counters still served when the database is down)
    GET    /tags         a page of tracked tags with their status counts, ordered by tag:
                         ?limit= (default 100, at most 1,000), ?after= (the last tag of
                         the previous page); the next page is in ``Link: <…>; rel="next"``
    POST   /tags         {"tag": "...", "sent_at": "..."} → 201, then wakes the scheduler
    GET    /tags/{tag}   the tag as ``GET /tags`` lists it | 404 when never tracked
    DELETE /tags/{tag}   200 | 404
    GET    /             the HTML status page (daemon/statuspage.py); ?page= past 100 tags
    GET    /ui/tags/{tag}
                         one tag's HTML page with its delivery curve; 404 page if unknown
    GET    /openapi.json the OpenAPI document of all of these (:mod:`daemon.openapi`)
    HEAD   wherever GET is served: the same status and headers, no body

The routes are one declarative table, :data:`ROUTES` (method, path pattern, handler,
bearer token or not, parameters, body, answers; its vocabulary is :mod:`daemon.routing`),
from which both the routing here and the OpenAPI document (:mod:`daemon.openapi`) come,
so the document cannot drift from what is served. Adding a route is one :class:`Route`
entry in that table and one handler method; an HTML page answers
``Answer("…", None, HTML)``.

A ``ThreadingHTTPServer`` is plenty for probes, a scraper and an occasional ``POST``;
no framework, nothing async. :class:`HttpServer` owns the application: the routes and
the methods each allows, the bearer token, what each route answers, starting and
stopping. :mod:`daemon.http_protocol` owns the wire under it (reading requests and
bodies within their limits, sending answers, request logs, turning errors into JSON)
and calls :meth:`HttpServer.answer` for each request; it imports nothing from here.
Every answer is JSON except ``/metrics`` and the HTML status pages, and bounded:
``/tags`` and ``/`` are paged, and the protocol caps connections and gives each a
whole-request deadline. When
``SMSPARTNER_HTTP_TOKEN`` is set, ``POST`` and ``DELETE`` need it as a bearer token;
``GET`` stays open for probes.
Request logs never include headers, so the token cannot reach them.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import threading
from collections.abc import Callable, Mapping
from datetime import datetime
from http import HTTPStatus
from typing import Any
from urllib.parse import quote, unquote_to_bytes

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Engine, RowMapping

from daemon import queries, statuspage, tracking, ui
from daemon.errors import ConfigError, InputError
from daemon.health import Health
from daemon.http_protocol import (
    ANSWER_DEADLINE,
    MAX_CONNECTIONS,
    REQUEST_DEADLINE,
    REQUEST_TIMEOUT,
    Reply,
    Request,
    Server,
    clip,
)
from daemon.http_protocol import MAX_BODY as MAX_BODY  # re-exported: part of this surface
from daemon.metrics import Metrics
from daemon.output import plain
from daemon.routing import HTML, TEXT, Answer, Call, Param, Route, allowed_methods
from daemon.settings import Settings
from daemon.status import parse_sent_at, tag_problem, tag_warnings, window_end

log = structlog.get_logger(__name__)

#: How often the serving loop checks for stop(): the worst-case delay of a shutdown.
_SHUTDOWN_POLL = 0.1

#: Lease columns are the scheduler's business, not the API's.
_HIDDEN_COLUMNS = frozenset({"lease_owner", "lease_expires_at"})
#: ``GET /tags``: tags per page unless ``limit`` says otherwise, and the most it may say.
#: A tag is about 600 bytes of JSON, so a page stays under a megabyte.
DEFAULT_PAGE = 100
MAX_PAGE = 1000
#: ``last_error`` is cut to this many characters in ``GET /tags``, so a page stays bounded
#: whatever an error message held (the poller stores it already redacted).
_MAX_ERROR_CHARS = 500
#: Longest ``after`` cursor accepted: a tag is at most 64 characters, but rows inserted by
#: another program are only bounded by the column.
_MAX_CURSOR_CHARS = 256
_DB_ERRORS = (sa.exc.DBAPIError, sa.exc.TimeoutError)


def decode_params(raw: Mapping[str, str]) -> dict[str, str]:
    """Percent-decode path parameters.

    Raises:
        InputError: one is not UTF-8 once decoded; the message names it.
    """
    decoded = {}
    for name, value in raw.items():
        try:
            decoded[name] = percent_decode(value)
        except UnicodeError:
            raise InputError(f"{name} in the path is not valid UTF-8") from None
    return decoded


class HttpServer:
    """The daemon's HTTP endpoints, served from a background thread.

    Args:
        host: address to listen on (``SMSPARTNER_HTTP_HOST``).
        port: port to listen on; 0 picks a free one (read it back from :attr:`port`).
        engine: the database; each write request is one transaction.
        health: the scheduler's health state (only read here).
        metrics: the metrics to refresh and render on ``/metrics``.
        settings: for the report window and the bearer token.
        clock: aware-UTC now.
        wake: asks the scheduler to look for due tags at once (after ``POST /tags``).
        max_connections: connections served at once; more get a quick 503.
        request_deadline: seconds a client has to send its whole request.
        answer_deadline: seconds to run a route and send its answer.
        owner: the daemon's name in leases, shown on the status page.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        engine: Engine,
        health: Health,
        metrics: Metrics,
        settings: Settings,
        clock: Callable[[], datetime],
        wake: Callable[[], None],
        max_connections: int = MAX_CONNECTIONS,
        request_deadline: float = REQUEST_DEADLINE,
        answer_deadline: float = ANSWER_DEADLINE,
        owner: str | None = None,
    ) -> None:
        self._owner = owner
        self._started_at: datetime | None = None
        self._max_connections = max_connections
        self._deadlines = (request_deadline, answer_deadline)
        self._host = host
        self._port = port
        self._engine = engine
        self._health = health
        self._metrics = metrics
        self._settings = settings
        self._clock = clock
        self._wake = wake
        self._lock = threading.Lock()
        self._server: Server | None = None
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._document: dict[str, Any] | None = None

    @property
    def port(self) -> int:
        """The bound port once started (the configured one before)."""
        server = self._server
        return int(server.server_address[1]) if server is not None else self._port

    def start(self) -> None:
        """Listen and serve in a background thread.

        Raises:
            ConfigError: the address cannot be listened on (in use, unknown host…).
        """
        with self._lock:
            if self._stopped:
                raise RuntimeError("an HttpServer cannot be started again after stop()")
            if self._server is not None:
                return
            try:
                server = Server(
                    (self._host, self._port),
                    self.answer,
                    max_connections=self._max_connections,
                    request_deadline=self._deadlines[0],
                    answer_deadline=self._deadlines[1],
                )
            except OSError as exc:
                reason = exc.strerror or str(exc)
                raise ConfigError(
                    f"SMSPARTNER_HTTP_HOST/SMSPARTNER_HTTP_PORT: cannot listen on "
                    f"{self._host}:{self._port}: {reason}"
                ) from None
            thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": _SHUTDOWN_POLL},
                name="smspartner-status-http",
                daemon=True,
            )
            thread.start()
            self._server, self._thread = server, thread
            self._started_at = self._clock()
        log.info("http.started", host=self._host, port=self.port)
        if self._settings.http_token is None and not _is_loopback(self._host):
            log.warning(
                "http.tags_open",
                host=self._host,
                port=self.port,
                hint="POST and DELETE /tags accept any caller that can reach this port; "
                "set SMSPARTNER_HTTP_TOKEN",
            )

    def stop(self) -> None:
        """Stop serving and close the socket; safe to call twice or before start().

        Requests in flight finish on their own (daemon) threads.
        """
        with self._lock:
            server, thread = self._server, self._thread
            self._server, self._thread, self._stopped = None, None, True
        if server is None or thread is None:
            return
        server.shutdown()
        server.server_close()
        thread.join(timeout=REQUEST_TIMEOUT)
        log.info("http.stopped")

    # --- routing ------------------------------------------------------------------------

    def answer(self, request: Request) -> Reply:
        """Answer one request: route it, check its method and token, run the route.

        The database being unreachable is a 503, whichever route met it. ``HEAD`` runs
        the ``GET`` route: the protocol sends its status and headers without the body.

        Raises:
            InputError: a bad body, parameter or tag (the protocol answers 400 with it).
        """
        try:
            return self._route(request)
        except _DB_ERRORS as exc:
            _log_db_error(request.path, exc)
            return Reply.error(HTTPStatus.SERVICE_UNAVAILABLE, "database unavailable")

    def _route(self, request: Request) -> Reply:
        matched = [
            (route, found) for route in ROUTES if (found := route.match(request.path)) is not None
        ]
        if not matched:
            return Reply.error(HTTPStatus.NOT_FOUND, "no such route")
        method = "GET" if request.method == "HEAD" else request.method
        chosen = next(((r, found) for r, found in matched if r.method == method), None)
        if chosen is None:
            allowed = allowed_methods(route for route, _ in matched)
            return Reply.error(
                HTTPStatus.METHOD_NOT_ALLOWED,
                f"method {request.method} is not allowed here (allowed: {allowed})",
                ("Allow", allowed),
            )
        route, raw = chosen
        if route.auth and not self.authorized(request.headers.get("Authorization")):
            return Reply.error(
                HTTPStatus.UNAUTHORIZED,
                "Authorization: Bearer <SMSPARTNER_HTTP_TOKEN> is required",
                ("WWW-Authenticate", "Bearer"),
            )
        return route.handler(self, Call(request, decode_params(raw)))

    # --- what the routes do ---------------------------------------------------------------

    def authorized(self, header: str | None) -> bool:
        """Whether an ``Authorization`` header satisfies ``SMSPARTNER_HTTP_TOKEN``."""
        token = self._settings.http_token
        if token is None:
            return True
        scheme, _, given = (header or "").strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        # http.server decodes headers as Latin-1: re-encoding gives back the raw bytes.
        raw = given.strip().encode("latin-1", errors="replace")
        return hmac.compare_digest(raw, token.get_secret_value().encode())

    def healthz(self, call: Call) -> Reply:
        """Alive when the scheduler loop beat recently."""
        if self._health.alive():
            return Reply(HTTPStatus.OK, {"status": "ok"})
        return Reply(HTTPStatus.SERVICE_UNAVAILABLE, {"status": "stalled"})

    def readyz(self, call: Call) -> Reply:
        """Ready when the database answers and the scheduler reports no problem."""
        problems = self._health.problems()
        try:
            with self._engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
        except _DB_ERRORS as exc:
            _log_db_error("/readyz", exc)
            if not any(p.startswith("database unreachable") for p in problems):
                problems.append("database unreachable")
        if problems:
            body = {"status": "not ready", "problems": problems}
            return Reply(HTTPStatus.SERVICE_UNAVAILABLE, body)
        return Reply(HTTPStatus.OK, {"status": "ready"})

    def metrics(self, call: Call) -> Reply:
        """Refresh the gauges (if the database answers) and render every metric."""
        try:
            with self._engine.connect() as conn:
                self._metrics.refresh(conn, self._clock())
        except _DB_ERRORS as exc:
            _log_db_error("/metrics", exc)  # the counters are still worth scraping
        data, content_type = self._metrics.render()
        return Reply(HTTPStatus.OK, data, content_type=content_type)

    def list_tags(self, call: Call) -> Reply:
        """A page of tracked tags, ordered by tag, with their ``tag_summary`` counts.

        The body stays a JSON array (as before paging), so scripts reading one page keep
        working; the next page is announced in a ``Link`` header (RFC 8288), absent on the
        last page. One more row than the page is read to know whether another page
        exists, so an exact multiple of ``limit`` does not end with an empty page.

        Raises:
            InputError: ``limit`` or ``after`` is not acceptable; the message names it.
        """
        limit, after = parse_page_query(call.request.query)
        with self._engine.connect() as conn:
            rows = queries.list_tags_page(conn, after=after, limit=limit + 1)
        more, rows = len(rows) > limit, rows[:limit]
        tags = [_listed(row) for row in rows]
        if not more:
            return Reply(HTTPStatus.OK, tags)
        cursor = quote(rows[-1]["tag"], safe="")
        link = ("Link", f'</tags?limit={limit}&after={cursor}>; rel="next"')
        return Reply(HTTPStatus.OK, tags, (link,))

    def status_page(self, call: Call) -> Reply:
        """``GET /``: the HTML status page (the daemon, then a page of tags).

        Raises:
            InputError: ``page`` is not a page number.
        """
        view = ui.DaemonView(
            now=self._clock(),
            owner=self._owner,
            started_at=self._started_at,
            last_beat=self._health.last_beat,
            problems=self._health.problems(),
            auth_error=self._health.auth_error,
            polls={},
        )
        return statuspage.index(self._engine, view, call.request.query)

    def tag_page(self, call: Call) -> Reply:
        """``GET /ui/tags/{tag}``: one tag's HTML page (a 404 page for an unknown tag)."""
        tag = call.params["tag"]
        return statuspage.tag(self._engine, self._clock(), tag, self._settings.report_window)

    def track(self, call: Call) -> Reply:
        """Track (or re-activate) the tag a ``POST /tags`` body names, then wake the
        scheduler so it is polled at once.

        Raises:
            InputError: the body is not a valid registration; the message names the field.
        """
        tag, sent_at = parse_track_body(call.request.read_body())
        now = self._clock()
        sent_at = sent_at or now
        window_ends_at = window_end(sent_at, self._settings.report_window)
        with self._engine.begin() as conn:
            tracking.track(conn, tag, sent_at=sent_at, window_ends_at=window_ends_at, now=now)
            row = tracking.get_tag(conn, tag)
        assert row is not None  # just written in this transaction
        self._wake()
        log.info("http.tag_tracked", tag=tag, sent_at=row["sent_at"])
        location = ("Location", "/tags/" + quote(tag, safe=""))
        body_out = {**_public(row), "warnings": tag_warnings(tag)}
        return Reply(HTTPStatus.CREATED, body_out, (location,))

    def get_tag(self, call: Call) -> Reply:
        """One tag as ``GET /tags`` lists it (row and counts); 404 when never tracked.

        An untracked tag is still found (its ``state`` says so): its data is kept.

        Raises:
            InputError: the path does not hold a valid tag.
        """
        tag = _path_tag(call)
        with self._engine.connect() as conn:
            row = queries.tag_with_counts(conn, tag)
        if row is None:
            return Reply.error(HTTPStatus.NOT_FOUND, f"tag {tag!r} was never tracked")
        return Reply(HTTPStatus.OK, _listed(row))

    def untrack(self, call: Call) -> Reply:
        """Untrack the tag named in the path.

        Raises:
            InputError: the path does not hold a valid tag.
        """
        tag = _path_tag(call)
        with self._engine.begin() as conn:
            found = tracking.untrack(conn, tag, now=self._clock())
        if not found:
            return Reply.error(HTTPStatus.NOT_FOUND, f"tag {tag!r} is not tracked")
        log.info("http.tag_untracked", tag=tag)
        return Reply(HTTPStatus.OK, {"tag": tag, "state": "untracked"})

    def openapi(self, call: Call) -> Reply:
        """The OpenAPI document of :data:`ROUTES`, built on first use."""
        with self._lock:
            if self._document is None:
                from daemon import openapi  # it documents this module: imported when asked

                token_required = self._settings.http_token is not None
                self._document = openapi.document(
                    ROUTES, COMMON_ANSWERS, token_required=token_required
                )
            return Reply(HTTPStatus.OK, self._document)


# --- the route table --------------------------------------------------------------------------

TAG_IN_PATH = Param(
    "tag",
    "path",
    {"$ref": "#/components/schemas/TagName"},
    "The tag, percent-encoded (a tag may hold `/`: send it as `%2F`).",
)
LIMIT = Param(
    "limit",
    "query",
    {
        "type": "integer",
        "minimum": 1,
        "maximum": MAX_PAGE,
        "default": DEFAULT_PAGE,
        "examples": [2],
    },
    f"Tags per page (at most {MAX_PAGE:,}).",
)
AFTER = Param(
    "after",
    "query",
    {
        "type": "string",
        "maxLength": _MAX_CURSOR_CHARS,
        "pattern": "^[^\\x00]*$",
        "examples": ["nov-promo"],
    },
    "The last tag of the previous page (the `Link` header gives the next page whole).",
)

#: Answers the protocol may give on any route, whatever the route: an unexpected error,
#: and a refusal when the server is full or the database is unreachable.
COMMON_ANSWERS: Mapping[int, Answer] = {
    500: Answer("An unexpected error (logged by the daemon)."),
    503: Answer(
        "Too many connections at once (with `Retry-After`), or the database is unreachable.",
        headers=("Retry-After",),
    ),
}
PAGE = Param(
    "page",
    "query",
    {
        "type": "integer",
        "minimum": 1,
        "maximum": statuspage.MAX_PAGE_NUMBER,
        "default": 1,
        "examples": [2],
    },
    "The page of tags to show, 100 tags a page, newest send first.",
)
_BAD_TAG = Answer("The path does not hold a valid tag; the message says why.")

#: Every route the server answers. Routing and ``GET /openapi.json`` both read this table.
#: A path that fits several patterns goes to the first entry serving its method: list a
#: literal path (``/tags/export``) before a pattern it also fits (``/tags/{tag}``).
ROUTES: tuple[Route, ...] = (
    Route(
        "GET",
        "/healthz",
        HttpServer.healthz,
        "Liveness: whether the scheduler loop beat in the last minute",
        {200: Answer("Alive.", "Health"), 503: Answer("The loop stalled.", "Health")},
    ),
    Route(
        "GET",
        "/readyz",
        HttpServer.readyz,
        "Readiness: database reachable, API key accepted, polls succeeding",
        {200: Answer("Ready.", "Ready"), 503: Answer("Not ready; `problems` says why.", "Ready")},
    ),
    Route(
        "GET",
        "/metrics",
        HttpServer.metrics,
        "Prometheus metrics (counters are served even when the database is down)",
        {200: Answer("The Prometheus text format.", None, TEXT)},
    ),
    Route(
        "GET",
        "/tags",
        HttpServer.list_tags,
        "A page of tracked tags, ordered by tag, each with its `tag_summary` counts",
        {
            200: Answer(
                "The page; `Link` names the next one, if any.", "TagPage", headers=("Link",)
            ),
            400: Answer("`limit` or `after` is not acceptable; the message names it."),
        },
        params=(LIMIT, AFTER),
    ),
    Route(
        "POST",
        "/tags",
        HttpServer.track,
        "Track a tag (or re-activate it); it is polled at once",
        {
            201: Answer("Tracked.", "TrackedTag", headers=("Location",)),
            400: Answer("The body is not a valid registration; the message names the field."),
            401: Answer("The bearer token is missing or wrong.", headers=("WWW-Authenticate",)),
            411: Answer("No `Content-Length` (a chunked body is not read)."),
            413: Answer(f"The body is over {MAX_BODY // 1024} KiB."),
        },
        body="TrackRequest",
        auth=True,
    ),
    Route(
        "GET",
        "/tags/{tag}",
        HttpServer.get_tag,
        "One tag: its row and its `tag_summary` counts, as `GET /tags` lists it",
        {
            200: Answer("The tag (an untracked one too: its data is kept).", "TagWithCounts"),
            400: _BAD_TAG,
            404: Answer("The tag was never tracked."),
        },
        params=(TAG_IN_PATH,),
    ),
    Route(
        "DELETE",
        "/tags/{tag}",
        HttpServer.untrack,
        "Stop polling a tag; its data is kept",
        {
            200: Answer("Untracked.", "Untracked"),
            400: _BAD_TAG,
            401: Answer("The bearer token is missing or wrong.", headers=("WWW-Authenticate",)),
            404: Answer("The tag is not tracked."),
        },
        params=(TAG_IN_PATH,),
        auth=True,
    ),
    Route(
        "GET",
        "/",
        HttpServer.status_page,
        "The status page: the daemon's health, then every tag (100 a page) with its bar and rate",
        {
            200: Answer("The page (HTML, no scripts or external resources).", None, HTML),
            400: Answer("`page` is not a page number."),
            503: Answer("The database is down: the page still shows the daemon.", None, HTML),
        },
        params=(PAGE,),
    ),
    Route(
        "GET",
        "/ui/tags/{tag}",
        HttpServer.tag_page,
        "One tag's page: its counts, delivery curve and recent polls (no phone numbers)",
        {
            200: Answer("The page (HTML).", None, HTML),
            400: _BAD_TAG,
            404: Answer("The tag was never tracked (an HTML page).", None, HTML),
        },
        params=(TAG_IN_PATH,),
    ),
    Route(
        "GET",
        "/openapi.json",
        HttpServer.openapi,
        "This document: every route above, generated from the table that routes them",
        {200: Answer("An OpenAPI 3.1 document.", "OpenApiDocument")},
    ),
)


def _is_loopback(host: str) -> bool:
    """Whether only this machine can reach ``host`` (a name other than localhost is
    assumed reachable: the warning it earns is cheap, a wrong guess is not)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _path_tag(call: Call) -> str:
    """The tag a ``/tags/{tag}`` path names.

    Raises:
        InputError: it is not a valid tag; the message says why.
    """
    tag = call.params["tag"]
    problem = tag_problem(tag)
    if problem:
        raise InputError(problem)
    return tag


# --- request bodies and answers -------------------------------------------------------------


def percent_decode(text: str) -> str:
    """Percent-decode part of a request target, as UTF-8.

    ``http.server`` decodes the request line as Latin-1, so re-encoding gives back the
    bytes sent: a non-ASCII tag sent raw (as ``curl`` does with ``café``) reads the same
    as one sent percent-encoded, instead of as mojibake.

    Raises:
        UnicodeError: the bytes are not UTF-8.
    """
    return unquote_to_bytes(text.encode("latin-1")).decode("utf-8")


def parse_page_query(query: str) -> tuple[int, str | None]:
    """The ``limit`` and ``after`` of a ``GET /tags`` query string (others are ignored).

    Raises:
        InputError: one line naming the parameter.
    """
    params: dict[str, str] = {}
    for field in query.split("&"):
        raw_name, _, raw_value = field.partition("=")
        name = raw_name.replace("+", " ")
        if name not in ("limit", "after"):
            continue
        if name in params:
            raise InputError(f"{name} must be given at most once")
        try:
            params[name] = percent_decode(raw_value.replace("+", " "))
        except UnicodeError:
            raise InputError(f"{name} is not valid UTF-8 once percent-decoded") from None
    limit = DEFAULT_PAGE
    if "limit" in params:
        raw = params["limit"]
        # isdigit() alone accepts "١٠" (Arabic digits); int() alone accepts " 1_0 ".
        if not (raw.isascii() and raw.isdigit() and len(raw) <= 9 and 1 <= int(raw) <= MAX_PAGE):
            raise InputError(f"limit must be a whole number from 1 to {MAX_PAGE} (got {raw!r:.40})")
        limit = int(raw)
    after = params.get("after") or None
    if after is not None:
        if len(after) > _MAX_CURSOR_CHARS:
            raise InputError(f"after must be at most {_MAX_CURSOR_CHARS} characters (a tag)")
        if "\x00" in after:
            raise InputError("after must not contain NUL (a tag never does)")
    return limit, after


def parse_track_body(body: bytes) -> tuple[str, datetime | None]:
    """The ``tag`` and optional ``sent_at`` of a ``POST /tags`` body (unknown fields ignored).

    Raises:
        InputError: one line naming what is wrong.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"body is not valid UTF-8 (bad byte at offset {exc.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(
            f"body is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
    except RecursionError:  # "[[[[…" 64 KiB deep
        raise InputError("body is not valid JSON: nested too deeply") from None
    except ValueError as exc:  # an integer past sys.get_int_max_str_digits() (4,300 digits)
        reason = str(exc).split(";")[0]
        raise InputError(f"body is not acceptable JSON: {reason}") from None
    if not isinstance(data, dict):
        raise InputError(f'body must be a JSON object like {{"tag": "..."}} (got {_kind(data)})')
    tag = data.get("tag")
    if tag is None:
        raise InputError("tag is required")
    if not isinstance(tag, str):
        raise InputError(f"tag must be a string (got {_kind(tag)})")
    problem = tag_problem(tag)
    if problem:
        raise InputError(problem)
    raw = data.get("sent_at")
    if raw is None:
        return tag, None
    if not isinstance(raw, str):
        raise InputError(f"sent_at must be an ISO-8601 string (got {_kind(raw)})")
    try:
        return tag, parse_sent_at(raw)
    except ValueError as exc:
        raise InputError(f"sent_at: {exc}") from None


def _kind(value: object) -> str:
    """A JSON value's type, in JSON's words."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _public(row: RowMapping) -> dict[str, Any]:
    """A ``tracked_tags`` row as the API shows it."""
    return {str(k): plain(v) for k, v in row.items() if k not in _HIDDEN_COLUMNS}


def _listed(row: RowMapping) -> dict[str, Any]:
    """A row of :func:`queries.list_tags_page` as ``GET /tags`` shows it."""
    listed = _public(row)
    error = listed.get("last_error")
    if isinstance(error, str) and len(error) > _MAX_ERROR_CHARS:
        listed["last_error"] = error[:_MAX_ERROR_CHARS] + "…"
    return listed


def _log_db_error(path: str, exc: Exception) -> None:
    """Log a database failure without its SQL parameters or connection URL."""
    cause = getattr(exc, "orig", None) or exc
    reason = " ".join(str(cause).split())[:300]
    log.warning("http.database_error", path=clip(path), error=f"{type(cause).__name__}: {reason}")
