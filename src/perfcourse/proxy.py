"""A delay-injecting TCP proxy: what does a database 1 ms away cost?

On a laptop the database answers in microseconds; in production it sits across a network, and
every round trip pays the network's latency. Put a :class:`LatencyProxy` between the code and
PostgreSQL or Redis and the N+1 problem, chatty caches and pipelining show their real cost:

>>> engine, proxy = postgres_via_proxy(delay_s=0.001)     # PostgreSQL "1 ms away"
>>> with count_queries(engine) as q: ...
>>> proxy.delay_s = 0.005                                  # change it live (a slider)
>>> measure_round_trip(engine)                             # what a round trip really costs
>>> proxy.stop()                                           # disposes the engine's pool too

What the delay models, precisely: every chunk of bytes the client sends is held for ``delay_s``
after it arrives, then forwarded; bytes coming back from the server pass at once. So each
request/response exchange (a round trip) costs ``delay_s`` more: a network whose round-trip time
is ``delay_s``. Chunks are released at ``arrival + delay_s`` independently of each other (order
kept), so requests sent back to back (pipelining, ``executemany`` batches) overlap their delays
as on a real link: latency is added, bandwidth is not limited. Connection set-up messages
(PostgreSQL's startup and authentication, TLS negotiation) are delayed like any other.

The delay asked for is a lower bound, not what a query pays: the proxy's own forwarding (a
Python thread, two more socket hops) and the scheduler's wake-up add to it, more on a loaded
machine. Measure what a setting really costs with :func:`measure_round_trip` and use that
figure in models and labels.

The proxy runs in a background thread with its own ``selectors`` loop: it works inside Jupyter,
whose event loop it never touches. It listens on 127.0.0.1 only, on a port the OS picks.
"""

from __future__ import annotations

import collections
import selectors
import socket
import statistics
import threading
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

import redis
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from . import db, services
from .units import format_duration

__all__ = ["LatencyProxy", "measure_round_trip", "postgres_via_proxy", "redis_via_proxy"]

_CHUNK = 64 * 1024
#: Stop reading from a side while this many bytes wait to be forwarded from it (backpressure).
_MAX_BUFFERED = 4 * 1024 * 1024
#: select() has microsecond timeouts (epoll/poll round up to whole milliseconds, too coarse for
#: a 1 ms delay); it only handles descriptors below FD_SETSIZE, so switch to poll above that.
_SELECT_FD_LIMIT = 1000


class _Pipe:
    """One direction of a connection: bytes read from ``src`` and written to ``dst``."""

    __slots__ = ("src", "dst", "delayed", "queue", "out", "eof", "last_release")

    def __init__(self, src: socket.socket, dst: socket.socket, delayed: bool) -> None:
        self.src = src
        self.dst = dst
        self.delayed = delayed
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.out = bytearray()  # released, not yet accepted by dst
        self.eof = False
        self.last_release = 0.0

    def buffered(self) -> int:
        return len(self.out) + sum(len(chunk) for _, chunk in self.queue)


class _Connection:
    __slots__ = ("client", "server", "upstream", "downstream", "closed")

    def __init__(self, client: socket.socket, server: socket.socket) -> None:
        self.client = client
        self.server = server
        self.upstream = _Pipe(client, server, delayed=True)
        self.downstream = _Pipe(server, client, delayed=False)
        self.closed = False


