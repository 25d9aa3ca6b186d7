"""The HTTP surface of ``run``: probes, metrics and ``/tags``, on the standard library.

Routes (design.md, "Interfaces")::

    GET    /healthz      200 {"status": "ok"} | 503 {"status": "stalled"}
    GET    /readyz       200 {"status": "ready"} | 503 {"status": "not ready", "problems": [...]}
    GET    /metrics      Prometheus text (counters still served when the database is down)
    GET    /tags         tracked tags with their status counts
    POST   /tags         {"tag": "...", "sent_at": "..."} → 201, then wakes the scheduler
    DELETE /tags/{tag}   200 | 404

A ``ThreadingHTTPServer`` is plenty for probes, a scraper and an occasional ``POST``;
no framework, nothing async. :class:`_Handler` owns the protocol (routing, methods,
headers, body limits, the bearer token, turning errors into JSON); :class:`HttpServer`
owns what the routes do. Every answer is JSON except ``/metrics``. When
``SMSPARTNER_HTTP_TOKEN`` is set, ``POST`` and ``DELETE`` need it as a bearer token;
``GET`` stays open for probes. Request logs never include headers, so the token
cannot reach them.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast
from urllib.parse import quote, unquote

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Engine, RowMapping

from daemon import store, tracking
from daemon.errors import ConfigError, InputError
from daemon.health import Health
from daemon.metrics import Metrics
from daemon.output import plain
from daemon.settings import Settings
from daemon.status import parse_sent_at, tag_problem, tag_warnings

log = structlog.get_logger(__name__)

#: Largest ``POST`` body accepted; a tag registration is well under 1 KiB.
MAX_BODY = 64 * 1024
#: Socket timeout per read, so a slow or stalled client cannot hold a thread forever.
REQUEST_TIMEOUT = 10.0
#: After refusing a body we did not read, read (and drop) up to this much of it so the
#: connection closes cleanly: closing with unread data makes the kernel send a reset,
#: which can destroy our answer before the client reads it.
_DRAIN_LIMIT = 1024 * 1024
#: How often the serving loop checks for stop(): the worst-case delay of a shutdown.
_SHUTDOWN_POLL = 0.1

_ROUTES: dict[str, tuple[str, ...]] = {
    "/healthz": ("GET",),
    "/readyz": ("GET",),
    "/metrics": ("GET",),
    "/tags": ("GET", "POST"),
}
_TAG_PREFIX = "/tags/"
#: Lease columns are the scheduler's business, not the API's.
_HIDDEN_COLUMNS = frozenset({"lease_owner", "lease_expires_at"})
#: Columns of the ``tag_summary`` view added to each tag of ``GET /tags``.
_SUMMARY_COUNTS = (
    "total",
    "waiting",
    "delivered",
    "not_delivered",
    "failed",
    "expired",
    "unknown",
    "stop_sms",
    "delivery_rate",
)
_DB_ERRORS = (sa.exc.DBAPIError, sa.exc.TimeoutError)


@dataclass(frozen=True, slots=True)
class _Reply:
    """One answer: a JSON-ready body (or raw bytes with their content type)."""

    status: int
    body: Any
    headers: tuple[tuple[str, str], ...] = ()
    content_type: str = "application/json"


def _error(status: int, message: str, *headers: tuple[str, str]) -> _Reply:
    return _Reply(status, {"error": message}, headers)


class _Refused(Exception):
    """Stop handling a request and send this answer instead."""

    def __init__(self, reply: _Reply) -> None:
        super().__init__(reply.status)
        self.reply = reply


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
    ) -> None:
        self._host = host
        self._port = port
        self._engine = engine
        self._health = health
        self._metrics = metrics
        self._settings = settings
        self._clock = clock
        self._wake = wake
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stopped = False

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
            family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
            try:
                server = _Server((self._host, self._port), self, family)
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

    def healthz(self) -> _Reply:
        """Alive when the scheduler loop beat recently."""
        if self._health.alive():
            return _Reply(HTTPStatus.OK, {"status": "ok"})
        return _Reply(HTTPStatus.SERVICE_UNAVAILABLE, {"status": "stalled"})

    def readyz(self) -> _Reply:
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
            return _Reply(HTTPStatus.SERVICE_UNAVAILABLE, body)
        return _Reply(HTTPStatus.OK, {"status": "ready"})

    def metrics(self) -> _Reply:
        """Refresh the gauges (if the database answers) and render every metric."""
        try:
            with self._engine.connect() as conn:
                self._metrics.refresh(conn, self._clock())
        except _DB_ERRORS as exc:
            _log_db_error("/metrics", exc)  # the counters are still worth scraping
        data, content_type = self._metrics.render()
        return _Reply(HTTPStatus.OK, data, content_type=content_type)

    def list_tags(self) -> _Reply:
        """Every tracked tag with its ``tag_summary`` counts."""
        with self._engine.connect() as conn:
            rows = tracking.list_tags(conn)
            summaries = {s["tag"]: s for s in store.tag_summary(conn)}
        tags = []
        for row in rows:
            summary = summaries.get(row["tag"])
            counts = {n: plain(summary[n] if summary else None) for n in _SUMMARY_COUNTS}
            tags.append({**_public(row), **counts})
        return _Reply(HTTPStatus.OK, tags)

    def track(self, body: bytes) -> _Reply:
        """Track (or re-activate) the tag a ``POST /tags`` body names, then wake the
        scheduler so it is polled at once.

        Raises:
            InputError: the body is not a valid registration; the message names the field.
        """
        tag, sent_at = parse_track_body(body)
        now = self._clock()
        sent_at = sent_at or now
        # parse_sent_at keeps sent_at early enough for any allowed window to fit.
        window_ends_at = sent_at + self._settings.report_window
        with self._engine.begin() as conn:
            tracking.track(conn, tag, sent_at=sent_at, window_ends_at=window_ends_at, now=now)
            row = tracking.get_tag(conn, tag)
        assert row is not None  # just written in this transaction
        self._wake()
        log.info("http.tag_tracked", tag=tag, sent_at=row["sent_at"])
        location = ("Location", _TAG_PREFIX + quote(tag, safe=""))
        body_out = {**_public(row), "warnings": tag_warnings(tag)}
        return _Reply(HTTPStatus.CREATED, body_out, (location,))

    def untrack(self, segment: str) -> _Reply:
        """Untrack the tag named by the (still URL-encoded) last path segment.

        Raises:
            InputError: the segment is not a valid tag.
        """
        try:
            tag = unquote(segment, errors="strict")
        except UnicodeDecodeError:
            raise InputError("tag in the path is not valid UTF-8") from None
        problem = tag_problem(tag)
        if problem:
            raise InputError(problem)
        with self._engine.begin() as conn:
            found = tracking.untrack(conn, tag, now=self._clock())
        if not found:
            return _error(HTTPStatus.NOT_FOUND, f"tag {tag!r} is not tracked")
        log.info("http.tag_untracked", tag=tag)
        return _Reply(HTTPStatus.OK, {"tag": tag, "state": "untracked"})


def _is_loopback(host: str) -> bool:
    """Whether only this machine can reach ``host`` (a name other than localhost is
    assumed reachable: the warning it earns is cheap, a wrong guess is not)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --- request bodies and answers -------------------------------------------------------------


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


