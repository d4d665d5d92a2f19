"""Chapter 07 helpers: gunicorn started and always stopped, load generator, balancer, sizing, and
the lab's harness (shop endpoints, profile, send, kill, the failover trial).

Counts only, never wall time. Every test starts its servers in ``with`` blocks and checks that
the process group is gone afterwards.
"""

from __future__ import annotations

import os
import socket
import threading

import pytest

from perfcourse import web
from perfcourse.chapters import infrastructure_scaling as infra
from perfcourse.load import http_load
from perfcourse.net import free_port


def _gone(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_serve_answers_every_endpoint_and_stops_the_group():
    with infra.serve(workers=2) as server:
        assert server.running()
        status, headers, body = web.get(server.port, "/health")
        assert (status, body) == (200, b"ok") and headers["X-Worker-Pid"].isdigit()
        assert web.get(server.port, "/io?ms=1")[0] == 200
        assert web.get(server.port, "/cpu?n=1000")[2] == f'{{"result": {infra.cpu_work(1000)}}}'.encode()
        status, _, body = web.get(server.port, "/orders?user=3")
        assert status == 200 and b'"orders"' in body
        assert web.get(server.port, "/nope")[0] == 404
        pid = server.pid
    assert not server.running() and _gone(pid)


def test_serve_stops_the_server_when_the_block_raises():
    with pytest.raises(ZeroDivisionError):
        with infra.serve() as server:
            pid = server.pid
            raise ZeroDivisionError
    assert _gone(pid)


def test_run_load_is_bounded_and_records_pids():
    with infra.serve(workers=2) as server:
        result = http_load(server.port, "/io?ms=5", requests=30, concurrency=4)
    assert result.ok == 30 and len(result.samples) == 30
    assert sum(result.by_pid().values()) == 30
    summary = result.summary()
    assert summary["served"] == 30 and summary["throughput_per_s"] > 0


def test_run_load_refuses_other_hosts():
    with pytest.raises(ValueError):
        http_load(80, "/", requests=1, concurrency=1, host="example.com")


def test_throughput_by_server_one_row_per_case():
    df = infra.throughput_by_server(
        [{"case": "1 worker", "workers": 1}, {"case": "gthread", "worker_class": "gthread", "threads": 2}],
        "/cpu?n=2000", requests=10, concurrency=2)
    assert list(df.case) == ["1 worker", "gthread"] and list(df.served) == [10, 10]
    assert list(df.threads) == [1, 2]


_DISPOSE_BOTH = """
def post_fork(server, worker):
    from perfcourse.chapters import infrastructure_scaling as infra
    for engine in (infra.ENGINE, infra.READ_ENGINE):
        if engine is not None:
            engine.dispose(close=False)
"""


def test_preload_shares_the_master_connection_unless_disposed_after_fork():
    plain = infra.connection_origins(preload=False, requests=10)
    shared = infra.connection_origins(preload=True, requests=10)
    disposed = infra.connection_origins(preload=True, hooks=_DISPOSE_BOTH, requests=10)
    assert (plain["inherited_connection"], plain["own_connection"]) == (0, 10)
    assert (shared["inherited_connection"], shared["own_connection"]) == (10, 0)
    assert (disposed["inherited_connection"], disposed["own_connection"]) == (0, 10)
    assert disposed["closed_inherited"] == 0
    assert "preload_app = True" in disposed["config"] and "def post_fork" in disposed["config"]


def test_replica_engine_is_inherited_too_and_closing_is_counted():
    shared = infra.connection_origins(preload=True, requests=10, replica=True)
    assert (shared["inherited_connection"], shared["inherited_replica"]) == (10, 5)
    closing = infra.connection_origins(preload=True, requests=10, replica=True,
                                       hooks=_DISPOSE_BOTH.replace("close=False", ""))
    assert closing["inherited_connection"] == 0 and closing["closed_inherited"] >= 1


def test_round_robin_counts_and_health_checks():
    with infra.serve() as a, infra.serve() as b:
        with infra.LoadBalancer({"a": a.port, "b": b.port}) as lb:
            result = http_load(lb.port, "/health", requests=20, concurrency=4)
            assert result.ok == 20 and lb.served == {"a": 10, "b": 10}
            assert result.by_backend() == {"a": 10, "b": 10}
            b.stop()
            # No health check yet: the first request to b fails, marks it down, goes to a.
            sequential = http_load(lb.port, "/health", requests=10, concurrency=1)
            assert sequential.ok == 10 and lb.rerouted == 1
            assert lb.served == {"a": 20, "b": 10} and lb.health() == {"a": True, "b": False}
            assert lb.check_health() == {"a": True, "b": False}
        assert not lb.running()


def test_balancer_without_backends_answers_503():
    with infra.LoadBalancer({"dead": free_port()}) as lb:
        status, _, _ = web.get(lb.port, "/health")
    assert status == 503 and lb.unavailable == 1 and lb.rerouted == 1


@pytest.mark.parametrize(("healthy", "previous", "expected"), [
    ([True, True, True], -1, 0), ([True, True, True], 0, 1), ([True, True, True], 2, 0),
    ([True, False, True], 0, 2), ([False, False, True], 2, 2), ([False, False], 0, -1),
])
def test_next_healthy(healthy, previous, expected):
    assert infra.next_healthy(healthy, previous) == expected


def test_balancer_asks_the_choice_it_was_given():
    calls = []

    def always_first(healthy, previous):
        calls.append((list(healthy), previous))
        return 0

    with infra.serve() as a, infra.serve() as b:
        with infra.LoadBalancer({"a": a.port, "b": b.port}, choose=always_first) as lb:
            result = http_load(lb.port, "/health", requests=6, concurrency=2)
    assert result.ok == 6 and lb.served == {"a": 6}
    assert calls[0] == ([True, True], -1) and all(previous in (-1, 0) for _, previous in calls)


def test_simulated_server_counts_requests_and_states_its_bound():
    result = infra.simulate_server(workers=2, threads=3, io_fraction=0.5, request_ms=10, cores=2,
                                   seconds=0.2)
    assert result["served"] > 0 and result["throughput_per_s"] == result["served"] / 0.2
    assert result["model_per_s"] == min(2 * 3 / 0.010, 2 / 0.005)
    assert infra.simulate_server(workers=1, threads=1, io_fraction=1.0, seconds=0.05)["model_per_s"] == 100
    with pytest.raises(ValueError):
        infra.simulate_server(workers=0, threads=1, io_fraction=0.5)


# --------------------------------------------------------------------------------------------
# The lab's harness: shop endpoints, the mix, send, kill, the failover trial


def test_shop_endpoints_report_their_cpu_and_wall_time_and_health_can_drain(tmp_path):
    flag = tmp_path / "deploying"
    with infra.serve(infra.LAB_APP, env={"PERFCOURSE_INFRA_DRAIN": str(flag)}) as server:
        status, headers, body = web.get(server.port, "/shop/checkout")
        assert status == 200 and body == b'{"endpoint": "checkout"}'
        assert float(headers["X-Wall-Ms"]) >= float(headers["X-Cpu-Ms"]) >= 0
        assert web.get(server.port, "/shop/nope")[0] == 404
        assert web.get(server.port, "/checkout?ms=1&req=7")[2] == b'{"order": "7", "charged": true}'
        flag.touch()
        assert web.get(server.port, "/health")[:3:2] == (503, b"draining")
        assert web.get(server.port, "/io?ms=1")[0] == 200  # draining: it still serves requests
        flag.unlink()
        assert web.get(server.port, "/health")[0] == 200
    with infra.serve() as server:  # the lesson's app knows none of it
        assert web.get(server.port, "/shop/checkout")[0] == 404


def test_measure_profile_tells_computing_from_waiting_and_memory_is_read_per_worker():
    with infra.serve(infra.LAB_APP, workers=2, preload=True) as server:
        profile = infra.measure_profile(server.port, infra.SHOP_MIX, samples=3)
        memory = infra.worker_memory_mb(server)
        with pytest.raises(RuntimeError, match="without a profile"):
            infra.measure_profile(server.port, {"/health": 1.0}, samples=1)
    assert list(profile.columns) == ["endpoint", "share", "cpu_ms", "wait_ms"]
    assert list(profile.endpoint) == list(infra.SHOP_MIX) and list(profile.share) == list(infra.SHOP_MIX.values())
    by = profile.set_index("endpoint")
    # 90,000 loop iterations against 8,000; 80 ms asleep against 2 (orderings, not durations)
    assert by.cpu_ms["/shop/catalog"] > by.cpu_ms["/shop/checkout"]
    assert by.wait_ms["/shop/checkout"] > by.wait_ms["/shop/catalog"]
    assert len(memory) == 2 and all(mb > 1 for mb in memory)


def test_the_mix_is_sent_in_its_proportions():
    paths = infra._mix_paths({"/a": 0.5, "/b": 0.3, "/c": 0.2}, 10, seed=3)
    assert sorted(paths) == ["/a"] * 5 + ["/b"] * 3 + ["/c"] * 2
    assert paths == infra._mix_paths({"/a": 0.5, "/b": 0.3, "/c": 0.2}, 10, seed=3)
    assert sorted(infra._mix_paths({"/a": 1, "/b": 1, "/c": 1}, 4, seed=0)).count("/a") >= 1
    with infra.serve(infra.LAB_APP, worker_class="gthread", threads=4) as server:
        result = infra.mix_load(server.port, {"/shop/search": 2, "/health": 1}, requests=12, concurrency=3)
    assert result.ok == 12 and result.requested == 12


def _silent_server():
    """A socket that accepts one connection, reads the request and closes without answering."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def serve_once():
        conn, _ = listener.accept()
        conn.recv(1024)
        conn.close()
        listener.close()

    threading.Thread(target=serve_once, daemon=True).start()
    return listener.getsockname()[1]


def test_send_tells_a_refused_connection_from_a_request_without_answer():
    with pytest.raises(infra.BackendRefused):
        infra.send(free_port(), "POST", "/checkout")
    sent = []
    with pytest.raises(infra.BackendNoResponse):
        infra.send(_silent_server(), "POST", "/checkout", on_sent=lambda: sent.append(True))
    assert sent == [True]
    assert issubclass(infra.BackendRefused, infra.BackendError) and issubclass(infra.BackendError, OSError)
    with infra.serve(infra.LAB_APP) as server:
        response = infra.send(server.port, "POST", "/checkout?ms=1&req=3")
        assert response.status == 200 and response.body == b'{"order": "3", "charged": true}'
        infra.kill(server)
        assert not server.running()
        with pytest.raises(infra.BackendRefused):
            infra.send(server.port, "GET", "/health")


def _attempt(outcome, status=0):
    return infra._Attempt(1, 1, "a", "GET", "/x", 0.0, sent=outcome != "refused", outcome=outcome, status=status)


@pytest.mark.parametrize(("method", "status", "outcomes", "verdict"), [
    ("GET", 200, [("answered", 200)], "served"),
    ("GET", 200, [("no response", 0), ("answered", 200)], "served"),
    ("POST", 200, [("refused", 0), ("answered", 200)], "served"),
    ("POST", 502, [("no response", 0)], "unknown outcome"),
    ("POST", 200, [("no response", 0), ("answered", 200)], "unsafe retry"),
    ("GET", 502, [("no response", 0)], "lost"),
    ("POST", 502, [("refused", 0)], "lost"),
    ("GET", 200, [], "lost"),               # a 200 no backend gave
    ("POST", 200, [("no response", 0)], "lost"),  # a payment of unknown outcome reported as done
], ids=["served", "get-retried", "refused-post-retried", "post-unknown", "post-sent-twice", "get-dropped",
        "refused-post-dropped", "made-up-200", "unknown-called-ok"])
def test_each_request_gets_a_verdict(method, status, outcomes, verdict):
    attempts = [_attempt(outcome, code) for outcome, code in outcomes]
    assert infra._classify(method, status, None, attempts) == verdict


class _RoundRobin:
    def __init__(self, backends, send):
        self.names, self.backends, self.send = list(backends), dict(backends), send
        self.turn = 0

    def check_health(self):
        pass

    def handle(self, method, path):
        name = self.names[self.turn % len(self.names)]
        self.turn += 1
        try:
            return self.send(self.backends[name], method, path)
        except infra.BackendError:
            return web.HttpResponse(502, {}, b"")


class _Failover(_RoundRobin):
    def __init__(self, backends, send):
        super().__init__(backends, send)
        self.lock = threading.Lock()
        self.up = dict.fromkeys(self.names, True)

    def check_health(self):
        for name, port in self.backends.items():
            try:
                self.up[name] = self.send(port, "GET", "/health", 1.0).status == 200
            except infra.BackendError:
                self.up[name] = False

    def handle(self, method, path):
        with self.lock:
            start = self.turn
            self.turn += 1
        for k in range(len(self.names)):  # each backend once, from this request's turn on
            name = self.names[(start + k) % len(self.names)]
            if not self.up[name]:
                continue
            try:
                return self.send(self.backends[name], method, path)
            except infra.BackendRefused:
                self.up[name] = False
            except infra.BackendNoResponse:
                self.up[name] = False
                if method != "GET":
                    return web.HttpResponse(502, {}, b"")
        return web.HttpResponse(503, {}, b"")


def test_failover_trial_counts_what_a_naive_balancer_loses():
    trial = infra.failover_trial(_RoundRobin, seed=2, requests=(30, 20), concurrency=4)
    assert web.running_servers() == 0
    roles, summary = trial.roles, trial.summary()
    assert sorted(roles.values()) == ["a", "b", "c"] and 30 // 4 <= trial.killed_after < 30 // 2
    assert summary["requests"] == 50 == len(trial.requests)
    assert summary["lost"] > 0 and summary["unsafe_retries"] == 0
    # every third request of phase 2 went to the dead backend; the deployed one got its turns in phase 1
    assert trial.to_down[roles["killed"]] > 0 and trial.to_down[roles["deployed"]] > 0
    load = trial.attempts[trial.attempts.request.notna()]
    assert set(load[(load.phase == 2) & (load.backend == roles["killed"])].outcome) == {"refused"}
    assert summary["served"] + summary["lost"] + summary["unknown_outcome"] == 50


def test_failover_trial_of_a_balancer_with_health_checks_and_safe_retries():
    trial = infra.failover_trial(_Failover, seed=2, requests=(30, 20), concurrency=4)
    assert web.running_servers() == 0
    summary = trial.summary()
    assert (summary["lost"], summary["unsafe_retries"], summary["sent_to_down"]) == (0, 0, 0)
    assert summary["revived_served"] > 0 and summary["served"] + summary["unknown_outcome"] == 50
    assert trial.served_before_kill[trial.roles["steady"]] > 0
    health = trial.attempts[trial.attempts.request.isna()]
    assert len(health) == 6 and set(health.path) == {"/health"}  # two checks of three backends


def test_failover_trial_stops_every_backend_when_the_balancer_raises():
    class Broken(_RoundRobin):
        def check_health(self):
            raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        infra.failover_trial(Broken, seed=1)
    assert web.running_servers() == 0
