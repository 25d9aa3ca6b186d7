"""The one module that talks HTTP to SMS Partner (``GET /bulk-status-by-tag``).

It owns the request (URL, User-Agent, URL-encoded ``apiKey``/``tag``/``page``), retries,
the mapping of transport errors, HTTP statuses and provider codes onto
:mod:`daemon.errors`, and the redaction of the API key from everything it lets out
(messages, logs, reprs; the text work is :mod:`daemon.redaction`'s). Reading the body's
envelope and items, tolerantly, is :mod:`daemon.responses`'s; when a request may go out
(the rate limit, the wait before a retry, the shutdown deadline) is :mod:`daemon.pacing`'s.

Pagination is not documented by the provider: responses carry ``currentPage`` and
``total`` but no page parameter is documented. So we send ``page=N`` (1-based) and judge
each page by what it holds, never by what the envelope claims. After each page, in this
order, we stop on:

* ``empty_page``: the page has no items (or, on page 2 and later, the provider answers
  code 4 "message not found", which is how running off the end may look);
* ``no_new_numbers``: the page brought no phone number we had not already seen; its items
  are kept (they may carry newer statuses) but asking for more would loop forever on a
  server that ignores ``page``;
* ``short_page``: the page holds fewer items than the largest page this client has
  received (the provider's page size, as far as we know it), unless ``total`` says more
  items are to come: ``total`` may keep a fetch going, never end it. Until a first full
  page has been seen, a tag that fits on one page costs a second, empty request;
* ``max_pages``: the configured hard cap was reached (logged as a warning, not at debug
  like the others: the tag may be truncated).

``total`` and ``currentPage`` are hints only: a provider that says ``total: 1`` over
3,000 numbers, or ``currentPage: 1`` on every page, must not truncate a tag (only a page
size that shrinks while the daemon runs, together with a ``total`` too low, could). When the
items received (less a last page of repeats) disagree with ``total``, the fetch logs
``api.total_mismatch`` as a warning and calls ``on_total_mismatch`` (a Prometheus
counter in the daemon). A server that ignores ``page`` costs two requests (three at
most), never a loop. Reports come back in the order received, duplicates included:
merging is the poller's job (:func:`daemon.status.merge_reports`), so this module never
decides which wins.

Deadlines. ``request_timeout`` (``SMSPARTNER_HTTP_TIMEOUT_SECONDS``) bounds each request
as a whole, connecting, waiting and reading included, however slowly the provider
trickles its bytes: each network operation gets at most the time left, the time is
checked between chunks, and :mod:`daemon.watchdog` cuts the connection of a request
blocked past it. A fetch has a budget too (``poll_budget``): pages, retries and waits all
fit in it, or the poll fails as transient and backs off. When the daemon stops, it gives
fetches a deadline (``deadline``); a page that would start after it, a wait that would end
after it, or a request still under way at it abandons the fetch with
:class:`~daemon.errors.PollAbandoned`, which is not an :class:`~daemon.errors.ApiError`
(:mod:`daemon.pacing` decides the waits).

A body we cannot use (HTML, truncated, unexpected) is described by status, content type
and length only, never quoted: a provider may echo the key in any encoding. The provider's
``message`` is kept, cut short, once every spelling of the key is removed from it
(:func:`daemon.redaction.redact`): it is what tells "Incorrect API Key" from a quota.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, tzinfo
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
    DeadlineExceededError,
    NoMessagesError,
    PermanentApiError,
    PollAbandoned,
    RateLimitedError,
    SmsPartnerStatusError,
    TransientApiError,
)
from daemon.pacing import Budget, Pacer, retry_after_seconds
from daemon.redaction import redact, scrub
from daemon.responses import Envelope, ItemParser, envelope_or_none
from daemon.status import Report
from daemon.stoplist import StopListEnvelope, StopListPages
from daemon.watchdog import Guard, Watchdog

__all__ = ["FetchResult", "SmsPartnerClient"]

_log = structlog.get_logger(__name__)

_T = TypeVar("_T")
_E = TypeVar("_E", bound=Envelope)

#: A page of 1,000 numbers is ~100 KB; a body this large is hostile or broken, and
#: reading it whole would let one bad answer take the daemon's memory.
MAX_BODY_BYTES: Final = 32 * 1024 * 1024
#: How much of the provider's ``message`` goes into an error, once redacted.
_MESSAGE_CHARS: Final = 200
#: The whole-request deadline when the ``httpx.Client`` has no read timeout to copy.
DEFAULT_REQUEST_TIMEOUT: Final = 10.0
#: The least a poll's budget can be (see :func:`default_poll_budget`).
MIN_POLL_BUDGET: Final = 300.0

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
        stop_reason: why pagination stopped; one of ``empty_page``, ``no_new_numbers``,
            ``short_page``, ``max_pages``.
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


def default_poll_budget(
    *, request_timeout: float, max_retries: int, max_pages: int, rate_limit_per_second: float
) -> float:
    """How long one fetch may take when the caller does not say.

    Long enough for the largest fetch allowed (``max_pages`` requests at the rate limit)
    plus one page's worth of attempts, and never under :data:`MIN_POLL_BUDGET`: the
    budget is there to stop a hostile provider holding a worker for hours, not to cut a
    big tag short.
    """
    pages = max_pages / rate_limit_per_second if rate_limit_per_second > 0 else 0.0
    return max(MIN_POLL_BUDGET, pages) + (max(0, max_retries) + 1) * request_timeout


def _clean_message(text: str) -> str:
    """Provider text for an error message: one line, printable, bounded."""
    line = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return line[:_MESSAGE_CHARS]


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
        monotonic: injected clock for the rate limiter and the deadlines.
        deadline: returns when a fetch must be over, on the ``monotonic`` clock, or
            None while there is no deadline (the daemon sets one when it stops). None,
            the default, means never.
        request_timeout: seconds one request may take as a whole; None copies the
            ``httpx.Client``'s read timeout (``SMSPARTNER_HTTP_TIMEOUT_SECONDS`` in the
            daemon), or :data:`DEFAULT_REQUEST_TIMEOUT` when it has none.
        poll_budget: seconds one :meth:`fetch_tag` may take, retries and waits included;
            None means :func:`default_poll_budget`.
        on_total_mismatch: called once per fetch whose items disagree with ``total``.

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
        request_timeout: float | None = None,
        poll_budget: float | None = None,
        on_total_mismatch: Callable[[], None] | None = None,
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
        self._stop_list_url = f"{base_url.rstrip('/')}/stop-sms/list"
        self._stop_list_path = redact(httpx.URL(self._stop_list_url).path, api_key)
        self._max_retries = max(0, max_retries)
        self._max_pages = max(1, max_pages)
        if request_timeout is None:
            request_timeout = http.timeout.read or DEFAULT_REQUEST_TIMEOUT
        self._request_timeout = request_timeout
        self._poll_budget = poll_budget or default_poll_budget(
            request_timeout=request_timeout,
            max_retries=self._max_retries,
            max_pages=self._max_pages,
            rate_limit_per_second=rate_limit_per_second,
        )
        self._on_total_mismatch = on_total_mismatch
        # The largest page received so far: the provider's page size, as far as we know.
        # Shared by the worker threads; a lost update only costs a request.
        self._page_size = 0
        self._monotonic = monotonic
        self._watchdog = Watchdog(monotonic)
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
            TransientApiError: transport errors, 5xx, unreadable bodies or a request
                past its whole-request deadline, after retries; or the poll's budget ran
                out.
            PermanentApiError: anything the provider would refuse again.
            PollAbandoned: the shutdown deadline came first; ``pages`` says how far it got.
        """
        parser = ItemParser(tag, known, clean=self.redact)
        budget = self._pacer.budget(self._poll_budget)
        reports: list[Report] = []
        pages = items = last = mismatches = 0
        total: int | None = None
        page = 1
        while True:
            if page > self._max_pages:
                reason = "max_pages"
                break
            try:
                self._pacer.before_page(page, budget)
                envelope = self._fetch_page(tag, page, budget)
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
            total = envelope.total if envelope.total is not None else total
            if envelope.current_page is not None and envelope.current_page != page:
                mismatches += 1  # a hint that lies; the items decide below
            raw_items = envelope.items
            if not raw_items:
                reason = "empty_page"
                break
            last = len(raw_items)
            items += last
            before = len(parser.seen)
            reports.extend(parser.parse_page(raw_items, page))
            if len(parser.seen) == before:
                reason = "no_new_numbers"
                break
            if last < self._page_size and (total is None or items >= total):
                reason = "short_page"
                break
            self._page_size = max(self._page_size, last)
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
            total=total,
            page_mismatches=mismatches,
        )
        # A last page of repeats is a server ignoring ``page``, not more messages.
        counted = items - last if reason == "no_new_numbers" else items
        if total is not None and counted != total:
            _log.warning("api.total_mismatch", tag=tag, total=total, items=counted, reason=reason)
            if self._on_total_mismatch is not None:
                self._on_total_mismatch()
        return FetchResult(
            reports=reports,
            pages=pages,
            items=items,
            skipped=parser.skipped,
            stop_reason=reason,
            numbers=len(parser.seen),
        )

    def fetch_stop_list(self, *, zone: tzinfo, now: datetime) -> StopListPages:
        """Fetch the account's STOP list (``GET /stop-sms/list``), page by page.

        The same requests as :meth:`fetch_tag` (key, retries, rate limit, deadlines,
        budget, redaction); the pages are read, and paging is stopped, by
        :class:`~daemon.stoplist.StopListPages`, whose ``complete`` says whether the
        answer may be trusted to be the whole list.

        Args:
            zone: the provider's time zone, for ``createdAt``.
            now: the moment of the sync.

        Raises:
            AuthError: codes 1/10, the key is missing or wrong.
            RateLimitedError, TransientApiError: as for :meth:`fetch_tag`, after retries.
            PermanentApiError: anything the provider would refuse again (code 4 too).
            PollAbandoned: the shutdown deadline came first.
        """
        pages = StopListPages(zone=zone, max_pages=self._max_pages, now=now)
        budget = self._pacer.budget(self._poll_budget)
        page = 1
        while True:
            where = f"GET {self._stop_list_path} page={page}"
            try:
                self._pacer.before_page(page, budget)
                request = functools.partial(
                    self._request, self._stop_list_url, {"page": page}, where, budget
                )
                envelope = self._with_retries(functools.partial(request, StopListEnvelope), budget)
            except NoMessagesError as exc:  # "message not found" means nothing here
                raise PermanentApiError(
                    f"{where}: SMS Partner refused the request (code 4: message not found)",
                    code=exc.code,
                    http_status=exc.http_status,
                ) from None
            except PollAbandoned as exc:
                exc.pages = pages.pages  # our own exception: amending it is safe
                raise
            if not pages.add_page(envelope):
                break
            page += 1
        # At debug even when incomplete: the sync's own line says so, once.
        _log.debug(
            "api.pagination_stopped",
            endpoint="stop-sms/list",
            reason=pages.stop_reason,
            complete=pages.complete,
            pages=pages.pages,
            items=pages.items,
            skipped=pages.skipped,
            nb_data=pages.nb_data,
        )
        return pages

    # --- one page, with retries --------------------------------------------------------

    def _fetch_page(self, tag: str, page: int, budget: Budget) -> Envelope:
        """One page, retried on transient errors; raises ours, never httpx's."""
        return self._with_retries(lambda: self._request_page(tag, page, budget), budget)

    def _with_retries(self, call: Callable[[], _T], budget: Budget) -> _T:
        attempts = 0

        def attempt() -> _T:
            nonlocal attempts
            attempts += 1
            return call()

        def before_retry(retry_state: tenacity.RetryCallState) -> None:
            self._before_retry(retry_state, budget)

        def worth_retrying(exc: BaseException) -> bool:
            # Not once the budget is spent: the next attempt could not even start; nor
            # after a deadline cut (see DeadlineExceededError): the tag's backoff retries.
            return (
                _is_transient(exc)
                and not isinstance(exc, DeadlineExceededError)
                and self._monotonic() < budget.ends_at
            )

        retrying = tenacity.Retrying(
            sleep=lambda seconds: self._pacer.pause(seconds, budget),
            stop=tenacity.stop_after_attempt(self._max_retries + 1),
            wait=self._pacer.retry_wait,
            retry=tenacity.retry_if_exception(worth_retrying),
            before_sleep=before_retry,
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

    def _before_retry(self, retry_state: tenacity.RetryCallState, budget: Budget) -> None:
        """Log the retry about to be waited for, unless it would come too late."""
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        try:
            self._pacer.before_retry(retry_state.upcoming_sleep, budget)
        except TransientApiError as spent:
            # No time left for another attempt: fail with the last error, saying why.
            status = exc.http_status if isinstance(exc, ApiError) else None
            raise TransientApiError(f"{exc}; no retry: {spent}", http_status=status) from exc
        _log.warning(
            "api.retry_scheduled",
            attempt=retry_state.attempt_number,
            wait=round(retry_state.upcoming_sleep, 3),
            error=redact(str(exc), self._api_key),
            error_type=type(exc).__name__,
        )

    # --- one HTTP request -------------------------------------------------------------

    def _request_page(self, tag: str, page: int, budget: Budget) -> Envelope:
        where = f"GET {self._path} tag={tag!r} page={page}"
        return self._request(self._url, {"tag": tag, "page": page}, where, budget, Envelope)

    def _request(
        self,
        url: str,
        params: dict[str, str | int],
        where: str,
        budget: Budget,
        model: type[_E],
    ) -> _E:
        """One GET of ``url`` with ``params`` (and the key), read into ``model``."""
        self._pacer.before_request(budget)
        started = time.perf_counter()
        # The request's own deadline, or the budget's end if sooner; the shutdown
        # deadline is read again at every check, since SIGTERM may come mid-request.
        ends_at = min(self._monotonic() + self._request_timeout, budget.ends_at)

        def deadline() -> float:
            return min(ends_at, self._pacer.ends_at())

        try:
            with self._watchdog.armed(deadline) as guard:
                response = self._get_bounded(url, params, where, guard)
        except _Overdue:
            raise self._overdue(where, budget) from None
        except httpx.HTTPError as exc:
            if guard.fired or self._monotonic() >= deadline():
                raise self._overdue(where, budget) from None
            raise self._transport_error(exc, where) from exc
        except httpx.InvalidURL as exc:
            # A bad base_url: settings should have caught it; retrying will not help.
            scrub(exc, self._api_key)
            raise PermanentApiError(self.redact(f"{where}: invalid URL ({exc})")) from exc
        _log.debug(
            "api.request",
            **params,
            status=response.status_code,
            elapsed_ms=round((time.perf_counter() - started) * 1000, 1),
        )
        return self._classify(response, where, model)

    def _get_bounded(
        self, url: str, params: dict[str, str | int], where: str, guard: Guard
    ) -> httpx.Response:
        """GET one page, reading at most :data:`MAX_BODY_BYTES` of its body, by the
        guard's deadline.

        Raises:
            _Overdue: the deadline passed (before sending, between chunks, or the
                watchdog cut the connection).
        """
        left = guard.deadline() - self._monotonic()
        if left <= 0:
            raise _Overdue
        request = self._http.build_request(
            "GET",
            url,
            params={"apiKey": self._api_key, **params},
            headers={"User-Agent": _user_agent()},
            # No single operation may outlast the whole request (httpx's own timeouts
            # are per operation: they restart at every byte).
            timeout=httpx.Timeout(min(left, self._request_timeout)),
            extensions={"trace": guard.trace},
        )
        response = self._http.send(request, stream=True)
        guard.attach(response.extensions.get("network_stream"))
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
                if self._monotonic() >= guard.deadline():
                    raise _Overdue
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    raise PermanentApiError(
                        f"{where}: response is over the {MAX_BODY_BYTES:,}-byte limit",
                        http_status=response.status_code,
                    )
                chunks.append(chunk)
        finally:
            response.close()
        if guard.fired:  # cut mid-body: what was read may look complete but is not
            raise _Overdue
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

    def _overdue(self, where: str, budget: Budget) -> SmsPartnerStatusError:
        """The error for a request its deadline cut short, by which deadline it was."""
        if self._pacer.stopping():
            return PollAbandoned(
                "the daemon is stopping: a request still under way at its shutdown "
                "deadline was cut short"
            )
        if self._monotonic() >= budget.ends_at:
            return TransientApiError(
                f"{where}: the poll's budget of {budget.seconds:g} s was spent mid-request"
            )
        return DeadlineExceededError(
            f"{where}: no complete answer within {self._request_timeout:g} s "
            "(the whole-request deadline)"
        )

    def _transport_error(self, exc: httpx.HTTPError, where: str) -> ApiError:
        """Translate an httpx error; its message (which may hold the URL) is redacted."""
        scrub(exc, self._api_key)
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        detail = self.redact(f"{where}: {reason}")
        if isinstance(exc, httpx.UnsupportedProtocol | httpx.TooManyRedirects):
            return PermanentApiError(detail)
        return TransientApiError(detail)

    def _classify(
        self,
        response: httpx.Response,
        where: str,
        model: type[_E] = Envelope,  # type: ignore[assignment]
    ) -> _E:
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
        envelope = self._envelope(body, where, status, model)
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

    def _envelope(
        self,
        body: dict[str, Any],
        where: str,
        status: int,
        model: type[_E] = Envelope,  # type: ignore[assignment]
    ) -> _E:
        try:
            return model.model_validate(body)
        except pydantic.ValidationError as exc:
            error = exc.errors()[0]
            field = ".".join(str(part) for part in error["loc"]) or "response"
            raise TransientApiError(
                self.redact(f"{where}: unexpected response, field {field}: {error['msg']}"),
                http_status=status,
            ) from None  # pydantic's error repeats the input, which could be huge

    def _raise_provider_error(
        self, envelope: Envelope, response: httpx.Response, where: str
    ) -> None:
        """Raise the error a provider ``code`` means (the body said ``success: false``)."""
        code = envelope.code
        status = response.status_code
        # Redact before cutting, so a key cut in half cannot slip through.
        text = _clean_message(self.redact(envelope.message or ""))
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
        """What we say about a body we could not use: its type and length, never its text.

        A provider may echo the key in any encoding in an error page; quoting none of it
        is the one way to be sure none leaks. ``body`` is the JSON object when there was
        one (its envelope said enough already).
        """
        if body is not None:
            return ""
        if not response.content:
            return ": empty body"
        media = response.headers.get("Content-Type", "").split(";")[0].strip()
        media = _clean_message(self.redact(media))[:60] or "no content type"
        return f": {media} body of {len(response.content):,} bytes"

    def redact(self, text: str) -> str:
        """``text`` with the API key masked in every spelling (see :mod:`daemon.redaction`)."""
        return redact(text, self._api_key)


class _Overdue(Exception):
    """Internal: a request's deadline passed; :meth:`SmsPartnerClient._overdue` says which."""
