"""The status page's rendering (daemon/ui.py, daemon/ui_chart.py): data in, HTML out."""

from __future__ import annotations

import base64
import hashlib
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from daemon import statuspage, ui, ui_chart
from daemon.errors import InputError

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def tag_row(tag: str, **counts: int) -> dict[str, Any]:
    """A row as :func:`daemon.queries.newest_tags_page` gives it."""
    row: dict[str, Any] = {s: 0 for s in ui_chart.STATUS_ORDER}
    row.update(
        tag=tag,
        state="active",
        sent_at=NOW - timedelta(hours=2),
        window_ends_at=NOW + timedelta(hours=46),
        last_polled_at=NOW - timedelta(minutes=3),
        next_poll_at=NOW + timedelta(minutes=2),
        consecutive_failures=0,
        poll_count=12,
        last_error=None,
        last_outcome="ok",
        last_run_at=NOW - timedelta(minutes=3),
        stop_sms=0,
    )
    row.update(counts)
    row["total"] = sum(row[s] for s in ui_chart.STATUS_ORDER)
    return row


def view(**changes: Any) -> ui.DaemonView:
    values: dict[str, Any] = dict(
        now=NOW,
        owner="host:42:abcd",
        started_at=NOW - timedelta(hours=3, minutes=5),
        last_beat=NOW - timedelta(seconds=2),
        problems=[],
        auth_error=None,
        polls={"ok": 40, "transient_error": 2},
        next_due=("spring", NOW + timedelta(seconds=40)),
        states={"active": 2},
    )
    values.update(changes)
    return ui.DaemonView(**values)


HOSTILE = ['<script>alert("x")</script>', '"><img src=x onerror=alert(1)>', "a/b?c#d&e%41"]


def test_hostile_tags_are_text_everywhere_and_links_encode_them() -> None:
    rows = [tag_row(t, delivered=3) for t in HOSTILE]
    pages = [
        ui.render_index(view(next_due=(HOSTILE[0], None)), rows, page=1, total_tags=3),
        *(ui.render_tag(NOW, row, ui_chart.build_curve([], 3, observed=5), []) for row in rows),
        ui.render_not_found(NOW, HOSTILE[1]),
    ]
    for page in pages:
        assert "<script" not in page and "<img" not in page
    index = pages[0]
    assert 'href="/ui/tags/%3Cscript%3Ealert%28%22x%22%29%3C%2Fscript%3E"' in index
    assert 'href="/ui/tags/a%2Fb%3Fc%23d%26e%2541"' in index
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in index


def test_the_stylesheet_is_the_only_inline_code_and_its_hash_is_allowed() -> None:
    page = ui.render_index(view(), [tag_row("t", delivered=5, failed=1)], page=1, total_tags=1)
    (css,) = re.findall(r"<style>(.*?)</style>", page, re.S)
    digest = base64.b64encode(hashlib.sha256(css.encode()).digest()).decode()
    assert f"style-src 'sha256-{digest}'" in ui.CONTENT_SECURITY_POLICY
    assert "default-src 'none'" in ui.CONTENT_SECURITY_POLICY
    # The policy forbids style attributes and scripts: the page must not need them.
    assert " style=" not in page and "<script" not in page
    assert not re.search(r"\son[a-z]+=", page)  # no event handler attributes
    assert not re.search(r'(src|href)="(https?:)?//', page)


def test_the_bar_follows_the_counts_and_a_lone_failure_still_shows() -> None:
    bar = ui_chart.status_bar({"delivered": 99_998, "failed": 1, "waiting": 1}, 100_000)
    rects = re.findall(
        r'data-status="(\w+)" data-count="(\d+)" x="([\d.]+)" y="0" width="([\d.]+)"', bar
    )
    assert [(s, int(n)) for s, n, _, _ in rects] == [
        ("delivered", 99_998),
        ("failed", 1),
        ("waiting", 1),
    ]
    widths = [float(w) for *_, w in rects]
    assert sum(widths) == pytest.approx(1000, abs=0.05)
    assert widths[1] >= 3.9 and widths[2] >= 3.9  # a sliver, not nothing
    xs = [float(x) for _, _, x, _ in rects]
    assert xs == sorted(xs) and xs[0] == 0
    assert "delivered 99,998, failed 1, waiting 1" in bar  # its title

    empty = ui_chart.status_bar({}, 0)
    assert "<rect" not in empty and "no numbers" in empty


