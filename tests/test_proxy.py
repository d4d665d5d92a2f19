"""Tests of perfcourse.proxy: the delay-injecting proxy, alone and in front of real servers.

No test asserts an upper bound on wall time: only lower bounds (a delay is never shorter than
asked), counts, and ratios measured in the same run.
"""

from __future__ import annotations

import os
import socket
import socketserver
import threading
import time

import pytest
import sqlalchemy as sa

from perfcourse.proxy import LatencyProxy, measure_round_trip, postgres_via_proxy, redis_via_proxy


class _Echo(socketserver.BaseRequestHandler):
    def handle(self):
        while data := self.request.recv(65536):
            self.request.sendall(data)


class _TCPEcho(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class _UnixEcho(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True


@pytest.fixture
def echo_server():
    server = _TCPEcho(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server.server_address
    server.shutdown()
    server.server_close()


@pytest.fixture
def unix_echo_server(tmp_path):
    path = str(tmp_path / "echo.sock")
    server = _UnixEcho(path, _Echo)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield path
    server.shutdown()
    server.server_close()


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "connection closed early"
        data += chunk
    return bytes(data)


def _round_trips(proxy: LatencyProxy, n: int, message: bytes = b"ping 1234") -> float:
    """n sequential request/response exchanges through the proxy; elapsed seconds."""
    with socket.create_connection((proxy.host, proxy.port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        start = time.perf_counter()
        for _ in range(n):
            sock.sendall(message)
            assert _recv_exactly(sock, len(message)) == message
        return time.perf_counter() - start


def test_forwards_bytes_exactly_in_both_directions(echo_server):
    payload = os.urandom(3_000_000)  # larger than any socket buffer: exercises partial sends
    with LatencyProxy(*echo_server, delay_s=0) as proxy:
        results = {}

        def one_client(i):
            with socket.create_connection((proxy.host, proxy.port), timeout=10) as sock:
                sender = threading.Thread(target=sock.sendall, args=(payload,))
                sender.start()
                results[i] = _recv_exactly(sock, len(payload))
                sender.join()

        clients = [threading.Thread(target=one_client, args=(i,)) for i in range(3)]
        for client in clients:
            client.start()
        for client in clients:
            client.join()
        assert all(results[i] == payload for i in range(3))
        assert proxy.connections == 3
        # The proxy thread adds to its counters just after each send, so the clients can have
        # every byte a moment before the last addition: wait for the counters to settle.
        deadline = time.monotonic() + 10
        while proxy.bytes_to_client < 3 * len(payload) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proxy.bytes_to_server == proxy.bytes_to_client == 3 * len(payload)


def test_each_round_trip_pays_the_delay(echo_server):
    n, delay = 20, 0.005
    with LatencyProxy(*echo_server, delay_s=0) as proxy:
        baseline = _round_trips(proxy, n)
        proxy.delay_s = delay  # changed while running
        delayed = _round_trips(proxy, n)
        proxy.delay_s = 4 * delay
        slower = _round_trips(proxy, n)
        assert proxy.round_trips == 3 * n  # one delayed chunk per request
    assert delayed >= n * delay  # a lower bound: delays are never shorter than asked
    assert slower >= n * 4 * delay
    assert delayed > baseline
    assert slower > delayed


def test_pipelined_requests_overlap_their_delays(echo_server):
    n, delay = 10, 0.05
    message = b"x" * 100
    with LatencyProxy(*echo_server, delay_s=delay) as proxy:
        sequential = _round_trips(proxy, n, message)
        with socket.create_connection((proxy.host, proxy.port), timeout=10) as sock:
            start = time.perf_counter()
            for _ in range(n):  # send everything first, then read: no waiting in between
                sock.sendall(message)
            assert _recv_exactly(sock, n * len(message)) == message * n
            pipelined = time.perf_counter() - start
    assert sequential >= n * delay
    assert pipelined >= delay
    # measured side by side: the proxy does not serialise delays (about n times faster)
    assert pipelined < sequential / 3


def test_unix_socket_target(unix_echo_server):
    with LatencyProxy(target_unix_path=unix_echo_server, delay_s=0.002) as proxy:
        assert _round_trips(proxy, 5) >= 5 * 0.002
        assert proxy.target == unix_echo_server


def test_stop_is_clean_and_idempotent(echo_server):
    proxy = LatencyProxy(*echo_server, delay_s=0.001).start()
    assert proxy.start() is proxy  # idempotent
    thread = proxy._thread
    client = socket.create_connection((proxy.host, proxy.port), timeout=5)
    client.sendall(b"hello")
    assert _recv_exactly(client, 5) == b"hello"
    proxy.stop()
    assert not thread.is_alive() and not proxy.running
    assert proxy.error is None
    assert client.recv(10) == b""  # the proxy closed its side
    client.close()
    with pytest.raises(OSError):
        socket.create_connection((proxy.host, proxy.port), timeout=1).close()
    proxy.stop()  # twice: nothing happens
    assert "stopped" in repr(proxy) and "round trips" in repr(proxy)


def test_unreachable_target_closes_the_client(tmp_path):
    with LatencyProxy(target_unix_path=str(tmp_path / "nothing.sock")) as proxy:
        with socket.create_connection((proxy.host, proxy.port), timeout=5) as sock:
            assert sock.recv(10) == b""
        assert proxy.running


def test_misuse_says_what_to_do():
    with pytest.raises(ValueError, match="target_unix_path"):
        LatencyProxy()
    with pytest.raises(ValueError, match=">= 0"):
        LatencyProxy("127.0.0.1", 1, delay_s=-1)


# ------------------------------------------------------------------------- real servers


def test_postgres_through_the_proxy(postgres_mode):
    engine, proxy = postgres_via_proxy(delay_s=0.002)
    try:
        with engine.connect() as conn:
            before = proxy.round_trips
            start = time.perf_counter()
            for _ in range(5):
                assert conn.execute(sa.text("select 1")).scalar_one() == 1
            elapsed = time.perf_counter() - start
        assert proxy.round_trips - before >= 5
        assert elapsed >= 5 * 0.002
        if postgres_mode == "embedded":
            assert proxy.target_unix_path and proxy.target_unix_path.endswith(".s.PGSQL.5432")
    finally:
        proxy.stop()
    assert not proxy.running


def test_postgres_proxy_keeps_the_namespace(postgres_engine):
    engine, proxy = postgres_via_proxy(delay_s=0.001, source=postgres_engine)
    with proxy:
        with engine.begin() as conn:
            conn.execute(sa.text("create table proxied (x int)"))
            conn.execute(sa.text("insert into proxied values (42)"))
    # the table landed in the test's own schema, seen by the direct engine
    with postgres_engine.connect() as conn:
        assert conn.execute(sa.text("select x from proxied")).scalar_one() == 42


def test_measured_round_trip_is_never_below_the_delay(postgres_engine):
    """The calibration a notebook labels its curves with: at least the delay, and a delay
    added on top of the direct round trip (a lower bound only: no upper bound on wall time)."""
    direct = measure_round_trip(postgres_engine, samples=20)
    engine, proxy = postgres_via_proxy(delay_s=0.003, source=postgres_engine)
    with proxy:
        before = proxy.round_trips
        proxied = measure_round_trip(engine, samples=20)
        assert proxy.round_trips - before >= 20  # one delayed round trip per SELECT 1
    assert direct > 0
    assert proxied >= 0.003
    with pytest.raises(ValueError, match="at least 1"):
        measure_round_trip(postgres_engine, samples=0)


def test_redis_through_the_proxy(redis_client):
    client, proxy = redis_via_proxy(delay_s=0.002)
    with proxy:
        assert client.ping() is True
        key = redis_client.prefix + "greeting"
        client.set(key, "hello")
        assert redis_client.get(key) == b"hello"
        before = proxy.round_trips
        start = time.perf_counter()
        for _ in range(5):
            client.get(key)
        assert time.perf_counter() - start >= 5 * 0.002
        assert proxy.round_trips - before == 5
        # a pipeline is one round trip for many commands
        before = proxy.round_trips
        pipe = client.pipeline(transaction=False)
        for _ in range(50):
            pipe.get(key)
        assert pipe.execute() == [b"hello"] * 50
        assert proxy.round_trips - before == 1
