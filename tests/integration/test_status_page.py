"""The HTML status page (``GET /`` and ``GET /ui/tags/{tag}``) of a daemon run in-process
against the simulator, read over loopback and in headless Chromium.

The daemon is built through :class:`daemon.app.App` as ``run`` builds it, with the
simulator and the daemon on one clock the test moves; each :func:`step` is one dispatch
and the polls it leads to. The Chromium test saves its screenshots in a directory it
prints (``SMSPARTNER_TEST_SCREENSHOTS`` keeps them somewhere lasting). Without a
``chromium`` binary it is skipped, unless ``SMSPARTNER_TEST_REQUIRE_CHROMIUM=1`` (CI),
as the PostgreSQL tests are.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from daemon import queries
from daemon.app import App
from daemon.db import create_engine, delivery_statuses, poll_runs
from daemon.health import Health
from daemon.http import HttpServer
from daemon.metrics import Metrics
from daemon.settings import load_settings
from daemon.simulator import Simulator
from tests.helpers import API_KEY, free_port, step

# Read before conftest scrubs SMSPARTNER_* from the environment: they configure the run.
_CHROMIUM_REQUIRED = os.environ.get("SMSPARTNER_TEST_REQUIRE_CHROMIUM") == "1"
_SCREENSHOTS = os.environ.get("SMSPARTNER_TEST_SCREENSHOTS")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

T0 = datetime(2026, 11, 26, 9, 0, tzinfo=UTC)
#: Tags of the story, with how many numbers each sends and when (minutes before T0).
CAMPAIGNS = {"black-friday": (400, 0), "newsletter-48": (150, 20), "otp-0926": (40, 90)}


class Clock:
    """The one clock of the simulator and the daemon, moved by the test."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Site:
    """A daemon with its HTTP server, the simulator behind it, and a client."""

    app: App
    sim: Simulator
    clock: Clock
    client: httpx.Client

    @property
    def url(self) -> str:
        return str(self.client.base_url).rstrip("/")

    def step(self, **delta: float) -> None:
        """Move the clock, then one dispatch and its polls."""
        self.clock.now += timedelta(**delta)
        step(self.app.daemon)

    def track(self, tag: str, count: int, minutes_ago: float = 0) -> None:
        """Send ``count`` messages under ``tag`` at the simulator, and track it."""
        sent = self.clock.now - timedelta(minutes=minutes_ago)
        self.sim.add_tag(tag, count, sent_at=sent)
        answer = self.client.post("/tags", json={"tag": tag, "sent_at": sent.isoformat()})
        assert answer.status_code == 201

    def page(self, path: str) -> httpx.Response:
        response = self.client.get(path)
        assert response.headers["content-type"] == "text/html; charset=utf-8"
        return response


@pytest.fixture
def make_site(db_url: str) -> Iterator[Callable[..., Site]]:
    built: list[tuple[App, Simulator, httpx.Client]] = []

    def make(**overrides: Any) -> Site:
        clock = Clock()
        sim = Simulator(api_key=API_KEY, seed=7, clock=clock).start()
        values: dict[str, Any] = dict(
            api_key=API_KEY,
            base_url=sim.url,
            database_url=db_url,
            retry_backoff_seconds=0.01,
            rate_limit_per_second=0,
            http_host="127.0.0.1",
            http_port=free_port(),
        )
        values.update(overrides)
        app = App(load_settings({}, **values), clock=clock)
        server = app.http_server
        assert server is not None
        server.start()
        client = httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=10)
        built.append((app, sim, client))
        return Site(app, sim, clock, client)

    yield make
    for app, sim, client in built:
        client.close()
        assert app.http_server is not None
        app.http_server.stop()
        app.daemon.stop()
        app.close()
        sim.stop()


def the_story(site: Site) -> None:
    """Three campaigns, polled as the daemon would over their first three hours."""
    for tag, (count, minutes_ago) in CAMPAIGNS.items():
        site.track(tag, count, minutes_ago)
    site.step()
    for minutes in (1, 1, 2, 5, 10, 20, 30, 60, 60):
        site.step(minutes=minutes)


# --- reading the pages -----------------------------------------------------------------------


@dataclass
class Element:
    tag: str
    attrs: dict[str, str]
    text: str = ""
    #: Its place in :attr:`Dom.elements`, and the place after its last descendant.
    index: int = 0
    end: int = 0


