"""The Grafana dashboard of deploy/grafana/: its JSON and provisioning files checked the way
Grafana reads them, and every panel's SQL run on PostgreSQL holding polled data.

Docker is not needed: nothing here starts Grafana. Instead,

- the dashboard JSON is checked for what Grafana needs to load and draw it (ids, grid,
  data source, targets), and the provisioning files and the compose ``dashboards``
  profile are checked against each other (uids, paths, role, database);
- each panel's SQL is expanded as Grafana expands it (:func:`expand`: the dashboard's
  template variables, then the PostgreSQL data source's macros, with any macro it does
  not cover failing the test) and run as the read-only role that deploy/grafana/bi-role.sql
  creates, on a database filled through the real poll path (the simulator on loopback, an
  injected clock); the answers are compared with what the tables say.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import re
import secrets
import subprocess
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
import yaml

from daemon import tracking
from daemon.app import App
from daemon.settings import load_settings
from daemon.simulator import Simulator
from tests.conftest import _PG_REQUIRED, PgServer, _pg_bin, pg_database
from tests.helpers import API_KEY
from tests.integration.conftest import NOW, Clock

REPO = Path(__file__).resolve().parents[2]
GRAFANA = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "smspartner-status.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "smspartner-status.yaml"
PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "smspartner-status.yaml"
ROLE_SQL = GRAFANA / "bi-role.sql"
COMPOSE = REPO / "deploy" / "compose" / "compose.yaml"

#: The PostgreSQL data source's plugin id (Grafana 10.2 and later).
POSTGRES_PLUGIN = "grafana-postgresql-datasource"
#: Panel types that ship with Grafana (no plugin to install).
CORE_PANELS = {"barchart", "bargauge", "stat", "table", "text", "timeseries", "piechart"}
GRID_COLUMNS = 24


# --- Grafana's expansion of a panel's SQL ----------------------------------------------------


class MacroError(AssertionError):
    """A panel's SQL uses a variable or macro that :func:`expand` does not cover."""


#: Template variables as the frontend finds them: ``$name`` or ``${name}``.
_VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")
#: The backend's macro call, as the PostgreSQL data source matches it: the arguments end at
#: the first ``)``, so an argument cannot hold parentheses.
_MACRO = re.compile(r"\$([_a-zA-Z0-9]+)\(([^\)]*)\)")
_INTERVAL = re.compile(r"'?(\d+)(s|m|h|d|w)'?")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
#: What Grafana accepts as the optional fill argument of ``$__timeGroup``.
_FILL = re.compile(r"NULL|previous|-?\d+(\.\d+)?")


def _rfc3339(moment: datetime) -> str:
    """Go's ``time.RFC3339Nano`` of a UTC time, as the macros print the time range."""
    moment = moment.astimezone(UTC)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if moment.microsecond:
        text += "." + f"{moment.microsecond:06d}".rstrip("0")
    return text + "Z"


def _interval_seconds(arg: str) -> int:
    """An interval argument (``1h``, ``'1d'``) in seconds; Grafana prints the product
    with Go's ``%v``, which this matches for whole seconds below a million."""
    found = _INTERVAL.fullmatch(arg)
    if not found:
        raise MacroError(f"interval {arg!r} not covered")
    seconds = int(found[1]) * _UNIT_SECONDS[found[2]]
    if not 0 < seconds < 1_000_000:
        raise MacroError(f"interval {arg!r}: Go would print {seconds} s differently")
    return seconds


def _macro(name: str, args: list[str], time_from: datetime, time_to: datetime) -> str:
    """One macro of the PostgreSQL data source (without TimescaleDB), as Grafana's
    backend writes it; the ones no panel uses are refused."""
    if name == "__time" and len(args) == 1:
        return f'{args[0]} AS "time"'
    if name == "__timeFilter" and len(args) == 1:
        return f"{args[0]} BETWEEN '{_rfc3339(time_from)}' AND '{_rfc3339(time_to)}'"
    if name == "__timeFrom" and args == [""]:
        return f"'{_rfc3339(time_from)}'"
    if name == "__timeTo" and args == [""]:
        return f"'{_rfc3339(time_to)}'"
    if name == "__timeGroupAlias" and len(args) in (2, 3):
        if len(args) == 3 and not _FILL.fullmatch(args[2]):
            raise MacroError(f"fill value {args[2]!r} not accepted by Grafana")
        seconds = _interval_seconds(args[1])
        return f'floor(extract(epoch from {args[0]})/{seconds})*{seconds} AS "time"'
    raise MacroError(f"macro ${name}({', '.join(args)}) not covered")