def test_the_curve_is_cumulative_and_read_at_any_minute() -> None:
    # 70 final in the first minute (65 delivered), 10 in minute 3, 5 in minute 100.
    curve = ui_chart.build_curve([(3, 10, 8), (0, 70, 65), (100, 5, 5)], 100, observed=200)
    assert curve.at(0.5) == (0.0, 0.0)
    assert curve.at(1) == (0.70, 0.65)
    assert curve.at(3.9) == (0.70, 0.65)
    assert curve.at(4) == pytest.approx((0.80, 0.73))
    assert curve.at(500) == pytest.approx((0.85, 0.78))
    assert curve.end == 200 and curve.axis_end == 360

    svg = ui_chart.curve_svg(curve)
    assert 'data-final="0.8500"' in svg and 'data-delivered="0.7800"' in svg
    ticks = re.findall(r'<text class="tick[^"]*"[^>]*>([^<]+)</text>', svg)
    assert ticks == ["1 min", "2 min", "5 min", "15 min", "30 min", "1 h", "2 h", "6 h"]
    assert "time since sending (log scale)" in svg and "share of numbers" in svg
    milestones = re.findall(r"<tr><td[^>]*>([^<]+)</td><td[^>]*>([^<]+)</td>", svg)
    assert milestones == [
        ("1 min", "70.0%"),
        ("5 min", "80.0%"),
        ("15 min", "80.0%"),
        ("1 h", "80.0%"),
        ("3.3 h (last poll)", "85.0%"),
    ]


def test_a_new_tag_has_a_short_axis_and_one_without_numbers_no_chart() -> None:
    curve = ui_chart.build_curve([(0, 1, 1)], 4, observed=2)
    assert curve.axis_end == 15
    assert "No numbers" in ui_chart.curve_svg(ui_chart.build_curve([], 0, observed=2))


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("skipped +33612345678: bad date", "skipped …: bad date"),
        ("number 0612345678 and 06 12 34 56 78", "number … and …"),
        (
            "HTTP 503 after 3 tries (2026-11-26T09:00:00Z)",
            "HTTP 503 after 3 tries (2026-11-26T09:00:00Z)",
        ),
    ],
)
def test_error_texts_lose_anything_like_a_phone_number(text: str, shown: str) -> None:
    assert ui.mask_numbers(text) == shown
    row = tag_row("t", waiting=1) | {"consecutive_failures": 2, "last_error": text}
    runs = [
        {
            "started_at": NOW,
            "finished_at": NOW + timedelta(seconds=1),
            "outcome": "transient_error",
            "pages": 0,
            "numbers_seen": 0,
            "numbers_changed": 0,
            "error": text,
        }
    ]
    page = ui.render_tag(NOW, row, ui_chart.build_curve([], 1, observed=1), runs)
    assert "12345678" not in page and "12 34 56 78" not in page


def test_the_daemon_part_says_what_is_wrong() -> None:
    page = ui.render_index(
        view(
            problems=["API key rejected: Incorrect API Key"],
            auth_error="Incorrect API Key",
            polls={"auth_error": 20_000},
            polls_capped=True,
            next_due=None,
        ),
        [],
        page=1,
        total_tags=0,
    )
    assert "Polling is paused" in page and "Not ready" in page
    assert "≥ 20,000" in page
    assert "no active tag" in page and "No tag is tracked yet" in page

    fine = ui.render_index(view(), [], page=1, total_tags=0)
    assert "Ready" in fine and "up 3 h 05 min" in fine and "heartbeat 2 s ago" in fine
    assert "host:42:abcd" in fine and "in 40 s" in fine


@pytest.mark.parametrize(
    ("delta", "text"),
    [
        (timedelta(seconds=0.4), "now"),
        (timedelta(seconds=-45), "45 s ago"),
        (timedelta(minutes=12), "in 12 min"),
        (timedelta(hours=-3, minutes=-5), "3 h 05 min ago"),
        (timedelta(days=-3, hours=-4), "3 d 4 h ago"),
    ],
)
def test_relative_times(delta: timedelta, text: str) -> None:
    assert ui.relative(NOW, NOW + delta) == text


@pytest.mark.parametrize(
    ("query", "page"),
    [("", 1), ("page=2", 2), ("x=1&page=30", 30), ("page=1000000", 1_000_000)],
)
def test_page_numbers(query: str, page: int) -> None:
    assert statuspage.page_number(query) == page


@pytest.mark.parametrize(
    "query", ["page=0", "page=", "page=-1", "page=1e3", "page=١", "page=99999999"]
)
def test_bad_page_numbers_name_the_parameter(query: str) -> None:
    with pytest.raises(InputError, match=r"^page must be a whole number"):
        statuspage.page_number(query)


def test_a_tag_whose_numbers_were_pruned_says_so_instead_of_a_flat_curve() -> None:
    row = tag_row("old", delivered=90, failed=10)
    pruned = ui.render_tag(NOW, row, ui_chart.build_curve([], 100, observed=3000), [])
    assert "no longer stored (pruned)" in pruned and 'class="curve"' not in pruned

    waiting = ui.render_tag(
        NOW, tag_row("new", waiting=5), ui_chart.build_curve([], 5, observed=1), []
    )
    assert 'class="curve"' in waiting  # nothing final yet: a true 0 %