def _log_db_error(path: str, exc: Exception) -> None:
    """Log a database failure without its SQL parameters or connection URL."""
    cause = getattr(exc, "orig", None) or exc
    reason = " ".join(str(cause).split())[:300]
    log.warning("http.database_error", path=path, error=f"{type(cause).__name__}: {reason}")


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


# --- the protocol -------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    """One thread per connection; threads are daemons so a stuck client never blocks exit."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], app: HttpServer, family: int) -> None:
        self.address_family = family
        self.app = app
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The default prints a traceback to stderr; a client hanging up mid-answer is
        # routine and the handler already turned everything else into a 500.
        log.debug("http.connection_error", exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    """Turns one HTTP request into one call of :class:`HttpServer` and one JSON answer."""

    timeout = REQUEST_TIMEOUT
    server_version = "smspartner-status"
    sys_version = ""
    _started = 0.0
    _unread = 0  # body bytes the client announced that were not read

    # -- plumbing of BaseHTTPRequestHandler

    def log_message(self, format: str, *args: Any) -> None:
        """Silenced: ``http.request`` is logged through structlog instead, without headers."""

    def parse_request(self) -> bool:
        self._started = time.perf_counter()
        return super().parse_request()

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The base class's own refusals (bad request line, unknown method…), as JSON."""
        self.close_connection = True
        self._send(_error(code, message or HTTPStatus(code).phrase))

    def do_GET(self) -> None:
        """Every method goes through one dispatcher, so wrong ones get 405 with Allow."""
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_GET

    # -- routing

    def _dispatch(self) -> None:
        path = self._path()
        try:
            reply = self._route(cast(_Server, self.server).app, path)
        except _Refused as refused:
            reply = refused.reply
        except InputError as exc:
            reply = _error(HTTPStatus.BAD_REQUEST, str(exc))
        except _DB_ERRORS as exc:
            _log_db_error(_clip(path), exc)
            reply = _error(HTTPStatus.SERVICE_UNAVAILABLE, "database unavailable")
        except TimeoutError:
            # The client stopped sending mid-body: nobody is waiting for an answer.
            log.debug("http.timeout", method=self.command, path=_clip(path))
            self.close_connection = True
            return
        except Exception:
            log.exception("http.internal_error", method=self.command, path=_clip(path))
            reply = _error(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error")
        self._send(reply)
        self._drain()

    def _route(self, app: HttpServer, path: str) -> _Reply:
        if path in _ROUTES:
            allowed = _ROUTES[path]
        elif path.startswith(_TAG_PREFIX):
            allowed = ("DELETE",)
            if "/" in path[len(_TAG_PREFIX) :]:  # /tags/a/b, /tags/../x
                return _error(HTTPStatus.NOT_FOUND, "no such route")
        else:
            return _error(HTTPStatus.NOT_FOUND, "no such route")
        method = self.command
        if method not in allowed:
            return _error(
                HTTPStatus.METHOD_NOT_ALLOWED,
                f"method {method} is not allowed here (allowed: {', '.join(allowed)})",
                ("Allow", ", ".join(allowed)),
            )
        if method in ("POST", "DELETE") and not app.authorized(self.headers.get("Authorization")):
            return _error(
                HTTPStatus.UNAUTHORIZED,
                "Authorization: Bearer <SMSPARTNER_HTTP_TOKEN> is required",
                ("WWW-Authenticate", "Bearer"),
            )
        if method == "DELETE":
            return app.untrack(path[len(_TAG_PREFIX) :])
        if method == "POST":
            return app.track(self._read_json_body())
        return {
            "/healthz": app.healthz,
            "/readyz": app.readyz,
            "/metrics": app.metrics,
            "/tags": app.list_tags,
        }[path]()

    def _path(self) -> str:
        """The request path without query or fragment (never normalised: no ``..`` magic)."""
        return getattr(self, "path", "").split("?", 1)[0].split("#", 1)[0]

    # -- bodies

    def _read_json_body(self) -> bytes:
        """Read a ``POST`` body after checking its announced length.

        The Content-Type is not checked: the body is parsed as JSON whatever it says, so
        ``curl -d '{"tag": "x"}'`` (sent as a form) works, and a body that is not JSON
        gets a 400 naming the problem either way.

        Raises:
            _Refused: 411 or 413.
            InputError: the Content-Length header is not a number.
        """
        declared = self.headers.get("Content-Length")
        if declared is not None and declared.strip().isascii() and declared.strip().isdigit():
            self._unread = int(declared)
        if declared is None or self.headers.get("Transfer-Encoding"):
            self.close_connection = True  # a chunked body we will not parse
            raise _Refused(_error(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required"))
        if not self._unread and declared.strip() != "0":
            raise InputError("Content-Length must be a number of bytes")
        if self._unread > MAX_BODY:
            raise _Refused(
                _error(
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                    f"body must be at most {MAX_BODY} bytes (Content-Length is {self._unread})",
                )
            )
        body = self.rfile.read(self._unread)
        self._unread = 0
        return body

    def _drain(self) -> None:
        """Read and drop a body we answered without reading, so the close is clean."""
        remaining, self._unread = self._unread, 0
        if remaining > _DRAIN_LIMIT:
            return  # not worth it: the client may see a reset
        try:
            while remaining > 0:
                chunk = self.rfile.read(min(remaining, 64 * 1024))
                if not chunk:
                    return
                remaining -= len(chunk)
        except OSError:
            pass  # the client went away or stalled: nothing left to protect

    # -- answers

    def _send(self, reply: _Reply) -> None:
        body = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
        # Logged before answering, so whoever reads the answer can already see the line.
        started = self._started or time.perf_counter()
        log.debug(
            "http.request",
            method=getattr(self, "command", None) or "-",
            path=_clip(self._path()),
            status=int(reply.status),
            duration_ms=round((time.perf_counter() - started) * 1000, 1),
        )
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in reply.headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
