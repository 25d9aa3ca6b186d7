"""What each ``smspartner-status`` verb does, and the Context it does it with.

A verb is ``cmd_<name>(ctx, args) -> int``: it reads the parsed arguments, works through
the Context (the settings, the clock, the database opened and migrated on first use, a
poller with its own HTTP client), prints its answer and returns the exit code. Expected
failures are raised from our exception tree; ``daemon.cli.main`` turns them into one
``error: …`` line and exit 2 or 1. The standalone verbs (``demo``, ``simulator``) get no
Context: they need no settings or database.

The verbs live apart from the parser so that ``cli.py`` stays the composition root
(arguments, settings, logging, exit codes) and a verb reads without the argparse around
it. This module imports nothing from ``cli.py``; the dependency runs one way.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from daemon import backfill, migrate, queries, retention, tracking
from daemon.db import create_engine, release_run_lock, sqlite_run_lock
from daemon.errors import ConfigError, InputError, StoreError
from daemon.health import (
    LIVENESS_TIMEOUT,
    Health,
    HeartbeatDirError,
    Notifier,
    heartbeat_age,
    heartbeat_path,
    prepare_heartbeat,
)
from daemon.http import HttpServer
from daemon.metrics import Metrics
from daemon.output import SUMMARY_COLUMNS, TAG_COLUMNS, iso, print_error, print_json, table
from daemon.poller import Poller, PollResult
from daemon.scheduler import Daemon
from daemon.settings import Settings
from daemon.smspartner import SmsPartnerClient
from daemon.status import tag_warnings, window_end


def utcnow() -> datetime:
    """The one real clock; everything else receives ``now`` or a clock."""
    return datetime.now(UTC)


# --- composition ----------------------------------------------------------------------


@dataclass
class Context:
    """What a verb needs, built once in ``main()``."""

    settings: Settings
    clock: Callable[[], datetime]
    _engine: Engine | None = None

    @property
    def engine(self) -> Engine:
        """The database, migrated to head on first use (unless auto-migrate is off)."""
        if self._engine is None:
            engine = create_engine(self.settings.database_url.get_secret_value())
            try:
                migrate.ensure_schema(engine, auto_migrate=self.settings.auto_migrate)
            except sa.exc.SQLAlchemyError as exc:
                engine.dispose()
                raise StoreError(
                    f"cannot open database {self.settings.safe_database_url}: "
                    f"{getattr(exc, 'orig', None) or exc}"
                ) from exc
            self._engine = engine
        return self._engine

    @contextmanager
    def poller(
        self,
        *,
        sleep: Callable[[float], None] = time.sleep,
        deadline: Callable[[], float | None] | None = None,
        event_hooks: dict[str, list[Callable[..., Any]]] | None = None,
        on_total_mismatch: Callable[[], None] | None = None,
    ) -> Iterator[Poller]:
        """A poller with its own HTTP client, closed afterwards.

        Args:
            sleep: what retries and the rate limit wait with (the daemon's returns early
                when shutdown begins).
            deadline: when a poll must be over, once the daemon is stopping (see
                ``Daemon.shutdown_deadline``); none by default.
            event_hooks: httpx hooks (the daemon times API requests for its metrics).
            on_total_mismatch: called when a fetch disagrees with the provider's total.
        """
        if self.settings.api_key is None:
            raise ConfigError(
                "SMSPARTNER_API_KEY: not set (also read from SMSPARTNER_API_KEY_FILE "
                "or $CREDENTIALS_DIRECTORY/api_key)"
            )
        with httpx.Client(
            timeout=self.settings.http_timeout_seconds, event_hooks=event_hooks
        ) as http:
            client = SmsPartnerClient(
                http,
                api_key=self.settings.api_key.get_secret_value(),
                base_url=self.settings.base_url,
                max_retries=self.settings.max_retries,
                retry_backoff=self.settings.retry_backoff_seconds,
                rate_limit_per_second=self.settings.rate_limit_per_second,
                max_pages=self.settings.max_pages,
                sleep=sleep,
                deadline=deadline,
                on_total_mismatch=on_total_mismatch,
            )
            yield Poller(
                engine=self.engine, client=client, settings=self.settings, clock=self.clock
            )

    def close(self) -> None:
        """Release the database (closes every pooled connection; safe to call twice)."""
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None


# --- verbs ---------------------------------------------------------------------------------


def _warn_tag(tag: str) -> None:
    for warning in tag_warnings(tag):
        print(f"warning: tag {tag!r}: {warning}", file=sys.stderr)


def cmd_track(ctx: Context, args: argparse.Namespace) -> int:
    """Track a tag (or re-activate it), or every tag of a file."""
    if args.from_file is not None:
        if args.tag is not None:
            raise InputError("give either TAG or --from-file FILE, not both")
        return _track_from_file(ctx, args.from_file, args.sent_at)
    if args.tag is None:
        raise InputError("TAG is required (or --from-file FILE)")
    now = ctx.clock()
    sent_at = args.sent_at or now
    if problem := tracking.sent_at_problem(sent_at, now):
        raise InputError(f"--sent-at: {problem}")
    _warn_tag(args.tag)
    with ctx.engine.begin() as conn:
        existed = tracking.get_tag(conn, args.tag) is not None
        tracking.track(
            conn,
            args.tag,
            sent_at=sent_at,
            window_ends_at=window_end(sent_at, ctx.settings.report_window),
            now=now,
        )
        row = tracking.get_tag(conn, args.tag)
    assert row is not None
    verb = "re-activated" if existed else "tracking"
    print(
        f"{verb} tag {args.tag!r}: sent at {iso(row['sent_at'])}, "
        f"reports accepted until {iso(row['window_ends_at'])}"
    )
    return 0


#: Tags whose warnings ``track --from-file`` prints before summing up the rest.
WARNED_TAGS_SHOWN = 10


def _track_from_file(ctx: Context, path: str, sent_at: datetime | None) -> int:
    source = "<stdin>" if path == "-" else path
    now = ctx.clock()
    if sent_at is not None and (problem := tracking.sent_at_problem(sent_at, now)):
        raise InputError(f"--sent-at: {problem}")
    entries = backfill.read_file(path)  # every line checked before anything is written
    if not entries:
        raise InputError(f"--from-file: no tags in {source}")
    for entry in entries:
        if entry.sent_at is not None and (problem := tracking.sent_at_problem(entry.sent_at, now)):
            raise InputError(f"{source}:{entry.line}: sent_at {problem}")
    warned = 0
    for tag in dict.fromkeys(e.tag for e in entries):
        if warnings := tag_warnings(tag):
            warned += 1
            if warned <= WARNED_TAGS_SHOWN:
                print(f"warning: tag {tag!r}: {'; '.join(warnings)}", file=sys.stderr)
    if warned > WARNED_TAGS_SHOWN:
        print(
            f"warning: {warned - WARNED_TAGS_SHOWN} more tag(s) longer than 20 characters "
            "or not lowercase",
            file=sys.stderr,
        )
    with ctx.engine.begin() as conn:
        done = backfill.track_all(
            conn,
            entries,
            default_sent_at=sent_at or now,
            window=ctx.settings.report_window,
            now=now,
        )
    print(
        f"tracking {done.tags} tag(s) from {source}: "
        f"{done.new} new, {done.tags - done.new} re-activated"
    )
    return 0


def cmd_untrack(ctx: Context, args: argparse.Namespace) -> int:
    """Stop polling a tag; its data stays."""
    with ctx.engine.begin() as conn:
        found = tracking.untrack(conn, args.tag, now=ctx.clock())
    if not found:
        raise InputError(f"tag {args.tag!r} is not tracked")
    print(f"untracked tag {args.tag!r}; its data is kept")
    return 0


def cmd_tags(ctx: Context, args: argparse.Namespace) -> int:
    """List tracked tags."""
    with ctx.engine.connect() as conn:
        rows = [dict(r) for r in queries.list_tags(conn)]
    if args.json:
        print_json([{c: r[c] for c in TAG_COLUMNS} for r in rows])
    else:
        shown = ("tag", "state", "sent_at", "next_poll_at", "last_success_at", "last_error")
        print(table(rows, shown))
    return 0


def _summary_line(result: PollResult) -> str:
    counts = ", ".join(f"{status} {n}" for status, n in sorted(result.counts.items())) or "none"
    text = (
        f"polled {result.tag!r}: {result.pages} page(s), {result.numbers_seen} numbers seen, "
        f"{result.changed} changed, {result.optouts} new opt-out(s)"
    )
    if result.skipped:
        text += f", {result.skipped} malformed item(s) skipped"
    state: str = result.state
    if state == "untracked":
        state += f" (polled once; `smspartner-status track {result.tag}` resumes polling)"
    return f"{text}\n  statuses: {counts}\n  tag state: {state}"


def cmd_poll(ctx: Context, args: argparse.Namespace) -> int:
    """Poll one tag now, tracking it first if needed."""
    # The poller first: without an API key nothing is tracked (a command that fails
    # must not leave a new tag behind for the daemon).
    with ctx.poller() as poller:
        now = ctx.clock()
        with ctx.engine.begin() as conn:
            if tracking.get_tag(conn, args.tag) is None:
                _warn_tag(args.tag)
                tracking.track(
                    conn,
                    args.tag,
                    sent_at=now,
                    window_ends_at=window_end(now, ctx.settings.report_window),
                    now=now,
                )
                print(f"tracking tag {args.tag!r} (sent at now)")
        result = poller.poll(args.tag)
    if not result.ok:
        print_error(f"poll of {args.tag!r} failed: {result.error}")
        return 1
    if result.no_messages:
        print(f"polled {args.tag!r}: no messages under this tag yet (tag state: {result.state})")
    else:
        print(_summary_line(result))
    return 0


def cmd_report(ctx: Context, args: argparse.Namespace) -> int:
    """Print one tag's summary (and optionally every number)."""
    with ctx.engine.connect() as conn:
        summary = queries.tag_summary(conn, args.tag)
        if not summary:
            raise InputError(f"tag {args.tag!r} is not tracked")
        numbers = [dict(r) for r in queries.numbers(conn, args.tag)] if args.numbers else []
    row = dict(summary[0])
    if args.json:
        data: dict[str, Any] = {"summary": {c: row[c] for c in SUMMARY_COLUMNS}}
        if args.numbers:
            data["numbers"] = numbers
        print_json(data)
        return 0
    print(table([row], SUMMARY_COLUMNS[:11]))
    print(
        f"\nsent at {iso(row['sent_at'])}, window ends {iso(row['window_ends_at'])}, "
        f"last polled {iso(row['last_polled_at']) or 'never'}"
    )
    if args.numbers:
        print()
        print(
            table(
                numbers,
                (
                    "phone_number",
                    "status",
                    "provider_status",
                    "stop_sms",
                    "reported_at",
                    "resolved_at",
                ),
            )
        )
    return 0


