"""Several `run` replicas sharing one PostgreSQL database, as a deployment runs them:
work shared through row leases, a killed replica's tag taken over, concurrent
auto-migration, a server restart under a running daemon, and the SQL of docs/bi.md.

Every daemon here is a real subprocess (the `Running` helper of tests/helpers.py) talking
to the simulator over loopback and to the throwaway PostgreSQL cluster of conftest.py.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import sqlalchemy as sa

from daemon.db import create_engine
from daemon.migrate import head_revision
from daemon.simulator import Simulator
from daemon.status import map_provider_status
from tests.conftest import PgServer, pg_database
from tests.helpers import Dispatches, Running, free_port, run_cli, wait_for

pytestmark = pytest.mark.postgres

BI_GUIDE = Path(__file__).resolve().parents[2] / "docs" / "bi.md"


# --- fixtures ---------------------------------------------------------------------------


@pytest.fixture
def pg_url(pg_server: PgServer) -> Iterator[str]:
    """A fresh, empty PostgreSQL database."""
    with pg_database(pg_server) as url:
        yield url


@pytest.fixture
def db(pg_url: str) -> Iterator[sa.Engine]:
    """An engine on that database for the test's own queries."""
    engine = create_engine(pg_url)
    yield engine
    engine.dispose()


@pytest.fixture
def env(cli_env: dict[str, str], pg_url: str) -> dict[str, str]:
    """Environment of one replica: the shared database, two workers, no HTTP server."""
    return {
        **cli_env,
        "SMSPARTNER_DATABASE_URL": pg_url,
        "SMSPARTNER_HTTP_PORT": "0",
        "SMSPARTNER_CONCURRENCY": "2",
    }


@pytest.fixture
def replicas(running: Callable[..., Running]) -> Callable[..., Running]:
    """Start `run` replicas, each with its own log file (killed at the end if left)."""
    return running


@pytest.fixture
def dispatches(tmp_path: Path) -> Iterator[Callable[[], Dispatches]]:
    """Listeners for replicas' dispatcher passes (one per replica: its NOTIFY_SOCKET)."""
    made: list[Dispatches] = []

    def make() -> Dispatches:
        made.append(Dispatches(tmp_path / f"notify{len(made)}.sock"))
        return made[-1]

    yield make
    for listener in made:
        listener.close()


# --- helpers ----------------------------------------------------------------------------


def _events(replica: Running, name: str) -> list[dict[str, Any]]:
    return [e for e in replica.events() if e.get("event") == name]


def _started(replica: Running) -> bool:
    return bool(_events(replica, "daemon.started"))


def _insert_tags(db: sa.Engine, tags: list[str], sent_at: datetime) -> None:
    """Register tags the way a sidecar application may: a bare row in ``tracked_tags``."""
    with db.begin() as conn:
        conn.execute(
            sa.text("INSERT INTO tracked_tags (tag, sent_at) VALUES (:tag, :sent_at)"),
            [{"tag": tag, "sent_at": sent_at} for tag in tags],
        )


def _ok_runs(db: sa.Engine) -> Counter[str]:
    with db.connect() as conn:
        rows = conn.execute(sa.text("SELECT tag FROM poll_runs WHERE outcome = 'ok'"))
        return Counter(tag for (tag,) in rows)


def _assert_no_overlapping_polls(db: sa.Engine) -> None:
    """No tag was ever polled twice at once, whoever polled it (``poll_runs`` intervals)."""
    with db.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT tag, started_at, finished_at FROM poll_runs ORDER BY tag, started_at")
        ).all()
    for (tag, _, end), (next_tag, next_start, _) in itertools.pairwise(rows):
        if tag == next_tag:
            assert next_start >= end, f"two polls of {tag!r} overlapped"


def _assert_no_duplicate_events(db: sa.Engine) -> None:
    """At most one first-sighting event per number, and never the same change twice."""
    with db.connect() as conn:
        dupes = conn.execute(
            sa.text(
                "SELECT tag, phone_number, old_status, new_status, count(*)"
                " FROM delivery_status_events"
                " GROUP BY tag, phone_number, old_status, new_status HAVING count(*) > 1"
            )
        ).all()
    assert dupes == []


def _stored(db: sa.Engine, tag: str) -> dict[str, tuple[str, bool]]:
    with db.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT phone_number, status, stop_sms FROM delivery_statuses WHERE tag = :t"),
            {"t": tag},
        )
        return {phone: (status, stop) for phone, status, stop in rows}


