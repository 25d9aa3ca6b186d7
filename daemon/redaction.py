"""Keeping the SMS Partner API key out of text: URLs, messages, log lines and reprs.

The key travels as the ``apiKey`` query parameter, so any URL can carry it: httpx's own
log lines, its exception messages, reprs such as ``<Request('GET', '…')>``. Two modules
need to hide it and neither should depend on the other: :mod:`daemon.smspartner`
redacts everything it lets out (messages, logs, reprs, chained httpx errors) and
:mod:`daemon.log`'s processor redacts every log line, including lines we did not write.
Pure string work: no I/O, nothing of ours imported.
"""

from __future__ import annotations

import re
from urllib.parse import quote, quote_plus

__all__ = ["redact", "scrub"]

# ``apiKey=`` in any case, up to the next parameter, whitespace or quote: covers URLs in
# httpx's own log lines, exception messages and reprs such as ``<Request('GET', '…')>``.
_API_KEY_PARAM = re.compile(r"(apikey=)[^&\s\"']*", re.IGNORECASE)


def redact(text: str, secret: str | None = None) -> str:
    """Hide the API key in ``text`` before it can reach a log, an error or a repr.

    Replaces every ``apiKey=<value>`` query parameter with ``apiKey=***`` and, when
    ``secret`` is given, every occurrence of the secret itself, raw and URL-encoded
    (both ``%20`` and ``+`` forms, since httpx encodes query strings the latter way).

    Args:
        text: any text that may contain a URL or a response excerpt.
        secret: the API key; an empty secret is ignored (it would match everywhere).

    Returns:
        The text with the key replaced by ``***``.
    """
    text = _API_KEY_PARAM.sub(r"\1***", text)
    if secret:
        # Longest first, so an encoded form is not half-replaced by a shorter variant.
        variants = {secret, quote(secret, safe=""), quote_plus(secret, safe=""), quote(secret)}
        for variant in sorted(variants, key=len, reverse=True):
            text = text.replace(variant, "***")
    return text


def scrub(exc: BaseException, secret: str) -> None:
    """Redact a third-party exception's message, and its chain's, in place.

    ``raise … from exc`` keeps the original as ``__cause__``, and a traceback printer
    would show its message (and its own causes'), which for httpx may hold the full URL
    with the key.

    Args:
        exc: the exception to clean, followed through ``__cause__``/``__context__``.
        secret: the API key, as for :func:`redact`.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        current.args = tuple(
            redact(arg, secret) if isinstance(arg, str) else arg for arg in current.args
        )
        current = current.__cause__ or current.__context__
