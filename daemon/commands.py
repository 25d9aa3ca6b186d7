"""What each ``smspartner-status`` verb does.

A verb is ``cmd_<name>(ctx, args) -> int``: it reads the parsed arguments, works through
``ctx``, the :class:`~daemon.app.App` (the settings, the clock, the database opened and
migrated on first use, the poller, the daemon), prints its answer and returns the exit
code. Expected failures are raised from our exception tree; ``daemon.cli.main`` turns
them into one ``error: …`` line and exit 2 or 1. The standalone verbs (``check``,
``demo``, ``simulator``) get no App: they need no settings object.

A verb imports what it uses, inside its function: ``check`` must not pay for SQLAlchemy
and ``poll`` not for APScheduler (see docs/performance.md, "Start-up"). This module
imports nothing from ``cli.py``; the dependency runs one way.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from daemon.errors import ConfigError, InputError, StoreError
from daemon.health import LIVENESS_TIMEOUT, HeartbeatDirError, heartbeat_age, heartbeat_path
from daemon.output import (
    NUMBER_CSV_COLUMNS,
    OPTOUT_COLUMNS,
    SUMMARY_COLUMNS,
    TAG_COLUMNS,
    iso,
    print_error,
    print_json,
    table,
    write_csv,
)
from daemon.status import tag_warnings, window_end

if TYPE_CHECKING:
    from daemon.app import App
    from daemon.poller import PollResult
    from daemon.scheduler import Daemon


# --- verbs ---------------------------------------------------------------------------------


def _warn_tag(tag: str) -> None:
    for warning in tag_warnings(tag):
        print(f"warning: tag {tag!r}: {warning}", file=sys.stderr)


def cmd_track(ctx: App, args: argparse.Namespace) -> int:
    """Track a tag (or re-activate it), or every tag of a file."""
    if args.from_file is not None:
        if args.tag is not None:
            raise InputError("give either TAG or --from-file FILE, not both")
        return _track_from_file(ctx, args.from_file, args.sent_at)
    if args.tag is None:
        raise InputError("TAG is required (or --from-file FILE)")
    from daemon import tracking

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


def _track_from_file(ctx: App, path: str, sent_at: datetime | None) -> int:
    from daemon import backfill, tracking

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


def cmd_untrack(ctx: App, args: argparse.Namespace) -> int:
    """Stop polling a tag; its data stays."""
    from daemon import tracking

    with ctx.engine.begin() as conn:
        found = tracking.untrack(conn, args.tag, now=ctx.clock())
    if not found:
        raise InputError(f"tag {args.tag!r} is not tracked")
    print(f"untracked tag {args.tag!r}; its data is kept")
    return 0


def cmd_tags(ctx: App, args: argparse.Namespace) -> int:
    """List tracked tags."""
    from daemon import queries

    if _wants_csv(args):
        with ctx.engine.connect() as conn:
            write_csv(queries.stream_tags(conn), TAG_COLUMNS)
        return 0
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


def cmd_poll(ctx: App, args: argparse.Namespace) -> int:
    """Poll one tag now, tracking it first if needed."""
    from daemon import tracking

    # The poller first: without an API key nothing is tracked (a command that fails
    # must not leave a new tag behind for the daemon).
    poller = ctx.poller
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


def cmd_report(ctx: App, args: argparse.Namespace) -> int:
    """Print one tag's summary (and optionally every number)."""
    from daemon import queries

    if _wants_csv(args):
        return _report_csv(ctx, args)
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
        print(table(numbers, NUMBER_CSV_COLUMNS))
    return 0


def _wants_csv(args: argparse.Namespace) -> bool:
    """Whether a listing was asked for as CSV; ``--csv`` with ``--json`` is bad input."""
    if args.csv and args.json:
        raise InputError("--csv: give either --csv or --json, not both")
    return bool(args.csv)


def _report_csv(ctx: App, args: argparse.Namespace) -> int:
    """``report TAG --csv``: the numbers with ``--numbers``, else the summary row.

    One CSV holds one table, so ``--numbers`` prints the numbers alone (the summary is
    ``report TAG --csv``), streamed from the database as they are read.
    """
    from daemon import queries

    with ctx.engine.connect() as conn:
        summary = queries.tag_summary(conn, args.tag)
        if not summary:
            raise InputError(f"tag {args.tag!r} is not tracked")
        if args.numbers:
            write_csv(queries.stream_numbers(conn, args.tag), NUMBER_CSV_COLUMNS)
        else:
            write_csv(summary, SUMMARY_COLUMNS)
    return 0


def cmd_optouts(ctx: App, args: argparse.Namespace) -> int:
    """List STOP opt-outs (per tag, or the account's list), syncing the list first if asked."""
    csv = _wants_csv(args)  # bad flags are refused before any request
    if args.sync:
        _sync_stop_list(ctx, machine=csv or args.json)
    if args.account:
        return _account_optouts(ctx, args)
    from daemon import queries

    if csv:
        with ctx.engine.connect() as conn:
            write_csv(queries.stream_optouts(conn), OPTOUT_COLUMNS)
        return 0
    with ctx.engine.connect() as conn:
        rows = [dict(r) for r in queries.optouts(conn)]
    columns = OPTOUT_COLUMNS
    if args.json:
        print_json([{c: r[c] for c in columns} for r in rows])
    else:
        print(table(rows, columns))
    return 0


#: Columns of ``optouts --account``.
ACCOUNT_COLUMNS = ("phone_number", "provider_id", "listed_at", "first_seen_at", "removed_at")


