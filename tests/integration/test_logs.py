"""Log lines as a log pipeline reads them: one JSON object per line whose values are all
JSON values, datetimes as ISO-8601 text; the console format prints them as readably."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from enum import Enum
from pathlib import Path
from typing import Any

import pytest
import structlog

from daemon import cli
from daemon.log import configure_logging
from daemon.simulator import Simulator
from tests.helpers import API_KEY

#: When the provider says the STOP numbers answered: 2026-12-03T03:30:38Z.
REPORTED = 1796268638
STOPPED = ("+33711111111", "+33722222222")  # not among add_tag's +3361… numbers


def _poll_with_stops(
    fmt: str,
    simulator: Simulator,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> list[str]:
    """``poll`` a tag of several pages with two STOP answers, at debug level; the log
    lines it wrote (on stderr, as every data-printing verb logs)."""
    simulator.add_tag("spring", 1200)  # three pages of 500
    for phone in STOPPED:
        simulator.set_number("spring", phone, "Delivered", date=str(REPORTED), stop_sms=True)
    for name, value in {
        "API_KEY": API_KEY,
        "BASE_URL": simulator.url,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'logs.db'}",
        "RATE_LIMIT_PER_SECOND": "0",
        "LOG_LEVEL": "debug",
        "LOG_FORMAT": fmt,
    }.items():
        monkeypatch.setenv(f"SMSPARTNER_{name}", value)
    assert cli.main(["poll", "spring"]) == 0
    captured = capsys.readouterr()
    assert "polled 'spring'" in captured.out
    return captured.err.splitlines()


def _is_iso_utc(value: object) -> bool:
    if not isinstance(value, str):
        return False
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return False
    return parsed.utcoffset() == timedelta(0)


@pytest.mark.usefixtures("restore_logging")
def test_every_json_line_of_a_debug_poll_parses_with_iso_times(
    simulator: Simulator,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    lines = _poll_with_stops("json", simulator, tmp_path, monkeypatch, capsys)
    events = [json.loads(line) for line in lines]  # every line, ours and the libraries'
    assert {e["logger"] for e in events if "logger" in e} >= {"httpx", "sqlalchemy.engine.Engine"}
    assert any(e["event"] == "poll.completed" for e in events)

    opt_outs = [e for e in events if e["event"] == "stop_sms.opt_out"]
    assert sorted(e["phone_number"] for e in opt_outs) == sorted(STOPPED)
    for e in opt_outs:
        assert e["reported_at"] == "2026-12-03T03:30:38Z"
        assert datetime.fromisoformat(e["reported_at"]) == datetime.fromtimestamp(REPORTED, UTC)
    for e in events:
        assert _is_iso_utc(e["timestamp"])
        times = {k: v for k, v in e.items() if k.endswith("_at") and v is not None}
        assert all(_is_iso_utc(v) for v in times.values()), e
        fields = json.dumps({k: v for k, v in e.items() if k != "event"})
        assert "datetime.datetime(" not in fields, e


@pytest.mark.usefixtures("restore_logging")
def test_the_console_format_prints_times_as_iso(
    simulator: Simulator,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    lines = _poll_with_stops("console", simulator, tmp_path, monkeypatch, capsys)
    opt_outs = [line for line in lines if "stop_sms.opt_out" in line]
    assert len(opt_outs) == 2
    assert all("reported_at=2026-12-03T03:30:38Z" in line for line in opt_outs)
    # SQLAlchemy's debug messages quote result rows as reprs: its text, not our values.
    ours = [line for line in lines if not line.endswith("[sqlalchemy.engine.Engine]")]
    assert not [line for line in ours if "datetime.datetime(" in line]


class _Colour(Enum):
    RED = "red"


class _Opaque:
    def __str__(self) -> str:
        return "opaque thing"


@pytest.mark.usefixtures("restore_logging")
def test_values_json_cannot_hold_are_written_as_plain_text() -> None:
    """Whatever a future log call passes, the line stays one parseable JSON object."""
    out = io.StringIO()
    configure_logging(level="debug", fmt="json", secrets=[API_KEY], stream=out)
    when = datetime(2026, 12, 3, 3, 30, 38, 120000, tzinfo=UTC)
    values: dict[str, Any] = {
        "at": when,
        "day": when.date(),
        "by_time": {when: 1},
        "many": (when, {2}),
        "colour": _Colour.RED,
        "amount": Decimal("1.50"),
        "ratio": float("nan"),
        "error": ValueError(f"bad key {API_KEY}"),
        "thing": _Opaque(),
        "raw": b"\xff\x00ok",
    }
    structlog.get_logger().info("test.values", **values)
    line = json.loads(out.getvalue())
    assert line.pop("error").startswith("ValueError: bad key ")  # and the key masked:
    assert API_KEY not in out.getvalue()
    assert {k: line[k] for k in values if k != "error"} == {
        "at": "2026-12-03T03:30:38.120000Z",
        "day": "2026-12-03",
        "by_time": {"2026-12-03T03:30:38.120000Z": 1},
        "many": ["2026-12-03T03:30:38.120000Z", [2]],
        "colour": "red",
        "amount": "1.50",
        "ratio": "nan",
        "thing": "opaque thing",
        "raw": "\\xff\x00ok",
    }