def cmd_optouts(ctx: Context, args: argparse.Namespace) -> int:
    """List STOP opt-outs."""
    with ctx.engine.connect() as conn:
        rows = [dict(r) for r in queries.optouts(conn)]
    columns = ("phone_number", "tag", "reported_at", "first_seen_at")
    if args.json:
        print_json([{c: r[c] for c in columns} for r in rows])
    else:
        print(table(rows, columns))
    return 0


def cmd_prune(ctx: Context, args: argparse.Namespace) -> int:
    """Delete (or count) rows older than the given ages, in batches."""
    cutoffs = retention.Cutoffs.from_ages(
        ctx.clock(),
        events=args.events_older_than,
        runs=args.runs_older_than,
        statuses=args.statuses_older_than,
        optouts=args.optouts_older_than,
    )
    if not cutoffs:
        raise InputError(
            "prune: give at least one of --events-older-than, --runs-older-than, "
            "--statuses-older-than, --optouts-older-than"
        )
    verb = "would delete" if args.dry_run else "deleted"

    def progress(result: retention.TableResult, finished: bool) -> None:
        rows = f"{result.rows:,} row(s)"
        if finished:
            print(f"{result.table}: {verb} {rows} {result.what}", flush=True)
        else:
            print(f"{result.table}: {rows} deleted so far …", flush=True)

    started = time.monotonic()
    results = retention.prune(
        ctx.engine,
        cutoffs,
        batch_size=args.batch_size,
        dry_run=args.dry_run,
        progress=progress,
    )
    total = sum(r.rows for r in results)
    if args.dry_run:
        print(f"dry run: {total:,} row(s) would be deleted; nothing was changed")
    else:
        print(f"pruned {total:,} row(s) in {time.monotonic() - started:.1f} s")
    return 0