def _expected(simulator: Simulator, tag: str) -> dict[str, tuple[str, bool]]:
    """What the simulator serves for ``tag``, as the daemon should store it."""
    return {
        phone: (map_provider_status(status).value, stop)
        for phone, (status, stop, _date) in simulator.truth(tag).items()
    }


def _stop_all(running: list[Running]) -> list[int]:
    """SIGTERM every replica at once (once each: as systemd or docker would), then
    collect the exit codes."""
    for replica in running:
        replica.proc.send_signal(signal.SIGTERM)
    codes = [replica.proc.wait(timeout=20) for replica in running]
    for replica in running:
        replica._out.close()
    return codes


# --- several replicas -----------------------------------------------------------------------


def test_three_replicas_share_the_work_and_never_poll_a_tag_twice(
    env: dict[str, str],
    db: sa.Engine,
    simulator: Simulator,
    replicas: Callable[..., Running],
    dispatches: Callable[[], Dispatches],
) -> None:
    """24 due tags, three replicas of two workers each, a provider answering in 0.3 s:
    every tag is polled exactly once in its first cadence period (1 minute), by one
    replica at a time, and the work lands on more than one replica."""
    tags = [f"camp{i:02d}" for i in range(24)]
    for tag in tags:
        simulator.add_tag(tag, 4)
        simulator.inject("slow", tag=tag, times=None, seconds=0.3)
    passes = [dispatches() for _ in range(3)]
    running = [replicas({**env, **p.env()}) for p in passes]  # all three migrate the database
    wait_for(lambda: all(_started(r) for r in running), 30, "three replicas to start")

    sent_at = datetime.now(UTC)
    _insert_tags(db, tags, sent_at)
    began = time.monotonic()
    wait_for(lambda: len(_ok_runs(db)) == len(tags), 40, "every tag to be polled")
    took = time.monotonic() - began
    for listener in passes:  # one more look by every replica: nothing else is due yet
        listener.wait_next()

    assert _ok_runs(db) == dict.fromkeys(tags, 1)
    polls = {tag: simulator.request_count(tag, page=1) for tag in tags}
    assert polls == dict.fromkeys(tags, 1)
    _assert_no_overlapping_polls(db)
    with db.connect() as conn:
        due = dict(conn.execute(sa.text("SELECT tag, next_poll_at FROM tracked_tags")).all())
    assert all(due[tag] >= sent_at + timedelta(seconds=59) for tag in tags)

    polled_by = [[str(e["tag"]) for e in _events(r, "poll.completed")] for r in running]
    everything = [tag for one in polled_by for tag in one]
    assert sorted(everything) == tags  # each tag by exactly one replica
    shares = [len(one) for one in polled_by]
    assert sum(1 for n in shares if n) >= 2, f"work not spread: {shares}"
    print(f"\n24 tags polled in {took:.1f} s; polls per replica: {shares}")

    assert _stop_all(running) == [0, 0, 0]
    with db.connect() as conn:
        leased = conn.scalar(
            sa.text("SELECT count(*) FROM tracked_tags WHERE lease_owner IS NOT NULL")
        )
    assert leased == 0
    for replica in running:
        errors = [e for e in replica.events() if e.get("level") in ("error", "critical")]
        assert errors == [], errors


