"""A fake SMS Partner API on loopback, for tests, benchmarks and the ``demo`` verb.

It serves ``GET /v1/bulk-status-by-tag?apiKey=…&tag=…&page=N`` and the account's STOP
list, ``GET /v1/stop-sms/list?apiKey=…&page=N`` (:class:`~daemon.campaigns.StopList`),
the way the provider documents them (see design.md, "What the provider documents"),
over a real HTTP server, so the client is exercised down to sockets, keep-alive and URL
encoding rather than against a mock of itself.

What it models:

- Realistic, evolving statuses (:mod:`daemon.campaigns`): every number gets a report
  delay and a final outcome from a seeded generator, and what is served depends only on
  the simulated clock, so a test can jump to "48 hours later" without waiting.
- The undocumented edges the client must survive: pagination servers that ignore or echo
  ``page``, endless pages, rate limits, HTML error pages, truncated or reset responses,
  malformed items (:meth:`Simulator.set_items`). Faults are queued with
  :meth:`Simulator.inject` or drawn at random with ``fault_rate``.
- Hostile providers: one that trickles its answer a few bytes at a time (``trickle``),
  one that echoes the key back escaped in a JSON message or an HTML error page
  (``echo_key``, ``echo_key_html``), one whose ``total`` and ``currentPage`` lie
  (``lying_total``).

Every request is recorded (:attr:`Simulator.requests`) so tests can assert what the
client actually sent.

The ``smspartner-status simulator`` verb that serves it standalone is
:mod:`daemon.simulator_cli`.
"""

from __future__ import annotations

import contextlib
import html
import json
import random
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from daemon.campaigns import StopList, as_utc

#: The paths served; everything else is a 404.
STATUS_PATH = "/v1/bulk-status-by-tag"
STOP_LIST_PATH = "/v1/stop-sms/list"
#: The ``tag`` of :meth:`Simulator.inject` that aims a fault at ``/stop-sms/list`` only
#: (a fault without a tag hits whichever request comes next, on either path).
STOP_LIST_TAG = "/stop-sms/list"

#: Fault names accepted by :meth:`Simulator.inject`.
FAULTS = (
    "500",
    "503",
    "429",
    "429json",
    "html",
    "truncated",
    "slow",
    "wrong_key",
    "not_found",
    "reset",
    "ignore_page",
    "echo_page",
    "endless",
    "trickle",
    "echo_key",
    "echo_key_html",
    "lying_total",
)
#: Transient faults drawn per request when ``fault_rate`` > 0: ones a client must retry.
RANDOM_FAULTS = ("500", "429", "html", "truncated")
# Parameters each fault understands; anything else is a typo worth a ValueError.
_FAULT_PARAMS: dict[str, frozenset[str]] = {
    "429": frozenset({"retry_after"}),
    "html": frozenset({"status"}),
    "slow": frozenset({"seconds"}),
    "trickle": frozenset({"bytes", "interval"}),
    "echo_key_html": frozenset({"status"}),
    "lying_total": frozenset({"total", "current_page"}),
}

