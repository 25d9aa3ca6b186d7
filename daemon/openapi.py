"""The OpenAPI 3.1 document of ``run``'s HTTP surface, served as ``GET /openapi.json``.

The document is generated from :data:`daemon.http.ROUTES`, the table the server routes
with, so a route cannot be served undocumented or documented unserved, and each
operation lists exactly the statuses its route declares plus the protocol's own
(:data:`daemon.http.COMMON_ANSWERS`). What the table names but does not spell out lives
here: the JSON Schemas of bodies (:data:`SCHEMAS`, with examples) and the headers.

Conventions the generator applies to every route:

- ``HEAD`` is documented wherever ``GET`` is: same parameters and statuses, no body;
- a route marked ``auth`` carries the bearer security scheme and its 401, but only when
  ``SMSPARTNER_HTTP_TOKEN`` is set: without it the route is open, and the document of
  that server says so;
- an answer whose body names a tag links (OpenAPI links, which schemathesis' stateful
  phase follows) to every operation whose path takes a ``{tag}``.

The server imports this module when the document is first asked for, and hands it the
table; this module imports nothing of the server.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from daemon.db import COUNT_COLUMNS
from daemon.routing import JSON

if TYPE_CHECKING:
    from daemon.routing import Answer, Route

#: The version of the document's own shape (``info.version``); bump it with the routes.
API_VERSION = "1.0.0"

_TIME = {"type": "string", "format": "date-time", "examples": ["2026-11-26T08:30:00Z"]}
_TIME_OR_NULL = {"type": ["string", "null"], "format": "date-time"}
_COUNT = {"type": "integer", "minimum": 0}

#: A tag as :func:`daemon.status.tag_problem` takes it: no whitespace, no control
#: character. The rule also refuses the other unprintable code points (format, private-use,
#: unassigned), which a portable regular expression cannot name: the description says so.
TAG_PATTERN = r"^[^\s\x00-\x1f\x7f-\x9f]+$"
_TAG_DESCRIPTION = (
    "1–64 printable characters without whitespace, kept exactly as given (SMS Partner "
    "documents at most 20, lowercase: others are accepted with a warning). Besides the "
    "`pattern`, format, private-use and unassigned code points are refused."
)

#: The columns of ``tracked_tags`` the API shows (lease columns are the scheduler's).
_TAG_PROPERTIES: dict[str, Any] = {
    "tag": {"type": "string", "examples": ["nov-promo"]},
    "sent_at": _TIME,
    "window_ends_at": _TIME_OR_NULL,
    "state": {"enum": ["active", "completed", "expired", "untracked"]},
    "next_poll_at": _TIME_OR_NULL,
    "last_polled_at": _TIME_OR_NULL,
    "last_success_at": _TIME_OR_NULL,
    "poll_count": _COUNT,
    "consecutive_failures": _COUNT,
    "last_error": {"type": ["string", "null"]},
    "created_at": _TIME,
    "updated_at": _TIME,
}

#: The counts of the ``tag_summary`` view, as ``GET /tags`` and ``GET /tags/{tag}`` add them.
_COUNT_PROPERTIES: dict[str, Any] = {
    **dict.fromkeys(COUNT_COLUMNS, _COUNT),
    "delivery_rate": {
        "type": ["number", "null"],
        "minimum": 0,
        "maximum": 1,
        "description": "delivered / total; null while the tag has no number",
    },
}

_TAG_EXAMPLE = {
    "tag": "nov-promo",
    "sent_at": "2026-11-26T08:30:00Z",
    "window_ends_at": "2026-11-28T08:30:00Z",
    "state": "active",
    "next_poll_at": "2026-11-26T09:05:00Z",
    "last_polled_at": "2026-11-26T09:00:00Z",
    "last_success_at": "2026-11-26T09:00:00Z",
    "poll_count": 12,
    "consecutive_failures": 0,
    "last_error": None,
    "created_at": "2026-11-26T08:30:02Z",
    "updated_at": "2026-11-26T09:00:00Z",
}
_COUNTS_EXAMPLE = {
    "total": 1200,
    "waiting": 40,
    "delivered": 1130,
    "not_delivered": 25,
    "failed": 5,
    "expired": 0,
    "unknown": 0,
    "stop_sms": 3,
    "delivery_rate": 0.9417,
}


def _object(properties: Mapping[str, Any], example: Any, **extra: Any) -> dict[str, Any]:
    """A closed object schema whose every property is always present."""
    return {
        "type": "object",
        "required": list(properties),
        "properties": dict(properties),
        "additionalProperties": False,
        "examples": [example],
        **extra,
    }


#: The JSON Schemas that :class:`daemon.http.Answer` and ``Route.body`` name.
SCHEMAS: dict[str, dict[str, Any]] = {
    "Error": _object(
        {"error": {"type": "string", "description": "one line naming what is wrong"}},
        {"error": "limit must be a whole number from 1 to 1000 (got '0')"},
    ),
    "Health": _object({"status": {"enum": ["ok", "stalled"]}}, {"status": "ok"}),
    "Ready": {
        "type": "object",
        "required": ["status"],
        "properties": {
            "status": {"enum": ["ready", "not ready"]},
            "problems": {"type": "array", "items": {"type": "string"}},
        },
        "additionalProperties": False,
        "examples": [
            {"status": "ready"},
            {"status": "not ready", "problems": ["API key rejected: Incorrect API Key"]},
        ],
    },
    "TagName": {
        "type": "string",
        "minLength": 1,
        "maxLength": 64,
        "pattern": TAG_PATTERN,
        # Python's `$` (jsonschema's, schemathesis') also matches before a final newline,
        # where ECMA's does not: "nov-promo\n" must be invalid in both.
        "not": {"pattern": "\\n"},
        "description": _TAG_DESCRIPTION,
        "examples": ["nov-promo"],
    },
    "TrackRequest": {
        "type": "object",
        "required": ["tag"],
        "properties": {
            "tag": {"$ref": "#/components/schemas/TagName"},
            "sent_at": {
                "type": ["string", "null"],
                "format": "date-time",
                "description": "When the campaign was sent (default now); without an offset "
                "it is UTC. At most a day ahead of the daemon's clock, and early enough for "
                "its report window to end by the year 9999.",
            },
        },
        "description": "Unknown fields are ignored.",
        "examples": [{"tag": "nov-promo", "sent_at": "2026-11-26T08:30:00Z"}],
    },
    "TrackedTag": _object(
        {
            **_TAG_PROPERTIES,
            "warnings": {
                "type": "array",
                "items": {"type": "string"},
                "description": "why the tag looks unlike SMS Partner's (longer than 20, "
                "not lowercase); it is tracked all the same",
            },
        },
        {**_TAG_EXAMPLE, "warnings": []},
    ),
    "TagWithCounts": _object(
        {**_TAG_PROPERTIES, **_COUNT_PROPERTIES},
        {**_TAG_EXAMPLE, **_COUNTS_EXAMPLE},
        description="A `tracked_tags` row with the counts of `tag_summary`; `last_error` "
        "is cut to 500 characters.",
    ),
    "TagPage": {
        "type": "array",
        "items": {"$ref": "#/components/schemas/TagWithCounts"},
        "maxItems": 1000,
        "examples": [[{**_TAG_EXAMPLE, **_COUNTS_EXAMPLE}]],
    },
    "Untracked": _object(
        {"tag": {"type": "string"}, "state": {"const": "untracked"}},
        {"tag": "nov-promo", "state": "untracked"},
    ),
    "OpenApiDocument": {
        "type": "object",
        "required": ["openapi", "info", "paths"],
        "description": "This document.",
    },
}

#: The headers that :class:`daemon.http.Answer` names.
HEADERS: dict[str, dict[str, Any]] = {
    "Link": {
        "description": 'The next page, RFC 8288: `</tags?limit=100&after=nov-promo>; rel="next"` '
        "(relative to the server; the cursor percent-encoded). Absent on the last page.",
        "schema": {"type": "string"},
    },
    "Location": {
        "description": "The tag's address, `/tags/{tag}` with the tag percent-encoded.",
        "schema": {"type": "string"},
    },
    "Retry-After": {
        "description": "Seconds to wait before trying again (when the server is full).",
        "schema": {"type": "integer", "minimum": 0},
    },
    "WWW-Authenticate": {"description": "`Bearer`.", "schema": {"type": "string"}},
}

_SECURITY_SCHEME = {
    "type": "http",
    "scheme": "bearer",
    "description": "`SMSPARTNER_HTTP_TOKEN`, as `Authorization: Bearer <token>`. Only writes "
    "(`POST`, `DELETE`) need it, and only when it is set; reads stay open for probes.",
}

_DESCRIPTION = (
    "The HTTP surface of `smspartner-status run`: probes, metrics and the tracked tags. "
    'Every error is JSON `{"error": "..."}` with one line naming what is wrong: a '
    "malformed parameter or body is a 400, never a 5xx. `HEAD` is answered wherever `GET` "
    "is; any other method gets 405 with an `Allow` header. Each connection has 10 s to send "
    "its whole request and 30 s for the answer; past 64 connections at once the answer is "
    "a quick 503 with `Retry-After`."
)


def document(
    routes: Sequence[Route], common: Mapping[int, Answer], *, token_required: bool
) -> dict[str, Any]:
    """The OpenAPI document of ``routes``.

    Args:
        routes: the server's route table.
        common: answers any route may give (added to each operation's own).
        token_required: whether ``SMSPARTNER_HTTP_TOKEN`` is set, so that ``auth``
            routes need it.
    """
    tag_operations = [_operation_id(r) for r in routes if "{tag}" in r.path]
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        needs_token = route.auth and token_required
        operation = _operation(route, common, needs_token, tag_operations)
        item = paths.setdefault(route.path, {})
        item[route.method.lower()] = operation
        if route.method == "GET":
            item["head"] = _head(route, operation)
    components: dict[str, Any] = {"schemas": SCHEMAS, "headers": HEADERS}
    if token_required:
        components["securitySchemes"] = {"bearer": _SECURITY_SCHEME}
    return {
        "openapi": "3.1.0",
        "info": {"title": "smspartner-status", "version": API_VERSION, "description": _DESCRIPTION},
        "paths": paths,
        "components": components,
    }


def _operation_id(route: Route) -> str:
    """The route's handler name, in camel case (``list_tags`` → ``listTags``)."""
    first, *rest = route.handler.__name__.split("_")
    return first + "".join(word.title() for word in rest)


def _operation(
    route: Route, common: Mapping[int, Answer], needs_token: bool, tag_operations: list[str]
) -> dict[str, Any]:
    """One operation: the route's answers and the common ones, its parameters, body and
    security."""
    answers = {**common, **route.answers}
    if not needs_token:
        answers.pop(401, None)  # an open route never asks for the token
    operation: dict[str, Any] = {
        "operationId": _operation_id(route),
        "summary": route.summary,
        "responses": {
            str(status): _response(answer, common.get(status), tag_operations)
            for status, answer in sorted(answers.items())
        },
    }
    if route.params:
        operation["parameters"] = [
            {
                "name": p.name,
                "in": p.where,
                "required": p.where == "path",
                "description": p.description,
                "schema": dict(p.schema),
            }
            for p in route.params
        ]
    if route.body:
        operation["requestBody"] = {
            "required": True,
            "content": {JSON: {"schema": _ref(route.body)}},
        }
    if needs_token:
        operation["security"] = [{"bearer": []}]
    return operation


def _response(answer: Answer, common: Answer | None, tag_operations: list[str]) -> dict[str, Any]:
    """One response object. When the route's own answer shares its status with a common
    one of another body (``/readyz``'s 503), the body may be either."""
    response: dict[str, Any] = {"description": answer.description}
    if common is not None and common is not answer and common.description != answer.description:
        response["description"] += " Or: " + common.description
    if answer.schema is not None or answer.media != JSON:
        schema: dict[str, Any] = _ref(answer.schema) if answer.schema else {"type": "string"}
        if common is not None and common.schema != answer.schema and common.schema is not None:
            schema = {"anyOf": [schema, _ref(common.schema)]}
        response["content"] = {answer.media: {"schema": schema}}
    headers = dict.fromkeys((*answer.headers, *(common.headers if common else ())))
    if headers:
        response["headers"] = {name: {"$ref": f"#/components/headers/{name}"} for name in headers}
    if answer.schema and "tag" in SCHEMAS[answer.schema].get("properties", {}):
        response["links"] = {
            op[0].upper() + op[1:]: {
                "operationId": op,
                "parameters": {"tag": "$response.body#/tag"},
            }
            for op in tag_operations
        }
    return response


def _head(route: Route, get: dict[str, Any]) -> dict[str, Any]:
    """The ``HEAD`` twin of a ``GET`` operation: same parameters and statuses, no body."""
    head = {**get, "operationId": "head" + get["operationId"][0].upper() + get["operationId"][1:]}
    head["summary"] = f"Headers of GET {route.path}, without the body"
    head["responses"] = {
        status: {k: v for k, v in response.items() if k not in ("content", "links")}
        for status, response in get["responses"].items()
    }
    return head


#: A link's runtime expression: the ``tag`` of the answer's body.
_BODY_TAG = "$response.body#/tag"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}