def cmd_db_upgrade(ctx: Context, args: argparse.Namespace) -> int:
    """Migrate the schema to head."""
    engine = create_engine(ctx.settings.database_url.get_secret_value())
    try:
        before = migrate.current_revision(engine)
        changed = migrate.upgrade(engine)
        after = migrate.current_revision(engine)
    except sa.exc.SQLAlchemyError as exc:
        raise StoreError(
            f"cannot migrate {ctx.settings.safe_database_url}: {getattr(exc, 'orig', None) or exc}"
        ) from exc
    finally:
        engine.dispose()
    if changed:
        print(
            f"database {ctx.settings.safe_database_url} upgraded from "
            f"{before or 'empty'} to {after}"
        )
    else:
        print(f"database {ctx.settings.safe_database_url} already at {after} (head)")
    return 0


def cmd_run(ctx: Context, args: argparse.Namespace) -> int:
    """The daemon: poll every tracked tag on its cadence until stopped (or once)."""
    settings = ctx.settings
    run_lock = sqlite_run_lock(settings.database_url.get_secret_value())
    heartbeat = heartbeat_path(settings.database_url.get_secret_value())
    try:
        prepare_heartbeat(heartbeat)
        engine = ctx.engine
        health, metrics = Health(ctx.clock), Metrics()
        holder: list[Daemon] = []
        with ctx.poller(
            sleep=lambda seconds: holder[0].interruptible_sleep(seconds),
            deadline=lambda: holder[0].shutdown_deadline(),
            event_hooks=metrics.httpx_event_hooks(),
            on_total_mismatch=metrics.observe_total_mismatch,
        ) as poller:
            daemon = Daemon(
                engine=engine,
                poll=poller.poll,
                clock=ctx.clock,
                health=health,
                concurrency=settings.concurrency,
                report_window=settings.report_window,
                on_result=metrics.observe_poll,
                notifier=Notifier(),
                heartbeat=heartbeat,
                maintenance=retention.scheduled_prune(
                    engine, settings, ctx.clock, should_stop=lambda: holder[0].stopping
                ),
            )
            holder.append(daemon)
            if args.once:
                return _run_once(daemon)
            server = None
            if settings.http_port:
                server = HttpServer(
                    host=settings.http_host,
                    port=settings.http_port,
                    engine=engine,
                    health=health,
                    metrics=metrics,
                    settings=settings,
                    clock=ctx.clock,
                    wake=daemon.wake,
                )
                server.start()
            try:
                daemon.run_until_signal()
            finally:
                if server is not None:
                    server.stop()
        return 0
    finally:
        # The engine first: closing the lock's descriptor drops every POSIX lock this
        # process holds on the file, SQLite's own included (see sqlite_run_lock).
        ctx.close()
        release_run_lock(run_lock)


