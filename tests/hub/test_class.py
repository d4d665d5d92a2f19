"""A class on one server: JupyterHub with three local learners running chapters 00 and 02 at once.

What a workshop on a shared machine looks like: one JupyterHub (the ``jupyterhub`` package and
its ``configurable-http-proxy``), local accounts, one shared read-only install of the course (a
virtual environment outside the checkout, built by ``make hub``), and per learner a copy of the
notebooks and a data directory of their own (``PERFCOURSE_DATA``), where their embedded
PostgreSQL and Redis live. The test:

- creates three local users with default home permissions, starts the hub as root, starts each
  learner's Jupyter server through the hub's REST API;
- runs the learner versions of chapters 00 and 02 in each learner's own server (a session per
  notebook, every code cell sent over the kernel's websocket, as JupyterLab does), the three
  learners at the same time; untouched checks give their hints, nothing else may fail;
- samples each learner's processes together (their Jupyter server, kernels, embedded PostgreSQL
  and Redis: :class:`perfcourse.memory.Footprint`) and writes the peaks to ``data/hub-class.json``
  (the instructor guide's sizing quotes them);
- proves each learner's servers are closed to the others: learner 2 cannot reach learner 1's
  Redis or PostgreSQL, while learner 1 can (so the check can fail), and no embedded server
  listens on a TCP port.

Run with ``make hub`` (root only: it adds and removes local users; CI runs it).
"""

from __future__ import annotations

import datetime
import json
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import textwrap
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import nbformat
import psutil
import pytest

from perfcourse.memory import Footprint
from perfcourse.services import session_processes
from perfcourse.units import format_bytes

ROOT = Path(__file__).resolve().parents[2]
#: The shared install every learner runs (``make hub`` builds it with the system Python).
BIN = Path(os.environ.get("HUB_VENV", "/tmp/perfcourse-hub/venv")) / "bin"
PROXY = ROOT / "data" / "hub" / "node_modules" / ".bin" / "configurable-http-proxy"
LEARNERS = ["pc-learner1", "pc-learner2", "pc-learner3"]
NOTEBOOKS = ["00-setup-and-dataset.ipynb", "02-query-optimization.ipynb"]
RUNUSER = shutil.which("runuser", path="/usr/sbin:/usr/bin:/sbin:/bin") or "runuser"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="adds local users and runs JupyterHub as root"),
    pytest.mark.skipif(shutil.which("jupyterhub", path=str(BIN)) is None,
                       reason="no shared install with jupyterhub: make hub builds it"),
    pytest.mark.skipif(not PROXY.exists(), reason="configurable-http-proxy is not installed: make hub installs it"),
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _as(user: str, *command: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([RUNUSER, "-u", user, "--", *command], capture_output=True, text=True,
                          env=env, check=False, timeout=300)


def _data_dir(user: str) -> Path:
    return Path(pwd.getpwnam(user).pw_dir) / "perfcourse-data"


class Hub:
    """The hub's REST API and the learners' servers behind it, with a service token."""

    def __init__(self, port: int, token: str) -> None:
        self.base, self.token = f"http://127.0.0.1:{port}", token

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        request = urllib.request.Request(
            self.base + path, method=method, data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                text = answer.read()
                return answer.status, json.loads(text) if text else {}
        except urllib.error.HTTPError as error:
            return error.code, {"message": error.read().decode(errors="replace")}

    def start_server(self, user: str) -> None:
        status, answer = self.call("POST", f"/hub/api/users/{user}/server")
        assert status in (201, 202, 400), f"{user}: the hub did not start a server ({status} {answer})"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            _, model = self.call("GET", f"/hub/api/users/{user}")
            if model.get("servers", {}).get("", {}).get("ready"):
                return
            time.sleep(1)
        pytest.fail(f"{user}'s Jupyter server was not ready after 180 s")

    def run_notebook(self, user: str, notebook: str) -> list[str]:
        """Open ``notebook`` in ``user``'s server and run every code cell in its kernel.

        Returns the errors other than a check's hint (AssertionError), as "Name: value" lines.
        """
        import websocket

        status, session = self.call("POST", f"/user/{user}/api/sessions", {
            "path": f"notebooks/{notebook}", "type": "notebook", "name": notebook, "kernel": {"name": "python3"},
        })
        assert status == 201, f"{user}: no kernel for {notebook} ({status} {session})"
        kernel = session["kernel"]["id"]
        url = f"ws://127.0.0.1:{self.base.rsplit(':', 1)[1]}/user/{user}/api/kernels/{kernel}/channels"
        ws = websocket.create_connection(url, header=[f"Authorization: token {self.token}"], timeout=300)
        errors: list[str] = []
        try:
            path = Path(pwd.getpwnam(user).pw_dir) / "perfcourse" / "notebooks" / notebook
            for cell in nbformat.read(path, as_version=4).cells:
                if cell.cell_type == "code" and cell.source.strip():
                    errors += self._execute(ws, cell.source)
        finally:
            ws.close()
            self.call("DELETE", f"/user/{user}/api/sessions/{session['id']}")
        return errors

    @staticmethod
    def _execute(ws, code: str) -> list[str]:
        msg_id = uuid.uuid4().hex
        ws.send(json.dumps({
            "header": {"msg_id": msg_id, "username": "perfcourse-test", "session": uuid.uuid4().hex,
                       "msg_type": "execute_request", "version": "5.3",
                       "date": datetime.datetime.now(datetime.UTC).isoformat()},
            "parent_header": {}, "metadata": {}, "channel": "shell",
            "content": {"code": code, "silent": False, "store_history": True, "user_expressions": {},
                        "allow_stdin": False, "stop_on_error": False},
        }))
        errors, replied, idle = [], False, False
        while not (replied and idle):
            message = json.loads(ws.recv())
            if message.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind = message["msg_type"]
            if kind == "error" and message["content"]["ename"] != "AssertionError":
                errors.append(f"{message['content']['ename']}: {message['content']['evalue']}")
            replied |= kind == "execute_reply"
            idle |= kind == "status" and message["content"]["execution_state"] == "idle"
        return errors


@pytest.fixture(scope="module")
def learners():
    """Three local accounts, each with a copy of the learner notebooks and a seeded dataset."""
    for user in LEARNERS:
        try:
            pwd.getpwnam(user)
        except KeyError:
            subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", user], check=True)
        home = Path(pwd.getpwnam(user).pw_dir)
        course = home / "perfcourse"
        shutil.rmtree(course, ignore_errors=True)
        shutil.copytree(ROOT / "notebooks", course / "notebooks")
        shutil.chown(course, user, user)
        for path in course.rglob("*"):
            shutil.chown(path, user, user)
        env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(home), "PERFCOURSE_DATA": str(_data_dir(user))}
        seeded = _as(user, str(BIN / "perfcourse"), "seed", "--backend", "sqlite", "--backend", "postgres", env=env)
        assert seeded.returncode == 0, f"{user}: seeding failed: {seeded.stderr[-1500:]}"
        # Both embedded servers up, as after chapter 05: the sizing covers a learner's whole course.
        started = _as(user, str(BIN / "perfcourse"), "services", "up", env=env)
        assert started.returncode == 0, f"{user}: services up failed: {started.stderr[-1500:]}"
    yield LEARNERS
    for user in LEARNERS:
        home = Path(pwd.getpwnam(user).pw_dir)
        env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(home), "PERFCOURSE_DATA": str(_data_dir(user))}
        _as(user, str(BIN / "perfcourse"), "services", "down", env=env)
        subprocess.run(["pkill", "-u", user], check=False)
        time.sleep(0.5)
        subprocess.run(["userdel", "--remove", user], check=False, capture_output=True)


