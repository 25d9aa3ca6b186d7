"""The ``smspartner-status`` command line.

This module owns the parser (every verb, option, help text and argument type) and
``main()``, which parses arguments, builds the settings once, configures logging, then
hands the verb an :class:`~daemon.app.App`, the composition root that builds the
engine, clients, poller and daemon when the verb first asks. What the verbs do lives in
``daemon.commands``. Every expected error (our exception tree, and a database failing
a verb's statement) becomes one ``error: …`` line on stderr and a non-zero exit: 2 for
bad input or configuration, 1 for a failure at run time. Only the entry points
(``daemon.__main__`` and the console script) import this module.

``--help``, a bad argument and ``check`` import only the standard library and our light
modules; the settings, logging and everything heavy are imported once a verb needs them
(tests/integration/test_light_start.py keeps it so).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, NoReturn

from daemon.commands import (
    cmd_check,
    cmd_db_upgrade,
    cmd_demo,
    cmd_optouts,
    cmd_poll,
    cmd_prune,
    cmd_report,
    cmd_run,
    cmd_simulator,
    cmd_tags,
    cmd_track,
    cmd_untrack,
)
from daemon.errors import ConfigError, InputError, SmsPartnerStatusError
from daemon.output import print_error
from daemon.status import parse_duration, parse_sent_at, tag_problem

if TYPE_CHECKING:
    from daemon.app import App

EXAMPLES = """\
examples:
  smspartner-status demo                          see it work against the bundled simulator
  smspartner-status track spring-sale --sent-at 2026-11-26T09:00:00Z
  smspartner-status poll spring-sale              poll now and print a summary
  smspartner-status report spring-sale --numbers  every number with its status
  smspartner-status report spring-sale --numbers --csv > spring-sale.csv
  smspartner-status run                           the daemon: poll every tracked tag

