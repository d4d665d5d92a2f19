"""A small web stack on loopback: an HTTP client, an in-process threaded server, and gunicorn.

* :func:`get` - one GET over a fresh ``http.client`` connection (no proxies, loopback only).
* :class:`BackgroundServer` - a WSGI app served by werkzeug's threaded server in a background
  thread: a real HTTP server, light enough to start inside a notebook.
* :func:`serve` - gunicorn as a subprocess from a config file written to a temporary folder; it
  waits until the app answers and always stops the whole process group when the block ends.
  :func:`running_servers` says how many are still running (0 after every ``with`` block).
"""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from werkzeug.serving import WSGIRequestHandler, make_server

from .load import http_load
from .net import LOOPBACK, free_port

__all__ = [
    "BackgroundServer",
    "HttpResponse",
    "Server",
    "get",
    "gunicorn_config",
    "running_servers",
    "serve",
]


class HttpResponse(NamedTuple):
    """An answer: status, headers and body (unpacks as ``status, headers, body``)."""

    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def body_bytes(self) -> int:
        """The size of the body."""
        return len(self.body)


def get(where: int | str, path: str = "/health", headers: dict[str, str] | None = None, *,
        timeout_s: float = 10.0) -> HttpResponse:
    """One GET over a fresh connection to ``where``: a port on loopback, or a base URL such as
    ``http://127.0.0.1:8000`` (loopback only)."""
    if isinstance(where, int):
        host, port = LOOPBACK, where
    else:
        host, _, port_text = where.split("//", 1)[-1].rstrip("/").partition(":")
        port = int(port_text or 80)
    if host not in (LOOPBACK, "localhost", "::1"):
        raise ValueError("get() talks to loopback only (127.0.0.1)")
    conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return HttpResponse(response.status, dict(response.getheaders()), response.read())
    finally:
        conn.close()


class BackgroundServer:
    """A WSGI app served by werkzeug's threaded HTTP server in a background thread.

    It listens on 127.0.0.1 on a port the OS picks (``.port``, ``.url``). A real HTTP server
    (sockets, headers, keep-alive off), lighter to start inside a notebook than a gunicorn
    process; :meth:`stop` shuts it down and joins the thread. Use as a context manager.
    """

    def __init__(self, app) -> None:
        class QuietHandler(WSGIRequestHandler):
            def log(self, *args, **kwargs) -> None:  # no access log lines in the notebook
                pass

        self.server = make_server(LOOPBACK, 0, app, threaded=True, request_handler=QuietHandler)
        self.port = self.server.server_port
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True,
                                       name=f"http-{self.port}")
        self.thread.start()

    def stop(self) -> None:
        """Shut the server down and join its thread; idempotent."""
        if self.thread.is_alive():
            self.server.shutdown()
            self.thread.join(5)
        self.server.server_close()

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# gunicorn as a subprocess (a real, multi-process app server)


def gunicorn_config(*, workers: int = 1, threads: int = 1, worker_class: str = "sync",
                    preload: bool = False, hooks: str = "") -> str:
    """The text of a gunicorn config file (a Python file) for these settings."""
    text = textwrap.dedent(f"""\
        workers = {workers}
        threads = {threads}
        worker_class = {worker_class!r}
        preload_app = {preload}
        loglevel = "warning"
        timeout = 30
        graceful_timeout = 2
        """)
    return text + (textwrap.dedent(hooks).strip() + "\n" if hooks.strip() else "")


@dataclass
class Server:
    """A running gunicorn: its port, master process and config text."""

    port: int
    process: subprocess.Popen
    config: str
    log_path: Path
    workers: int = 1

    @property
    def pid(self) -> int:
        return self.process.pid

    def running(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text()
        except OSError:
            return ""

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the master and its workers (the whole process group); idempotent."""
        _stop_group(self.process, timeout_s)


#: gunicorn masters started by :func:`serve` in this process and not stopped yet.
_RUNNING: set[subprocess.Popen] = set()


def running_servers() -> int:
    """How many gunicorn servers started here are still running (0 after every ``with`` block)."""
    return sum(1 for p in list(_RUNNING) if p.poll() is None)


def _stop_group(process: subprocess.Popen, timeout_s: float = 5.0) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pass
    # Workers orphaned by a crashed master are in the same group: make sure they are gone too.
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        pass


def _wait_ready(server: Server, timeout_s: float, warm_path: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not server.running():
            raise RuntimeError(f"gunicorn exited with code {server.process.returncode}:\n{server.log()[-2000:]}")
        try:
            if get(server.port, "/health", timeout_s=1.0).status == 200:
                break
        except OSError:
            time.sleep(0.05)
    else:
        raise TimeoutError(f"gunicorn did not answer within {timeout_s:g} s:\n{server.log()[-2000:]}")
    # Wait (bounded) until every worker has booted, so a measurement does not include boot time.
    pids: set[str] = set()
    while len(pids) < server.workers and time.monotonic() < deadline:
        result = http_load(server.port, warm_path, requests=2 * server.workers,
                           concurrency=server.workers, timeout_s=5.0, max_duration_s=5.0)
        pids |= {s.pid for s in result.samples if s.pid}


@contextmanager
def serve(app: str, *, workers: int = 1, threads: int = 1, worker_class: str = "sync",
          preload: bool = False, hooks: str = "", env: dict | None = None,
          warm_path: str = "/health", startup_timeout_s: float = 30.0) -> Iterator[Server]:
    """Run gunicorn with the WSGI ``app`` (``"module:callable"`` or ``"module:factory()"``) on
    ``127.0.0.1`` and a free port for the ``with`` block; always stop it.

    The app must answer ``GET /health`` with 200 and set ``X-Worker-Pid`` on its responses:
    the block starts once ``/health`` answers and every worker has served ``warm_path`` (so a
    measurement does not include worker boot).

    The config file is written to a temporary folder (``server.config`` holds its text). The
    block starts once ``/health`` answers and every worker has served a request; on exit (or on
    any error) the process group gets SIGTERM, then SIGKILL, and the folder is removed.
    """
    with tempfile.TemporaryDirectory(prefix="perfcourse-gunicorn-") as tmp:
        config = gunicorn_config(workers=workers, threads=threads, worker_class=worker_class,
                                 preload=preload, hooks=hooks)
        config_path = Path(tmp) / "gunicorn.conf.py"
        config_path.write_text(config)
        log_path = Path(tmp) / "gunicorn.log"
        last_error: Exception | None = None
        for _attempt in range(3):  # a free port can be taken between the check and the bind
            port = free_port()
            with open(log_path, "w") as log:
                process = subprocess.Popen(
                    [sys.executable, "-m", "gunicorn", "-c", str(config_path),
                     "--bind", f"{LOOPBACK}:{port}", app],
                    cwd=tmp, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env={**os.environ, **(env or {})}, start_new_session=True)
            server = Server(port, process, config, log_path, workers)
            _RUNNING.add(process)
            try:
                _wait_ready(server, startup_timeout_s, warm_path)
            except RuntimeError as exc:  # exited: maybe the port was taken; try another
                last_error = exc
                _stop_group(process)
                _RUNNING.discard(process)
                continue
            except BaseException:
                _stop_group(process)
                _RUNNING.discard(process)
                raise
            try:
                yield server
            finally:
                _stop_group(process)
                _RUNNING.discard(process)
            return
        raise RuntimeError(f"gunicorn did not start: {last_error}")