@pytest.fixture(scope="module")
def hub(learners, tmp_path_factory):
    """JupyterHub on loopback, spawning each learner's server as that learner (LocalProcessSpawner)."""
    work = tmp_path_factory.mktemp("hub")
    port, token = _free_port(), secrets.token_hex(16)
    (work / "jupyterhub_config.py").write_text(f"""
c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.port = {port}
c.JupyterHub.hub_port = {_free_port()}
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{_free_port()}"
c.ConfigurableHTTPProxy.command = [{str(PROXY)!r}]
c.JupyterHub.db_url = "sqlite:///{work}/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = "{work}/cookie_secret"
c.ConfigurableHTTPProxy.pid_file = "{work}/proxy.pid"
c.JupyterHub.authenticator_class = "dummy"
c.DummyAuthenticator.password = {secrets.token_hex(8)!r}
c.Authenticator.allowed_users = set({LEARNERS!r})
c.JupyterHub.services = [{{"name": "perfcourse-test", "api_token": {token!r}}}]
c.JupyterHub.load_roles = [{{"name": "perfcourse-test", "services": ["perfcourse-test"],
    "scopes": ["admin:users", "admin:servers", "access:servers"]}}]
c.Spawner.cmd = [{str(BIN / "jupyterhub-singleuser")!r}]
c.Spawner.notebook_dir = "~/perfcourse"
c.Spawner.default_url = "/lab"
c.Spawner.start_timeout = 180
c.Spawner.http_timeout = 180
c.Spawner.environment = {{
    "PERFCOURSE_DATA": lambda spawner: str(__import__("pwd").getpwnam(spawner.user.name).pw_dir) + "/perfcourse-data",
    "PATH": "{BIN}:/usr/bin:/bin",
}}
""")
    log = open(work / "hub.log", "w")
    server = subprocess.Popen([str(BIN / "jupyterhub"), "-f", str(work / "jupyterhub_config.py")],
                              cwd=work, stdout=log, stderr=subprocess.STDOUT)
    client = Hub(port, token)
    deadline, up = time.monotonic() + 90, False
    while not up and time.monotonic() < deadline:
        assert server.poll() is None, (work / "hub.log").read_text()[-3000:]
        try:
            up = client.call("GET", "/hub/api/")[0] == 200
        except urllib.error.URLError:  # not listening yet
            time.sleep(0.5)
    assert up, (work / "hub.log").read_text()[-3000:]
    try:
        for user in learners:
            client.start_server(user)
        yield client
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def test_three_learners_run_chapters_00_and_02_at_once_each_in_their_own_servers(hub, learners):
    footprints = {user: Footprint(session_processes(_data_dir(user))) for user in learners}
    errors: dict[str, list[str]] = {}

    seconds: dict[str, float] = {}

    def learner(user: str) -> None:
        started = time.monotonic()
        try:
            errors[user] = [f"{nb}: {e}" for nb in NOTEBOOKS for e in hub.run_notebook(user, nb)]
        except Exception as exc:  # noqa: BLE001 - reported below, with the learner's name
            errors[user] = [f"{type(exc).__name__}: {exc}"]
        seconds[user] = round(time.monotonic() - started, 1)

    for footprint in footprints.values():
        footprint.__enter__()
    threads = [threading.Thread(target=learner, args=(user,)) for user in learners]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for footprint in footprints.values():
        footprint.__exit__(None, None, None)
    assert errors == {user: [] for user in learners}

    record = {user: {"peak_bytes": f.peak_bytes, "peak_by_process": f.peak_by_process,
                     "most_by_process": f.most_by_process, "samples": f.samples,
                     "seconds_for_both_notebooks": seconds[user]}
              for user, f in footprints.items()}
    (ROOT / "data" / "hub-class.json").write_text(json.dumps({"notebooks": NOTEBOOKS, "learners": record},
                                                             indent=2) + "\n")
    for user, footprint in footprints.items():
        print(f"\n{user}: both notebooks in {seconds[user]} s; {footprint}")
        names = set(footprint.most_by_process)
        assert {"postgres", "redis-server"} <= names, f"{user}'s embedded servers were not seen: {names}"
        assert any(n.startswith("jupyterhub-sing") for n in names), f"{user}'s Jupyter server was not seen: {names}"
        assert footprint.peak_bytes < 1024**3, f"{user} needed {format_bytes(footprint.peak_bytes)}"


