"""Chapter 07 helpers: gunicorn started and always stopped, load generator, balancer, sizing.

Counts only, never wall time. Every test starts its servers in ``with`` blocks and checks that
the process group is gone afterwards.
"""

from __future__ import annotations

import os

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