_ENDLESS_TOTAL = 1_000_000_000
_HTML_PAGE = (
    b"<html><head><title>502 Bad Gateway</title></head><body>"
    b"<center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>"
)


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the simulator received it, after URL decoding.

    Attributes:
        path: The URL path, without the query string.
        tag: The ``tag`` parameter, or None when absent.
        page: The ``page`` parameter as an int, or None when absent or not a number.
        api_key: The ``apiKey`` parameter, or None when absent.
        at: The simulated time the request arrived (aware UTC).
    """

    path: str
    tag: str | None
    page: int | None
    api_key: str | None
    at: datetime


@dataclass
class _Fault:
    kind: str
    tag: str | None
    remaining: int | None  # None: forever
    params: dict[str, float]


@dataclass
class _Reply:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    reset_after: int | None = None  # send this many body bytes, then reset the connection
    drop: bool = False  # reset the connection without answering at all
    trickle: tuple[int, float] | None = None  # send the whole answer N bytes every S s


class _Server(ThreadingHTTPServer):
    """The HTTP server, tracking open connections so :meth:`Simulator.stop` is prompt.

    httpx keeps connections alive, so handler threads sit in ``readline`` until the
    client hangs up; shutting their sockets down lets ``server_close`` join them.
    """

    daemon_threads = True
    block_on_close = True

    def __init__(self, address: tuple[str, int], simulator: Simulator) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.simulator = simulator
        self.open_connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        # Tracked here, in the accepting thread, so stop() cannot miss a new connection.
        with self.connections_lock:
            self.open_connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.open_connections.discard(request)
        super().shutdown_request(request)

    def drop_connections(self) -> None:
        """Shut every open connection down so idle keep-alive handlers return."""
        with self.connections_lock:
            connections = list(self.open_connections)
        for conn in connections:
            with contextlib.suppress(OSError):  # already closed by its handler
                conn.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up mid-response (and our own "reset" fault) are routine here.
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so every reply carries Content-Length
    server_version = "smspartner-simulator/1"
    # Headers and body are two writes; with Nagle on, a small body waits for the client's
    # delayed ACK (~40 ms per request).
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Stay silent: the CLI's stdout carries one line only, and tests want quiet."""

    def do_GET(self) -> None:
        """Answer one request; the simulator decides what, this method only sends it."""
        length = self.headers.get("Content-Length", "")
        if length.isdigit():
            self.rfile.read(int(length))  # keep the keep-alive stream aligned
        parts = urlsplit(self.path)
        reply = self.server.simulator._reply(parts.path, parts.query)
        if reply.drop:
            self._reset()
            return
        if reply.trickle is not None:
            self._trickle(reply, *reply.trickle)
            return
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if reply.reset_after is None:
            self.wfile.write(reply.body)
            return
        self.wfile.write(reply.body[: reply.reset_after])
        self._reset()

    def _trickle(self, reply: _Reply, size: int, interval: float) -> None:
        """Send the whole answer, status line and headers included, ``size`` bytes every
        ``interval`` seconds: every read the client makes succeeds, slowly."""
        head = [f"HTTP/1.1 {reply.status} {self.responses[reply.status][0]}"]
        head.append(f"Content-Type: {reply.content_type}")
        head.append(f"Content-Length: {len(reply.body)}")
        head.extend(f"{name}: {value}" for name, value in reply.headers.items())
        answer = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + reply.body
        stopping = self.server.simulator._stopping
        for start in range(0, len(answer), size):
            if start and stopping.wait(interval):
                break  # stop() while trickling: hang up, as a server going down would
            self.wfile.write(answer[start : start + size])
        self.close_connection = True

    def _reset(self) -> None:
        """Close the connection abruptly, as a crashing server or proxy would."""
        # Linger 0 turns close into a TCP RST instead of an orderly FIN: an abrupt drop.
        # The close takes effect once finish() releases rfile.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()