def _sync_stop_list(ctx: App, *, machine: bool) -> None:
    """``optouts --sync``: sync the account's STOP list now and say what it did.

    Before JSON or CSV (``machine``) the summary goes to stderr, so that stdout stays one
    document a program can read.

    Raises:
        ApiError: the provider still failed after retries (exit 1), or its answer could
            not be proven whole (nothing was changed).
    """
    from daemon.errors import TransientApiError

    result = ctx.stop_list.sync_now()
    if result.outcome == "truncated":
        raise TransientApiError(f"STOP list not synced: {result.error}")
    if not result.ok:
        raise _api_error(result.outcome, result.error or result.outcome)
    print(result.summary, file=sys.stderr if machine else sys.stdout)


def _api_error(outcome: str, message: str) -> Exception:
    """The error of our tree a failed sync's outcome stands for (exit 1)."""
    from daemon.errors import AuthError, PermanentApiError, TransientApiError

    kinds = {"auth_error": AuthError, "transient_error": TransientApiError}
    return kinds.get(outcome, PermanentApiError)(message)


def _account_optouts(ctx: App, args: argparse.Namespace) -> int:
    """``optouts --account``: the account's STOP list as stored, removed numbers too."""
    from daemon import queries

    if args.csv:
        with ctx.engine.connect() as conn:
            write_csv(queries.stream_account_list(conn), ACCOUNT_COLUMNS)
        return 0
    with ctx.engine.connect() as conn:
        rows = [dict(r) for r in queries.account_list(conn)]
        last = queries.last_stop_list_sync(conn)
    if args.json:
        print_json([{c: r[c] for c in ACCOUNT_COLUMNS} for r in rows])
        return 0
    print(table(rows, ACCOUNT_COLUMNS))
    if last is None:
        print("\nnever synced (smspartner-status optouts --sync)")
    else:
        print(
            f"\nlast sync {iso(last['started_at'])}: {last['outcome']}, listed "
            f"{last['listed']}, added {last['added']}, removed {last['removed']}"
            + (f" ({last['error']})" if last["error"] else "")
        )
    return 0


def cmd_prune(ctx: App, args: argparse.Namespace) -> int:
    """Delete (or count) rows older than the given ages, in batches."""
    from daemon import retention

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
        batch_size=args.batch_size or retention.DEFAULT_BATCH_SIZE,
        dry_run=args.dry_run,
        progress=progress,
    )
    total = sum(r.rows for r in results)
    if args.dry_run:
        print(f"dry run: {total:,} row(s) would be deleted; nothing was changed")
    else:
        print(f"pruned {total:,} row(s) in {time.monotonic() - started:.1f} s")
    return 0


def cmd_db_upgrade(ctx: App, args: argparse.Namespace) -> int:
    """Migrate the schema to head."""
    import sqlalchemy as sa

    from daemon import migrate

    url = ctx.settings.safe_database_url
    try:
        engine = ctx.raw_engine
        before = migrate.current_revision(engine)
        changed = migrate.upgrade(engine)
        after = migrate.current_revision(engine)
    except sa.exc.SQLAlchemyError as exc:
        raise StoreError(f"cannot migrate {url}: {getattr(exc, 'orig', None) or exc}") from exc
    if changed:
        print(f"database {url} upgraded from {before or 'empty'} to {after}")
    else:
        print(f"database {url} already at {after} (head)")
    return 0


def cmd_run(ctx: App, args: argparse.Namespace) -> int:
    """The daemon: poll every tracked tag on its cadence until stopped (or once)."""
    from daemon.db import release_run_lock, sqlite_run_lock
    from daemon.health import prepare_heartbeat

    run_lock = sqlite_run_lock(ctx.settings.database_url.get_secret_value())
    try:
        prepare_heartbeat(ctx.heartbeat)
        daemon = ctx.daemon
        if args.once:
            return _run_once(daemon)
        server = ctx.http_server
        if server is not None:
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
    synced = stats.stop_list
    if synced is not None and synced.ok:
        print(f"synced the account's STOP list: {synced.summary}")
    elif synced is not None or stats.stop_list_error:
        error = synced.error if synced is not None else stats.stop_list_error
        print_error(f"sync of the account's STOP list failed: {error}")
        return 1
    return 1 if stats.failures else 0


#: How far ahead of now a heartbeat may be: the daemon writes it on this host with this
#: clock, so only a clock step explains a few seconds; more means someone else wrote it.
HEARTBEAT_CLOCK_SLACK = timedelta(seconds=5)


def cmd_check(ctx: App | None, args: argparse.Namespace) -> int:
    """Exit 0 when the daemon on this database beat recently (container health).

    Every unhealthy answer exits 1, never 2: Docker reserves a HEALTHCHECK's exit 2.
    Run at every health-check interval, it reads the database URL as the settings would
    (:func:`daemon.sources.database_url`) without building them, and imports nothing
    heavy.
    """
    from daemon import sources

    now = datetime.now(UTC)
    try:
        path = heartbeat_path(sources.database_url())
    except ConfigError as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
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


def cmd_demo(ctx: App | None, args: argparse.Namespace) -> int:
    """Run everything against the bundled simulator in accelerated time."""
    from daemon.demo import run_demo

    return run_demo(args)


def cmd_simulator(ctx: App | None, args: argparse.Namespace) -> int:
    """Run the bundled fake SMS Partner API (needs no settings or database)."""
    from daemon.simulator_cli import run_cli

    return run_cli(args)