class Dom(HTMLParser):
    """Every element of a page with its attributes and its own text."""

    def __init__(self, page: str) -> None:
        super().__init__()
        self.elements: list[Element] = []
        self._open: list[Element] = []
        self.feed(page)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        n = len(self.elements)
        element = Element(tag, {k: v or "" for k, v in attrs}, index=n, end=n + 1)
        self.elements.append(element)
        if tag not in ("meta", "link", "rect", "line", "path", "circle", "br", "input", "img"):
            self._open.append(element)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        n = len(self.elements)
        self.elements.append(Element(tag, {k: v or "" for k, v in attrs}, index=n, end=n + 1))

    def handle_endtag(self, tag: str) -> None:
        if all(e.tag != tag for e in self._open):
            return  # a void element's stray end tag
        while self._open:
            element = self._open.pop()
            element.end = len(self.elements)
            if element.tag == tag:
                break

    def handle_data(self, data: str) -> None:
        for element in self._open:
            element.text += data

    def find(self, tag: str, **attrs: str) -> list[Element]:
        """Elements of this kind whose attributes contain these (``class_`` for class)."""
        wanted = {k.rstrip("_"): v for k, v in attrs.items()}
        return [
            e
            for e in self.elements
            if e.tag == tag and all(v in e.attrs.get(k, "").split() for k, v in wanted.items())
        ]

    def rows(self) -> dict[str, Element]:
        """The tag rows of the status page, by tag."""
        return {e.attrs["data-tag"]: e for e in self.elements if "data-tag" in e.attrs}

    def inside(self, element: Element) -> list[Element]:
        """The descendants of ``element``, in document order."""
        return self.elements[element.index + 1 : element.end]

    def cells(self, row: Element) -> dict[str, str]:
        """A table row's cells by their ``data-label``, with their text (spaces folded)."""
        return {
            e.attrs["data-label"]: " ".join(e.text.split())
            for e in self.inside(row)
            if e.tag == "td" and "data-label" in e.attrs
        }


def bars(page: str) -> dict[str, dict[str, int]]:
    """Each tag row's bar segments: tag → status → count."""
    found: dict[str, dict[str, int]] = {}
    current = None
    for e in Dom(page).elements:
        if "data-tag" in e.attrs:
            current = found.setdefault(e.attrs["data-tag"], {})
        elif e.tag == "rect" and current is not None:
            current[e.attrs["data-status"]] = int(e.attrs["data-count"])
    return found


def external_references(page: str, host: str) -> list[str]:
    """``src``/``href`` values that would load or link anything off this server."""
    found = []
    for e in Dom(page).elements:
        for name in ("src", "href", "action", "xlink:href"):
            value = e.attrs.get(name)
            if value is None:
                continue
            if re.match(r"(?i)\s*(https?:)?//", value) and not value.startswith(host):
                found.append(value)
    return found


def phone_numbers(site: Site) -> set[str]:
    """Every phone number the simulator served, in the forms a page could show."""
    phones = set()
    for tag in CAMPAIGNS:
        for phone in site.sim.truth(tag):
            phones.update({phone, phone.lstrip("+"), phone[3:]})
    return phones


def summary(site: Site) -> dict[str, dict[str, Any]]:
    with site.app.engine.connect() as conn:
        return {row["tag"]: dict(row) for row in queries.tag_summary(conn)}


# --- the pages over HTTP -------------------------------------------------------------------------


