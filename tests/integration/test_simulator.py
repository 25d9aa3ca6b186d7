"""The bundled fake SMS Partner API, spoken to over loopback with a real httpx client."""

from __future__ import annotations

import argparse
import json
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from daemon.simulator import FAULTS, RANDOM_FAULTS, Simulator
from daemon.simulator_cli import add_cli_arguments, run_cli

ROOT = Path(__file__).resolve().parents[2]
T0 = datetime(2024, 3, 1, 9, 0, tzinfo=UTC)
KEY = "simulator-key"  # the simulator's default key
# Plain HTTP on loopback; sharing one TLS context saves ~0.1 s of certificate loading per client.
TLS = ssl.create_default_context()


def new_client(url: str, timeout: float = 5) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=timeout, verify=TLS)


class Clock:
    """A virtual clock the test moves by hand."""

    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def sim(clock: Clock) -> Iterator[Simulator]:
    with Simulator(clock=clock, page_size=3) as simulator:
        yield simulator


@pytest.fixture
def client(sim: Simulator) -> Iterator[httpx.Client]:
    with new_client(sim.url, 5) as c:
        yield c


def fetch(
    client: httpx.Client, tag: str | None = "t", page: int | None = None, key: str | None = KEY
) -> httpx.Response:
    params: dict[str, Any] = {}
    if key is not None:
        params["apiKey"] = key
    if tag is not None:
        params["tag"] = tag
    if page is not None:
        params["page"] = page
    return client.get("/bulk-status-by-tag", params=params)


