"""Keeping the SMS Partner API key out of text: URLs, messages, log lines and reprs.

The key travels as the ``apiKey`` query parameter, so any URL can carry it: httpx's own
log lines, its exception messages, reprs such as ``<Request('GET', '…')>``. And a
provider may echo it back in an error page or a JSON ``message``, spelt however its
framework escapes text. Two modules need to hide it and neither should depend on the
other: :mod:`daemon.smspartner` redacts everything it lets out (messages, logs, reprs,
chained httpx errors) and :mod:`daemon.log`'s processor redacts every log line,
including lines we did not write. Pure string work: no I/O, nothing of ours imported.

What :func:`redact` hides, in any mix within one occurrence (a JSON encoder may escape
only the ``/``, an HTML one only the ``&``):

* the key raw, and in any letter case (over-redacting a look-alike costs nothing);
* percent-encoded, with upper- or lowercase hex, and form-encoded (``+`` for a space);
* JSON-escaped: ``\\/``, ``\\"``, ``\\\\``, ``\\uXXXX`` (either case, surrogate pairs);
* HTML-escaped: named entities (``&amp;``, ``&sol;``…), decimal and hex references;
* any ``apiKey=…`` query value, whatever the key, and the userinfo (``user:password@``)
  of every URL, which may hold a password from ``SMSPARTNER_BASE_URL``.

A secret shorter than :data:`MIN_SECRET_LENGTH` is hidden only where it stands alone (not
inside a longer word): the daemon refuses such keys at start, and replacing two letters
everywhere would garble every line (``poll.compl***t***d``) while protecting nothing.
"""

from __future__ import annotations

import functools
import html.entities
import json
import re
from collections.abc import Iterable
from typing import Final

__all__ = ["MIN_SECRET_LENGTH", "redact", "redact_all", "scrub"]

#: Below this length a secret is matched as a whole word only (see the module docstring).
MIN_SECRET_LENGTH: Final = 8

# ``apiKey=`` in any case, up to the next parameter, whitespace or quote: covers URLs in
# httpx's own log lines, exception messages and reprs such as ``<Request('GET', '…')>``.
_API_KEY_PARAM = re.compile(r"(apikey=)[^&\s\"']*", re.IGNORECASE)
# ``scheme://userinfo@``: userinfo cannot hold an unencoded ``/``, ``@`` or whitespace, so
# this never reaches into a path (``http://host/a@b`` is left alone).
_USERINFO = re.compile(r"\b([a-z][a-z0-9+.\-]*://)[^/\s@\"'<>]*@", re.IGNORECASE)

# JSON's short escapes (RFC 8259, section 7), by the character they stand for.
_JSON_SHORT: Final = {'"': '\\"', "\\": "\\\\", "/": "\\/", "\b": "\\b", "\f": "\\f"}
_JSON_SHORT.update({"\n": "\\n", "\r": "\\r", "\t": "\\t"})


@functools.cache
def _named_entities() -> dict[str, list[str]]:
    """HTML5's named character references, by the character they stand for."""
    names: dict[str, list[str]] = {}
    for name, text in html.entities.html5.items():
        names.setdefault(text, []).append(name)
    return names


def _spellings(char: str) -> str:
    """A regular expression for every way one character of the key may be written."""
    options = [re.escape(char)]
    # Percent-encoding of its UTF-8 bytes, either hex case (IGNORECASE covers it).
    options.append("".join(f"%{byte:02x}" for byte in char.encode("utf-8")))
    if char == " ":
        options.append(r"\+")  # form encoding
    # JSON: a short escape, or \uXXXX (a surrogate pair beyond the BMP).
    if char in _JSON_SHORT:
        options.append(re.escape(_JSON_SHORT[char]))
    options.append(re.escape(json.dumps(char, ensure_ascii=True)[1:-1]))
    if len(json.dumps(char, ensure_ascii=True)) == 3:  # printable ASCII: also as \u00XX
        options.append(re.escape(f"\\u{ord(char):04x}"))
    # HTML: named entities (with or without the ``;``, as HTML5 allows for a few),
    # decimal and hex references with any leading zeros.
    # Longest name first: ``&eacute;`` must not stop at ``&eacute``, leaving a ``;``.
    names = sorted(_named_entities().get(char, ()), key=len, reverse=True)
    options.extend(re.escape(f"&{name}") for name in names)
    options.append(f"&#0*{ord(char)};")
    options.append(f"&#x0*{ord(char):x};")
    return "(?:" + "|".join(dict.fromkeys(options)) + ")"


@functools.lru_cache(maxsize=16)
def _secret_pattern(secret: str) -> re.Pattern[str]:
    """Every spelling of ``secret``, compiled once per secret."""
    body = "".join(_spellings(char) for char in secret)
    if len(secret) < MIN_SECRET_LENGTH:
        body = rf"(?<!\w){body}(?!\w)"
    return re.compile(body, re.IGNORECASE)


def redact(text: str, secret: str | None = None) -> str:
    """Hide the API key in ``text`` before it can reach a log, an error or a repr.

    Replaces every ``apiKey=<value>`` query parameter with ``apiKey=***``, drops the
    userinfo of every URL and, when ``secret`` is given, replaces every spelling of it
    listed in the module docstring with ``***``.

    Args:
        text: any text that may contain a URL, a provider message or a response excerpt.
        secret: the API key; an empty secret is ignored (it would match everywhere).

    Returns:
        The text with the key replaced by ``***``.
    """
    return redact_all(text, [secret] if secret else [])


def redact_all(text: str, secrets: Iterable[str]) -> str:
    """:func:`redact` for several secrets at once (the log processor's case).

    Args:
        text: as for :func:`redact`.
        secrets: every secret to hide; empty ones are ignored.
    """
    text = _USERINFO.sub(r"\1", text)
    # Secrets first: the query pattern stops at a raw key's ``&`` and would leave a tail.
    for secret in secrets:
        if secret:
            text = _secret_pattern(secret).sub("***", text)
    return _API_KEY_PARAM.sub(r"\1***", text)


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
