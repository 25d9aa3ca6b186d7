"""The wire under the HTTP surface: one HTTP/1.0 request in, one answer out.

:mod:`daemon.http` decides what each route answers; this module owns how requests
arrive and answers leave, on the standard library's ``ThreadingHTTPServer``:

- a :class:`Server` runs one daemon thread per connection and hands every request, as
  a :class:`Request`, to an :data:`App` callable, whatever its method;
- connections are bounded: past :data:`MAX_CONNECTIONS` at once, a new one gets a canned
  503 straight from the accepting thread and is closed, so idle or slow clients cannot
  take every thread and file descriptor of the daemon;
- each connection has a deadline for the whole request (:data:`REQUEST_DEADLINE` from
  accept until the request line, headers and body are in), then another for the answer
  (:data:`ANSWER_DEADLINE`); a client still sending, or not reading, when its deadline
  passes is cut off by one watchdog thread, however it paces its bytes;
- the path loses its query (kept apart, for the app) and fragment but is never
  normalised (no ``..`` magic);
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

import contextlib
import errno
import json
import socket
import threading
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
#: Socket timeout per read or write; :data:`REQUEST_DEADLINE` bounds the whole request.
REQUEST_TIMEOUT = 10.0
#: Connections served at once; more get a quick 503. Probes, a scraper and the odd
#: ``POST`` need a handful, and each connection is one thread and one file descriptor.
MAX_CONNECTIONS = 64
#: Seconds from accepting a connection until its whole request (line, headers, body) has
#: arrived: a per-read timeout alone lets a client sending one byte every few seconds
#: hold a thread for ever.
REQUEST_DEADLINE = 10.0
#: Seconds to run the route and send the answer, once the request is in.
ANSWER_DEADLINE = 30.0
#: After refusing a body we did not read, read (and drop) up to this much of it so the
#: connection closes cleanly: closing with unread data makes the kernel send a reset,
#: which can destroy our answer before the client reads it.
_DRAIN_LIMIT = 1024 * 1024
#: What a Content-Length of more than 18 digits counts as: too large, never drained.
_TOO_LONG = 10**18


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
        query: what followed ``?`` in the target (without the fragment), still encoded.
        headers: the request headers.
        read_body: reads the body after checking its Content-Length; raises
            :class:`~daemon.errors.InputError` (400) or refuses with 411 or 413.
    """

    method: str
    path: str
    query: str
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


def _canned(status: HTTPStatus, message: str, *headers: str) -> bytes:
    """A whole HTTP/1.0 answer with a JSON error, for sending without a handler."""
    body = json.dumps({"error": message}).encode()
    head = [
        f"HTTP/1.0 {status.value} {status.phrase}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        "Connection: close",
        *headers,
    ]
    return "\r\n".join(head).encode() + b"\r\n\r\n" + body


#: The answer to a connection over :data:`MAX_CONNECTIONS`.
_BUSY = _canned(HTTPStatus.SERVICE_UNAVAILABLE, "too many connections", "Retry-After: 1")
#: At most one ``http.busy`` warning per this many seconds (with the count meanwhile).
_BUSY_LOG_EVERY = 10.0


class _Deadlines:
    """One thread that cuts off connections whose deadline has passed.

    Cutting off is ``shutdown(SHUT_RDWR)``: the handler's blocked read returns at once
    (end of file) and its writes fail, so its thread ends and the connection closes.
    Shutting down happens under the lock and :meth:`clear` takes it, so a socket is never
    touched after its handler let go of it (its descriptor may be reused by then).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._due: dict[socket.socket, float] = {}
        self._cut: set[socket.socket] = set()
        self._closed = False
        self._thread = threading.Thread(
            target=self._run, name="smspartner-status-http-deadlines", daemon=True
        )
        self._thread.start()

    def set(self, sock: socket.socket, seconds: float) -> None:
        """Give ``sock`` until ``seconds`` from now (replacing any earlier deadline)."""
        with self._cond:
            self._due[sock] = time.monotonic() + seconds
            self._cond.notify()

    def clear(self, sock: socket.socket) -> None:
        """Forget ``sock``: its handler is about to close it."""
        with self._cond:
            self._due.pop(sock, None)
            self._cut.discard(sock)

    def was_cut(self, sock: socket.socket) -> bool:
        """Whether ``sock`` was cut off for missing its deadline."""
        with self._cond:
            return sock in self._cut

    def close(self) -> None:
        """Stop the thread (connections still open keep their sockets)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=1)

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                for sock in [s for s, due in self._due.items() if due <= now]:
                    del self._due[sock]
                    self._cut.add(sock)
                    with contextlib.suppress(OSError):  # the client is already gone
                        sock.shutdown(socket.SHUT_RDWR)
                    log.debug("http.deadline_passed")
                wait = min(self._due.values(), default=now + 60) - now
                self._cond.wait(timeout=max(wait, 0.01))