def test_a_killed_replica_s_tag_is_taken_over_once_its_lease_expires(
    env: dict[str, str],
    db: sa.Engine,
    simulator: Simulator,
    replicas: Callable[..., Running],
    dispatches: Callable[[], Dispatches],
) -> None:
    """`kill -9` of the replica polling a slow tag: its lease keeps the others off the
    tag until it expires, then another replica polls it; nothing is lost or doubled.

    The lease lasts 60 s (``daemon.scheduler.LEASE``). Rather than wait a minute, the test
    moves the dead replica's ``lease_expires_at`` into the past with an UPDATE, which is
    what the passing of those 60 s would do.
    """
    simulator.add_tag("stuck", 30)
    simulator.inject("slow", tag="stuck", times=1, seconds=5)
    calm = [f"calm{i}" for i in range(4)]
    for tag in calm:
        simulator.add_tag(tag, 5)
    passes = [dispatches() for _ in range(2)]
    running = [replicas({**env, **p.env()}) for p in passes]
    wait_for(lambda: all(_started(r) for r in running), 30, "two replicas to start")
    _insert_tags(db, ["stuck", *calm], datetime.now(UTC))

    def owner_of_stuck() -> str | None:
        with db.connect() as conn:
            return conn.scalar(sa.text("SELECT lease_owner FROM tracked_tags WHERE tag='stuck'"))

    wait_for(owner_of_stuck, 10, "a replica to claim the slow tag")
    owner = owner_of_stuck()
    assert owner is not None
    pid = int(owner.rsplit(":", 2)[1])  # owner is host:pid:random
    (victim,) = [r for r in running if r.proc.pid == pid]
    (survivor,) = [r for r in running if r is not victim]
    wait_for(lambda: simulator.request_count("stuck") == 1, 10, "the slow request")
    victim.proc.kill()  # SIGKILL mid-poll: no clean stop, no lease release
    assert victim.stop()[0] == -signal.SIGKILL

    passes[running.index(survivor)].wait_next()  # it looks again; the lease still holds
    assert simulator.request_count("stuck") == 1
    assert owner_of_stuck() == owner
    assert _ok_runs(db)["stuck"] == 0

    with db.begin() as conn:  # the 60 s of the dead replica's leases pass
        expired = conn.execute(
            sa.text(
                "UPDATE tracked_tags SET lease_expires_at = now() - interval '1 second'"
                " WHERE lease_owner = :owner"
            ),
            {"owner": owner},
        ).rowcount
    assert expired >= 1
    expired_at = time.monotonic()
    wait_for(lambda: _ok_runs(db)["stuck"] == 1, 15, "the survivor to poll the tag")
    takeover = time.monotonic() - expired_at
    print(f"\ntaken over {takeover:.1f} s after the lease expired")

    assert [e["tag"] for e in _events(survivor, "poll.completed")].count("stuck") == 1
    assert simulator.request_count("stuck", page=1) == 2  # the killed poll and this one
    wait_for(lambda: all(_ok_runs(db)[t] == 1 for t in calm), 15, "the other tags")
    for tag in ["stuck", *calm]:
        assert set(_stored(db, tag)) == set(simulator.truth(tag)), tag
    with db.connect() as conn:
        first_sightings = conn.scalar(
            sa.text(
                "SELECT count(*) FROM delivery_status_events"
                " WHERE tag = 'stuck' AND old_status IS NULL"
            )
        )
    assert first_sightings == 30
    _assert_no_duplicate_events(db)
    _assert_no_overlapping_polls(db)
    assert survivor.stop()[0] == 0


def test_concurrent_auto_migration_of_an_empty_database(env: dict[str, str], db: sa.Engine) -> None:
    """Four processes migrating an empty database at once (two `db upgrade`, two `tags`,
    which auto-migrates): all succeed and the schema is at head, once."""
    verbs = [["db", "upgrade"], ["tags", "--json"], ["db", "upgrade"], ["tags", "--json"]]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "daemon", *verb],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for verb in verbs
    ]
    outputs = [p.communicate(timeout=60) for p in procs]
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, out + err
        assert "Traceback" not in err
    with db.connect() as conn:
        versions = conn.execute(sa.text("SELECT version_num FROM alembic_version")).all()
        tables = set(sa.inspect(conn).get_table_names())
    assert versions == [(head_revision(),)]
    assert {"tracked_tags", "delivery_statuses", "poll_runs"} <= tables
    assert sum("upgraded from" in out for out, _ in outputs) <= 1  # the others found head


# --- a database restart under a running daemon -------------------------------------------------


def _readyz(port: str) -> int:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code
    except httpx.TransportError:
        return 0


def _register(port: str, *tags: str) -> None:
    """Track tags (or re-track them: due now) over the running daemon's HTTP API."""
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
        for tag in tags:
            assert http.post("/tags", json={"tag": tag}).status_code == 201


def _http_env(env: dict[str, str]) -> tuple[dict[str, str], str]:
    port = str(free_port())
    return {**env, "SMSPARTNER_HTTP_PORT": port}, port