def test_the_status_page_shows_the_daemon_and_every_tag(make_site: Callable[..., Site]) -> None:
    site = make_site()
    the_story(site)
    response = site.page("/")
    assert response.status_code == 200
    page = response.text
    dom = Dom(page)

    # Every tag, newest send first, with its counts, rate and opt-outs from tag_summary.
    rows = dom.rows()
    assert list(rows) == ["black-friday", "newsletter-48", "otp-0926"]
    expected = summary(site)
    for tag, bar in bars(page).items():
        row = expected[tag]
        assert bar == {s: row[s] for s in STATUSES if row[s]}
        assert sum(bar.values()) == row["total"] > 0
        cells = dom.cells(rows[tag])
        assert cells["Delivered"] == f"{100 * row['delivery_rate']:.1f} %"
        assert cells["Numbers"] == f"{row['total']:,}"
        assert cells["Opt-outs"] == f"{row['stop_sms']:,}"
        assert cells["State"] == "active"
        assert cells["Last poll"] == "ok now"  # every tag was polled at the last step
    assert summary(site)["black-friday"]["stop_sms"] > 0  # the story has opt-outs

    # The daemon: ready, its owner, its heartbeat, the polls of the last hour.
    assert "Ready" in dom.find("div", id="readiness")[0].text
    assert site.app.daemon.owner in page
    assert "heartbeat now" in " ".join(dom.find("div", id="process")[0].text.split())
    with site.app.engine.connect() as conn:
        hour_ago = site.clock.now - timedelta(hours=1)
        polls = conn.scalar(
            sa.select(sa.func.count())
            .select_from(poll_runs)
            .where(poll_runs.c.started_at >= hour_ago)
        )
    polls_card = " ".join(dom.find("div", id="polls")[0].text.split())
    assert re.fullmatch(rf"Polls, last hour\s*{polls}\s*ok {polls}", polls_card), polls_card
    due = queries_next_due(site)
    assert due in dom.find("div", id="next-due")[0].text

    # Aggregates only, nothing from elsewhere, and a policy that forbids loading any.
    assert not [p for p in phone_numbers(site) if p in page]
    assert external_references(page, site.url) == []
    csp = response.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src" not in csp
    assert response.headers["x-content-type-options"] == "nosniff"


STATUSES = ("delivered", "not_delivered", "failed", "waiting", "unknown", "expired")


def queries_next_due(site: Site) -> str:
    with site.app.engine.connect() as conn:
        row = queries.next_due(conn)
    assert row is not None
    return str(row["tag"])


def test_a_tag_page_draws_the_delivery_curve_of_its_numbers(
    make_site: Callable[..., Site],
) -> None:
    site = make_site()
    the_story(site)
    response = site.page("/ui/tags/black-friday")
    assert response.status_code == 200
    page = response.text
    dom = Dom(page)

    # The curve ends where the numbers stand: its shares are the table's.
    with site.app.engine.connect() as conn:
        statuses = [
            s
            for (s,) in conn.execute(
                sa.select(delivery_statuses.c.status).where(
                    delivery_statuses.c.tag == "black-friday"
                )
            )
        ]
    final = sum(s in ("delivered", "not_delivered", "failed", "expired") for s in statuses)
    delivered = statuses.count("delivered")
    (svg,) = dom.find("svg", class_="curve")
    assert float(svg.attrs["data-final"]) == pytest.approx(final / len(statuses), abs=1e-4)
    assert float(svg.attrs["data-delivered"]) == pytest.approx(delivered / len(statuses), abs=1e-4)
    assert 0 < delivered < final < len(statuses)  # the story has every kind
    # Axes, ticks and labels, and two lines that rise.
    ticks = [e.text for e in dom.find("text", class_="tick")]
    assert ticks[:3] == ["1 min", "2 min", "5 min"] and "1 h" in ticks
    assert "time since sending (log scale)" in svg.text and "share of numbers" in svg.text
    for kind in ("l-final", "l-delivered"):
        (line,) = dom.find("path", class_=kind)
        heights = [float(v) for v in re.findall(r"V([\d.]+)", line.attrs["d"])]
        assert len(heights) > 3 and heights == sorted(heights, reverse=True)  # y grows down
    # The milestones read the same curve.
    cells = [" ".join(e.text.split()) for e in dom.find("table", class_="milestones")[0:1]]
    assert f"{delivered / len(statuses):.1%}" in cells[0]

    # Its polls, newest first, and the same rules as the status page.
    with site.app.engine.connect() as conn:
        runs = queries.poll_history(conn, "black-friday")
    (history,) = dom.find("table", class_="history")
    shown = [
        (datetime.fromisoformat(e.attrs["datetime"]), dom.cells(row)["Outcome"])
        for row in dom.inside(history)
        if row.tag == "tr" and (e := next((t for t in dom.inside(row) if t.tag == "time"), None))
    ]
    assert shown == [(run["started_at"], "ok") for run in runs]
    assert len(shown) == 10  # every step polled it
    assert not [p for p in phone_numbers(site) if p in page]
    assert external_references(page, site.url) == []