class Server(ThreadingHTTPServer):
    """One thread per connection, at most ``max_connections`` of them, each connection
    with a whole-request deadline; threads are daemons so a stuck client never blocks exit.

    Args:
        address: host and port to listen on; a host with ``:`` is IPv6.
        app: answers each request.
        max_connections: connections served at once; more get a 503 and are closed.
        request_deadline: seconds for a client to send its whole request.
        answer_deadline: seconds to run the route and send its answer.

    Raises:
        OSError: the address cannot be listened on.
    """

    daemon_threads = True
    #: The listen backlog (socketserver's default is 5): connections the kernel completes
    #: while the accepting thread catches up. Past it, new connections' SYNs are dropped
    #: and each such client waits a second for its retransmit, refusal or not.
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        app: App,
        *,
        max_connections: int = MAX_CONNECTIONS,
        request_deadline: float = REQUEST_DEADLINE,
        answer_deadline: float = ANSWER_DEADLINE,
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.app = app
        self.max_connections = max_connections
        self.request_deadline = request_deadline
        self.answer_deadline = answer_deadline
        self._count_lock = threading.Lock()
        self._active = 0
        self._refused = 0  # since the last http.busy warning
        self._busy_logged = -_BUSY_LOG_EVERY
        self.deadlines = _Deadlines()  # before binding: a failed bind calls server_close()
        super().__init__(address, _Handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        try:
            return super().get_request()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                # Out of descriptors: the listening socket stays readable, so without a
                # pause the serving loop would spin on accept() at full CPU.
                log.warning("http.accept_failed", error=exc.strerror)
                time.sleep(0.1)
            raise

    def process_request(self, request: Any, client_address: Any) -> None:
        """Start a thread for the connection, or refuse it when the server is full."""
        with self._count_lock:
            full = self._active >= self.max_connections
            if not full:
                self._active += 1
        if full:
            self._refuse(request)
            return
        self.deadlines.set(request, self.request_deadline)
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release()

    def shutdown_request(self, request: Any) -> None:
        self.deadlines.clear(request)
        super().shutdown_request(request)

    def server_close(self) -> None:
        super().server_close()
        self.deadlines.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The default prints a traceback to stderr; a client hanging up mid-answer is
        # routine and the handler already turned everything else into a 500.
        log.debug("http.connection_error", exc_info=True)

    def _release(self) -> None:
        with self._count_lock:
            self._active -= 1

    def _refuse(self, sock: socket.socket) -> None:
        """Answer 503 and close, from the accepting thread, without ever blocking it."""
        try:
            sock.setblocking(False)
            sock.send(_BUSY)  # a few hundred bytes: fits an empty socket buffer
            sock.shutdown(socket.SHUT_WR)
            # Drop what the client already sent: closing with unread data makes the
            # kernel answer with a reset, which can destroy the 503 before it is read.
            for _ in range(16):
                if not sock.recv(4096):
                    break
        except OSError:
            pass  # nothing more to read, or the client is gone
        finally:
            sock.close()
        now = time.monotonic()
        with self._count_lock:
            self._refused += 1
            if now - self._busy_logged < _BUSY_LOG_EVERY:
                return
            refused, self._refused, self._busy_logged = self._refused, 0, now
        log.warning("http.busy", refused=refused, max_connections=self.max_connections)


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
        if self._server.deadlines.was_cut(self.connection):
            # What arrived before the cut (``GET /hea``) is not a request to answer.
            self.close_connection = True
            return False
        return super().parse_request()

    @property
    def _server(self) -> Server:
        return cast(Server, self.server)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The base class's own refusals (bad request line, unknown method…), as JSON."""
        self.close_connection = True
        self._send(Reply.error(code, message or HTTPStatus(code).phrase))

    def do_GET(self) -> None:
        """Every method goes through one dispatcher, so the app can answer 405 with Allow."""
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_GET

    def __getattr__(self, name: str) -> Any:
        """Any other method (TRACE, QUERY, one of an extension…) is dispatched too, where
        the base class would answer 501: the route knows which methods it allows, and a
        client is better served by 405 with ``Allow`` than by "not implemented"."""
        if name.startswith("do_"):
            return self.do_GET
        raise AttributeError(name)

    # -- dispatch

    def _dispatch(self) -> None:
        if self._server.deadlines.was_cut(self.connection):
            # Cut off while sending its headers: they ended early, nobody is listening.
            self.close_connection = True
            return
        path = self._path()
        query = self._target().partition("?")[2]
        if not self._announces_body():
            self._request_read()
        request = Request(self.command, path, query, self.headers, self._read_json_body)
        try:
            reply = self._server.app(request)
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

    def _target(self) -> str:
        """The request target without its fragment."""
        return str(getattr(self, "path", "")).split("#", 1)[0]

    def _path(self) -> str:
        """The request path without query or fragment (never normalised: no ``..`` magic)."""
        return self._target().split("?", 1)[0]

    def _announces_body(self) -> bool:
        """Whether the client announced a body (one still to come after the headers)."""
        length = (self.headers.get("Content-Length") or "").strip()
        return bool(self.headers.get("Transfer-Encoding")) or length not in ("", "0")

    def _request_read(self) -> None:
        """The whole request is in: from now on the answer's deadline applies."""
        self._server.deadlines.set(self.connection, self._server.answer_deadline)

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
        declared = (self.headers.get("Content-Length") or "").strip()
        if self.headers.get("Content-Length") is None or self.headers.get("Transfer-Encoding"):
            self.close_connection = True  # a chunked body we will not parse
            raise _Refused(Reply.error(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required"))
        # isdigit() alone would let "١٢" (Arabic digits) through, and int() "1_0" or "+1".
        if not (declared.isascii() and declared.isdigit()):
            raise InputError("Content-Length must be a number of bytes")
        # int() refuses more than 4,300 digits (a ValueError, so a 500): never needed.
        self._unread = int(declared) if len(declared) <= 18 else _TOO_LONG
        if self._unread > MAX_BODY:
            shown = declared if len(declared) <= 18 else f"{len(declared)} digits long"
            raise _Refused(
                Reply.error(
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                    f"body must be at most {MAX_BODY} bytes (Content-Length is {shown})",
                )
            )
        expected, self._unread = self._unread, 0
        body = self.rfile.read(expected)
        if len(body) < expected:
            # The client hung up or was cut off at its deadline: a truncated body may
            # still parse (trailing spaces), but it is not what was sent.
            self.close_connection = True
            raise TimeoutError("the body ended before its Content-Length")
        self._request_read()
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
