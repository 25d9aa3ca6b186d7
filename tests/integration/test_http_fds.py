"""The daemon's HTTP server under a flood of idle clients, with few file descriptors.

A subprocess, because the process's own descriptor limit is the subject: with every
idle connection accepted, ``ulimit -n 256`` let clients take the descriptors that polls
need (``Too many open files``) while the probes still said 200.
"""

from __future__ import annotations

import os
import resource
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx

from daemon.simulator import Simulator
from tests.helpers import API_KEY, free_port, run_cli, wait_for

#: The daemon's descriptor limit: room for its own ~25 and the 64 connections it serves.
NOFILE = 128


def _low_nofile() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, hard))


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_idle_clients_cannot_take_the_descriptors_polls_need(
    cli_env: dict[str, str], simulator: Simulator, tmp_path: Path
) -> None:
    simulator.add_tag("during-flood", 30)
    port = free_port()
    env = {**cli_env, "SMSPARTNER_HTTP_PORT": str(port)}
    assert run_cli("db", "upgrade", env=env).code == 0
    log = tmp_path / "daemon.log"
    with log.open("w") as out:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "daemon", "run"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=_low_nofile,  # the limit of that process is the subject
        )
    idle: list[socket.socket] = []
    try:
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=5) as http:
            wait_for(lambda: _status(http) == 200, 20, "/healthz")
            # Twice the daemon's limit in clients that connect and never send a byte.
            for _ in range(2 * NOFILE):
                idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            assert _status(http) == 503  # full: a quick refusal, not a hang
            assert _open_fds(daemon.pid) < NOFILE - 16

            # Another program registers a tag meanwhile: it is polled and stored.
            db = env["SMSPARTNER_DATABASE_URL"].removeprefix("sqlite:///")
            with sqlite3.connect(db) as conn:
                conn.execute("INSERT INTO tracked_tags (tag) VALUES ('during-flood')")

            def stored() -> bool:
                with sqlite3.connect(db) as conn:
                    query = "SELECT outcome FROM poll_runs WHERE tag = 'during-flood'"
                    return [row[0] for row in conn.execute(query)] == ["ok"]

            wait_for(stored, 8, "the tag to be polled during the flood")
            for sock in idle:
                sock.close()
            wait_for(lambda: _status(http) == 200, 5, "/healthz once the clients left")
    finally:
        for sock in idle:
            sock.close()
        daemon.terminate()
        assert daemon.wait(timeout=20) == 0
    text = log.read_text()
    assert "Too many open files" not in text
    assert '"http.busy"' in text
    assert API_KEY not in text


def _status(http: httpx.Client) -> int:
    try:
        return http.get("/healthz").status_code
    except httpx.TransportError:
        return 0