class Simulator(StopList):
    """The fake SMS Partner API: what is served (:class:`~daemon.campaigns.StopList`),
    the simulated clock, faults, and the server that serves them.

    Use it as a context manager (``with Simulator() as sim: …``) so the socket and its
    threads are closed even when a test fails.

    Args:
        api_key: The only key accepted; others get code 10, none gets code 1.
        seed: Seeds phone numbers, delays, outcomes and random faults, for replayable runs.
        page_size: Items per page, unless a tag overrides it.
        time_scale: Simulated seconds per real second when no ``clock`` is given
            (5760 plays the 48-hour report window in 30 seconds).
        clock: Returns the simulated now; lets tests and benchmarks jump in time.
        host: Address to bind; loopback by default.
        port: Port to bind; 0 picks a free one (read it back from :attr:`url`).
        error_http_status: HTTP status sent with provider error bodies (codes 1, 10, 4).
            The docs show them with 200; elsewhere the API uses 4xx.
        fault_rate: Probability in [0, 1] that a request gets a random transient fault
            from :data:`RANDOM_FAULTS` when no injected fault applies.

    Raises:
        ValueError: On a page size below 1, a non-positive time scale, or a fault rate
            outside [0, 1].
    """

    def __init__(
        self,
        *,
        api_key: str = "simulator-key",
        seed: int = 0,
        page_size: int = 500,
        time_scale: float = 1.0,
        clock: Callable[[], datetime] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        error_http_status: int = 200,
        fault_rate: float = 0.0,
    ) -> None:
        if page_size < 1:
            raise ValueError(f"page_size must be at least 1, got {page_size}")
        if not time_scale > 0:
            raise ValueError(f"time_scale must be positive, got {time_scale}")
        if not 0.0 <= fault_rate <= 1.0:
            raise ValueError(f"fault_rate must be between 0 and 1, got {fault_rate}")
        super().__init__(seed=seed)
        self.api_key = api_key
        self.page_size = page_size
        self.time_scale = time_scale
        self.host = host
        self.port = port
        self.error_http_status = error_http_status
        self.fault_rate = fault_rate
        self.requests: list[RecordedRequest] = []
        self._clock = clock
        # Simulated time runs from construction, so tags added before start() are "now".
        self._epoch = datetime.now(UTC)
        self._monotonic = time.monotonic()
        self._faults: list[_Fault] = []
        self._fault_rng = random.Random(f"{seed}\x00faults")
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # -- lifecycle ---------------------------------------------------------------

    @property
    def url(self) -> str:
        """The base URL to give the client, e.g. ``http://127.0.0.1:43817/v1``.

        Raises:
            RuntimeError: Before :meth:`start`, when no port is bound yet.
        """
        if self._server is None:
            raise RuntimeError("the simulator is not started")
        address = self._server.server_address
        host = address[0].decode() if isinstance(address[0], bytes) else str(address[0])
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{address[1]}/v1"

    def start(self) -> Simulator:
        """Bind the socket and serve in a background thread.

        Returns:
            The simulator itself, so ``sim = Simulator().start()`` reads naturally.

        Raises:
            RuntimeError: If already started.
            OSError: If the address cannot be bound (port in use, bad host).
        """
        if self._server is not None:
            raise RuntimeError("the simulator is already started")
        self._stopping = threading.Event()
        self._server = _Server((self.host, self.port), self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.02},  # stop() waits at most this long
            name="smspartner-simulator",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, drop open connections and join every thread; idempotent."""
        server, thread = self._server, self._thread
        if server is None:
            return
        self._server = self._thread = None
        self._stopping.set()  # wakes "slow" handlers and serve_forever()
        server.shutdown()
        server.drop_connections()
        server.server_close()
        if thread is not None:
            thread.join()

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def serve_forever(self) -> None:
        """Serve until Ctrl-C (KeyboardInterrupt) or :meth:`stop`; for the CLI verb."""
        if self._server is None:
            self.start()
        stopping = self._stopping
        try:
            # A timed wait keeps the main thread responsive to signals on every platform.
            while not stopping.wait(0.2):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    # -- time --------------------------------------------------------------------

    def now(self) -> datetime:
        """The simulated now, aware UTC: the injected clock, or scaled real time."""
        if self._clock is not None:
            return as_utc(self._clock())
        elapsed = (time.monotonic() - self._monotonic) * self.time_scale
        return self._epoch + timedelta(seconds=elapsed)

    # -- faults ------------------------------------------------------------------

    def inject(
        self, fault: str, *, tag: str | None = None, times: int | None = 1, **params: float
    ) -> None:
        """Queue ``fault`` for the next ``times`` requests that match ``tag``.

        Faults are consumed in FIFO order, one per request; a request matches a fault
        whose tag is None or equal to the request's ``tag`` parameter.

        Args:
            fault: One of :data:`FAULTS`.
            tag: Only requests for this tag; None means any request to the endpoint.
            times: How many requests; None means until :meth:`clear_faults`.
            **params: ``retry_after`` for "429" (default 1), ``status`` for "html" (200 or
                502, default 200), ``seconds`` for "slow" (required); for "trickle",
                ``bytes`` sent every ``interval`` seconds (default 1 every 2 s); for
                "echo_key_html", ``status`` (default 403); for "lying_total", the
                ``total`` to claim (default 1) and, if given, the ``current_page`` to
                claim on every page.

        Raises:
            ValueError: On an unknown fault, an unknown or missing parameter, or
                ``times`` below 1.
        """
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; expected one of {', '.join(FAULTS)}")
        unknown = set(params) - _FAULT_PARAMS.get(fault, frozenset())
        if unknown:
            raise ValueError(f"fault {fault!r} takes no parameter {', '.join(sorted(unknown))}")
        if fault == "slow" and "seconds" not in params:
            raise ValueError("fault 'slow' needs seconds=…")
        if times is not None and times < 1:
            raise ValueError(f"times must be at least 1 or None, got {times}")
        with self._lock:
            self._faults.append(_Fault(fault, tag, times, dict(params)))

    def clear_faults(self) -> None:
        """Forget every queued fault (``fault_rate`` still applies)."""
        with self._lock:
            self._faults.clear()

    def _next_fault(self, tag: str | None) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.tag is None or fault.tag == tag:
                    if fault.remaining is not None:
                        fault.remaining -= 1
                        if fault.remaining == 0:
                            self._faults.remove(fault)
                    return fault
            if self.fault_rate and self._fault_rng.random() < self.fault_rate:
                return _Fault(self._fault_rng.choice(RANDOM_FAULTS), None, 1, {})
        return None

    # -- requests ----------------------------------------------------------------

    def request_count(self, tag: str | None = None, *, page: int | None = None) -> int:
        """How many requests arrived: all of them, or those for one tag, or one page (a
        count of ``page=1`` requests is a count of polls)."""
        with self._lock:
            return sum(
                1
                for r in self.requests
                if (tag is None or r.tag == tag) and (page is None or r.page == page)
            )

    def _reply(self, path: str, query: str) -> _Reply:
        """Decide the reply to one request: record it, apply a fault, else serve it."""
        params = parse_qs(query, keep_blank_values=True)
        api_key = params.get("apiKey", [None])[0]
        tag = params.get("tag", [None])[0]
        page_text = params.get("page", [None])[0]
        try:
            page = int(page_text) if page_text is not None else None
        except ValueError:
            page = None
        now = self.now()
        with self._lock:
            self.requests.append(RecordedRequest(path, tag, page, api_key, now))
        if path not in (STATUS_PATH, STOP_LIST_PATH):
            return _Reply(404, b"Not Found", "text/plain")
        listing = path == STOP_LIST_PATH
        # An absent, unparsable or non-positive page is read as the first one.
        asked = page if page is not None and page >= 1 else 1
        fault = self._next_fault(STOP_LIST_TAG if listing else tag)
        kind = fault.kind if fault else ""
        if kind == "500":
            return _Reply(500, b"Internal Server Error", "text/plain")
        if kind == "503":
            return _error(503, 503, "Service unavailable")
        if kind == "429":
            retry_after = fault.params.get("retry_after", 1) if fault else 1
            reply = _error(429, 429, "Too many requests")
            reply.headers["Retry-After"] = f"{retry_after:g}"
            return reply
        if kind == "429json":
            return _error(200, 429, "Too many requests")
        if kind == "html":
            status = int(fault.params.get("status", 200)) if fault else 200
            return _Reply(status, _HTML_PAGE, "text/html; charset=utf-8")
        if kind == "wrong_key":
            return _error(self.error_http_status, 10, "Incorrect API Key")
        if kind == "not_found":
            return _error(self.error_http_status, 4, "Message not found")
        if kind == "echo_key":
            return _echo_key_json(api_key or "")
        if kind == "echo_key_html":
            status = int(fault.params.get("status", 403)) if fault else 403
            return _echo_key_html(api_key or "", status)
        if kind == "slow" and fault and self._stopping.wait(fault.params["seconds"]):
            # stop() cut the nap short: drop the request, as a server going down would.
            return _Reply(200, b"", drop=True)
        content_page, claimed = asked, asked
        if kind == "ignore_page":
            content_page, claimed = 1, 1
        elif kind == "echo_page":
            content_page = 1
        if listing:
            reply = self._serve_stop_list(api_key, content_page, now, endless=kind == "endless")
        else:
            reply = self._serve(api_key, tag, content_page, claimed, now, endless=kind == "endless")
        if kind == "truncated":
            reply.body = reply.body[: len(reply.body) // 2]
        elif kind == "reset":
            reply.reset_after = len(reply.body) // 2
        elif kind == "trickle" and fault:
            size = max(1, int(fault.params.get("bytes", 1)))
            reply.trickle = (size, fault.params.get("interval", 2.0))
        elif kind == "lying_total" and fault and reply.status == 200:
            reply.body = _lie(reply.body, fault.params, total="nbData" if listing else "total")
        return reply

    def _serve_stop_list(
        self, api_key: str | None, page: int, now: datetime, *, endless: bool = False
    ) -> _Reply:
        """The account's STOP list, ``page_size`` entries a page, ``nbData`` in all."""
        if not api_key:
            return _error(self.error_http_status, 1, "API key required")
        if api_key != self.api_key:
            return _error(self.error_http_status, 10, "Incorrect API Key")
        start = (page - 1) * self.page_size
        if endless:  # new numbers on every page, and a count that never runs out
            data: list[Any] = [
                {"id": start + j, "phoneNumber": f"+3368{(start + j) % 10**7:07d}"}
                for j in range(self.page_size)
            ]
            count = _ENDLESS_TOTAL
        else:
            items = self.stop_list_items(now)
            data, count = items[start : start + self.page_size], len(items)
        payload = {"success": True, "code": 200, "nbData": count, "data": data}
        return _Reply(200, json.dumps(payload, default=str).encode())

    def _serve(
        self,
        api_key: str | None,
        tag: str | None,
        page: int,
        claimed: int,
        now: datetime,
        *,
        endless: bool = False,
    ) -> _Reply:
        """The documented answer: an error body, or one page of the tag."""
        if not api_key:
            return _error(self.error_http_status, 1, "API key required")
        if api_key != self.api_key:
            return _error(self.error_http_status, 10, "Incorrect API Key")
        t = now.timestamp()
        with self._lock:
            state = self._tags.get(tag) if tag else None
            if state is None and not (endless and tag):
                return _error(self.error_http_status, 4, "Message not found")
            size = (state.page_size if state else None) or self.page_size
            if endless:
                # Brand-new numbers on every page, however far: a server that never ends.
                start = (page - 1) * size
                items: list[Any] = [
                    {
                        "phoneNumber": f"+3367{(start + j) % 10**7:07d}",
                        "status": "Waiting",
                        "stopSMS": False,
                        "date": str(int(t)),
                    }
                    for j in range(size)
                ]
                total = _ENDLESS_TOTAL
            else:
                assert state is not None  # for mypy: only endless serves unknown tags
                items = state.items((page - 1) * size, page * size, t)
                total = len(state)
        payload = {
            "success": True,
            "code": 200,
            "currentPage": claimed,
            "total": total,
            "StatutResponse_List": items,
        }
        # default=str: set_items may hold anything; serve it rather than fail the request.
        return _Reply(200, json.dumps(payload, default=str).encode())


