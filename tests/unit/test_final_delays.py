"""The delays from sending to each newly final report, which the metrics' histogram
observes: one per number, in order, computed once per distinct date."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from daemon.poller import _final_delays

SENT = datetime(2026, 11, 26, 8, 0, tzinfo=UTC)
NOW = SENT + timedelta(hours=1)


def test_one_delay_per_number_in_order_and_now_for_a_report_without_a_date() -> None:
    reported = [SENT + timedelta(seconds=30), None, SENT + timedelta(seconds=30), SENT]
    assert _final_delays(reported, SENT, NOW) == (30.0, 3600.0, 30.0, 0.0)


def test_no_newly_final_report_gives_no_delay() -> None:
    assert _final_delays([], SENT, NOW) == ()
