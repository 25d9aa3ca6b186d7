"""The deployment files in deploy/ as operators use them: every manifest names real
settings, real CLI verbs and the real probe routes, and the daemon starts exactly as the
systemd unit says (EnvironmentFile, credentials directory, sd_notify, SIGTERM).

Nothing here needs systemd, Docker or a cluster: `.ci/check-deploy` runs the linters
(systemd-analyze, hadolint, kubernetes-validate); these tests check what the linters
cannot know, that the files agree with the program.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from daemon.cli import build_parser
from daemon.settings import ENV_PREFIX, SECRET_FIELDS, Settings, load_settings
from daemon.simulator import Simulator
from tests.helpers import API_KEY

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
UNIT = DEPLOY / "systemd" / "smspartner-status.service"
ENV_EXAMPLE = DEPLOY / "systemd" / "env.example"
DOCKERFILE = DEPLOY / "container" / "Dockerfile"
COMPOSE = DEPLOY / "compose" / "compose.yaml"
SECRET = DEPLOY / "kubernetes" / "secret.example.yaml"
#: Where the install guide puts the virtualenv, and the unit's state directory.
INSTALLED_BIN = "/opt/smspartner-status/bin/smspartner-status"
STATE_DIR = "/var/lib/smspartner-status"
HTTP_PORT = 8787
#: Inside a pod or a container the probes come from outside: the daemon binds every address.
ALL_ADDRESSES = "0.0.0.0"  # noqa: S104 - a value we look for, not a socket we bind
#: Where the daemon writes its heartbeat without RUNTIME_DIRECTORY or XDG_RUNTIME_DIR (a
#: private directory in tempfile.gettempdir()), writable in every manifest.
TMP = "/tmp"  # noqa: S108 - a mount point we look for, not a file we write
#: What the deployments may run: the daemon, one pass, the migration, the bundled simulator.
DEPLOYED_VERBS = {("run",), ("run", "--once"), ("db", "upgrade"), ("simulator",)}


# --- parsing the files as their tools do --------------------------------------------------


def parse_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A systemd unit as ``{section: [(key, value), …]}``; keys may repeat."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"{path}: {line!r} outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{path}: not KEY=VALUE: {line!r}"
        current.append((key.strip(), value.strip()))
    return sections


def unit_values(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    """Every value of ``key`` in ``section``, in order."""
    return [v for k, v in unit.get(section, []) if k == key]


def unit_value(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> str:
    """The one value of ``key`` in ``section``."""
    values = unit_values(unit, section, key)
    assert len(values) == 1, f"[{section}] {key}= appears {len(values)} times"
    return values[0]


def parse_env_file(text: str) -> dict[str, str]:
    """An ``EnvironmentFile=`` as systemd reads it: ``KEY=value`` lines, ``#``/``;``
    comments, optional quotes around the value."""
    found = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not KEY=value: {line!r}"
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        found[key.strip()] = value
    return found


def parse_assignments(value: str) -> dict[str, str]:
    """An ``Environment=`` value: space-separated, optionally quoted ``KEY=value`` words."""
    return dict(word.partition("=")[::2] for word in shlex.split(value))


def dockerfile_stages(path: Path) -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions ``(INSTRUCTION, arguments)``, one list per stage;
    continuation lines joined and comment lines dropped, as BuildKit does."""
    stages: list[list[tuple[str, str]]] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        instruction, _, args = (pending + line).partition(" ")
        pending = ""
        if instruction.upper() == "FROM":
            stages.append([])
        assert stages, f"{path}: {instruction} before FROM"
        stages[-1].append((instruction.upper(), args.strip()))
    return stages


def only(stage: list[tuple[str, str]], instruction: str) -> str:
    """The arguments of the one ``instruction`` of a stage."""
    found = [args for name, args in stage if name == instruction]
    assert len(found) == 1, f"{instruction} appears {len(found)} times in the stage"
    return found[0]


def load_yaml(path: Path) -> list[dict[str, Any]]:
    """Every document of a YAML file."""
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def kubernetes_documents() -> list[dict[str, Any]]:
    """Every object of every manifest in deploy/kubernetes."""
    docs = [d for p in sorted((DEPLOY / "kubernetes").glob("*.yaml")) for d in load_yaml(p)]
    assert docs, "no manifests in deploy/kubernetes"
    return docs


def pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    """The pod template of a workload (Deployment, Job, CronJob), None for other kinds."""
    spec = doc.get("spec", {})
    if doc["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    template = spec.get("template")
    return None if template is None else dict(template["spec"])


# --- what the program accepts -------------------------------------------------------------


def setting_names() -> set[str]:
    """Every environment variable the settings read, ``*_FILE`` secrets included."""
    names = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    return names | {ENV_PREFIX + name.upper() + "_FILE" for name in SECRET_FIELDS}


def cli_verb(args: list[str]) -> tuple[str, ...]:
    """The verb that ``smspartner-status ARGS`` runs; fails the test on arguments the
    command line would reject."""
    try:
        parsed = build_parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"`smspartner-status {shlex.join(args)}` is not a valid command line")
    verb: tuple[str, ...] = (parsed.verb,)
    if parsed.verb == "db":
        verb = ("db", parsed.db_verb)
    elif parsed.verb == "run" and parsed.once:
        verb = ("run", "--once")
    if parsed.verb != "simulator":
        # argparse takes abbreviations (`--onc`); the files spell every word out.
        assert tuple(args) == verb, f"write {shlex.join(verb)!r}, not {shlex.join(args)!r}"
    return verb


def assert_valid_values(env: dict[str, str], where: str) -> None:
    """The literal values given to settings parse (interpolations are left to their tool)."""
    names = setting_names()
    unknown = sorted(set(env) - names - {"CREDENTIALS_DIRECTORY"})
    assert not unknown, f"{where}: not settings of smspartner-status: {unknown}"
    literal = {
        name.removeprefix(ENV_PREFIX).lower(): value
        for name, value in env.items()
        if name.startswith(ENV_PREFIX) and not name.endswith("_FILE") and "${" not in value
    }
    load_settings(environ={}, **literal)  # raises ConfigError naming a bad value


# --- (a) the files agree with the program -------------------------------------------------


def test_every_smspartner_variable_named_in_deploy_is_a_real_setting() -> None:
    names = setting_names()
    used: dict[str, set[str]] = {}
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file():
            for name in re.findall(r"\bSMSPARTNER_[A-Z0-9_]*[A-Z0-9]", path.read_text("utf-8")):
                used.setdefault(name, set()).add(str(path.relative_to(REPO)))
    assert "SMSPARTNER_API_KEY" in used and "SMSPARTNER_DATABASE_URL" in used
    unknown = {name: sorted(paths) for name, paths in used.items() if name not in names}
    assert not unknown, f"variables that smspartner-status does not read: {unknown}"


def test_systemd_unit_notifies_is_watched_and_reads_its_key_as_a_credential() -> None:
    unit = parse_unit(UNIT)
    assert unit_value(unit, "Service", "Type") == "notify"
    assert unit_value(unit, "Service", "NotifyAccess") == "main"
    # The daemon sends WATCHDOG=1 every ~2 s; a minute tolerates a long poll and GC pauses.
    assert int(unit_value(unit, "Service", "WatchdogSec")) == 60
    assert unit_value(unit, "Service", "Restart") == "on-failure"
    # The CLI exits 2 on bad configuration: restarting would only repeat the error.
    assert unit_value(unit, "Service", "RestartPreventExitStatus") == "2"
    assert unit_value(unit, "Service", "KillSignal") == "SIGTERM"
    # The daemon exits within 10 s of SIGTERM; systemd must wait longer than that.
    assert int(unit_value(unit, "Service", "TimeoutStopSec")) > 10
    assert unit_value(unit, "Service", "DynamicUser") == "yes"
    assert unit_value(unit, "Service", "EnvironmentFile") == "-/etc/smspartner-status/env"

    # Credentials land in $CREDENTIALS_DIRECTORY/<name>: each name must be a secret setting.
    credentials = [c.partition(":")[0] for c in unit_values(unit, "Service", "LoadCredential")]
    assert credentials == ["api_key"]
    assert set(credentials) <= set(SECRET_FIELDS)

    # The SQLite file lives in the state directory systemd creates for the dynamic user.
    state = unit_value(unit, "Service", "StateDirectory")
    assert f"/var/lib/{state}" == STATE_DIR == unit_value(unit, "Service", "WorkingDirectory")
    env: dict[str, str] = {}
    for assignment in unit_values(unit, "Service", "Environment"):
        env.update(parse_assignments(assignment))
    assert env["SMSPARTNER_DATABASE_URL"] == f"sqlite:///{STATE_DIR}/smspartner-status.db"
    assert_valid_values(env, "the unit's Environment=")

    # The heartbeat goes to $RUNTIME_DIRECTORY: private to the service, gone at stop.
    assert unit_value(unit, "Service", "RuntimeDirectory") == "smspartner-status"
    assert unit_value(unit, "Service", "RuntimeDirectoryMode") == "0700"

    commands = [
        shlex.split(unit_value(unit, "Service", "ExecStartPre")),
        shlex.split(unit_value(unit, "Service", "ExecStart")),
    ]
    assert [c[0] for c in commands] == [INSTALLED_BIN, INSTALLED_BIN]
    assert [cli_verb(c[1:]) for c in commands] == [("db", "upgrade"), ("run",)]