def _run_once(daemon: Daemon) -> int:
    stats = daemon.run_once()
    failed = [r for r in stats.results if not r.ok]
    print(
        f"polled {stats.polls} tag(s): {stats.polls - stats.failures} ok, {stats.failures} failed"
        + (" (stopped by a signal: the tags not polled stay due)" if daemon.stopping else "")
    )
    for result in failed:
        print_error(f"poll of {result.tag!r} failed: {result.error}")
    return 1 if stats.failures else 0


#: How far ahead of now a heartbeat may be: the daemon writes it on this host with this
#: clock, so only a clock step explains a few seconds; more means someone else wrote it.
HEARTBEAT_CLOCK_SLACK = timedelta(seconds=5)


def cmd_check(ctx: Context, args: argparse.Namespace) -> int:
    """Exit 0 when the daemon on this database beat recently (container health).

    Every unhealthy answer exits 1, never 2: Docker reserves a HEALTHCHECK's exit 2.
    """
    path = heartbeat_path(ctx.settings.database_url.get_secret_value())
    now = utcnow()
    try:
        age = heartbeat_age(path, now)
    except HeartbeatDirError as exc:
        print(f"unhealthy: {exc.strerror}", file=sys.stderr)
        return 1
    if age is None:
        print("unhealthy: no heartbeat from a running daemon", file=sys.stderr)
        return 1
    if age < -HEARTBEAT_CLOCK_SLACK:
        print(
            f"unhealthy: the heartbeat is dated {iso(now - age)}, "
            f"{int(-age.total_seconds())} s in the future: not written by a running daemon",
            file=sys.stderr,
        )
        return 1
    if age > LIVENESS_TIMEOUT:
        print(f"unhealthy: last heartbeat {int(age.total_seconds())} s ago", file=sys.stderr)
        return 1
    print(f"healthy: last heartbeat {max(age.total_seconds(), 0):.1f} s ago")
    return 0


def cmd_demo(ctx: Context | None, args: argparse.Namespace) -> int:
    """Run everything against the bundled simulator in accelerated time."""
    from daemon.demo import run_demo

    return run_demo(args)


def cmd_simulator(ctx: Context | None, args: argparse.Namespace) -> int:
    """Run the bundled fake SMS Partner API (needs no settings or database)."""
    from daemon.simulator_cli import run_cli

    return run_cli(args)