def _error(http_status: int, code: int, message: str) -> _Reply:
    body = {"success": False, "code": code, "message": message}
    return _Reply(http_status, json.dumps(body).encode())


def _escaped_spellings(key: str) -> list[str]:
    """The key as careless error pages echo it: raw, JSON-escaped (``\\/``,
    ``\\u00e9``), HTML-escaped (``&amp;``, ``&#47;``) and lowercase percent-encoded."""
    json_escaped = json.dumps(key)[1:-1].replace("/", "\\/")
    html_escaped = html.escape(key).replace("/", "&#47;")
    percent = quote(key, safe="").lower()
    return [key, json_escaped, html_escaped, percent]


def _echo_key_json(key: str) -> _Reply:
    """Code 10 with a message echoing the key; written by hand, so the JSON-escaped
    spelling reaches the client as is (``json.dumps`` would not escape ``/``)."""
    _, json_escaped, html_escaped, percent = _escaped_spellings(key)
    message = f"Incorrect API Key {json_escaped} ({html_escaped}, {percent})"
    body = '{"success": false, "code": 10, "message": "' + message + '"}'
    return _Reply(200, body.encode())


def _echo_key_html(key: str, status: int) -> _Reply:
    """An HTML error page echoing the key in every careless spelling."""
    items = "".join(f"<li>{spelling}</li>" for spelling in _escaped_spellings(key))
    page = f"<html><body><h1>Forbidden</h1><p>Unknown key:</p><ul>{items}</ul></body></html>"
    return _Reply(status, page.encode(), "text/html; charset=utf-8")


def _lie(body: bytes, params: dict[str, float], *, total: str = "total") -> bytes:
    """A page whose ``total`` (``nbData`` on the STOP list; and ``currentPage``, if
    asked) lie about what it holds."""
    payload = json.loads(body)
    payload[total] = int(params.get("total", 1))
    if "current_page" in params:
        payload["currentPage"] = int(params["current_page"])
    return json.dumps(payload, default=str).encode()
