"""A fast static SMS Partner page server on loopback, for the benchmarks.

It answers ``GET …/bulk-status-by-tag?…&tag=…&page=N`` with pages rendered once, at start,
as complete HTTP responses: serving one is a single ``sendall``. The bundled simulator
encodes every page on request (and is a test double with faults to inject), so timing a
poller against it counts the server's work too; against this server what a benchmark
measures is the client: its requests, parsing and storage.

* The served tag's pages hold 1,000 items each; a page past the last is an empty list,
  as the provider's is.
* Any other tag gets the provider's code 4 ("message not found"), with HTTP 200.
* Connections are kept alive (httpx) or closed when the client asks (urllib), one
  thread per connection.

It runs in a child process, as a real provider would be elsewhere, so its threads never
compete with the measured process for the GIL. ``serve(kind)`` switches between the item
sets ``first`` (1 % waiting) and ``changed`` (that 1 % delivered since), and
``requests()`` counts the requests answered so far.
"""

from __future__ import annotations

import json
import multiprocessing
import socket
import threading
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

TAG = "bench"
KEY = "bench-api-key-0001"
SENT = datetime(2026, 11, 26, 8, 0, tzinfo=UTC)
PAGE_SIZE = 1000


def items(n: int, changed: bool) -> list[dict[str, object]]:
    """99 % delivered, 1 % waiting; with ``changed`` that 1 % is delivered too."""
    out: list[dict[str, object]] = []
    for i in range(n):
        waiting = i % 100 == 0 and not changed
        date = (
            SENT
            + timedelta(seconds=30 if not waiting else 0)
            + timedelta(minutes=90 if changed and i % 100 == 0 else 0)
        )
        out.append(
            {
                "phoneNumber": f"+336{i:08d}",
                "status": "Waiting" if waiting else "Delivered",
                "stopSMS": i % 997 == 0,
                "date": str(int(date.timestamp())),
            }
        )
    return out


def _response(body: dict[str, object]) -> tuple[bytes, bytes]:
    """An HTTP answer as (status line and headers, body): the blank line goes between."""
    data = json.dumps(body, separators=(",", ":")).encode()
    head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
    return head.encode(), data


def render(all_items: list[dict[str, object]]) -> list[tuple[bytes, bytes]]:
    """Every page of ``all_items`` as an HTTP answer."""
    pages = [all_items[i : i + PAGE_SIZE] for i in range(0, len(all_items), PAGE_SIZE)]
    return [
        _response(
            {
                "success": True,
                "code": 200,
                "currentPage": number,
                "total": len(all_items),
                "StatutResponse_List": page,
            }
        )
        for number, page in enumerate(pages, start=1)
    ]


class PageServer:
    """The server in a child process; a context manager that stops it on exit."""

    def __init__(self, numbers: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._pipe, child = ctx.Pipe()
        self._proc = ctx.Process(target=_run, args=(child, numbers), daemon=True)
        self._proc.start()
        self.url: str = self._pipe.recv()

    def serve(self, kind: str) -> None:
        """Serve the item set ``kind`` (``first`` or ``changed``) from now on."""
        self._pipe.send(kind)
        assert self._pipe.recv() == "ok"

    def requests(self) -> int:
        """How many requests the server has answered since it started."""
        self._pipe.send("count")
        count: int = self._pipe.recv()
        return count

    def close(self) -> None:
        """Stop the child process."""
        self._pipe.send("stop")
        self._proc.join(10)

    def __enter__(self) -> PageServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _run(pipe: Any, numbers: int) -> None:
    sets = {"first": render(items(numbers, False)), "changed": render(items(numbers, True))}
    state: dict[str, Any] = {"pages": sets["first"], "count": 0}
    lock = threading.Lock()
    listener = socket.create_server(("127.0.0.1", 0), backlog=128)
    threading.Thread(target=_accept, args=(listener, state, lock), daemon=True).start()
    pipe.send(f"http://127.0.0.1:{listener.getsockname()[1]}/v1")
    while (command := pipe.recv()) != "stop":
        if command == "count":
            with lock:
                pipe.send(state["count"])
        else:
            state["pages"] = sets[command]
            pipe.send("ok")
    listener.close()


def _accept(listener: socket.socket, state: dict[str, Any], lock: threading.Lock) -> None:
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return  # closed at stop
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=_connection, args=(conn, state, lock), daemon=True).start()


def _connection(conn: socket.socket, state: dict[str, Any], lock: threading.Lock) -> None:
    """Answer the requests of one connection until the client closes it or asks to."""
    code4 = _response({"success": False, "code": 4, "message": "Message not found"})
    buffer = b""
    with conn:
        while True:
            while b"\r\n\r\n" not in buffer:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buffer += chunk
            request, _, buffer = buffer.partition(b"\r\n\r\n")  # GETs carry no body
            lines = request.decode("latin-1").split("\r\n")
            query = parse_qs(urlsplit(lines[0].split(" ")[1]).query)
            close = any(line.lower() == "connection: close" for line in lines[1:])
            if query.get("tag") == [TAG]:
                pages: list[tuple[bytes, bytes]] = state["pages"]
                number = int(query.get("page", ["1"])[0])
                if 1 <= number <= len(pages):
                    answer = pages[number - 1]
                else:
                    total = len(pages) * PAGE_SIZE
                    answer = _response(
                        {
                            "success": True,
                            "code": 200,
                            "currentPage": number,
                            "total": total,
                            "StatutResponse_List": [],
                        }
                    )
            else:
                answer = code4
            head, body = answer
            conn.sendall(head + (b"Connection: close\r\n\r\n" if close else b"\r\n") + body)
            with lock:
                state["count"] += 1
            if close:
                return