class LatencyProxy:
    """Forward TCP connections to a target, delaying what the client sends by ``delay_s``.

    ``LatencyProxy("127.0.0.1", 5432, delay_s=0.001)`` or, for a server on a unix socket (the
    embedded PostgreSQL), ``LatencyProxy(target_unix_path=".../.s.PGSQL.5432")``. Connect to
    ``(proxy.host, proxy.port)``. Use as ``with LatencyProxy(...) as proxy:`` or call
    :meth:`start` and :meth:`stop` (both idempotent). ``delay_s`` may be changed while running;
    it applies to chunks arriving from then on (order is always kept).

    Counters: ``round_trips`` (client chunks forwarded, each having paid the delay once: one per
    request for request/response protocols), ``bytes_to_server``, ``bytes_to_client``,
    ``connections``.
    """

    def __init__(
        self,
        target_host: str | None = None,
        target_port: int | None = None,
        delay_s: float = 0.001,
        *,
        target_unix_path: str | None = None,
        connect_timeout_s: float = 5.0,
    ) -> None:
        if target_unix_path is None and (target_host is None or target_port is None):
            raise ValueError(
                "Tell the proxy where to forward: LatencyProxy(host, port) for a TCP server, or "
                "LatencyProxy(target_unix_path=...) for a unix socket."
            )
        self.target_host = target_host
        self.target_port = target_port
        self.target_unix_path = str(target_unix_path) if target_unix_path else None
        self.connect_timeout_s = connect_timeout_s
        self.host = "127.0.0.1"
        self.port: int | None = None
        self.delay_s = delay_s
        self.round_trips = 0
        self.bytes_to_server = 0
        self.bytes_to_client = 0
        self.connections = 0
        self.error: BaseException | None = None  # what stopped the loop, if it crashed
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._lock = threading.Lock()
        self._on_stop: list[Any] = []

    # -- configuration ----------------------------------------------------------------------
    @property
    def delay_s(self) -> float:
        """Delay added to every client-to-server chunk, in seconds (one round trip's worth)."""
        return self._delay_s

    @delay_s.setter
    def delay_s(self, value: float) -> None:
        value = float(value)
        if not value >= 0:
            raise ValueError(f"delay_s must be a number of seconds >= 0, not {value!r}.")
        self._delay_s = value
        self._wake()

    @property
    def target(self) -> str:
        """Where connections are forwarded, as text."""
        return self.target_unix_path or f"{self.target_host}:{self.target_port}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> LatencyProxy:
        """Listen on 127.0.0.1 (port chosen by the OS) and forward in a background thread."""
        with self._lock:
            if self._thread is not None:
                return self
            self._stopping = False
            self.error = None
            self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind((self.host, 0))
            self._listener.listen(128)
            self._listener.setblocking(False)
            self.port = self._listener.getsockname()[1]
            self._wake_r, self._wake_w = socket.socketpair()
            self._wake_r.setblocking(False)
            self._wake_w.setblocking(False)
            self._selector: selectors.BaseSelector = selectors.SelectSelector()
            self._selector.register(self._listener, selectors.EVENT_READ, "accept")
            self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
            self._connections: dict[socket.socket, _Connection] = {}
            self._thread = threading.Thread(
                target=self._serve, name=f"LatencyProxy-{self.port}", daemon=True
            )
            self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Close every connection and the listening socket, and join the thread (idempotent).

        Resources registered with :meth:`closing` (an engine, a client) are closed first.
        """
        with self._lock:
            thread = self._thread
            if thread is None:
                return
            for resource in reversed(self._on_stop):
                for method in ("dispose", "close"):
                    if hasattr(resource, method):
                        try:
                            getattr(resource, method)()
                        except Exception:  # noqa: BLE001 - closing must go on
                            pass
                        break
            self._on_stop.clear()
            self._stopping = True
            self._wake()
            thread.join(timeout_s)
            if thread.is_alive():  # pragma: no cover - the loop wakes within milliseconds
                raise RuntimeError(f"The latency proxy thread did not stop in {timeout_s} s.")
            self._thread = None

    def closing(self, resource: Any) -> Any:
        """Dispose/close ``resource`` (an engine, a Redis client) when the proxy stops."""
        self._on_stop.append(resource)
        return resource

    def __enter__(self) -> LatencyProxy:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return (f"<LatencyProxy: delay {format_duration(self.delay_s)}, {state}, "
                f"{self.round_trips} round trips>")

    # -- the loop (background thread only below this line) ---------------------------------
    def _wake(self) -> None:
        wake = getattr(self, "_wake_w", None)
        if wake is not None:
            try:
                wake.send(b"x")
            except OSError:  # buffer full (already woken) or closed (stopped)
                pass

    def _serve(self) -> None:
        try:
            while not self._stopping:
                events = self._selector.select(self._timeout())
                now = time.perf_counter()
                for key, mask in events:
                    if key.data == "accept":
                        self._accept()
                    elif key.data == "wake":
                        try:
                            while self._wake_r.recv(4096):
                                pass
                        except BlockingIOError:
                            pass
                    else:
                        self._on_ready(key.data, key.fileobj, mask, now)
                self._release()
        except BaseException as exc:  # noqa: BLE001 - kept for the caller, the thread must end
            self.error = exc
        finally:
            for conn in list(self._connections.values()):
                self._close(conn)
            for sock in (self._listener, self._wake_r, self._wake_w):
                sock.close()
            self._selector.close()

    def _timeout(self) -> float | None:
        due = [pipe.queue[0][0] for conn in self._live() for pipe in (conn.upstream,
               conn.downstream) if pipe.queue]
        if not due:
            return None
        return max(0.0, min(due) - time.perf_counter())

    def _live(self) -> list[_Connection]:
        return list({id(c): c for c in self._connections.values()}.values())

    def _connect_target(self) -> socket.socket:
        if self.target_unix_path:
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.settimeout(self.connect_timeout_s)
            try:
                server.connect(self.target_unix_path)
            except OSError:
                server.close()
                raise
        else:
            server = socket.create_connection(
                (self.target_host, self.target_port), timeout=self.connect_timeout_s
            )
            server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        server.setblocking(False)
        return server

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except BlockingIOError:
                return
            try:
                server = self._connect_target()
            except OSError:
                client.close()  # the client sees the connection closed, as with a dead server
                continue
            client.setblocking(False)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Connection(client, server)
            self._connections[client] = conn
            self._connections[server] = conn
            self.connections += 1
            self._register(client, conn)
            self._register(server, conn)

    def _register(self, sock: socket.socket, conn: _Connection) -> None:
        if (isinstance(self._selector, selectors.SelectSelector)
                and sock.fileno() >= _SELECT_FD_LIMIT):
            poller = selectors.PollSelector()
            for key in self._selector.get_map().values():
                poller.register(key.fileobj, key.events, key.data)
            self._selector.close()
            self._selector = poller
        self._selector.register(sock, selectors.EVENT_READ, conn)

    def _update_interest(self, conn: _Connection) -> None:
        for sock, reading, writing in (
            (conn.client, conn.upstream, conn.downstream),
            (conn.server, conn.downstream, conn.upstream),
        ):
            mask = 0
            if not reading.eof and reading.buffered() < _MAX_BUFFERED:
                mask |= selectors.EVENT_READ
            if writing.out:
                mask |= selectors.EVENT_WRITE
            try:
                if mask:
                    self._selector.modify(sock, mask, conn)
                else:
                    self._selector.unregister(sock)
            except KeyError:
                if mask:
                    self._selector.register(sock, mask, conn)

    def _on_ready(self, conn: _Connection, sock, mask: int, now: float) -> None:
        if conn.closed:
            return
        reading = conn.upstream if sock is conn.client else conn.downstream
        writing = conn.downstream if sock is conn.client else conn.upstream
        try:
            if mask & selectors.EVENT_READ:
                data = sock.recv(_CHUNK)
                if data:
                    release = now + self._delay_s if reading.delayed else now
                    # a delay lowered meanwhile must not let this chunk overtake earlier ones
                    release = max(release, reading.last_release)
                    reading.last_release = release
                    reading.queue.append((release, data))
                else:
                    reading.eof = True
            if mask & selectors.EVENT_WRITE:
                self._flush(writing)
        except OSError:
            self._close(conn)

    def _flush(self, pipe: _Pipe) -> None:
        while pipe.out:
            try:
                sent = pipe.dst.send(pipe.out)
            except BlockingIOError:
                return
            if pipe.delayed:
                self.bytes_to_server += sent
            else:
                self.bytes_to_client += sent
            del pipe.out[:sent]

    def _release(self) -> None:
        now = time.perf_counter()
        for conn in self._live():
            if conn.closed:
                continue
            try:
                for pipe in (conn.upstream, conn.downstream):
                    while pipe.queue and pipe.queue[0][0] <= now:
                        _, chunk = pipe.queue.popleft()
                        pipe.out += chunk
                        if pipe.delayed:
                            self.round_trips += 1
                    if pipe.out:
                        self._flush(pipe)
                    if pipe.eof and not pipe.queue and not pipe.out:
                        # one side hung up and everything it sent was delivered: close both
                        self._close(conn)
                        break
                else:
                    self._update_interest(conn)
            except OSError:
                self._close(conn)

    def _close(self, conn: _Connection) -> None:
        if conn.closed:
            return
        conn.closed = True
        for sock in (conn.client, conn.server):
            self._connections.pop(sock, None)
            try:
                self._selector.unregister(sock)
            except (KeyError, ValueError):
                pass
            sock.close()


def measure_round_trip(engine: Engine, samples: int = 200, *,
                       statement: str = "SELECT 1") -> float:
    """Median seconds of one ``SELECT 1`` on ``engine``: what every query pays at least.

    Runs ``statement`` ``samples`` times on one connection (after one untimed run that connects
    and warms up) through the driver, without the ORM: the round trip to the server plus the
    driver's own work. Behind a :class:`LatencyProxy` it is the delay asked for plus the proxy's
    forwarding, which is what a model of N+1 must use.
    """
    if samples < 1:
        raise ValueError(f"samples must be at least 1, not {samples!r}.")
    times = []
    with engine.connect() as conn:
        conn.exec_driver_sql(statement).scalar()
        for _ in range(samples):
            start = time.perf_counter()
            conn.exec_driver_sql(statement).scalar()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------
# The course's servers behind a proxy
# ---------------------------------------------------------------------------------------------


def _postgres_target(url: sa.engine.URL) -> dict[str, Any]:
    """Proxy target of a PostgreSQL URL: a unix socket (``?host=/dir``) or host and port."""
    query_host = url.query.get("host")
    if isinstance(query_host, tuple):
        query_host = query_host[0]
    port = url.port or int(url.query.get("port", 5432))
    if query_host and query_host.startswith("/"):
        return {"target_unix_path": f"{query_host.rstrip('/')}/.s.PGSQL.{port}"}
    host = query_host or url.host
    if not host:  # libpq's default: the local unix socket; we cannot guess its folder
        raise ValueError(
            f"The PostgreSQL URL {url.render_as_string(hide_password=True)} names no host: give "
            "one (postgresql://127.0.0.1:5432/db) or a socket folder (?host=/path/to/dir)."
        )
    return {"target_host": host, "target_port": port}


def postgres_via_proxy(
    delay_s: float = 0.001,
    *,
    source: Engine | str | None = None,
    namespace: str | None = None,
    scale: str | None = None,
    **engine_kwargs: Any,
) -> tuple[Engine, LatencyProxy]:
    """An engine on the course's PostgreSQL whose every round trip pays ``delay_s`` more.

    Returns ``(engine, proxy)``; ``proxy.stop()`` disposes the engine and closes the proxy.
    ``source`` is the server to reach: an engine from :func:`perfcourse.db.engine` (its URL and
    namespace are reused), a URL, or by default ``DATABASE_URL``/the embedded server (which
    listens on a unix socket only: the proxy connects to that socket). The namespace's
    ``search_path`` is set as :func:`perfcourse.db.engine` does. ``pool_pre_ping`` is off
    unless asked for: a ping is one more delayed round trip on every checkout, which would blur
    experiments that count round trips. Other keyword arguments go to ``create_engine``.
    """

    if isinstance(source, Engine):
        url = source.url
        namespace = namespace or getattr(source, "perfcourse_namespace", None)
    else:
        url = sa.engine.make_url(services.normalise_postgres_url(source or services.postgres_url()))
    namespace = namespace or db.namespace_for(scale)
    proxy = LatencyProxy(delay_s=delay_s, **_postgres_target(url)).start()
    proxied_url = url.difference_update_query(["host", "port"]).set(host=proxy.host,
                                                                    port=proxy.port)
    engine_kwargs.setdefault("pool_pre_ping", False)
    try:
        engine = db.engine("postgres", namespace=namespace, url=proxied_url, **engine_kwargs)
    except Exception:
        proxy.stop()
        raise
    proxy.closing(engine)
    return engine, proxy


def redis_via_proxy(
    delay_s: float = 0.001, *, url: str | None = None, **client_kwargs: Any
) -> tuple[Any, LatencyProxy]:
    """A redis-py client of the course's Redis whose every round trip pays ``delay_s`` more.

    Returns ``(client, proxy)``; ``proxy.stop()`` closes the client and the proxy. ``url``
    defaults to ``REDIS_URL`` or the embedded server. Keyword arguments go to ``redis.Redis``.
    """


    parts = urlsplit(url or services.redis_url())
    query = parse_qs(parts.query)
    if parts.scheme == "unix":
        target = {"target_unix_path": parts.path}
        db_number = int(query.get("db", ["0"])[0])
    else:
        target = {"target_host": parts.hostname or "127.0.0.1", "target_port": parts.port or 6379}
        path_db = parts.path.strip("/")
        db_number = int(path_db or query.get("db", ["0"])[0])
    proxy = LatencyProxy(delay_s=delay_s, **target).start()
    client_kwargs.setdefault("socket_connect_timeout", 2)
    client_kwargs.setdefault("socket_timeout", 5)
    client = redis.Redis(
        host=proxy.host, port=proxy.port, db=db_number,
        username=parts.username or None, password=parts.password or None,
        ssl=parts.scheme == "rediss", **client_kwargs,
    )
    proxy.closing(client)
    return client, proxy