def all_items(client: httpx.Client, tag: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    page = 1
    while batch := fetch(client, tag, page).json()["StatutResponse_List"]:
        items += batch
        page += 1
    return items


# -- the documented shape -----------------------------------------------------------


def test_pages_cover_the_tag_and_report_total(sim: Simulator, client: httpx.Client) -> None:
    phones = sim.add_tag("t", 7)
    pages = [fetch(client, "t", n).json() for n in (1, 2, 3)]
    assert [p["currentPage"] for p in pages] == [1, 2, 3]
    assert all(p["success"] is True and p["code"] == 200 and p["total"] == 7 for p in pages)
    assert [len(p["StatutResponse_List"]) for p in pages] == [3, 3, 1]
    served = [i["phoneNumber"] for p in pages for i in p["StatutResponse_List"]]
    assert served == phones and len(set(phones)) == 7
    assert fetch(client, "t").json() == pages[0]  # no page parameter: the first page


def test_page_past_the_end_is_empty_and_echoes_the_page(
    sim: Simulator, client: httpx.Client
) -> None:
    sim.add_tag("t", 4)
    body = fetch(client, "t", 9).json()
    assert body["StatutResponse_List"] == []
    assert body["currentPage"] == 9 and body["total"] == 4


def test_items_look_like_the_provider(sim: Simulator, client: httpx.Client, clock: Clock) -> None:
    sim.add_tag("t", 3, page_size=10)
    clock.now = T0 + timedelta(hours=48)
    for item in fetch(client).json()["StatutResponse_List"]:
        assert set(item) == {"phoneNumber", "status", "stopSMS", "date"}
        assert re.fullmatch(r"\+3361\d{7}", item["phoneNumber"])
        assert item["status"] in {"Delivered", "Not delivered", "Waiting", "ko"}
        assert isinstance(item["stopSMS"], bool)
        assert isinstance(item["date"], str) and item["date"].isdigit()


def test_per_tag_page_size_overrides_the_default(sim: Simulator, client: httpx.Client) -> None:
    sim.add_tag("t", 25, page_size=10)
    assert len(fetch(client).json()["StatutResponse_List"]) == 10


@pytest.mark.parametrize(
    ("key", "tag", "code", "message"),
    [
        (None, "t", 1, "API key required"),
        ("", "t", 1, "API key required"),
        ("wrong", "t", 10, "Incorrect API Key"),
        (KEY, None, 4, "Message not found"),
        (KEY, "nope", 4, "Message not found"),
    ],
)
def test_documented_errors(
    sim: Simulator, client: httpx.Client, key: str | None, tag: str | None, code: int, message: str
) -> None:
    sim.add_tag("t", 2)
    response = fetch(client, tag, key=key)
    assert response.status_code == 200
    assert response.json() == {"success": False, "code": code, "message": message}


def test_error_http_status_is_configurable(clock: Clock) -> None:
    with (
        Simulator(clock=clock, error_http_status=400) as sim,
        new_client(sim.url) as client,
    ):
        response = fetch(client, "unknown")
        assert response.status_code == 400 and response.json()["code"] == 4


def test_other_paths_are_404_and_recorded(sim: Simulator, client: httpx.Client) -> None:
    assert client.get("/bulk-status").status_code == 404
    assert sim.requests[-1].path == "/v1/bulk-status"


def test_url_encoded_key_and_tag_arrive_intact(clock: Clock) -> None:
    key, tag = "a+b&c=d/é", "x+y&z=w/é%"
    with Simulator(clock=clock, api_key=key) as sim, new_client(sim.url) as client:
        sim.add_tag(tag, 2)
        body = fetch(client, tag, 1, key=key).json()
        assert body["success"] is True and body["total"] == 2
        recorded = sim.requests[-1]
        assert (recorded.api_key, recorded.tag, recorded.page) == (key, tag, 1)
        assert recorded.path == "/v1/bulk-status-by-tag" and recorded.at == T0


def test_requests_are_recorded_and_counted(sim: Simulator, client: httpx.Client) -> None:
    sim.add_tag("t", 1)
    fetch(client, "t", 1)
    fetch(client, "t", 2)
    fetch(client, "u")
    client.get("/bulk-status-by-tag", params={"apiKey": KEY, "tag": "t", "page": "two"})
    assert sim.request_count() == 4
    assert sim.request_count("t") == 3 and sim.request_count("u") == 1
    assert [r.page for r in sim.requests] == [1, 2, None, None]


# -- evolving statuses ----------------------------------------------------------------


def test_statuses_evolve_with_the_clock(clock: Clock) -> None:
    with Simulator(clock=clock, page_size=1000) as sim, new_client(sim.url) as client:
        phones = sim.add_tag("t", 10_000)
        sent = str(int(T0.timestamp()))
        first = fetch(client, "t").json()["StatutResponse_List"]
        assert {(i["status"], i["stopSMS"], i["date"]) for i in first} == {("Waiting", False, sent)}

        clock.now = T0 + timedelta(hours=1)
        at_1h = sim.truth("t")
        served = {i["phoneNumber"]: i for i in all_items(client, "t")}
        assert list(served) == phones
        assert at_1h == {p: (i["status"], i["stopSMS"], i["date"]) for p, i in served.items()}
        counts = Counter(status for status, _, _ in at_1h.values())
        assert 0.85 < counts["Delivered"] / 10_000 < 0.93
        assert 0.04 < counts["Waiting"] / 10_000 < 0.11

        at_48h = sim.truth("t", T0 + timedelta(hours=48))
        counts = Counter(status for status, _, _ in at_48h.values())
        assert 0.90 < counts["Delivered"] / 10_000 < 0.96
        assert 0.015 < counts["Not delivered"] / 10_000 < 0.05
        assert 0.003 < counts["ko"] / 10_000 < 0.02
        assert 0.015 < counts["Waiting"] / 10_000 < 0.05
        stops = [s for s, stop, _ in at_48h.values() if stop]
        assert set(stops) <= {"Delivered"} and 0.004 < len(stops) / 10_000 < 0.02

    for phone, (status, stop, date) in at_48h.items():
        if status == "Waiting":
            assert date == sent and not stop
        else:  # a report arrives once, inside the window, and never changes afterwards
            assert int(sent) <= int(date) < int(sent) + 48 * 3600
            if at_1h[phone][0] != "Waiting":
                assert at_1h[phone] == (status, stop, date)


def test_same_seed_same_story_other_seed_other_numbers() -> None:
    def story(seed: int) -> tuple[list[str], dict[str, tuple[str, bool, str]]]:
        sim = Simulator(seed=seed, clock=lambda: T0)
        return sim.add_tag("t", 200), sim.truth("t", T0 + timedelta(hours=5))

    assert story(7) == story(7)
    assert set(story(7)[0]).isdisjoint(story(8)[0])


def test_a_second_batch_adds_new_numbers(sim: Simulator, clock: Clock) -> None:
    first = sim.add_tag("t", 50)
    second = sim.add_tag("t", 50, sent_at=T0 + timedelta(hours=1))
    assert set(first).isdisjoint(second)
    truth = sim.truth("t", T0 + timedelta(hours=1))
    assert len(truth) == 100
    assert {truth[p][0] for p in second} == {"Waiting"}


def test_time_scale_accelerates_real_time() -> None:
    sim = Simulator(time_scale=3600)
    start = sim.now()
    time.sleep(0.2)
    elapsed = (sim.now() - start).total_seconds()
    assert 600 < elapsed < 3600  # 0.2 s real = 720 s simulated, give or take scheduling


# -- handcrafted items -----------------------------------------------------------------


def test_set_items_are_served_verbatim(sim: Simulator, client: httpx.Client) -> None:
    items: list[dict[str, object]] = [
        {"phoneNumber": "+33600000001", "status": "delivered", "stopSMS": "1", "date": 1517989111},
        {"phoneNumber": 33600000002, "status": None, "stopSMS": 0},
        {"foo": "bar"},
        {"phoneNumber": "+33600000003", "status": " Not Delivered ", "stopSMS": False, "date": ""},
    ]
    sim.add_tag("t", 5)
    sim.set_items("t", items, page_size=3)
    items[0]["status"] = "changed after the call"  # the simulator kept its own copy
    pages = [fetch(client, "t", n).json() for n in (1, 2)]
    assert pages[0]["total"] == 4
    served = pages[0]["StatutResponse_List"] + pages[1]["StatutResponse_List"]
    assert served[0]["status"] == "delivered" and served[1:] == items[1:]
    assert sim.truth("t") == {
        "+33600000001": ("delivered", True, "1517989111"),
        "+33600000003": (" Not Delivered ", False, ""),
    }


def test_set_number_overrides_or_adds(sim: Simulator, client: httpx.Client) -> None:
    phones = sim.add_tag("t", 3, page_size=10)
    sim.set_number("t", phones[1], "ko", date="1709283600")
    sim.set_number("t", "+33699999999", "Delivered", stop_sms="1", date=1709283700)
    sim.set_number("fresh", "+33600000000", "Waiting")
    items = fetch(client, "t").json()["StatutResponse_List"]
    assert [i["phoneNumber"] for i in items] == [*phones, "+33699999999"]
    assert items[1] == {
        "phoneNumber": phones[1],
        "status": "ko",
        "stopSMS": False,
        "date": "1709283600",
    }
    assert items[3]["stopSMS"] == "1" and items[3]["date"] == 1709283700
    assert sim.truth("t")["+33699999999"] == ("Delivered", True, "1709283700")
    fresh = fetch(client, "fresh").json()["StatutResponse_List"]
    assert fresh == [
        {
            "phoneNumber": "+33600000000",
            "status": "Waiting",
            "stopSMS": False,
            "date": str(int(T0.timestamp())),
        }
    ]


def test_unknown_tag_truth_is_an_error(sim: Simulator) -> None:
    with pytest.raises(KeyError):
        sim.truth("never-added")


# -- faults ----------------------------------------------------------------------------


def test_http_errors_then_recovery(sim: Simulator, client: httpx.Client) -> None:
    sim.add_tag("t", 2)
    sim.inject("500", times=2)
    sim.inject("503")
    assert [fetch(client).status_code for _ in range(4)] == [500, 500, 503, 200]


def test_rate_limits(sim: Simulator, client: httpx.Client) -> None:
    sim.add_tag("t", 2)
    sim.inject("429", retry_after=2)
    sim.inject("429json")
    limited = fetch(client)
    assert limited.status_code == 429 and limited.headers["Retry-After"] == "2"
    assert limited.json()["code"] == 429
    in_json = fetch(client)
    assert in_json.status_code == 200
    assert in_json.json() == {"success": False, "code": 429, "message": "Too many requests"}


@pytest.mark.parametrize("status", [200, 502])
def test_html_page(sim: Simulator, client: httpx.Client, status: int) -> None:
    sim.add_tag("t", 2)
    sim.inject("html", status=status)
    response = fetch(client)
    assert response.status_code == status
    assert response.headers["content-type"].startswith("text/html")
    assert response.text.startswith("<html>")


def test_truncated_json(sim: Simulator, client: httpx.Client) -> None:
    sim.add_tag("t", 3)
    whole = fetch(client).content
    sim.inject("truncated")
    response = fetch(client)
    assert response.status_code == 200 and "json" in response.headers["content-type"]
    assert int(response.headers["content-length"]) == len(response.content) < len(whole)
    assert whole.startswith(response.content)
    with pytest.raises(json.JSONDecodeError):
        json.loads(response.content)


def test_reset_drops_the_connection_mid_body(sim: Simulator, client: httpx.Client) -> None:
    sim.add_tag("t", 3)
    sim.inject("reset")
    with pytest.raises(httpx.TransportError):
        fetch(client)
    assert fetch(client).status_code == 200  # the client recovers on a new connection


def test_slow_answers_after_the_delay(sim: Simulator, client: httpx.Client) -> None:
    sim.add_tag("t", 3)
    sim.inject("slow", seconds=0.3)
    started = time.monotonic()
    assert fetch(client).json()["total"] == 3
    assert time.monotonic() - started >= 0.3


def test_provider_error_faults_with_the_right_key(sim: Simulator, client: httpx.Client) -> None:
    sim.add_tag("t", 3)
    sim.inject("wrong_key")
    sim.inject("not_found")
    assert fetch(client).json()["code"] == 10
    assert fetch(client).json()["code"] == 4
    assert fetch(client).json()["code"] == 200


def test_pagination_faults(sim: Simulator, client: httpx.Client) -> None:
    sim.add_tag("t", 7)
    first = fetch(client, "t", 1).json()
    sim.inject("ignore_page")
    sim.inject("echo_page")
    assert fetch(client, "t", 2).json() == first
    echoed = fetch(client, "t", 2).json()
    assert echoed["currentPage"] == 2
    assert echoed["StatutResponse_List"] == first["StatutResponse_List"]


def test_endless_pages_until_cleared(sim: Simulator, client: httpx.Client) -> None:
    sim.add_tag("t", 2)
    sim.inject("endless", times=None)
    seen: set[str] = set()
    for page in (1, 2, 3, 500, 10_000):
        body = fetch(client, "t", page).json()
        assert body["currentPage"] == page and body["total"] >= 1_000_000
        phones = {i["phoneNumber"] for i in body["StatutResponse_List"]}
        assert len(phones) == 3 and seen.isdisjoint(phones)
        seen |= phones
    sim.clear_faults()
    assert fetch(client, "t", 1).json()["total"] == 2


def test_faults_target_one_tag(sim: Simulator, client: httpx.Client) -> None:
    sim.add_tag("a", 1)
    sim.add_tag("b", 1)
    sim.inject("500", tag="a")
    assert fetch(client, "b").status_code == 200
    assert fetch(client, "a").status_code == 500
    assert fetch(client, "a").status_code == 200


def test_fault_rate_draws_transient_faults(clock: Clock) -> None:
    with (
        Simulator(clock=clock, fault_rate=1.0, seed=3) as sim,
        new_client(sim.url) as client,
    ):
        sim.add_tag("t", 3)
        kinds = set()
        for _ in range(24):
            response = fetch(client)  # random faults always answer, never reset
            if response.status_code == 500:
                kinds.add("500")
            elif response.status_code == 429:
                kinds.add("429")
            elif response.headers["content-type"].startswith("text/html"):
                kinds.add("html")
            else:
                with pytest.raises(json.JSONDecodeError):
                    response.json()
                kinds.add("truncated")
        assert kinds == set(RANDOM_FAULTS)


@pytest.mark.parametrize(
    ("fault", "params"),
    [("nope", {}), ("slow", {}), ("500", {"seconds": 1.0}), ("429", {"retry_afer": 1.0})],
)
def test_inject_rejects_typos(sim: Simulator, fault: str, params: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=fault if fault == "nope" else "fault"):
        sim.inject(fault, **params)


def test_trickle_sends_the_whole_answer_a_few_bytes_at_a_time(
    sim: Simulator, client: httpx.Client
) -> None:
    sim.add_tag("t", 3)
    whole = fetch(client).content
    sim.inject("trickle", bytes=64, interval=0.05)
    started = time.monotonic()
    with client.stream("GET", "/bulk-status-by-tag", params={"apiKey": KEY, "tag": "t"}) as r:
        chunks = list(r.iter_raw())
    took = time.monotonic() - started
    assert b"".join(chunks) == whole and len(chunks) >= 2
    assert took >= 0.05 * (len(whole) // 64)  # headers count too: at least this many gaps


def test_echo_key_faults_echo_the_key_escaped(sim: Simulator, client: httpx.Client) -> None:
    sim.add_tag("t", 3)
    sim.inject("echo_key")
    sim.inject("echo_key_html", status=502)
    key = "a/b&c é"
    message = fetch(client, key=key)
    assert message.status_code == 200 and message.json()["code"] == 10
    assert "a\\/b&c \\u00e9" in message.text  # JSON-escaped, as sent
    assert "a&#47;b&amp;c é" in message.json()["message"]  # HTML-escaped
    assert "a%2fb%26c%20%c3%a9" in message.json()["message"]  # lowercase percent-encoded
    page = fetch(client, key=key)
    assert page.status_code == 502 and page.headers["content-type"].startswith("text/html")
    assert "a&#47;b&amp;c é" in page.text and "a%2fb%26c%20%c3%a9" in page.text


def test_lying_total_and_current_page(sim: Simulator, client: httpx.Client) -> None:
    sim.add_tag("t", 7)
    sim.inject("lying_total", times=2, total=1, current_page=1)
    second = fetch(client, "t", 2).json()
    assert (second["total"], second["currentPage"]) == (1, 1)
    assert len(second["StatutResponse_List"]) == 3  # the content is the true page 2
    assert fetch(client, "t", 3).json()["total"] == 1
    assert fetch(client, "t", 3).json()["total"] == 7


def test_every_fault_is_documented() -> None:
    assert len(FAULTS) == 17 and set(RANDOM_FAULTS) <= set(FAULTS)


# -- speed and lifecycle -----------------------------------------------------------------


def test_hundred_thousand_numbers_in_pages_of_a_thousand(clock: Clock) -> None:
    with Simulator(clock=clock, page_size=1000) as sim, new_client(sim.url) as client:
        started = time.perf_counter()
        sim.add_tag("big", 100_000)
        assert time.perf_counter() - started < 3
        clock.now = T0 + timedelta(hours=2)
        started = time.perf_counter()
        seen = {i["phoneNumber"] for p in (1, 50, 100) for i in all_pages(client, p)}
        per_page = (time.perf_counter() - started) / 3
        assert len(seen) == 3000
        assert per_page < 0.1  # typically ~2 ms server side, ~8 ms with the client


def all_pages(client: httpx.Client, page: int) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = fetch(client, "big", page).json()["StatutResponse_List"]
    return items


def test_stop_is_prompt_with_idle_and_slow_connections(clock: Clock) -> None:
    sim = Simulator(clock=clock).start()
    sim.add_tag("t", 1)
    errors: list[Exception] = []

    def slow_request() -> None:
        with new_client(sim.url, 10) as slow:
            try:
                fetch(slow)
            except httpx.TransportError as exc:
                errors.append(exc)

    with new_client(sim.url) as idle:
        assert fetch(idle).status_code == 200  # stays open: keep-alive
        sim.inject("slow", seconds=30)
        thread = threading.Thread(target=slow_request)
        thread.start()
        while sim.request_count() < 2:
            time.sleep(0.01)
        started = time.monotonic()
        sim.stop()
        assert time.monotonic() - started < 2
        thread.join(5)
    assert not thread.is_alive() and len(errors) == 1
    with pytest.raises(RuntimeError):
        _ = sim.url


# -- the CLI verb ------------------------------------------------------------------------

CLI = (
    "import argparse, sys\n"
    "from daemon.simulator_cli import add_cli_arguments, run_cli\n"
    "parser = argparse.ArgumentParser(prog='smspartner-status simulator')\n"
    "add_cli_arguments(parser)\n"
    "sys.exit(run_cli(parser.parse_args()))\n"
)


def run_cli_process(args: list[str], check: Callable[[str, str], None]) -> tuple[str, str]:
    """Start the verb, hand its announced URL and key to ``check``, then SIGTERM it."""
    with subprocess.Popen(
        [sys.executable, "-c", CLI, *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.fullmatch(r"SMSPARTNER_BASE_URL=(\S+) SMSPARTNER_API_KEY=(\S+)\n", line)
        try:
            assert match, line
            check(match[1], match[2])
        finally:
            process.send_signal(signal.SIGTERM)
            rest, errors = process.communicate(timeout=10)
        assert process.returncode == 0, errors
    return rest, errors


def test_cli_defaults_serve_the_demo_tag() -> None:
    def check(url: str, key: str) -> None:
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1") and key == KEY
        with new_client(url) as client:
            body = fetch(client, "demo", key=key).json()
        assert body["total"] == 1000 and len(body["StatutResponse_List"]) == 500

    assert run_cli_process(["--port", "0"], check) == ("", "")


def test_cli_options() -> None:
    def check(url: str, key: str) -> None:
        assert key == "k2"
        with new_client(url) as client:
            a = fetch(client, "a:b", key=key).json()
            assert a["total"] == 5 and len(a["StatutResponse_List"]) == 2
            assert fetch(client, "c", key=key).json()["total"] == 0
            assert fetch(client, "demo", key=key).json()["code"] == 4

    args = ["--port", "0", "--api-key", "k2", "--page-size", "2", "--tag", "a:b:5"]
    run_cli_process([*args, "--tag", "c:0", "--seed", "4", "--time-scale", "60"], check)


def test_cli_fault_serves_a_hostile_provider() -> None:
    def check(url: str, key: str) -> None:
        with new_client(url) as client:
            for _ in range(2):  # every request, not just the first
                assert fetch(client, "demo", key=key).json()["total"] == 1
            assert fetch(client, "other", key=key).json()["code"] == 4

    run_cli_process(["--port", "0", "--fault", "lying_total@demo,total=1"], check)


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--tag", "demo"], "NAME:COUNT"),
        (["--tag", "demo:lots"], "whole number"),
        (["--tag", "has space:3"], "whitespace"),
        (["--tag", "demo:-1"], "between"),
        (["--fault-rate", "2"], "between 0 and 1"),
        (["--port", "http"], "number"),
        (["--fault", "nope"], "unknown fault"),
        (["--fault", "trickle,interval"], "NAME=NUMBER"),
        (["--fault", "trickle,interval=fast"], "NAME=NUMBER"),
    ],
)
def test_cli_rejects_bad_options_in_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], fragment: str
) -> None:
    parser = argparse.ArgumentParser(prog="smspartner-status simulator")
    add_cli_arguments(parser)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument {argv[0]}" in error and fragment in error


def test_cli_port_in_use_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    with Simulator() as busy:
        port = busy.url.rsplit(":", 1)[1].split("/")[0]
        assert run_cli(parser.parse_args(["--port", port, "--tag", "t:1"])) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"simulator: cannot listen on 127.0.0.1:{port}")
    assert "Traceback" not in captured.err