Configuration comes from SMSPARTNER_* environment variables or a .env file
(SMSPARTNER_API_KEY, SMSPARTNER_DATABASE_URL, …); see .env.example and the README.
"""


#: What ``--csv`` prints, for every listing that has it (README, "CSV exports").
CSV_HELP = (
    "print CSV instead (RFC 4180 with a header line, streamed; times ISO-8601 UTC, "
    "true/false, empty for none; text a spreadsheet would run as a formula gets a "
    "leading ')"
)
#: The longest ``--…-older-than`` age: a century, as for SMSPARTNER_PRUNE_*_DAYS.
MAX_AGE = timedelta(days=36500)
#: ``prune --batch-size`` unless given: ``daemon.retention.DEFAULT_BATCH_SIZE``, which
#: ``--help`` must not import SQLAlchemy to read (a test keeps them equal).
PRUNE_BATCH_SIZE = 5000
#: The collector's first threshold while a verb starts: importing SQLAlchemy, pydantic
#: and httpx allocates about a million objects that live as long as the process; at
#: the default (700) the collector ran 175 times over them, a tenth of the start,
#: and freed nothing. The poller keeps it as high (``daemon.poller.tune_gc``).
START_GC_THRESHOLD = 50_000


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line, not usage plus error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# --- argument types ---------------------------------------------------------------------


def _tag(value: str) -> str:
    problem = tag_problem(value)
    if problem:
        raise argparse.ArgumentTypeError(f"invalid TAG {value!r}: {problem}")
    return value


def _sent_at(value: str) -> datetime:
    """ISO-8601 date-time; without an offset it is taken as UTC (status.parse_sent_at)."""
    try:
        return parse_sent_at(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None  # argparse names the option


def _age(value: str) -> timedelta:
    """``--…-older-than DURATION`` (``90d``, ``12h``); argparse names the option."""
    try:
        age = parse_duration(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if age <= timedelta(0):
        raise argparse.ArgumentTypeError(f"{value!r} must be more than zero")
    if age > MAX_AGE:  # now - age would fall before the year 1
        raise argparse.ArgumentTypeError(f"{value!r} is more than {MAX_AGE.days} days (a century)")
    return age


def _batch_size(value: str) -> int:
    try:
        size = int(value)
    except ValueError:
        size = 0
    if not 1 <= size <= 1_000_000:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number from 1 to 1000000")
    return size


# --- parser ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, with help texts that teach."""
    parser = _Parser(
        prog="smspartner-status",
        description="Keep an SMS Partner account's delivery reports in a SQL database.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True, parser_class=_Parser)

    p = verbs.add_parser(
        "track",
        help="start polling a tag (or re-activate it)",
        description="Track a tag: the daemon polls it until every number's "
        "report is final or the report window (48 h by default) closes.",
    )
    p.add_argument(
        "tag",
        nargs="?",
        type=_tag,
        metavar="TAG",
        help="the tag given to SMS Partner at send time",
    )
    p.add_argument(
        "--sent-at",
        type=_sent_at,
        metavar="ISO-8601",
        help="when the campaign was sent (default: now; no offset means UTC); "
        "the report window and the poll cadence count from it",
    )
    p.add_argument(
        "--from-file",
        metavar="FILE",
        help="track every tag of FILE instead of TAG (- reads stdin): one tag per line, "
        "or CSV with a header tag,sent_at (sent_at optional per row, else --sent-at or "
        "now); blank lines and # comments skipped. Every line is checked first: one bad "
        "line and nothing is tracked",
    )
    p.set_defaults(func=cmd_track)

    p = verbs.add_parser("untrack", help="stop polling a tag; its data is kept")
    p.add_argument("tag", type=_tag, metavar="TAG")
    p.set_defaults(func=cmd_untrack)

    p = verbs.add_parser("tags", help="list tracked tags with their state and schedule")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--csv", action="store_true", help=CSV_HELP + " (the columns of --json)")
    p.set_defaults(func=cmd_tags)

    p = verbs.add_parser(
        "poll",
        help="poll one tag now and print a summary",
        description="Poll one tag now, whatever the schedule, tracking it "
        "first (sent at now) if it is unknown. An untracked tag is polled once "
        "and stays untracked: 'track' puts it back on the schedule. Exits 1 if "
        "the poll fails; 'no messages under this tag yet' (code 4) is not a failure.",
    )
    p.add_argument("tag", type=_tag, metavar="TAG")
    p.set_defaults(func=cmd_poll)

    p = verbs.add_parser("report", help="a tag's delivery summary (and every number)")
    p.add_argument("tag", type=_tag, metavar="TAG")
    p.add_argument("--numbers", action="store_true", help="also list every number")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument(
        "--csv",
        action="store_true",
        help=CSV_HELP + ": with --numbers, one row per number (phone_number, status, "
        "provider_status, stop_sms, reported_at, resolved_at); without, the summary row",
    )
    p.set_defaults(func=cmd_report)

    p = verbs.add_parser(
        "optouts",
        help="numbers that answered STOP, per tag (or the account's STOP list)",
        description="List the numbers that answered STOP under a polled tag. --sync first "
        "fetches the account's whole STOP list from SMS Partner (opt-outs after a tag's "
        "48-hour window, numbers added by hand) and prints 'listed N, added A, removed R'; "
        "--account lists that list instead, with listed_at and removed_at. Exits 1 when "
        "SMS Partner still fails after retries.",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--csv", action="store_true", help=CSV_HELP + " (the columns of --json)")
    p.add_argument(
        "--sync",
        action="store_true",
        help="sync the account's STOP list from SMS Partner first (needs the API key)",
    )
    p.add_argument(
        "--account",
        action="store_true",
        help="list the account's STOP list (as last synced) instead of per-tag opt-outs",
    )
    p.set_defaults(func=cmd_optouts)

    p = verbs.add_parser(
        "prune",
        help="delete old events, poll runs (and statuses) in batches",
        description="Delete rows older than the given ages, 5,000 per transaction so the "
        "daemon is never held up. Opt-outs are kept unless --optouts-older-than is given. "
        "DURATION is like 90d, 12h, 30m.",
    )
    p.add_argument(
        "--events-older-than",
        type=_age,
        metavar="DURATION",
        help="delete delivery_status_events observed longer ago than this",
    )
    p.add_argument(
        "--runs-older-than",
        type=_age,
        metavar="DURATION",
        help="delete poll_runs finished longer ago than this",
    )
    p.add_argument(
        "--statuses-older-than",
        type=_age,
        metavar="DURATION",
        help="delete delivery_statuses (and their events) of tags completed, expired or "
        "untracked whose report window ended longer ago than this; the tags stay listed",
    )
    p.add_argument(
        "--optouts-older-than",
        type=_age,
        metavar="DURATION",
        help="delete STOP opt-outs first seen longer ago than this (never without it)",
    )
    p.add_argument(
        "--batch-size",
        type=_batch_size,
        default=PRUNE_BATCH_SIZE,
        metavar="N",
        help="rows deleted per transaction (default: %(default)s)",
    )
    p.add_argument("--dry-run", action="store_true", help="only count what would be deleted")
    p.set_defaults(func=cmd_prune)

    p = verbs.add_parser("db", help="database maintenance")
    db_verbs = p.add_subparsers(
        dest="db_verb", metavar="ACTION", required=True, parser_class=_Parser
    )
    up = db_verbs.add_parser("upgrade", help="migrate the schema to the newest version")
    up.set_defaults(func=cmd_db_upgrade)

    p = verbs.add_parser(
        "run",
        help="the daemon: poll every tracked tag until stopped",
        description="Poll every tracked tag on its cadence, re-check numbers still Waiting "
        "until they resolve or the window closes, sync the account's STOP list every "
        "SMSPARTNER_STOP_LIST_INTERVAL_MINUTES, and serve on "
        "SMSPARTNER_HTTP_HOST:SMSPARTNER_HTTP_PORT the status page (/), /healthz, /readyz, "
        "/metrics and /tags, all described by /openapi.json. Stops cleanly on SIGTERM or "
        "Ctrl-C.",
    )
    p.add_argument(
        "--once",
        action="store_true",
        help="poll every due tag once, close windows that ended, sync the account's STOP "
        "list if its last successful sync is older than SMSPARTNER_STOP_LIST_INTERVAL_MINUTES, "
        "and exit (non-zero if a poll or the sync failed) — for cron and Kubernetes CronJobs",
    )
    p.set_defaults(func=cmd_run, log_to_stdout=True, service=True)

    p = verbs.add_parser(
        "check",
        help="exit 0 when the running daemon is healthy",
        description="Exit 0 when the `run` daemon using this database beat in the last "
        "minute (for a Docker HEALTHCHECK), 1 otherwise.",
    )
    p.set_defaults(func=cmd_check, standalone=True)

    p = verbs.add_parser(
        "demo",
        help="see it work: simulator + daemon, 48 h in ~30 s",
        description="Start the bundled simulator on a free loopback port, track a few "
        "campaigns of realistic sizes in a local SQLite file, run the real daemon in "
        "accelerated time and show what happened.",
    )
    from daemon.demo import add_cli_arguments as add_demo_arguments

    add_demo_arguments(p)
    p.set_defaults(func=cmd_demo, standalone=True)

    p = verbs.add_parser(
        "simulator",
        help="run the bundled fake SMS Partner API on loopback",
        description="Serve a fake bulk-status-by-tag endpoint with realistic, "
        "evolving statuses, for trying the daemon without an account.",
    )
    from daemon.simulator_cli import add_cli_arguments

    add_cli_arguments(p)
    p.set_defaults(func=cmd_simulator, standalone=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``smspartner-status`` and ``python -m daemon``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    app: App | None = None
    collector_was_on = gc.isenabled()
    try:
        if getattr(args, "standalone", False):  # check, demo, simulator: no settings
            return int(args.func(None, args))
        _set_collector(args)
        from daemon.app import App
        from daemon.log import configure_logging
        from daemon.settings import load_settings

        settings = load_settings()
        configure_logging(
            level=settings.log_level,
            fmt=settings.log_format,
            secrets=settings.secrets(),
            stream=sys.stdout if getattr(args, "log_to_stdout", False) else sys.stderr,
        )
        app = App(settings, service=getattr(args, "service", False))
        return int(args.func(app, args))
    except (ConfigError, InputError) as exc:
        print_error(str(exc))
        return 2
    except SmsPartnerStatusError as exc:
        print_error(str(exc))
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return _reader_gone()
    except Exception as exc:
        if not _database_unavailable(exc):
            raise
        # A verb's own statement failed: a read-only SQLite file, a server that went
        # away mid-command. Only the driver's message: the SQL and its parameters are
        # noise here, and the URL is shown with its password masked.
        where = app.settings.safe_database_url if app is not None else "database"
        print_error(f"database {where}: {getattr(exc, 'orig', None) or exc}")
        return 1
    finally:
        if app is not None:
            app.close()
        if collector_was_on:
            gc.enable()
        if argv is None:  # the entry point: the process ends with this verb
            # Its exit then collects no garbage among the million objects its imports
            # made: they go with the process (figures in docs/performance.md).
            gc.freeze()


#: Verbs that do one bounded piece of work and exit: they run with the cyclic garbage
#: collector off (``run`` lives on, and ``prune`` may delete for an hour: they keep it).
SHORT_VERBS = (cmd_track, cmd_untrack, cmd_tags, cmd_poll, cmd_report, cmd_optouts)


def _set_collector(args: argparse.Namespace) -> None:
    """Turn the cyclic garbage collector off for a short verb; give the others a high
    first threshold (:data:`START_GC_THRESHOLD`). ``main`` turns it back on after.

    A short verb's reference cycles are few, and reference counting frees everything
    else at once; the collector only rescanned what the verb still held, a large part
    of a 100,000-number ``poll``, and freed nothing (figures in docs/performance.md).
    """
    if args.func in SHORT_VERBS:
        gc.disable()
    else:
        gc.set_threshold(START_GC_THRESHOLD, *gc.get_threshold()[1:])


def _database_unavailable(exc: Exception) -> bool:
    """Whether ``exc`` is a database failing a statement (:data:`daemon.db.UNAVAILABLE_ERRORS`).

    Without SQLAlchemy imported, no database was opened and it cannot be one.
    """
    if "sqlalchemy" not in sys.modules:
        return False
    from daemon.db import UNAVAILABLE_ERRORS

    return isinstance(exc, UNAVAILABLE_ERRORS)


def _reader_gone() -> int:
    """The reader of stdout went away (``report TAG --numbers | head -1``): stop quietly
    with the status a shell gives a writer its reader left, 141 (128 + SIGPIPE).

    Python flushes stdout once more at exit and would print that failure too, so stdout
    is pointed at /dev/null first and the last flush goes nowhere.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is no file (captured, replaced): nothing to do
        pass
    finally:
        os.close(devnull)
    return 141