def test_unknown_tags_get_a_404_page_and_odd_tags_round_trip(
    make_site: Callable[..., Site],
) -> None:
    site = make_site()
    odd = "a/b%<i>é</i>&x"
    site.track(odd, 3)
    site.step()

    response = site.page("/ui/tags/" + quote(odd, safe=""))
    assert response.status_code == 200
    assert Dom(response.text).find("span", class_="tagname")[0].text == odd
    assert "<i>é</i>" not in response.text  # escaped, never markup

    index = site.page("/").text
    links = {e.attrs["href"] for e in Dom(index).find("a") if e.text == odd}
    assert len(links) == 1  # the row's and the "next due" card's
    (link,) = links
    assert site.page(link).status_code == 200

    for path in (
        "/ui/tags/nope",
        "/ui/tags/BLACK",
        "/ui/tags/%00",
        "/ui/tags/" + "x" * 300,
    ):
        response = site.page(path)
        assert response.status_code == 404
        assert "No such tag" in response.text
    assert site.client.get("/ui/tags/a/b").status_code == 404  # a path, not a tag
    # A path that is not UTF-8 once decoded is refused by the router, as on every route.
    response = site.client.get("/ui/tags/%FF")
    assert response.status_code == 400
    assert response.json() == {"error": "tag in the path is not valid UTF-8"}


