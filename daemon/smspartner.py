"""The one module that talks HTTP to SMS Partner (``GET /bulk-status-by-tag``).

It owns the request (URL, User-Agent, URL-encoded ``apiKey``/``tag``/``page``), retries,
the mapping of transport errors, HTTP statuses and provider codes onto
:mod:`daemon.errors`, and the redaction of the API key from everything it lets out
(messages, logs, reprs; the text work is :mod:`daemon.redaction`'s). Reading the body's
envelope and items, tolerantly, is :mod:`daemon.responses`'s; when a request may go out
(the rate limit, the wait before a retry, the shutdown deadline) is :mod:`daemon.pacing`'s.

Pagination is not documented by the provider: responses carry ``currentPage`` and
``total`` but no page parameter is documented. So we send ``page=N`` (1-based) and, after
each page, check in this order:

* ``page_mismatch``: ``currentPage`` is present and is not the page we asked for; that
  page's items are discarded (a server that ignores ``page`` keeps sending page 1);
* ``empty_page``: the page has no items (or, on page 2 and later, the provider answers
  code 4 "message not found", which is how running off the end may look);
* ``total_reached``: the raw items received so far reach ``total`` (raw items, not unique
  numbers; a missing or unparsable ``total`` disables this rule);
* ``no_new_numbers``: the page brought no phone number we had not already seen; its items
  are kept (they may carry newer statuses) but asking for more would loop forever on a
  server that ignores ``page`` and sends neither ``currentPage`` nor ``total``;
* ``max_pages``: the configured hard cap was reached (logged as a warning, not at debug
  like the others: the tag may be truncated).

Hence a server that ignores ``page`` costs two requests (three at most), never a loop.
Reports come back in the order received, duplicates included: merging is the poller's
job (:func:`daemon.status.merge_reports`), so this module never decides which wins.

When the daemon stops, it gives fetches a deadline (``deadline``); a page that would start
after it, or a wait that would end after it, abandons the fetch with
:class:`~daemon.errors.PollAbandoned`, which is not an :class:`~daemon.errors.ApiError`
(:mod:`daemon.pacing` decides).
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import httpx
import orjson
import pydantic
import structlog
import tenacity

from daemon.errors import (
    ApiError,
    AuthError,
    ConfigError,
    NoMessagesError,
    PermanentApiError,
    PollAbandoned,
    RateLimitedError,
    SmsPartnerStatusError,
    TransientApiError,
)
from daemon.pacing import Pacer, retry_after_seconds
from daemon.redaction import redact, scrub
from daemon.responses import Envelope, ItemParser, envelope_or_none
from daemon.status import Report

__all__ = ["FetchResult", "SmsPartnerClient"]

_log = structlog.get_logger(__name__)

_T = TypeVar("_T")

#: A page of 1,000 numbers is ~100 KB; a body this large is hostile or broken, and
#: reading it whole would let one bad answer take the daemon's memory.
MAX_BODY_BYTES: Final = 32 * 1024 * 1024
#: How much of an unreadable body goes into an error message.
_EXCERPT_CHARS: Final = 120

_AUTH_CODES: Final = {1: "API key required", 10: "Incorrect API Key"}
_NO_MESSAGES_CODE: Final = 4
_RATE_LIMIT_CODE: Final = 429


# --- results and response models ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class FetchResult:
    """Everything one :meth:`SmsPartnerClient.fetch_tag` call learnt about a tag.

    Attributes:
        reports: every well-formed item (but those ``known`` left out), in the order
            received, not de-duplicated (the poller merges, so a number seen on two
            pages counts once there).
        pages: pages requested successfully, including the one that ended pagination.
        items: raw items received on kept pages (a ``page_mismatch`` page is not kept).
        skipped: malformed items skipped, each logged as ``api.item_skipped``.
        stop_reason: why pagination stopped; one of ``empty_page``, ``total_reached``,
            ``page_mismatch``, ``no_new_numbers``, ``max_pages``.
        numbers: distinct numbers with a well-formed item, reported or not.
    """

    reports: list[Report]
    pages: int
    items: int
    skipped: int
    stop_reason: str
    numbers: int = 0


# --- the client ---------------------------------------------------------------------


@functools.cache
def _user_agent() -> str:
    """``smspartner-status/<version>``, read lazily (nothing happens at import time)."""
    try:
        version = importlib.metadata.version("smspartner-status")
    except importlib.metadata.PackageNotFoundError:
        version = "dev"
    return f"smspartner-status/{version}"


def _is_transient(exc: BaseException) -> bool:
    return isinstance(exc, SmsPartnerStatusError) and exc.transient


class SmsPartnerClient:
    """Fetches every delivery report under a tag, page by page, politely and safely.

    Shared by the poller's thread pool: the only mutable state (the rate limiter, in its
    :class:`~daemon.pacing.Pacer`) is locked, and each :meth:`fetch_tag` call keeps its
    own parsing state.

    Args:
        http: the caller's ``httpx.Client``; it owns timeouts, proxies and its own
            lifetime (this object never closes it).
        api_key: the SMS Partner API key; it is never logged, raised or repr'd.
        base_url: e.g. ``https://api.smspartner.fr/v1``.
        max_retries: retries per request for transient errors (attempts = this + 1).
        retry_backoff: base of the full-jitter exponential backoff, in seconds.
        rate_limit_per_second: client-side request rate; 0 or less turns it off.
        max_pages: hard cap on pages per fetch.
        sleep: injected so tests never wait for real. It may return early (the
            daemon's does when shutdown begins): the wait is then checked against the
            deadline again and the rest of it slept.
        monotonic: injected clock for the rate limiter and the deadline.
        deadline: returns when a fetch must be over, on the ``monotonic`` clock, or
            None while there is no deadline (the daemon sets one when it stops). None,
            the default, means never.

    Raises:
        ConfigError: ``base_url`` is not an http(s) URL.
    """

    def __init__(
        self,
        http: httpx.Client,
        *,
        api_key: str,
        base_url: str,
        max_retries: int = 3,
        retry_backoff: float = 1.0,
        rate_limit_per_second: float = 5.0,
        max_pages: int = 1000,
        sleep: Callable[[float], None] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
        deadline: Callable[[], float | None] | None = None,
    ) -> None:
        self._http = http
        self._api_key = api_key
        self._url = f"{base_url.rstrip('/')}/bulk-status-by-tag"
        try:
            url = httpx.URL(self._url)
        except httpx.InvalidURL as exc:
            raise ConfigError(f"base URL {redact(base_url, api_key)!r} is invalid: {exc}") from None
        if url.scheme not in {"http", "https"} or not url.host:
            raise ConfigError(f"base URL {redact(base_url, api_key)!r} must be http(s)://host/…")
        # Messages name the endpoint by path only: no host, no query string, no key.
        self._path = redact(url.path, api_key)
        self._max_retries = max(0, max_retries)
        self._max_pages = max(1, max_pages)
        self._pacer = Pacer(
            rate_limit_per_second,
            retry_backoff=retry_backoff,
            sleep=sleep,
            monotonic=monotonic,
            deadline=deadline,
        )

    def __repr__(self) -> str:
        return f"SmsPartnerClient(url={redact(self._url, self._api_key)!r}, api_key='***')"

    def close(self) -> None:
        """Release what this client owns: nothing, since the ``httpx.Client`` is injected.

        Kept so callers can treat every client-like object alike; the composition root
        that built the ``httpx.Client`` closes it.
        """

    def fetch_tag(self, tag: str, known: Mapping[str, Report] | None = None) -> FetchResult:
        """Fetch every report under ``tag``, following the pagination rules above.

        ``known``: the report already stored for each number; items that read as exactly
        that are counted as seen but not reported (see
        :class:`~daemon.responses.ItemParser`).

        Raises:
            AuthError: codes 1/10, the key is missing or wrong.
            NoMessagesError: code 4 on the first page (nothing under this tag yet).
            RateLimitedError: still rate limited after every retry.
            TransientApiError: transport errors, 5xx or unreadable bodies after retries.
            PermanentApiError: anything the provider would refuse again.
            PollAbandoned: the deadline came first; ``pages`` says how far it got.
        """
        parser = ItemParser(tag, known)
        reports: list[Report] = []
        pages = items = 0
        page = 1
        while True:
            if page > self._max_pages:
                reason = "max_pages"
                break
            try:
                self._pacer.before_page(page)
                envelope = self._fetch_page(tag, page)
            except NoMessagesError:
                if page == 1:
                    raise
                # Running off the end may look like "message not found".
                pages += 1
                reason = "empty_page"
                break
            except PollAbandoned as exc:
                exc.pages = pages  # our own exception: amending it is safe
                raise
            pages += 1
            if envelope.current_page is not None and envelope.current_page != page:
                reason = "page_mismatch"
                break
            raw_items = envelope.items
            if not raw_items:
                reason = "empty_page"
                break
            items += len(raw_items)
            before = len(parser.seen)
            reports.extend(parser.parse_page(raw_items, page))
            if envelope.total is not None and items >= envelope.total:
                reason = "total_reached"
                break
            if len(parser.seen) == before:
                reason = "no_new_numbers"
                break
            page += 1
        log = _log.warning if reason == "max_pages" else _log.debug
        log(
            "api.pagination_stopped",
            tag=tag,
            reason=reason,
            pages=pages,
            items=items,
            skipped=parser.skipped,
            repeated=items - parser.skipped - len(reports),
        )
        return FetchResult(
            reports=reports,
            pages=pages,
            items=items,
            skipped=parser.skipped,
            stop_reason=reason,
            numbers=len(parser.seen),
        )

    # --- one page, with retries --------------------------------------------------------

    def _fetch_page(self, tag: str, page: int) -> Envelope:
        """One page, retried on transient errors; raises ours, never httpx's."""
        return self._with_retries(lambda: self._request_page(tag, page))

    def _with_retries(self, call: Callable[[], _T]) -> _T:
        attempts = 0

        def attempt() -> _T:
            nonlocal attempts
            attempts += 1
            return call()

        retrying = tenacity.Retrying(
            sleep=self._pacer.pause,
            stop=tenacity.stop_after_attempt(self._max_retries + 1),
            wait=self._pacer.retry_wait,
            retry=tenacity.retry_if_exception(_is_transient),
            before_sleep=self._before_retry,
            reraise=True,
        )
        try:
            return retrying(attempt)
        except ApiError as exc:
            if exc.transient and attempts > 1:
                # Say how hard we tried; our own exception, so amending it is safe.
                exc.message = f"{exc.message} (gave up after {attempts} attempts)"
                exc.args = (exc.message,)
            raise

    def _before_retry(self, retry_state: tenacity.RetryCallState) -> None:
        """Log the retry about to be waited for, unless it would come past the deadline."""
        self._pacer.before_retry(retry_state.upcoming_sleep)
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        _log.warning(
            "api.retry_scheduled",
            attempt=retry_state.attempt_number,
            wait=round(retry_state.upcoming_sleep, 3),
            error=redact(str(exc), self._api_key),
            error_type=type(exc).__name__,
        )

    # --- one HTTP request -------------------------------------------------------------

    def _request_page(self, tag: str, page: int) -> Envelope:
        self._pacer.before_request()
        where = f"GET {self._path} tag={tag!r} page={page}"
        started = time.perf_counter()
        try:
            response = self._get_bounded(tag, page, where)
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, where) from exc
        except httpx.InvalidURL as exc:
            # A bad base_url: settings should have caught it; retrying will not help.
            scrub(exc, self._api_key)
            raise PermanentApiError(self._redact(f"{where}: invalid URL ({exc})")) from exc
        _log.debug(
            "api.request",
            tag=tag,
            page=page,
            status=response.status_code,
            elapsed_ms=round((time.perf_counter() - started) * 1000, 1),
        )
        return self._classify(response, where)

    def _get_bounded(self, tag: str, page: int, where: str) -> httpx.Response:
        """GET one page, reading at most :data:`MAX_BODY_BYTES` of its body."""
        request = self._http.build_request(
            "GET",
            self._url,
            params={"apiKey": self._api_key, "tag": tag, "page": page},
            headers={"User-Agent": _user_agent()},
        )
        response = self._http.send(request, stream=True)
        try:
            declared = int(response.headers.get("Content-Length", "0") or 0)
        except ValueError:
            declared = 0
        chunks, size = [], 0
        try:
            if declared > MAX_BODY_BYTES:
                raise PermanentApiError(
                    f"{where}: response of {declared:,} bytes is over the "
                    f"{MAX_BODY_BYTES:,}-byte limit",
                    http_status=response.status_code,
                )
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    raise PermanentApiError(
                        f"{where}: response is over the {MAX_BODY_BYTES:,}-byte limit",
                        http_status=response.status_code,
                    )
                chunks.append(chunk)
        finally:
            response.close()
        # A plain Response again, so the rest of the client reads .content as usual; the
        # body is already decoded, so the headers describing its transfer go.
        headers = [
            (k, v)
            for k, v in response.headers.multi_items()
            if k.lower() not in ("content-encoding", "content-length", "transfer-encoding")
        ]
        return httpx.Response(
            response.status_code,
            headers=headers,
            content=b"".join(chunks),
            request=request,
        )

    def _transport_error(self, exc: httpx.HTTPError, where: str) -> ApiError:
        """Translate an httpx error; its message (which may hold the URL) is redacted."""
        scrub(exc, self._api_key)
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        detail = self._redact(f"{where}: {reason}")
        if isinstance(exc, httpx.UnsupportedProtocol | httpx.TooManyRedirects):
            return PermanentApiError(detail)
        return TransientApiError(detail)

    def _classify(self, response: httpx.Response, where: str) -> Envelope:
        """Map a response onto an envelope or one of our errors."""
        status = response.status_code
        if status == httpx.codes.TOO_MANY_REQUESTS:
            raise self._rate_limited(response, where, code=None)
        if status >= 500 or status == httpx.codes.REQUEST_TIMEOUT:
            raise TransientApiError(
                f"{where}: SMS Partner answered HTTP {status}", http_status=status
            )
        body = self._json_object(response)
        if not 200 <= status < 300:
            # Codes 1/10/4 may come with HTTP 400/401/404: the body says more than the status.
            envelope = envelope_or_none(body)
            if envelope is not None and envelope.is_error:
                self._raise_provider_error(envelope, response, where)
            raise PermanentApiError(
                f"{where}: SMS Partner answered HTTP {status}"
                + self._excerpt_suffix(response, body),
                http_status=status,
            )
        if body is None:
            raise TransientApiError(
                f"{where}: unreadable response (HTTP {status})" + self._excerpt_suffix(response),
                http_status=status,
            )
        envelope = self._envelope(body, where, status)
        if envelope.is_error:
            self._raise_provider_error(envelope, response, where)
        return envelope

    def _json_object(self, response: httpx.Response) -> dict[str, Any] | None:
        """The body as a JSON object, or None when it is empty, HTML, truncated or a list."""
        content = response.content
        try:
            body = orjson.loads(content)
        except orjson.JSONDecodeError:
            # orjson is stricter than json (UTF-8 without BOM, no NaN, no lone
            # surrogates): what it refuses gets the standard parser's verdict, so a body
            # json reads is never lost. (It reads integers past 64 bits as floats; the
            # one field read as an integer, a phone number, has at most 15 digits.)
            try:
                body = json.loads(content)
            except (ValueError, RecursionError):  # RecursionError: nested ~1,000 deep
                return None
        return body if isinstance(body, dict) else None

    def _envelope(self, body: dict[str, Any], where: str, status: int) -> Envelope:
        try:
            return Envelope.model_validate(body)
        except pydantic.ValidationError as exc:
            error = exc.errors()[0]
            field = ".".join(str(part) for part in error["loc"]) or "response"
            raise TransientApiError(
                self._redact(f"{where}: unexpected response, field {field}: {error['msg']}"),
                http_status=status,
            ) from None  # pydantic's error repeats the input, which could be huge

    def _raise_provider_error(
        self, envelope: Envelope, response: httpx.Response, where: str
    ) -> None:
        """Raise the error a provider ``code`` means (the body said ``success: false``)."""
        code = envelope.code
        status = response.status_code
        # Redact before truncating, so a key cut in half cannot slip through.
        text = self._redact((envelope.message or "").strip())[:200]
        if code in _AUTH_CODES:
            raise AuthError(
                f"SMS Partner rejected the API key (code {code}: {text or _AUTH_CODES[code]})",
                code=code,
                http_status=status,
            )
        if code == _NO_MESSAGES_CODE:
            raise NoMessagesError(
                f"{where}: no messages under this tag (code 4: {text or 'message not found'})",
                code=code,
                http_status=status,
            )
        if code == _RATE_LIMIT_CODE:
            raise self._rate_limited(response, where, code=code)
        detail = f"code {code}" if code is not None else "no code"
        raise PermanentApiError(
            f"{where}: SMS Partner refused the request ({detail}: {text or 'no message'})",
            code=code,
            http_status=status,
        )

    def _rate_limited(
        self, response: httpx.Response, where: str, *, code: int | None
    ) -> RateLimitedError:
        retry_after = retry_after_seconds(response.headers)
        _log.warning(
            "api.rate_limited",
            http_status=response.status_code,
            code=code,
            retry_after=retry_after,
            where=where,
        )
        suffix = f", retry after {retry_after:g}s" if retry_after is not None else ""
        return RateLimitedError(
            f"{where}: rate limited by SMS Partner (HTTP {response.status_code}"
            f"{f', code {code}' if code is not None else ''}{suffix})",
            retry_after=retry_after,
            code=code,
            http_status=response.status_code,
        )

    def _excerpt_suffix(self, response: httpx.Response, body: object = None) -> str:
        """A short, redacted excerpt of a body we could not use, for the error message."""
        if body is not None:
            return ""
        # Redact a generous prefix first, then cut: cutting first could split the key.
        raw = response.content[:4096].decode("utf-8", "replace")
        excerpt = " ".join(self._redact(raw).split())[:_EXCERPT_CHARS]
        if not excerpt:
            return ": empty body"
        return f": body starts {excerpt!r}"

    def _redact(self, text: str) -> str:
        return redact(text, self._api_key)
