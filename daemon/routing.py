"""The vocabulary of the HTTP route table: what a route is, and how a path finds it.

:data:`daemon.http.ROUTES` is a tuple of :class:`Route`; :mod:`daemon.http` routes
requests with it and :mod:`daemon.openapi` documents it, so a route and its
documentation are one line of that table. A route names its handler (a method of
:class:`~daemon.http.HttpServer`), its path pattern, whether it needs the bearer token,
its parameters (:class:`Param`), its request body and its answers (:class:`Answer`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from daemon.http_protocol import Reply, Request

if TYPE_CHECKING:
    from daemon.http import HttpServer

#: Media types of the answers (the JSON one is :class:`Reply`'s default).
JSON = "application/json"
HTML = "text/html"
TEXT = "text/plain"


@dataclass(frozen=True, slots=True)
class Param:
    """A query or path parameter of a route, as the OpenAPI document shows it.

    Attributes:
        name: as it appears in the query string or the ``{name}`` of the path pattern.
        where: ``query`` or ``path``.
        schema: its JSON Schema (as the route's handler checks it: a value the schema
            refuses gets a 400, one it accepts never does).
        description: one sentence for the reader.
    """

    name: str
    where: str
    schema: Mapping[str, Any]
    description: str


@dataclass(frozen=True, slots=True)
class Answer:
    """One answer a route may give.

    Attributes:
        description: when it is given.
        schema: the name of its body's schema in :mod:`daemon.openapi`
            (``Error`` by default: ``{"error": "..."}``), or None for a body that is not JSON.
        media: its Content-Type (without parameters).
        headers: names of the headers it carries, described in :mod:`daemon.openapi`.
    """

    description: str
    schema: str | None = "Error"
    media: str = JSON
    headers: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Route:
    """One method of one path: what routing dispatches on and what the document says.

    ``HEAD`` is never listed: it is served wherever ``GET`` is, by the ``GET`` route.

    Attributes:
        method: ``GET``, ``POST`` or ``DELETE``.
        path: the pattern; a ``{name}`` segment matches one path segment, handed to the
            handler percent-decoded (``/tags/a%2Fb`` is the tag ``a/b``).
        handler: the :class:`HttpServer` method that answers.
        summary: one line for the document.
        answers: every status the route itself gives, with its body; the protocol's own
            answers (:data:`COMMON_ANSWERS`) are added to every route.
        params: its query and path parameters.
        body: the name of its request body's schema in :mod:`daemon.openapi`, if any.
        auth: whether it needs ``SMSPARTNER_HTTP_TOKEN`` as a bearer token (when set).
    """

    method: str
    path: str
    handler: Callable[[HttpServer, Call], Reply]
    summary: str
    answers: Mapping[int, Answer]
    params: tuple[Param, ...] = ()
    body: str | None = None
    auth: bool = False

    def match(self, path: str) -> dict[str, str] | None:
        """The path parameters, still percent-encoded, when ``path`` fits the pattern;
        None when it does not. A parameter never spans a ``/``, and may be empty (the
        handler says why an empty tag is wrong)."""
        pattern, given = self.path.split("/"), path.split("/")
        if len(pattern) != len(given):
            return None
        found: dict[str, str] = {}
        for want, got in zip(pattern, given, strict=True):
            if want.startswith("{") and want.endswith("}"):
                found[want[1:-1]] = got
            elif want != got:
                return None
        return found


@dataclass(frozen=True, slots=True)
class Call:
    """One routed request, as a route's handler receives it.

    Attributes:
        request: the request (method, query, headers, body reader).
        params: the path parameters, percent-decoded.
    """

    request: Request
    params: Mapping[str, str]


def allowed_methods(routes: Iterable[Route]) -> str:
    """The ``Allow`` header for a path served by ``routes``: ``HEAD`` wherever ``GET``."""
    methods = {route.method for route in routes}
    if "GET" in methods:
        methods.add("HEAD")
    return ", ".join(sorted(methods))
