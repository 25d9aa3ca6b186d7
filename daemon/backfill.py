"""Backfill: track many tags from a file (``track --from-file FILE``).

The file is either one tag per line, or CSV whose first line is the header
``tag,sent_at`` (or just ``tag``), ``sent_at`` being optional per row (ISO-8601; without
an offset it is UTC). Blank lines and lines starting with ``#`` are skipped in both.
Every line is checked before anything is written: the first bad line stops everything
with one error naming ``FILE:LINE``. Then every tag is tracked in one transaction.
"""

from __future__ import annotations

import csv
import itertools
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TextIO

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from daemon import tracking
from daemon.db import tracked_tags
from daemon.errors import InputError
from daemon.status import parse_sent_at, tag_problem, window_end

_COLUMNS = ("tag", "sent_at")


@dataclass(frozen=True, slots=True)
class TagLine:
    """One tag of the file, with its ``sent_at`` when the line gave one."""

    tag: str
    sent_at: datetime | None
    line: int


def parse_lines(lines: Iterable[str], *, source: str) -> list[TagLine]:
    """Parse and check every line; raise :class:`InputError` at the first bad one.

    Args:
        lines: the file's lines (with or without line ends).
        source: the file's name for messages (``-`` reads as ``<stdin>``).
    """
    entries: list[TagLine] = []
    columns: list[str] | None = None  # set once a CSV header was read
    first = True
    for number, raw in enumerate(lines, start=1):
        text = raw.strip()
        if number == 1:
            text = text.removeprefix("\ufeff").strip()  # a BOM from spreadsheet exports
        if not text or text.startswith("#"):
            continue
        where = f"{source}:{number}"
        if first:
            first = False
            columns = _header(text)
            if columns is not None:
                continue
        if columns is None:
            entries.append(TagLine(_check_tag(text, where), None, number))
        else:
            entries.append(_csv_row(text, columns, where, number))
    return entries


def _header(text: str) -> list[str] | None:
    """The CSV columns when ``text`` is a header (``tag`` first, known names, no repeats)."""
    try:
        header = [c.strip().lower() for c in next(csv.reader([text], strict=True))]
    except csv.Error:
        return None
    if header[:1] != ["tag"] or not set(header) <= set(_COLUMNS):
        return None
    return header if len(set(header)) == len(header) else None


def _fields(text: str, where: str) -> list[str]:
    try:
        return next(csv.reader([text], strict=True))
    except csv.Error as exc:
        raise InputError(f"{where}: not a CSV line: {exc}") from None


def _csv_row(text: str, columns: list[str], where: str, number: int) -> TagLine:
    fields = [f.strip() for f in _fields(text, where)]
    if len(fields) > len(columns) or not fields:
        raise InputError(
            f"{where}: expected {len(columns)} field(s) ({','.join(columns)}), got {len(fields)}"
        )
    row = dict(zip(columns, fields, strict=False))
    sent_at = None
    if row.get("sent_at"):
        try:
            sent_at = parse_sent_at(row["sent_at"])
        except ValueError as exc:
            raise InputError(f"{where}: sent_at {exc}") from None
    return TagLine(_check_tag(row["tag"], where), sent_at, number)


def _check_tag(tag: str, where: str) -> str:
    problem = tag_problem(tag)
    if problem:
        raise InputError(f"{where}: invalid tag {tag!r}: {problem}")
    return tag


#: The longest line read from a tag file: a tag is at most 64 characters and a
#: ``sent_at`` about 35, so anything longer is not a tag file (``/dev/zero`` has no line
#: ends at all: reading it by whole lines grew without limit).
MAX_LINE_CHARS = 1024


def bounded_lines(handle: TextIO, *, source: str) -> Iterator[str]:
    """The lines of ``handle`` one at a time, none read past :data:`MAX_LINE_CHARS`.

    Raises:
        InputError: a line is longer, naming ``source`` and the line number.
    """
    for number in itertools.count(1):
        line = handle.readline(MAX_LINE_CHARS + 2)  # room for the longest line and "\r\n"
        if not line:
            return
        if len(line.rstrip("\r\n")) > MAX_LINE_CHARS:
            raise InputError(
                f"{source}:{number}: line longer than {MAX_LINE_CHARS} characters; "
                "expected one tag (or tag,sent_at) per line"
            )
        yield line


def read_file(path: str) -> list[TagLine]:
    """Read and check a tag file (``-`` is stdin) line by line; raise
    :class:`InputError` if bad."""
    source = "<stdin>" if path == "-" else path
    try:
        if path == "-":
            return parse_lines(bounded_lines(sys.stdin, source=source), source=source)
        with open(path, encoding="utf-8", newline="") as handle:
            return parse_lines(bounded_lines(handle, source=source), source=source)
    except OSError as exc:
        raise InputError(f"--from-file: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"--from-file: {source} is not UTF-8 text: {exc.reason}") from None


@dataclass(frozen=True, slots=True)
class Tracked:
    """What a backfill did: distinct tags tracked, of which new (others re-activated)."""

    tags: int
    new: int


def track_all(
    conn: Connection,
    entries: Iterable[TagLine],
    *,
    default_sent_at: datetime,
    window: timedelta,
    now: datetime,
) -> Tracked:
    """Track every entry in the caller's transaction (as ``track`` does for one tag).

    A tag listed twice is tracked once with its latest ``sent_at``, as tracking it twice
    in a row would leave it.
    """
    latest: dict[str, datetime] = {}
    for entry in entries:
        sent_at = entry.sent_at or default_sent_at
        latest[entry.tag] = max(sent_at, latest.get(entry.tag, sent_at))
    count = sa.select(sa.func.count()).select_from(tracked_tags)
    before = int(conn.scalar(count) or 0)
    tracking.track_many(
        conn, [(tag, s, window_end(s, window)) for tag, s in latest.items()], now=now
    )
    return Tracked(tags=len(latest), new=int(conn.scalar(count) or 0) - before)