def test_systemd_env_example_holds_valid_settings_and_no_api_key() -> None:
    env = parse_env_file(ENV_EXAMPLE.read_text("utf-8"))
    assert "SMSPARTNER_BASE_URL" in env
    # The key comes from LoadCredential=; one set here would win over it.
    assert "SMSPARTNER_API_KEY" not in env
    assert_valid_values(env, "deploy/systemd/env.example")


def test_container_image_runs_any_verb_as_a_non_root_user() -> None:
    builder, final = dockerfile_stages(DOCKERFILE)
    assert only(builder, "FROM") == "python:3.11-slim AS builder"
    assert only(final, "FROM") == "python:3.11-slim"

    # The builder installs the package with the PostgreSQL extra from the copied sources.
    extras = tomllib.loads((REPO / "pyproject.toml").read_text("utf-8"))["project"][
        "optional-dependencies"
    ]
    assert "postgres" in extras
    runs = " ".join(args for name, args in builder if name == "RUN")
    assert "pip install" in runs and ".[postgres]" in runs
    allowed = {
        line[1:].rstrip("/")
        for line in (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    for name, args in builder:
        if name == "COPY":
            *sources, _dest = args.split()
            for source in sources:
                assert (REPO / source).exists(), f"COPY {source}: not in the repository"
                assert source in allowed, f"COPY {source}: excluded by Dockerfile.dockerignore"

    # The final image gets the virtualenv only: no sources, no build tools.
    assert [args for name, args in final if name == "COPY"] == [
        "--from=builder /opt/smspartner-status /opt/smspartner-status"
    ]
    final_runs = " ".join(args for name, args in final if name == "RUN")
    assert "pip" not in final_runs and "apt-get" not in final_runs

    user = only(final, "USER")
    uid = user.partition(":")[0]
    assert uid.isdigit() and int(uid) != 0, "USER must be a numeric non-root UID"

    env_words = " ".join(args for name, args in final if name == "ENV").split()
    assert "PYTHONUNBUFFERED=1" in env_words
    assert f"{ENV_PREFIX}HTTP_HOST={ALL_ADDRESSES}" in env_words
    assert_valid_values(
        {k: v for k, _, v in (w.partition("=") for w in env_words) if k.startswith(ENV_PREFIX)},
        "the Dockerfile's ENV",
    )
    assert only(final, "EXPOSE") == str(HTTP_PORT)
    assert only(final, "STOPSIGNAL") == "SIGTERM"

    entrypoint = json.loads(only(final, "ENTRYPOINT"))
    assert entrypoint == ["smspartner-status"]
    assert cli_verb(json.loads(only(final, "CMD"))) == ("run",)
    healthcheck = only(final, "HEALTHCHECK")
    assert json.loads(healthcheck.partition(" CMD ")[2]) == ["smspartner-status", "check"]


def test_kubernetes_workloads_run_valid_verbs_with_secrets_probes_and_a_locked_down_user() -> None:
    uid = int(only(dockerfile_stages(DOCKERFILE)[-1], "USER").partition(":")[0])
    secret_keys = {
        doc["metadata"]["name"]: set(doc.get("stringData", {})) | set(doc.get("data", {}))
        for doc in load_yaml(SECRET)
        if doc["kind"] == "Secret"
    }
    verbs: dict[str, list[tuple[str, ...]]] = {}
    for doc in kubernetes_documents():
        spec = pod_spec(doc)
        if spec is None:
            continue
        assert spec["securityContext"]["runAsNonRoot"] is True
        tmp_volumes = {
            v["name"] for v in spec.get("volumes", []) if "emptyDir" in v and v["name"] == "tmp"
        }
        for container in spec.get("initContainers", []) + spec["containers"]:
            if "smspartner-status" not in container["image"]:
                continue  # the application next to the sidecar
            assert "command" not in container, "keep the image's ENTRYPOINT, pass args"
            verb = cli_verb(container["args"])
            verbs.setdefault(doc["kind"], []).append(verb)

            context = container["securityContext"]
            assert context["runAsUser"] == uid and context["runAsNonRoot"] is True
            assert context["readOnlyRootFilesystem"] is True
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"]
            assert container["resources"]["requests"] and container["resources"]["limits"]

            env = {e["name"]: e for e in container.get("env", [])}
            assert_valid_values(
                {n: e["value"] for n, e in env.items() if "value" in e},
                f"{doc['kind']} {container['name']}",
            )
            assert set(env) <= setting_names()
            for entry in env.values():
                ref = entry.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secret_keys[ref["name"]], ref
            assert env["SMSPARTNER_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
                "name": "smspartner-status",
                "key": "database-url",
            }
            if verb[0] == "run":
                assert env["SMSPARTNER_API_KEY"]["valueFrom"]["secretKeyRef"] == {
                    "name": "smspartner-status",
                    "key": "api-key",
                }
                # The heartbeat file goes to /tmp, and the root filesystem is read-only.
                mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
                assert mounts.get(TMP) in tmp_volumes
            if verb == ("run",):
                assert_sidecar_serves_probes(container, env)

        if doc["kind"] == "Deployment":
            assert spec["terminationGracePeriodSeconds"] == 30
    assert verbs == {
        "Deployment": [("db", "upgrade"), ("run",)],
        "CronJob": [("run", "--once")],
        "Job": [("db", "upgrade")],
    }
    cronjob = next(d for d in kubernetes_documents() if d["kind"] == "CronJob")
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"


def assert_sidecar_serves_probes(container: dict[str, Any], env: dict[str, Any]) -> None:
    """The `run` container listens on the pod IP at 8787 and is probed on our routes."""
    assert env["SMSPARTNER_HTTP_HOST"]["value"] == ALL_ADDRESSES
    assert env.get("SMSPARTNER_HTTP_PORT", {"value": str(HTTP_PORT)})["value"] == str(HTTP_PORT)
    ports = {p.get("name"): p["containerPort"] for p in container["ports"]}
    assert HTTP_PORT in ports.values()
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path
        assert get["port"] == HTTP_PORT or ports.get(get["port"]) == HTTP_PORT


def test_compose_migrates_then_runs_against_a_healthy_postgresql() -> None:
    (compose,) = load_yaml(COMPOSE)
    services = compose["services"]
    db = services["db"]
    assert db["image"] == "postgres:16" and "pg_isready" in " ".join(db["healthcheck"]["test"])

    migrate, daemon = services["migrate"], services["smspartner-status"]
    assert cli_verb(migrate["command"]) == ("db", "upgrade")
    assert cli_verb(daemon["command"]) == ("run",)
    assert migrate["depends_on"]["db"]["condition"] == "service_healthy"
    assert daemon["depends_on"] == {
        "db": {"condition": "service_healthy"},
        "migrate": {"condition": "service_completed_successfully"},
    }
    assert daemon["healthcheck"]["test"] == ["CMD", "smspartner-status", "check"]
    assert daemon["read_only"] is True and TMP in daemon["tmpfs"]
    assert any(str(p).endswith(f":{HTTP_PORT}") for p in daemon["ports"])

    for name, service in services.items():
        if "build" in service:
            build = service["build"]
            context = (COMPOSE.parent / build["context"]).resolve()
            assert context == REPO and (context / build["dockerfile"]) == DOCKERFILE
            assert cli_verb(service["command"]) in DEPLOYED_VERBS
        env = service.get("environment", {})
        if "build" in service:  # the services running smspartner-status (not db, grafana…)
            assert_valid_values(env, f"compose service {name}")
    assert daemon["environment"]["SMSPARTNER_HTTP_HOST"] == ALL_ADDRESSES
    assert daemon["environment"]["SMSPARTNER_DATABASE_URL"].startswith("postgresql://")


# --- (b) the daemon started as the unit starts it -----------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    """A listening sd_notify socket, as systemd gives a Type=notify service."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(tmp_path / "notify.sock"))
    listener.settimeout(15)
    try:
        yield listener
    finally:
        listener.close()


def receive_until(listener: socket.socket, wanted: str, messages: list[str]) -> None:
    """Collect sd_notify datagrams until ``wanted`` arrives (a datagram may hold several
    newline-separated assignments)."""
    while True:
        lines = listener.recv(4096).decode().splitlines()
        messages.extend(lines)
        if wanted in lines:
            return


def test_daemon_starts_notifies_and_stops_as_the_systemd_unit_says(
    tmp_path: Path, simulator: Simulator, notify_socket: socket.socket
) -> None:
    unit = parse_unit(UNIT)
    state = tmp_path / "state"  # stands for StateDirectory=, created by systemd
    state.mkdir(mode=0o700)

    def here(value: str) -> str:
        """The unit's paths, moved into the test's temporary directory."""
        return value.replace(STATE_DIR, str(state)).replace(
            INSTALLED_BIN, str(Path(sys.executable).with_name("smspartner-status"))
        )

    # systemd's order: the unit's Environment=, then EnvironmentFile= overrides it.
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    for assignment in unit_values(unit, "Service", "Environment"):
        env.update(parse_assignments(here(assignment)))
    port = free_port()
    example = ENV_EXAMPLE.read_text("utf-8")
    for name, value in (("BASE_URL", simulator.url), ("HTTP_PORT", str(port))):
        example, count = re.subn(
            rf"^{ENV_PREFIX}{name}=.*$", f"{ENV_PREFIX}{name}={value}", example, flags=re.M
        )
        assert count == 1, f"env.example should set {ENV_PREFIX}{name}"
    env_file = tmp_path / "env"
    env_file.write_text(example, encoding="utf-8")
    env.update(parse_env_file(env_file.read_text("utf-8")))

    # LoadCredential=api_key:… → $CREDENTIALS_DIRECTORY/api_key, readable by the service only.
    credentials = tmp_path / "credentials"
    credentials.mkdir(mode=0o700)
    for credential in unit_values(unit, "Service", "LoadCredential"):
        name = credential.partition(":")[0]
        (credentials / name).write_text(API_KEY + "\n", encoding="utf-8")
        (credentials / name).chmod(0o400)
    env["CREDENTIALS_DIRECTORY"] = str(credentials)
    env["NOTIFY_SOCKET"] = notify_socket.getsockname()
    # RuntimeDirectory= → $RUNTIME_DIRECTORY, created by systemd with RuntimeDirectoryMode=.
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=int(unit_value(unit, "Service", "RuntimeDirectoryMode"), 8))
    env["RUNTIME_DIRECTORY"] = str(runtime)
    assert "SMSPARTNER_API_KEY" not in env
    cwd = here(unit_value(unit, "Service", "WorkingDirectory"))

    pre = shlex.split(here(unit_value(unit, "Service", "ExecStartPre")))
    migrated = subprocess.run(pre, env=env, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    assert (state / "smspartner-status.db").is_file()

    simulator.add_tag("unit", 5)
    log = (tmp_path / "daemon.log").open("w")
    daemon = subprocess.Popen(
        shlex.split(here(unit_value(unit, "Service", "ExecStart"))),
        env=env,
        cwd=cwd,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        messages: list[str] = []
        receive_until(notify_socket, "READY=1", messages)
        # A watchdog ping after READY=1 (the first may race ahead of it).
        receive_until(notify_socket, "WATCHDOG=1", messages)
        assert messages[-1] == "WATCHDOG=1" and messages.index("READY=1") < len(messages) - 1
        assert [p.suffix for p in runtime.iterdir()] == [".heartbeat"]

        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
            assert http.get("/healthz").status_code == 200
            answer = http.post("/tags", json={"tag": "unit"})
            assert answer.status_code == 201, answer.text
            deadline = time.monotonic() + 10
            while simulator.request_count("unit") == 0 and time.monotonic() < deadline:
                time.sleep(0.1)
        assert simulator.request_count("unit") >= 1, "the key from the credential was not used"

        stopped = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        receive_until(notify_socket, "STOPPING=1", messages)
        assert daemon.wait(timeout=10) == 0
        assert time.monotonic() - stopped < 10
        assert list(runtime.iterdir()) == []  # a clean stop removes the heartbeat
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        log.close()
    output = (tmp_path / "daemon.log").read_text("utf-8")
    events = [json.loads(line)["event"] for line in output.splitlines() if line.startswith("{")]
    assert "daemon.started" in events and "daemon.stopped" in events
    assert API_KEY not in output + migrated.stdout + migrated.stderr