def expand(
    sql: str,
    *,
    time_from: datetime,
    time_to: datetime,
    variables: Mapping[str, str],
) -> str:
    """``sql`` as Grafana sends it to PostgreSQL for this time range and these values.

    The frontend replaces the template variables it knows (a single-valued variable
    goes in as its raw text, as the SQL data sources do); the backend then replaces
    the macros. Anything of either kind left over fails, so a panel cannot use a
    macro this function does not know.
    """

    def variable(found: re.Match[str]) -> str:
        name = found[1] or found[2]
        return variables[name] if name in variables else found[0]

    text = _VARIABLE.sub(variable, sql)

    def macro(found: re.Match[str]) -> str:
        args = [arg.strip(" ") for arg in found[2].split(",")]
        return _macro(found[1], args, time_from, time_to)

    text = _MACRO.sub(macro, text)
    left = re.search(r"\$\{?\w+|\[\[\w+", text)
    if left:
        raise MacroError(f"{left[0]!r} is neither a dashboard variable nor a covered macro")
    return text


def test_the_expander_writes_what_grafana_writes_and_refuses_the_rest() -> None:
    """The examples of Grafana's PostgreSQL documentation and tests, and a refusal for a
    macro the dashboard does not use (its expansion here would be a guess)."""
    frm, to = (
        datetime(2017, 4, 21, 5, 1, 17, tzinfo=UTC),
        datetime(2017, 4, 21, 5, 6, 17, tzinfo=UTC),
    )
    grafana = functools.partial(expand, time_from=frm, time_to=to, variables={"__interval": "5m"})
    assert (
        grafana("WHERE $__timeFilter(time_column)")
        == "WHERE time_column BETWEEN '2017-04-21T05:01:17Z' AND '2017-04-21T05:06:17Z'"
    )
    assert grafana("$__timeFrom() AND $__timeTo()") == (
        "'2017-04-21T05:01:17Z' AND '2017-04-21T05:06:17Z'"
    )
    assert grafana("SELECT $__timeGroupAlias(time_column, $__interval)") == (
        'SELECT floor(extract(epoch from time_column)/300)*300 AS "time"'
    )
    assert grafana("$__timeGroupAlias(c,'1d', 0)") == (
        'floor(extract(epoch from c)/86400)*86400 AS "time"'
    )
    assert grafana("SELECT $__time(c)") == 'SELECT c AS "time"'
    for unknown in (
        "$__unixEpochFilter(c)",
        "$__timeGroup(c, 5m)",
        "$__timeGroupAlias(c, 1M)",
        "$__timeFilter",
        "LIMIT $nowhere",
        "LIMIT ${nowhere}",
        "[[campaigns]]",
    ):
        with pytest.raises(MacroError):
            grafana(unknown)


# --- the files as Grafana and compose read them ----------------------------------------------


def load_dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text(encoding="utf-8")))


def load_yaml(path: Path) -> dict[str, Any]:
    return dict(yaml.safe_load(path.read_text(encoding="utf-8")))


def datasource() -> dict[str, Any]:
    """The one data source provisioned."""
    provisioning = load_yaml(DATASOURCES)
    assert provisioning["apiVersion"] == 1
    (source,) = provisioning["datasources"]
    return dict(source)


def panel_variables(dashboard: dict[str, Any]) -> dict[str, str]:
    """The dashboard's template variables at their saved values."""
    return {v["name"]: v["current"]["value"] for v in dashboard["templating"]["list"]}