def test_each_learners_embedded_servers_are_closed_to_the_others(hub, learners):
    owner, other = learners[0], learners[1]
    data = _data_dir(owner)
    redis_socket = data / "redis" / "redis.sock"
    postgres_dir = data / "postgres"
    assert redis_socket.exists(), "learner 1's Redis is not up"
    assert (postgres_dir / "postmaster.pid").exists(), "learner 1's PostgreSQL is not up"
    probe = textwrap.dedent(f"""
        import psycopg, redis
        results = []
        try:
            redis.Redis(unix_socket_path={str(redis_socket)!r}, socket_timeout=5).ping()
            results.append("redis")
        except Exception as exc:
            print("redis refused:", type(exc).__name__, exc)
        try:
            psycopg.connect(host={str(postgres_dir)!r}, dbname="postgres", user="postgres", connect_timeout=5).close()
            results.append("postgres")
        except Exception as exc:
            print("postgres refused:", type(exc).__name__, exc)
        print("reached:", ",".join(results))
    """)
    def attempt(user: str) -> subprocess.CompletedProcess:
        env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": pwd.getpwnam(user).pw_dir}
        return _as(user, str(BIN / "python"), "-c", probe, env=env)

    mine, theirs = attempt(owner), attempt(other)
    assert "reached: redis,postgres" in mine.stdout, (
        f"learner 1 cannot reach their own servers: {mine.stdout}{mine.stderr}"
    )
    assert "reached: \n" in theirs.stdout or theirs.stdout.rstrip().endswith("reached:"), (
        f"learner 2 reached learner 1's servers: {theirs.stdout}{theirs.stderr}"
    )
    assert "Permission denied" in theirs.stdout or "permission denied" in theirs.stdout.lower()
    listening = [
        (process.name(), conn.laddr)
        for user in learners
        for process in session_processes(_data_dir(user))()
        if process.name() in ("postgres", "redis-server")
        for conn in process.net_connections(kind="inet") if conn.status == psutil.CONN_LISTEN
    ]
    assert listening == [], f"embedded servers listen on TCP: {listening}"
