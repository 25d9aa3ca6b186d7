"""``smspartner-status demo``: the whole product against the bundled simulator.

The simulator runs in this process on a free loopback port with accelerated time; the
daemon's clock *is* the simulator's clock, so cadence, settling and the 48-hour window
all play out in about 30 real seconds. Nothing here is demo-only logic: the same
composition root (:class:`~daemon.app.App`), hence the same Daemon, Poller, client and
store as ``run``, do the work. ``--help`` imports this module for the options only:
everything heavy is imported when the demo runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from daemon.errors import InputError
from daemon.output import SUMMARY_COLUMNS, table
from daemon.status import PENDING, window_end

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from daemon.scheduler import Daemon
    from daemon.simulator import Simulator

DEMO_KEY = "demo-key"
#: (tag, numbers, sent this long before the demo starts)
CAMPAIGNS = (
    ("spring-sale", 2500, timedelta(minutes=2)),
    ("flash-promo", 800, timedelta(minutes=40)),
    ("appointment-reminders", 300, timedelta(hours=3)),
    ("newsletter-nov", 1500, timedelta(0)),
)
SAMPLE_SQL = (
    "SELECT tag, total, delivered, not_delivered, expired, stop_sms,\n"
    "       ROUND(delivery_rate * 100, 1) AS delivered_pct\n"
    "FROM tag_summary ORDER BY sent_at;"
)


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the ``demo`` verb."""
    parser.add_argument(
        "--database",
        default="smspartner-demo.db",
        metavar="PATH",
        help="SQLite file to create (replaced if it exists; default: %(default)s)",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=30.0,
        help="real seconds that 48 simulated hours take (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=1, help="simulator seed (default: 1)")


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo; returns the exit code.

    Raises:
        InputError: ``--database`` names a file that cannot be replaced or created.
    """
    if args.seconds <= 0:
        print("error: --seconds must be positive", file=sys.stderr)
        return 2
    db = Path(args.database).expanduser().resolve()
    # main() prints these as one line, exit 2.
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        where = exc.filename or db.parent
        raise InputError(f"--database: cannot create directory {where}: {exc.strerror}") from None
    for suffix in ("", "-wal", "-shm"):
        old = db.with_name(db.name + suffix)
        try:
            old.unlink(missing_ok=True)
        except OSError as exc:
            raise InputError(f"--database: cannot replace {old}: {exc.strerror}") from None
    scale = 48 * 3600 / args.seconds
    from daemon import tracking
    from daemon.app import App
    from daemon.log import configure_logging
    from daemon.settings import load_settings
    from daemon.simulator import Simulator

    configure_logging(level="error", fmt="console", stream=sys.stderr)

    with Simulator(api_key=DEMO_KEY, seed=args.seed, time_scale=scale, fault_rate=0.01) as sim:
        settings = load_settings(
            {},
            api_key=DEMO_KEY,
            base_url=sim.url,
            database_url=f"sqlite:///{db}",
            rate_limit_per_second=0,
            retry_backoff_seconds=0.05,
            http_port=0,
            auto_migrate=True,
        )
        # The daemon's clock is the simulator's; dispatching often keeps up with it.
        # The STOP list is due every simulated hour: look often enough to see it.
        app = App(settings, clock=sim.now, dispatch_interval=0.05, stop_list_tick=0.1)
        try:
            engine = app.engine  # created and migrated
            start = sim.now()
            print(f"simulator on {sim.url}; 48 simulated hours take ~{args.seconds:.0f} s")
            with engine.begin() as conn:
                for tag, count, ago in CAMPAIGNS:
                    sent_at = start - ago
                    sim.add_tag(tag, count, sent_at=sent_at)
                    tracking.track(
                        conn,
                        tag,
                        sent_at=sent_at,
                        window_ends_at=window_end(sent_at, settings.report_window),
                        now=start,
                    )
                    print(f"  tracking {tag!r}: {count:,} numbers, sent {_ago(ago)}")

            daemon = app.daemon
            daemon.start()
            try:
                _watch(engine, daemon, sim, start, deadline=time.monotonic() + args.seconds * 2)
            finally:
                daemon.stop()
            _final_report(engine, daemon.stats.polls, daemon.stats.failures, db)
        finally:
            app.close()
    return 0


def _ago(delta: timedelta) -> str:
    if not delta:
        return "just now"
    minutes = int(delta.total_seconds() // 60)
    return f"{minutes} min ago" if minutes < 60 else f"{minutes // 60} h ago"


def _watch(
    engine: Engine, daemon: Daemon, sim: Simulator, start: datetime, deadline: float
) -> None:
    """Print a progress line until every tag is completed or expired."""
    from daemon import queries

    tty = sys.stdout.isatty()
    last = ""
    while time.monotonic() < deadline:
        time.sleep(0.5)
        with engine.connect() as conn:
            rows = queries.tag_summary(conn)
            counts: dict[str, int] = {}
            for row in rows:
                for key in ("delivered", "not_delivered", "failed", "expired", "stop_sms"):
                    counts[key] = counts.get(key, 0) + int(row[key] or 0)
                counts["pending"] = counts.get("pending", 0) + sum(
                    int(row[s.value] or 0) for s in PENDING
                )
            active = sum(1 for row in rows if row["state"] == "active")
        hours = (sim.now() - start).total_seconds() / 3600
        line = (
            f"[+{hours:5.1f} h] polls {daemon.stats.polls:4d} | delivered "
            f"{counts.get('delivered', 0):5,d} | waiting {counts.get('pending', 0):5,d} | "
            f"not delivered {counts.get('not_delivered', 0):3d} | failed "
            f"{counts.get('failed', 0):3d} | expired {counts.get('expired', 0):3d} | "
            f"opt-outs {counts.get('stop_sms', 0):3d} | active tags {active}"
        )
        if line != last:
            print(("\r" + line) if tty else line, end="" if tty else "\n", flush=True)
            last = line
        if active == 0:
            break
    if tty:
        print()


def _stop_list_line(engine: Engine) -> str:
    """The demo's summary of the account's STOP list, as the daemon last synced it."""
    import sqlalchemy as sa

    from daemon import queries

    with engine.connect() as conn:
        rows = queries.account_list(conn)
        suppressed = conn.scalar(sa.text("SELECT COUNT(*) FROM suppression_list"))
    listed = sum(1 for r in rows if r["removed_at"] is None)
    return (
        f"account STOP list: {listed} number(s) listed, {len(rows) - listed} removed since "
        f"(smspartner-status optouts --account); suppression_list: {suppressed} number(s)"
    )


def _final_report(engine: Engine, polls: int, failures: int, db: Path) -> None:
    from daemon import queries

    with engine.connect() as conn:
        summary = [dict(r) for r in queries.tag_summary(conn)]
        optouts = [dict(r) for r in queries.optouts(conn)]
    print(f"\n{polls} polls ({failures} failed and retried later by the schedule)\n")
    print("tag_summary")
    print(table(summary, SUMMARY_COLUMNS[:11]))
    print(f"\nSTOP opt-outs: {len(optouts)}")
    print(table(optouts[:10], ("phone_number", "tag", "reported_at")))
    if len(optouts) > 10:
        print(f"… and {len(optouts) - 10} more (smspartner-status optouts)")
    print(_stop_list_line(engine))
    print(f"\ndatabase: {db}")
    print(f'try:  sqlite3 {db} \\\n  "{SAMPLE_SQL}"')
    print(f"or:   SMSPARTNER_DATABASE_URL=sqlite:///{db} smspartner-status report spring-sale")