def test_the_dashboard_json_is_what_grafana_loads() -> None:
    """Checked without Grafana (no JSON schema of the classic dashboard model is
    published): the fields Grafana needs to load, place and query each panel."""
    dashboard = load_dashboard()
    uid = datasource()["uid"]
    assert dashboard["uid"] and dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 39
    assert dashboard.get("id") is None  # Grafana numbers provisioned dashboards itself
    panels = dashboard["panels"]
    ids = [panel["id"] for panel in panels]
    assert all(isinstance(i, int) and i > 0 for i in ids) and len(set(ids)) == len(ids)

    cells: dict[tuple[int, int], int] = {}
    for panel in panels:
        where = f"panel {panel['id']} ({panel['title']})"
        assert panel["type"] in CORE_PANELS, where
        grid = panel["gridPos"]
        assert all(isinstance(grid[k], int) for k in ("h", "w", "x", "y")), where
        assert grid["h"] >= 1 and grid["w"] >= 1 and grid["x"] >= 0 and grid["y"] >= 0, where
        assert grid["x"] + grid["w"] <= GRID_COLUMNS, f"{where} is wider than the grid"
        for row in range(grid["y"], grid["y"] + grid["h"]):
            for column in range(grid["x"], grid["x"] + grid["w"]):
                other = cells.setdefault((row, column), panel["id"])
                assert other == panel["id"], f"{where} overlaps panel {other}"
        assert panel["datasource"] == {"type": POSTGRES_PLUGIN, "uid": uid}, where
        assert panel["targets"], where
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(set(ref_ids)) == len(ref_ids), where
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], where
            assert target["rawQuery"] is True and target["editorMode"] == "code", where
            assert target["format"] in ("time_series", "table"), where
            assert target["rawSql"].strip(), where

    variables = dashboard["templating"]["list"]
    sql = "\n".join(t["rawSql"] for p in panels for t in p["targets"])
    for variable in variables:
        values = [option["value"] for option in variable["options"]]
        assert variable["current"]["value"] in values, variable["name"]
        assert variable["query"] == ",".join(values), variable["name"]
        assert not variable["multi"] and not variable["includeAll"], variable["name"]
        assert re.search(rf"\${variable['name']}\b", sql), f"${variable['name']} is unused"