def test_the_daemon_survives_a_postgresql_restart(
    env: dict[str, str],
    db: sa.Engine,
    pg_server: PgServer,
    simulator: Simulator,
    replicas: Callable[..., Running],
) -> None:
    """PostgreSQL goes away and comes back under a running daemon: the daemon stays up,
    logs the database problem, fails then regains readiness, and ends with every number
    of every tag stored as the provider reports it, without duplicate events.

    The server is stopped, then started again once the daemon has logged the outage (a
    plain ``restart`` can fall between two dispatches and go unnoticed)."""
    if pg_server.pg_ctl is None:
        pytest.skip("needs the throwaway cluster (SMSPARTNER_TEST_POSTGRES_URL is set)")
    when = str(int(time.time()))
    statuses = ["Delivered", "Waiting", "Not delivered", "ko", "Waiting"]

    def serve(tag: str, final: bool = False) -> None:
        for i, status in enumerate(statuses):
            shown = "Delivered" if final and status == "Waiting" else status
            simulator.set_number(tag, f"+3367000{i:04d}", shown, date=when, stop_sms=i == 2)

    first, later = ["before1", "before2", "before3"], ["after1", "after2"]
    for tag in first:
        serve(tag)
    env, port = _http_env(env)
    daemon = replicas(env)
    wait_for(lambda: _readyz(port) == 200, 30, "readiness")
    _register(port, *first)
    wait_for(lambda: _ok_runs(db).keys() >= set(first), 15, "the first polls")

    pg_server.ctl("-m", "fast", "stop")
    try:
        wait_for(
            lambda: _events(daemon, "daemon.database_unavailable"),
            10,
            "the daemon to notice the database is gone",
        )
        assert _readyz(port) == 503
        assert daemon.proc.poll() is None
    finally:
        pg_server.ctl("restart")  # a stopped server starts again with its last options
    wait_for(lambda: _readyz(port) == 200, 20, "readiness after the restart")

    for tag in later:
        serve(tag)
    serve("before1", final=True)  # the Waiting numbers of one old tag resolve
    _register(port, *later, "before1")
    wait_for(
        lambda: _ok_runs(db).keys() >= set(later) and _ok_runs(db)["before1"] == 2,
        20,
        "polls after the restart",
    )

    assert daemon.proc.poll() is None
    for tag in first + later:
        assert _stored(db, tag) == _expected(simulator, tag), tag
    _assert_no_duplicate_events(db)
    with db.connect() as conn:
        events = conn.execute(
            sa.text(
                "SELECT old_status, new_status FROM delivery_status_events"
                " WHERE tag = 'before1' ORDER BY id"
            )
        ).all()
    assert Counter(events) == Counter(
        [(None, map_provider_status(s).value) for s in statuses]
        + [("waiting", "delivered")] * statuses.count("Waiting")
    )
    assert daemon.stop()[0] == 0
    names = [e["event"] for e in daemon.events()]
    print(f"\ndatabase problems logged: {Counter(n for n in names if 'database' in n)}")


def test_a_poll_cut_off_by_the_database_is_retried_soon_after_it_returns(
    env: dict[str, str],
    db: sa.Engine,
    pg_server: PgServer,
    simulator: Simulator,
    replicas: Callable[..., Running],
) -> None:
    """A poll whose fetch ends while PostgreSQL is down cannot store anything (one
    transaction per poll: nothing is half-written). Once the database is back, the tag is
    still due and should be polled again within a few dispatches, not a lease later."""
    if pg_server.pg_ctl is None:
        pytest.skip("needs the throwaway cluster (SMSPARTNER_TEST_POSTGRES_URL is set)")
    simulator.add_tag("cut", 5)
    simulator.inject("slow", tag="cut", times=1, seconds=1.5)
    env, port = _http_env(env)
    daemon = replicas(env)
    wait_for(lambda: _readyz(port) == 200, 30, "readiness")
    _register(port, "cut")
    wait_for(lambda: simulator.request_count("cut") == 1, 10, "the slow request")
    pg_server.ctl("-m", "fast", "stop")
    try:
        wait_for(lambda: _events(daemon, "poll.database_error"), 10, "the failed poll")
    finally:
        pg_server.ctl("restart")
    # Before the fix: about 57 s, the rest of the lease the cut-off poll still held.
    wait_for(lambda: _ok_runs(db)["cut"] == 1, 7.5, "the tag to be polled again")  # 3 passes
    assert daemon.stop()[0] == 0


#: One replica's heartbeat writes (a dispatch every 2 s for 20 minutes, in a burst);
#: prints how many failed.
_BEAT = """
import sys
from datetime import UTC, datetime
from pathlib import Path
from daemon.health import write_heartbeat
failed = 0
for _ in range(600):
    try:
        write_heartbeat(Path(sys.argv[1]), datetime.now(UTC))
    except OSError:
        failed += 1
print(failed)
"""


