"""The wire under the HTTP surface: one HTTP/1.0 request in, one answer out.

:mod:`daemon.http` decides what each route answers; this module owns how requests
arrive and answers leave, on the standard library's ``ThreadingHTTPServer``:

- a :class:`Server` runs one daemon thread per connection and hands every request, as
  a :class:`Request`, to an :data:`App` callable, whatever its method;
- the path loses its query and fragment but is never normalised (no ``..`` magic);
- a body is read only when the app asks for it, after its Content-Length is checked
  (411 without one, 413 over :data:`MAX_BODY`), and an unread body is drained so the
  close is clean;
- what the app raises becomes JSON: :class:`~daemon.errors.InputError` a 400, anything
  unexpected a 500 (logged), a client that stops sending mid-body no answer at all;
- each answer carries Content-Type, Content-Length and ``Cache-Control: no-store`` and
  is logged as ``http.request`` without headers, so a bearer token cannot reach the logs.

It imports nothing of the app, so the dependency runs one way: ``http`` → ``http_protocol``.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.message import Message
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

import structlog

from daemon.errors import InputError

log = structlog.get_logger(__name__)

#: Largest ``POST`` body accepted; a tag registration is well under 1 KiB.
MAX_BODY = 64 * 1024
#: Socket timeout per read, so a slow or stalled client cannot hold a thread forever.
REQUEST_TIMEOUT = 10.0
#: After refusing a body we did not read, read (and drop) up to this much of it so the
#: connection closes cleanly: closing with unread data makes the kernel send a reset,
#: which can destroy our answer before the client reads it.
_DRAIN_LIMIT = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Reply:
    """One answer: a JSON-ready body (or raw bytes with their content type)."""

    status: int
    body: Any
    headers: tuple[tuple[str, str], ...] = ()
    content_type: str = "application/json"

    @classmethod
    def error(cls, status: int, message: str, *headers: tuple[str, str]) -> Reply:
        """An error answer: ``{"error": message}`` with optional extra headers."""
        return cls(status, {"error": message}, headers)


@dataclass(frozen=True, slots=True)
class Request:
    """One request as the app sees it.

    Attributes:
        method: the HTTP method, as sent (``GET``, ``HEAD``, ``POST``…).
        path: the path without query or fragment, still URL-encoded.
        headers: the request headers.
        read_body: reads the body after checking its Content-Length; raises
            :class:`~daemon.errors.InputError` (400) or refuses with 411 or 413.
    """

    method: str
    path: str
    headers: Message
    read_body: Callable[[], bytes]


#: What the server calls for each request: the routes of :class:`daemon.http.HttpServer`.
App = Callable[[Request], Reply]


class _Refused(Exception):
    """Stop handling a request and send this answer instead."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.status)
        self.reply = reply


def clip(text: str, limit: int = 200) -> str:
    """``text`` cut to ``limit`` characters, so a huge path cannot flood a log line."""
    return text if len(text) <= limit else text[:limit] + "…"


class Server(ThreadingHTTPServer):
    """One thread per connection; threads are daemons so a stuck client never blocks exit.

    Args:
        address: host and port to listen on; a host with ``:`` is IPv6.
        app: answers each request.

    Raises:
        OSError: the address cannot be listened on.
    """

    daemon_threads = True

    def __init__(self, address: tuple[str, int], app: App) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.app = app
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The default prints a traceback to stderr; a client hanging up mid-answer is
        # routine and the handler already turned everything else into a 500.
        log.debug("http.connection_error", exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    """Turns one HTTP request into one call of the app and one JSON answer."""

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
        self._send(Reply.error(code, message or HTTPStatus(code).phrase))

    def do_GET(self) -> None:
        """Every method goes through one dispatcher, so the app can answer 405 with Allow."""
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_GET

    # -- dispatch

    def _dispatch(self) -> None:
        path = self._path()
        request = Request(self.command, path, self.headers, self._read_json_body)
        try:
            reply = cast(Server, self.server).app(request)
        except _Refused as refused:
            reply = refused.reply
        except InputError as exc:
            reply = Reply.error(HTTPStatus.BAD_REQUEST, str(exc))
        except TimeoutError:
            # The client stopped sending mid-body: nobody is waiting for an answer.
            log.debug("http.timeout", method=self.command, path=clip(path))
            self.close_connection = True
            return
        except Exception:
            log.exception("http.internal_error", method=self.command, path=clip(path))
            reply = Reply.error(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error")
        self._send(reply)
        self._drain()

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
            raise _Refused(Reply.error(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required"))
        if not self._unread and declared.strip() != "0":
            raise InputError("Content-Length must be a number of bytes")
        if self._unread > MAX_BODY:
            raise _Refused(
                Reply.error(
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

    def _send(self, reply: Reply) -> None:
        body = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
        # Logged before answering, so whoever reads the answer can already see the line.
        started = self._started or time.perf_counter()
        log.debug(
            "http.request",
            method=getattr(self, "command", None) or "-",
            path=clip(self._path()),
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