def test_any_tag_in_the_path_gets_its_page_or_a_404_page(make_site: Callable[..., Site]) -> None:
    site = make_site()
    site.track("known", 2)
    site.step()

    @settings(
        max_examples=60,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    # "." and ".." are dot segments: clients remove them before sending, so no page is asked.
    @given(st.text(min_size=1, max_size=80).filter(lambda t: t not in {".", ".."}))
    def check(tag: str) -> None:
        response = site.client.get("/ui/tags/" + quote(tag, safe=""))
        assert response.status_code == (200 if tag == "known" else 404)
        assert response.headers["content-type"] == "text/html; charset=utf-8"

    check()


def test_head_answers_like_get_and_writes_are_refused(make_site: Callable[..., Site]) -> None:
    site = make_site()
    site.track("otp", 5)
    site.step()
    for path in ("/", "/ui/tags/otp", "/ui/tags/nope", "/?page=2"):
        got, head = site.client.get(path), site.client.head(path)
        assert head.status_code == got.status_code
        assert head.content == b""
        assert head.headers["content-type"] == got.headers["content-type"]
        assert head.headers["content-security-policy"] == got.headers["content-security-policy"]
    for method, path in (("POST", "/"), ("DELETE", "/ui/tags/otp"), ("PUT", "/ui/tags/otp")):
        response = site.client.request(method, path)
        assert response.status_code == 405
        assert response.headers["allow"] == "GET, HEAD"


def test_tags_past_100_are_paged_with_links(make_site: Callable[..., Site]) -> None:
    site = make_site()
    for i in range(205):
        answer = site.client.post(
            "/tags",
            json={"tag": f"t{i:03d}", "sent_at": (T0 - timedelta(minutes=i)).isoformat()},
        )
        assert answer.status_code == 201

    first = Dom(site.page("/").text)
    assert list(first.rows())[:2] == ["t000", "t001"] and len(first.rows()) == 100
    assert [e.attrs["href"] for e in first.find("a", rel="next")] == ["/?page=2"]
    assert "Page 1 of 3" in site.page("/").text

    last = Dom(site.page("/?page=3").text)
    assert list(last.rows()) == ["t200", "t201", "t202", "t203", "t204"]
    assert [e.attrs["href"] for e in last.find("a", rel="prev")] == ["/?page=2"]
    assert last.find("a", rel="next") == []

    assert "No tags on this page" in site.page("/?page=9").text
    response = site.client.get("/?page=0")
    assert response.status_code == 400 and "page" in response.json()["error"]


def test_a_rejected_key_shows_the_pause(make_site: Callable[..., Site]) -> None:
    site = make_site(api_key="not-the-key")
    site.track("otp", 5)
    site.step()
    page = site.page("/")
    assert page.status_code == 200
    dom = Dom(page.text)
    (banner,) = dom.find("div", class_="banner")
    assert "Polling is paused" in banner.text
    assert "Paused" in dom.find("div", id="polling")[0].text
    assert "API key rejected" in dom.find("div", id="readiness")[0].text
    assert "not-the-key" not in page.text
    assert "auth error" in dom.find("div", id="polls")[0].text


def test_a_database_that_is_down_still_shows_the_daemon(tmp_path: Path) -> None:
    url = f"postgresql://smsp:hunter2@127.0.0.1:{free_port()}/nowhere"
    engine = create_engine(url)
    clock = Clock()
    health = Health(clock)
    health.beat()
    server = HttpServer(
        host="127.0.0.1",
        port=0,
        engine=engine,
        health=health,
        metrics=Metrics(),
        settings=load_settings({}, database_url=url, http_port=0),
        clock=clock,
        wake=lambda: None,
        owner="here:1:abc",
    )
    server.start()
    try:
        with capture_logs() as logs:
            response = httpx.get(f"http://127.0.0.1:{server.port}/", timeout=10)
        assert response.status_code == 503
        assert "database unreachable" in Dom(response.text).find("div", id="readiness")[0].text
        assert "here:1:abc" in response.text
        assert "hunter2" not in response.text + repr(logs)
    finally:
        server.stop()
        engine.dispose()


# --- in a real browser ---------------------------------------------------------------------------


@pytest.fixture
def chromium(tmp_path: Path) -> Callable[..., str]:
    """Run headless Chromium on a URL; returns what it printed (``--dump-dom``).

    The page's console goes to Chromium's log (``--enable-logging=stderr``): a
    Content-Security-Policy violation (a style or script the policy blocks) fails the test.
    """
    if CHROMIUM is None:
        if _CHROMIUM_REQUIRED:
            pytest.fail("chromium is not installed and SMSPARTNER_TEST_REQUIRE_CHROMIUM=1")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    profile = tmp_path / "chromium-profile"

    def run(url: str, *args: str) -> str:
        command = [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
            "--enable-logging=stderr",
            "--v=0",
            f"--user-data-dir={profile}",
            *args,
            url,
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=90, check=False)
        assert done.returncode == 0, done.stderr[-2000:]
        blocked = [line for line in done.stderr.splitlines() if "Content Security Policy" in line]
        assert blocked == []
        return done.stdout

    return run


@pytest.fixture
def screenshots(tmp_path: Path) -> Path:
    """Where the screenshots go: ``SMSPARTNER_TEST_SCREENSHOTS`` or the test's tmp_path."""
    where = Path(_SCREENSHOTS) if _SCREENSHOTS else tmp_path / "screenshots"
    where.mkdir(parents=True, exist_ok=True)
    print(f"screenshots in {where}")
    return where


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_chromium_shows_the_tags_with_their_bars_rates_and_curve(
    make_site: Callable[..., Site], chromium: Callable[..., str], screenshots: Path
) -> None:
    site = make_site()
    the_story(site)
    expected = summary(site)

    dom_text = chromium(site.url + "/", "--dump-dom")
    dom = Dom(dom_text)
    assert list(dom.rows()) == list(CAMPAIGNS)
    for tag, bar in bars(dom_text).items():
        assert sum(bar.values()) == expected[tag]["total"]
        assert bar["delivered"] == expected[tag]["delivered"]
        rate = dom.rows()[tag]
        assert f"{100 * expected[tag]['delivery_rate']:.1f} %" in rate.text
    assert len(dom.find("rect", class_="s-delivered")) == 3

    tag_dom_text = chromium(site.url + "/ui/tags/black-friday", "--dump-dom")
    tag_dom = Dom(tag_dom_text)
    (svg,) = tag_dom.find("svg", class_="curve")
    assert float(svg.attrs["data-delivered"]) > 0.5
    assert tag_dom.find("path", class_="l-final") and tag_dom.find("path", class_="l-delivered")
    assert "share of numbers" in svg.text

    shots = {
        "status-1280x800.png": ("/", "1280,800"),
        "status-390x844.png": ("/", "390,844"),
        "tag-1280x800.png": ("/ui/tags/black-friday", "1280,800"),
        "tag-1280x1400.png": ("/ui/tags/black-friday", "1280,1400"),
        "tag-390x844.png": ("/ui/tags/black-friday", "390,844"),
    }
    for name, (path, size) in shots.items():
        target = screenshots / name
        chromium(site.url + path, f"--screenshot={target}", f"--window-size={size}")
        assert target.read_bytes().startswith(b"\x89PNG")
        assert target.stat().st_size > 10_000  # a page, not a blank