def test_replicas_on_one_host_can_write_their_heartbeat_at_the_same_time(
    tmp_path: Path,
) -> None:
    """Three replicas on one machine and one database beat into the same file (the path
    depends only on the URL); none of those writes may fail."""
    path = tmp_path / "shared.heartbeat"
    beats = [
        subprocess.Popen(
            [sys.executable, "-c", _BEAT, str(path)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    failures = [int(p.communicate(timeout=30)[0]) for p in beats]
    assert failures == [0, 0, 0]


# --- docs/bi.md ----------------------------------------------------------------------------------


def _sql_blocks() -> list[str]:
    return re.findall(r"^```sql\n(.*?)^```", BI_GUIDE.read_text(), flags=re.M | re.S)


def _grafana(sql: str) -> str:
    """Expand the Grafana macro the guide uses, as Grafana would for the last 6 hours."""
    return re.sub(
        r"\$__timeFilter\(([^)]+)\)",
        r"\1 BETWEEN now() - interval '6 hours' AND now()",
        sql,
    )


def test_every_query_of_the_bi_guide_runs(
    env: dict[str, str], pg_url: str, simulator: Simulator, tmp_path: Path
) -> None:
    """Each ```sql block of docs/bi.md runs: the role block as the admin (it must grant
    enough), every query as that read-only role on a database holding polled data, and
    the blocks marked ``-- SQLite`` against a SQLite file opened read-only."""
    simulator.add_tag("bi-demo", 40)
    simulator.set_number("bi-demo", "+33699990001", "Delivered", stop_sms=True)
    simulator.set_number("bi-demo", "+33699990002", "Waiting")
    assert run_cli("poll", "bi-demo", env=env).code == 0
    simulator.set_number("bi-demo", "+33699990002", "Delivered")  # some history
    assert run_cli("poll", "bi-demo", env=env).code == 0
    sqlite_env = env | {"SMSPARTNER_DATABASE_URL": f"sqlite:///{tmp_path / 'bi.db'}"}
    assert run_cli("poll", "bi-demo", env=sqlite_env).code == 0

    blocks = _sql_blocks()
    role_blocks = [b for b in blocks if "CREATE ROLE" in b]
    sqlite_blocks = [b for b in blocks if b.startswith("-- SQLite")]
    queries = [b for b in blocks if b not in role_blocks and b not in sqlite_blocks]
    assert len(role_blocks) == 1 and len(queries) >= 5 and sqlite_blocks

    url = sa.make_url(pg_url)
    conninfo = pg_url.replace("+psycopg", "")
    role = f"smspartner_bi_{os.getpid()}_{url.database}"
    with psycopg.connect(conninfo, autocommit=True) as admin:
        me = admin.execute("SELECT current_user").fetchone()
        assert me is not None
        grants = re.sub(r"\bsmspartner_bi\b", role, role_blocks[0])
        grants = grants.replace("DATABASE smspartner ", f'DATABASE "{url.database}" ')
        grants = grants.replace("FOR ROLE smspartner ", f'FOR ROLE "{me[0]}" ')
        assert not re.search(r"\bsmspartner\b", grants), "a placeholder left unreplaced"
        try:
            # Queries built at run time go in as bytes (psycopg's hints want literals).
            admin.execute(grants.encode())
            # A table a later migration adds (as the daemon's role) is readable too.
            admin.execute("CREATE TABLE later_table (x integer)")
            admin.execute(f'SET ROLE "{role}"')
            for sql in queries:
                cur = admin.execute(_grafana(sql).encode())
                assert cur.description is not None, sql  # each block ends in a query
                cur.fetchall()
            admin.execute("SELECT * FROM later_table")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                admin.execute("DELETE FROM delivery_statuses")
            admin.execute("RESET ROLE")
            connect = admin.execute(
                "SELECT has_database_privilege(%s, current_database(), 'CONNECT')", [role]
            ).fetchone()
            assert connect == (True,)
        finally:
            admin.execute("RESET ROLE")
            admin.execute(f'DROP OWNED BY "{role}"')
            admin.execute(f'DROP ROLE "{role}"')

    path = tmp_path / "bi.db"
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        for sql in sqlite_blocks:
            assert conn.execute(sql).fetchall(), sql
