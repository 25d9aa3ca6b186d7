"""``smspartner-status simulator``: the bundled fake SMS Partner API as a standalone server.

The verb's options (:func:`add_cli_arguments`) and its run (:func:`run_cli`): build a
:class:`~daemon.simulator.Simulator` from them, print the two environment assignments
that point the daemon at it, then serve until Ctrl-C or SIGTERM.

It lives apart from :mod:`daemon.simulator` because tests, benchmarks and the ``demo``
verb run the simulator in-process and need none of this: argument parsing, stdout and
signal handling belong to the command line alone.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any


def _tag_spec(text: str) -> tuple[str, int]:
    name, sep, count_text = text.rpartition(":")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME:COUNT such as demo:1000, got {text!r}")
    if len(name) > 64 or any(c.isspace() or not c.isprintable() for c in name):
        raise argparse.ArgumentTypeError(
            f"tag {name!r} must be 1-64 printable characters without whitespace"
        )
    try:
        count = int(count_text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"COUNT in {text!r} must be a whole number, got {count_text!r}"
        ) from None
    if not 0 <= count <= 1_000_000:
        raise argparse.ArgumentTypeError(f"COUNT in {text!r} must be between 0 and 1000000")
    return name, count


def _fault_spec(text: str) -> tuple[str, str | None, dict[str, float]]:
    """``KIND[@TAG][,NAME=VALUE…]``, e.g. ``trickle@slow,interval=2,bytes=1``."""
    head, *pairs = text.split(",")
    kind, _, tag = head.partition("@")
    from daemon.simulator import FAULTS  # here: every command's parser reaches this module

    if kind not in FAULTS:
        raise argparse.ArgumentTypeError(f"unknown fault {kind!r}; one of {', '.join(FAULTS)}")
    params: dict[str, float] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        try:
            params[name] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name:
            raise argparse.ArgumentTypeError(f"expected NAME=NUMBER in {text!r}, got {pair!r}")
    return kind, tag or None, params


def _bounded(kind: type[int] | type[float], low: float, high: float) -> Callable[[str], Any]:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low:g} and {high:g}, got {text}")
        return value

    return parse


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``simulator`` verb's options to ``parser``.

    Args:
        parser: The verb's (sub)parser.
    """
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: %(default)s; keep loopback unless another "
        "container must reach it)",
    )
    parser.add_argument(
        "--port",
        type=_bounded(int, 0, 65535),
        default=8000,
        help="TCP port (default: %(default)s; 0 picks a free port, printed at start)",
    )
    parser.add_argument(
        "--api-key",
        default="simulator-key",
        help="the only key accepted; a wrong one gets code 10, none gets code 1 "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds phone numbers, delays and outcomes: the same seed replays the same "
        "story (default: %(default)s)",
    )
    parser.add_argument(
        "--page-size",
        type=_bounded(int, 1, 1_000_000),
        default=500,
        help="numbers per page of bulk-status-by-tag (default: %(default)s)",
    )
    parser.add_argument(
        "--time-scale",
        type=_bounded(float, 1e-6, 1e9),
        default=1.0,
        help="simulated seconds per real second; 5760 plays the whole 48 h report window "
        "in 30 s (default: %(default)s)",
    )
    parser.add_argument(
        "--fault-rate",
        type=_bounded(float, 0.0, 1.0),
        default=0.0,
        help="share of requests (0 to 1) answered with a random transient fault: HTTP "
        "500, HTTP 429, an HTML page or truncated JSON, to exercise retries "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--fault",
        dest="faults",
        action="append",
        type=_fault_spec,
        metavar="KIND[@TAG][,NAME=VALUE...]",
        help="answer every request (for TAG only, if given) with this fault, e.g. "
        "trickle,interval=2,bytes=1 (a provider trickling its answer), echo_key, "
        "echo_key_html,status=403, lying_total,total=1; repeat for several",
    )
    parser.add_argument(
        "--tag",
        dest="tags",
        action="append",
        type=_tag_spec,
        metavar="NAME:COUNT",
        help="serve COUNT numbers sent now under tag NAME, their reports arriving over "
        "simulated time; repeat for several tags (default: demo:1000)",
    )


def run_cli(args: argparse.Namespace) -> int:
    """Run the simulator until Ctrl-C or SIGTERM.

    Prints one line of environment assignments for the daemon (``eval``-able in a
    shell), then nothing else on stdout.

    Args:
        args: Options parsed by a parser set up with :func:`add_cli_arguments`.

    Returns:
        0 after a clean stop; 1 when the address cannot be bound.
    """
    from daemon.simulator import Simulator

    simulator = Simulator(
        api_key=args.api_key,
        seed=args.seed,
        page_size=args.page_size,
        time_scale=args.time_scale,
        host=args.host,
        port=args.port,
        fault_rate=args.fault_rate,
    )
    for name, count in args.tags or [("demo", 1000)]:
        simulator.add_tag(name, count)
    for kind, tag, params in args.faults or []:
        try:
            simulator.inject(kind, tag=tag, times=None, **params)
        except ValueError as exc:
            print(f"simulator: --fault: {exc}", file=sys.stderr)
            return 2
    try:
        simulator.start()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        print(f"simulator: cannot listen on {args.host}:{args.port}: {reason}", file=sys.stderr)
        return 1
    print(
        f"SMSPARTNER_BASE_URL={shlex.quote(simulator.url)} "
        f"SMSPARTNER_API_KEY={shlex.quote(args.api_key)}",
        flush=True,
    )
    previous: Any = None
    in_main = threading.current_thread() is threading.main_thread()
    if in_main:  # signal handlers can only be set from the main thread

        def on_sigterm(signum: int, frame: FrameType | None) -> None:
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        simulator.serve_forever()
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
    return 0