def test_the_provisioning_files_and_the_compose_profile_agree() -> None:
    """The data source reaches the compose database as the role that bi-role.sql makes,
    the dashboard provider reads the directory compose mounts, and the profile starts
    the role's script after the migration and Grafana after the script."""
    compose = load_yaml(COMPOSE)
    services = compose["services"]
    db, role, grafana = services["db"], services["bi-role"], services["grafana"]
    assert role["profiles"] == ["dashboards"] and grafana["profiles"] == ["dashboards"]
    assert role["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
    assert grafana["depends_on"]["bi-role"] == {"condition": "service_completed_successfully"}
    assert re.fullmatch(r"grafana/grafana:\d+\.\d+\.\d+", grafana["image"]), "pin Grafana"
    assert role["image"] == db["image"]  # its psql (15 or newer: \getenv) matches the server

    def mounts(service: dict[str, Any]) -> dict[str, Path]:
        """Container path → host path of the service's bind mounts."""
        found = {}
        for volume in service["volumes"]:
            source, target, *_ = str(volume).split(":")
            if source.startswith("."):
                found[target] = (COMPOSE.parent / source).resolve()
        return found

    # The role: the script compose runs is this file, for this role and database.
    command = role["command"]
    assert command[0] == "psql"
    options = {k: v for k, v in itertools.pairwise(command) if k in ("-h", "-U", "-d", "-f")}
    psql_vars = dict(v.split("=", 1) for k, v in itertools.pairwise(command) if k == "-v")
    assert psql_vars["ON_ERROR_STOP"] == "1"
    assert mounts(role)[options["-f"]] == ROLE_SQL
    role_name = psql_vars["bi_role"]
    assert options["-h"] == "db"
    assert options["-d"] == db["environment"]["POSTGRES_DB"]
    assert options["-U"] == db["environment"]["POSTGRES_USER"]  # the daemon's role
    assert "\\set bi_role " + role_name in ROLE_SQL.read_text(encoding="utf-8")

    # The data source: that role, that database, the db service, the password compose gives.
    source = datasource()
    assert source["type"] == POSTGRES_PLUGIN
    assert source["user"] == role_name
    assert source["url"] == "db:5432" and "db" in services
    assert source["jsonData"]["database"] == db["environment"]["POSTGRES_DB"]
    major = int(db["image"].split(":")[1])
    assert source["jsonData"]["postgresVersion"] == major * 100
    password = source["secureJsonData"]["password"]
    assert password.startswith("$")
    variable = password.lstrip("$").strip("{}")
    assert variable in grafana["environment"] and variable in role["environment"]
    assert f"\\getenv bi_password {variable}" in ROLE_SQL.read_text(encoding="utf-8")

    # The provisioning directories and the dashboard directory, mounted where Grafana and
    # the provider look.
    grafana_mounts = mounts(grafana)
    for kind, path in (("datasources", DATASOURCES), ("dashboards", PROVIDERS)):
        assert grafana_mounts[f"/etc/grafana/provisioning/{kind}"] == path.parent
    (provider,) = load_yaml(PROVIDERS)["providers"]
    assert provider["type"] == "file"
    assert grafana_mounts[provider["options"]["path"]] == DASHBOARD.parent
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"


# --- every panel on PostgreSQL, with data -----------------------------------------------------

#: The campaigns polled into the database: tag, sent_at, numbers.
CAMPAIGNS = [
    ("old-news", NOW - timedelta(days=20), 30),  # before the time range
    ("autumn-a", NOW - timedelta(days=6, hours=3), 120),
    ("autumn-b", NOW - timedelta(days=4, hours=3), 90),
    ("autumn-c", NOW - timedelta(days=2, hours=3), 100),  # its window closes before NOW
    ("flash", NOW - timedelta(hours=3), 150),  # numbers still waiting at NOW
    ("dropped", NOW - timedelta(hours=2), 40),  # untracked 30 minutes after sending
]
#: When each campaign is polled, after its sent_at (the default cadence, thinned out).
POLLS_AFTER = [
    timedelta(minutes=1),
    timedelta(minutes=10),
    timedelta(hours=1),
    timedelta(hours=6),
    timedelta(hours=24),
    timedelta(hours=48, minutes=5),  # the window closed: pending numbers expire
]
#: The dashboard's time range in these tests: the last 7 days, as "now-7d" to "now".
TIME_FROM, TIME_TO = NOW - timedelta(days=7), NOW
#: $__interval for panels with a 1 h minimum interval: Grafana's own choice for 7 days
#: (about 10 minutes for a panel 1,000 pixels wide) is below it.
INTERVAL = "1h"


@dataclass
class Seeded:
    """The database the panels run on."""

    admin: str  # a psycopg conninfo with every right
    reader: str  # the same database as the read-only role
    role: str
    psql: list[str]  # psql on the database, as the admin, for the test's role


#: STOP answers besides the simulator's own draws, seen on three different days: the
#: numbers (by position in their campaign) that answer just before a poll.
STOPS = {
    ("autumn-a", POLLS_AFTER[3]): [0, 1],
    ("autumn-a", POLLS_AFTER[4]): [2],
    ("flash", POLLS_AFTER[2]): [3],
}
#: Faults served to one poll: retried HTTP 500s (transient_error), a refused key.
FAULTS = {("autumn-b", POLLS_AFTER[2]): "500", ("autumn-c", POLLS_AFTER[1]): "wrong_key"}
UNTRACKED = ("dropped", NOW - timedelta(hours=1, minutes=30))


def _timeline() -> list[tuple[datetime, str, str]]:
    """Every send, poll and untrack of the seeding up to NOW, in time order."""
    events = [(UNTRACKED[1], "untrack", UNTRACKED[0])]
    for tag, sent_at, _ in CAMPAIGNS:
        events.append((sent_at, "send", tag))
        events += [(sent_at + after, "poll", tag) for after in POLLS_AFTER]
    untracked = {e for e in events if e[2] == UNTRACKED[0] and e[0] > UNTRACKED[1]}
    return sorted(e for e in events if e[0] <= NOW and e not in untracked)


def _seed(url: str, clock: Clock) -> None:
    """Send, track and poll the campaigns in time order through the real poller (the
    simulator and the daemon on one clock), with the opt-outs and faults above."""
    sent = {tag: (sent_at, count) for tag, sent_at, count in CAMPAIGNS}
    with Simulator(api_key=API_KEY, seed=7, page_size=500, clock=clock) as sim:
        settings = load_settings(
            {},
            api_key=API_KEY,
            base_url=sim.url,
            database_url=url,
            retry_backoff_seconds=0.01,
            rate_limit_per_second=0,
            max_retries=1,
        )
        app = App(settings, clock=clock)
        phones: dict[str, list[str]] = {}
        try:
            for moment, action, tag in _timeline():
                clock.now = moment
                if action == "send":
                    phones[tag] = sim.add_tag(tag, sent[tag][1], sent_at=moment)
                    with app.engine.begin() as conn:
                        tracking.track(
                            conn,
                            tag,
                            sent_at=moment,
                            window_ends_at=moment + timedelta(hours=48),
                            now=moment,
                        )
                elif action == "untrack":
                    with app.engine.begin() as conn:
                        tracking.untrack(conn, tag, now=moment)
                else:
                    after = moment - sent[tag][0]
                    for index in STOPS.get((tag, after), []):
                        sim.set_number(tag, phones[tag][index], "Delivered", stop_sms=True)
                    if (tag, after) in FAULTS:
                        sim.inject(FAULTS[tag, after], tag=tag, times=None)
                    app.poller.poll(tag)
                    sim.clear_faults()
        finally:
            app.close()


@pytest.fixture(scope="module")
def seeded(pg_server: PgServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seeded]:
    """A database with the campaigns polled, and the read-only role of bi-role.sql.

    Built once for the module (the polls take a few seconds); no test writes to it.
    """
    psql = _pg_bin("psql")
    if psql is None:
        message = "psql not found (install the postgresql package)"
        if _PG_REQUIRED:
            pytest.fail(message)
        pytest.skip(message)
    with pytest.MonkeyPatch.context() as patch, pg_database(pg_server) as url:
        # As the autouse _clean_env does for each test: no developer's settings leak in.
        for name in list(os.environ):
            if name.startswith("SMSPARTNER_"):
                patch.delenv(name)
        patch.chdir(tmp_path_factory.mktemp("grafana"))
        _seed(url, Clock(NOW))

        database = sa.make_url(url).database
        role = f"smspartner_bi_{os.getpid()}_{database}"
        password = secrets.token_urlsafe(16)
        run = [psql, "--no-psqlrc", "-q", "-v", "ON_ERROR_STOP=1", "-v", f"bi_role={role}"]
        env = {**os.environ, "POSTGRES_BI_PASSWORD": password}
        for _ in range(2):  # compose runs it at every `up`: again and again
            done = subprocess.run(
                [*run, "-f", str(ROLE_SQL), url], env=env, capture_output=True, text=True
            )
            assert done.returncode == 0, done.stderr
        reader = sa.make_url(url).set(username=role, password=password)
        try:
            yield Seeded(
                admin=url,
                reader=reader.render_as_string(hide_password=False),
                role=role,
                psql=[*run, url],
            )
        finally:
            with psycopg.connect(url, autocommit=True) as admin:
                admin.execute(f'DROP OWNED BY "{role}"'.encode())
                admin.execute(f'DROP ROLE "{role}"'.encode())


def panel(title: str) -> dict[str, Any]:
    """The dashboard's panel with this title."""
    (found,) = [p for p in load_dashboard()["panels"] if p["title"] == title]
    return dict(found)


def run_panel(
    seeded: Seeded,
    title: str,
    *,
    time_to: datetime = TIME_TO,
    **variables: str,
) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Run a panel's one query as Grafana would, as the read-only role; its column names
    and rows."""
    found = panel(title)
    (target,) = found["targets"]
    values = {**panel_variables(load_dashboard()), **variables}
    values["__interval"] = found.get("interval", INTERVAL)
    sql = expand(target["rawSql"], time_from=TIME_FROM, time_to=time_to, variables=values)
    with psycopg.connect(seeded.reader) as conn:
        cur = conn.execute(sql.encode())
        assert cur.description is not None
        return [c.name for c in cur.description], cur.fetchall()


def admin_rows(seeded: Seeded, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    """What the tables say, read with every right (the test's own queries)."""
    with psycopg.connect(seeded.admin) as conn:
        return conn.execute(sql.encode(), params).fetchall()


def in_range(moment: datetime) -> bool:
    return TIME_FROM <= moment <= TIME_TO


@pytest.mark.postgres
@pytest.mark.parametrize(
    "title", [p["title"] for p in json.loads(DASHBOARD.read_text(encoding="utf-8"))["panels"]]
)
def test_every_panel_runs_as_the_read_only_role_and_finds_data(seeded: Seeded, title: str) -> None:
    """Each panel's SQL runs, returns rows from the polled data, and a time series comes
    with a ``time`` column in time order, as Grafana requires."""
    (target,) = panel(title)["targets"]
    columns, rows = run_panel(seeded, title)
    assert rows, f"{title}: no rows"
    if target["format"] == "time_series":
        assert "time" in columns
        times = [row[columns.index("time")] for row in rows]
        assert times == sorted(times), f"{title}: not in time order"


@pytest.mark.postgres
def test_the_read_only_role_reads_and_cannot_write(seeded: Seeded) -> None:
    """The role bi-role.sql made: read-only sessions with a statement timeout, and the
    tables a later migration creates (as the daemon's role) readable too."""
    with psycopg.connect(seeded.admin, autocommit=True) as admin:
        admin.execute("CREATE TABLE IF NOT EXISTS later_migration (x integer)")
    with psycopg.connect(seeded.reader) as conn:
        assert conn.execute("SHOW default_transaction_read_only").fetchone() == ("on",)
        assert conn.execute("SHOW statement_timeout").fetchone() == ("1min",)
        assert conn.execute("SELECT count(*) FROM later_migration").fetchone() == (0,)
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("DELETE FROM delivery_statuses")


@pytest.mark.postgres
def test_the_role_script_refuses_to_run_without_a_password(seeded: Seeded) -> None:
    """Without POSTGRES_BI_PASSWORD (compose insists on it too), one line names it and
    psql exits non-zero before anything changes."""
    password_of = "SELECT rolpassword FROM pg_authid WHERE rolname = %(role)s"
    before = admin_rows(seeded, password_of, role=seeded.role)
    env = {k: v for k, v in os.environ.items() if k != "POSTGRES_BI_PASSWORD"}
    for value in ({}, {"POSTGRES_BI_PASSWORD": ""}):
        done = subprocess.run(
            [*seeded.psql, "-f", str(ROLE_SQL)],
            env={**env, **value},
            capture_output=True,
            text=True,
        )
        assert done.returncode != 0
        assert "ERROR:  POSTGRES_BI_PASSWORD is empty or unset" in done.stderr
    assert admin_rows(seeded, password_of, role=seeded.role) == before != [(None,)]


@pytest.mark.postgres
def test_delivery_rate_per_campaign_matches_tag_summary(seeded: Seeded) -> None:
    """One point per campaign sent in the range, at its sent_at: the rate of
    ``tag_summary``, and the rate among final outcomes counted from the numbers."""
    columns, rows = run_panel(seeded, "Delivery rate per campaign")
    assert columns[0] == "time"
    summary = admin_rows(
        seeded, "SELECT tag, sent_at, delivery_rate FROM tag_summary WHERE total > 0"
    )
    statuses = admin_rows(seeded, "SELECT tag, status FROM delivery_statuses")
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for tag, status in statuses:
        counts[tag][status] += 1
    expected = []
    for tag, sent_at, rate in sorted(summary, key=lambda r: r[1]):
        if in_range(sent_at):
            c = counts[tag]
            final = c["delivered"] + c["not_delivered"] + c["failed"] + c["expired"]
            expected.append((sent_at, round(100 * rate, 1), round(100 * c["delivered"] / final, 1)))
    assert {tag for tag, sent_at, _ in summary if in_range(sent_at)} == {
        "autumn-a", "autumn-b", "autumn-c", "flash", "dropped"
    }  # fmt: skip
    assert [(t, float(a), float(b)) for t, a, b in rows] == expected


@pytest.mark.postgres
def test_status_mix_shows_the_last_n_campaigns_before_the_range_end(seeded: Seeded) -> None:
    """``$campaigns`` newest campaigns sent by the end of the range, oldest first, each
    with its numbers by status as ``delivery_statuses`` holds them."""
    title = "Status mix of the last $campaigns campaigns"
    statuses = admin_rows(
        seeded, "SELECT tag, status, count(*) FROM delivery_statuses GROUP BY tag, status"
    )
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for tag, status, n in statuses:
        counts[tag][status] = n
    order = ["not_delivered" if c == "not delivered" else c for c in (
        "delivered", "not delivered", "failed", "expired", "waiting", "unknown"
    )]  # fmt: skip

    def expected(tags: list[str]) -> list[tuple[Any, ...]]:
        return [(tag, *(counts[tag][s] for s in order)) for tag in tags]

    columns, rows = run_panel(seeded, title, campaigns="5")
    assert columns == [
        "tag",
        "delivered",
        "not delivered",
        "failed",
        "expired",
        "waiting",
        "unknown",
    ]
    assert rows == expected(["autumn-a", "autumn-b", "autumn-c", "flash", "dropped"])
    # The range ends three days ago: the campaigns sent by then, whatever the range's start.
    _, rows = run_panel(seeded, title, time_to=NOW - timedelta(days=3))
    assert rows == expected(["old-news", "autumn-a", "autumn-b"])
    assert sum(counts["autumn-c"].values()) == 100 and counts["autumn-c"]["expired"] > 0


def _percentile_cont(values: list[float], fraction: float) -> float:
    """PostgreSQL's ``percentile_cont``: linear interpolation between the closest ranks."""
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@pytest.mark.postgres
def test_time_to_delivery_percentiles_per_interval_of_sending(seeded: Seeded) -> None:
    """Per hour of sending, the percentiles of sent_at → delivery report over delivered
    numbers, computed again here from the rows; and the daemon never sees a report
    before it happens (resolved_at's 90th percentile is not below reported_at's)."""
    columns, rows = run_panel(seeded, "Time to delivery")
    assert columns == [
        "time", "median", "90th percentile", "99th percentile",
        "90th percentile, seen by the daemon",
    ]  # fmt: skip
    delivered = admin_rows(
        seeded,
        "SELECT t.sent_at, d.reported_at, d.resolved_at FROM delivery_statuses d"
        " JOIN tracked_tags t ON t.tag = d.tag"
        " WHERE d.status = 'delivered' AND d.reported_at IS NOT NULL",
    )
    buckets: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for sent_at, reported_at, resolved_at in delivered:
        if in_range(sent_at):
            hour = math.floor(sent_at.timestamp() / 3600) * 3600
            buckets[hour].append(
                ((reported_at - sent_at).total_seconds(), (resolved_at - sent_at).total_seconds())
            )
    assert len(buckets) == 5  # one per campaign sent in the range
    expected = []
    for hour, pairs in sorted(buckets.items()):
        reported = [r for r, _ in pairs]
        resolved = [s for _, s in pairs]
        expected.append(
            (
                hour,
                *(_percentile_cont(reported, f) for f in (0.5, 0.9, 0.99)),
                _percentile_cont(resolved, 0.9),
            )
        )
    assert len(rows) == len(expected)
    for row, want in zip(rows, expected, strict=True):
        assert float(row[0]) == want[0]
        assert [float(v) for v in row[1:]] == pytest.approx(want[1:])
        median, p90, p99, seen = (float(v) for v in row[1:])
        assert 0 <= median <= p90 <= p99 and seen >= p90


@pytest.mark.postgres
def test_opt_outs_per_day_count_each_number_once_a_day(seeded: Seeded) -> None:
    columns, rows = run_panel(seeded, "Opt-outs per day")
    assert columns == ["time", "opt-outs"]
    optouts = admin_rows(seeded, "SELECT phone_number, first_seen_at FROM stop_sms_optouts")
    per_day: dict[date, set[str]] = defaultdict(set)
    for phone, seen in optouts:
        if in_range(seen):
            per_day[seen.astimezone(UTC).date()].add(phone)
    got = {datetime.fromtimestamp(float(t), UTC).date(): n for t, n in rows}
    assert got == {day: len(phones) for day, phones in per_day.items()}
    # The STOP answers of the seeding: on autumn-a's 6 h and 24 h polls, and flash's 1 h.
    sent_a = CAMPAIGNS[1][1]
    for seen in (
        sent_a + POLLS_AFTER[3],
        sent_a + POLLS_AFTER[4],
        CAMPAIGNS[4][1] + POLLS_AFTER[2],
    ):
        assert got.get(seen.date(), 0) >= 1


@pytest.mark.postgres
def test_numbers_still_waiting_count_tracked_campaigns_only(seeded: Seeded) -> None:
    """The waiting numbers of active campaigns; an untracked campaign's waiting numbers
    are no longer polled and are left out."""
    columns, rows = run_panel(seeded, "Numbers still waiting")
    assert columns == ["numbers waiting", "campaigns with numbers waiting"]
    waiting = admin_rows(
        seeded,
        "SELECT d.tag, t.state FROM delivery_statuses d JOIN tracked_tags t ON t.tag = d.tag"
        " WHERE d.status = 'waiting'",
    )
    active = [tag for tag, state in waiting if state == "active"]
    assert active and any(state == "untracked" for _, state in waiting)
    assert rows == [(len(active), len(set(active)))]


@pytest.mark.postgres
def test_polls_by_outcome_count_poll_runs_per_interval(seeded: Seeded) -> None:
    columns, rows = run_panel(seeded, "Polls by outcome")
    assert columns == ["time", "metric", "polls"]
    runs = admin_rows(seeded, "SELECT started_at, outcome FROM poll_runs")
    expected = Counter(
        (math.floor(started.timestamp() / 3600) * 3600, outcome)
        for started, outcome in runs
        if in_range(started)
    )
    assert Counter({(float(t), outcome): n for t, outcome, n in rows}) == expected
    assert {"ok", "transient_error", "auth_error"} <= {outcome for _, outcome, _ in rows}


@pytest.mark.postgres
def test_failed_polls_name_the_campaign_and_its_last_error(seeded: Seeded) -> None:
    columns, rows = run_panel(seeded, "Campaigns with failed polls")
    assert columns == ["tag", "polls", "failed", "last ok", "last error"]
    assert [(tag, failed) for tag, _, failed, _, _ in rows] == [("autumn-b", 1), ("autumn-c", 1)]
    errors = {tag: error for tag, *_, error in rows}
    assert "500" in errors["autumn-b"] and errors["autumn-c"]
    assert not any(API_KEY in error for error in errors.values())


@pytest.mark.postgres
def test_campaigns_table_lists_the_range_newest_first(seeded: Seeded) -> None:
    columns, rows = run_panel(seeded, "Campaigns")
    assert columns[:2] == ["tag", "sent_at"] and "delivered %" in columns
    assert [row[0] for row in rows] == ["dropped", "flash", "autumn-c", "autumn-b", "autumn-a"]
    summary = dict(admin_rows(seeded, "SELECT tag, delivery_rate FROM tag_summary"))
    rate = columns.index("delivered %")
    assert [float(row[rate]) for row in rows] == [round(100 * summary[row[0]], 1) for row in rows]
