"""A session's memory, summed over its processes (Binder replay, the JupyterHub class test)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from perfcourse.memory import Footprint, processes_with_env
from perfcourse.services import POSTGRES_DIR, REDIS_DIR, session_processes

HOLD = ("import sys, time; block = bytearray(int(sys.argv[1])); "
        "block[::4096] = b'x' * len(block[::4096]); time.sleep(30)")


def _holder(megabytes: int, **env: str) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(megabytes * 1024**2)], env={**os.environ, **env})
    time.sleep(1.0)  # the block is allocated and touched
    return process


def test_footprint_sums_the_selected_processes_and_only_them(tmp_path):
    mine = [_holder(60, PERFCOURSE_DATA=str(tmp_path)), _holder(40, PERFCOURSE_DATA=str(tmp_path))]
    other = _holder(80, PERFCOURSE_DATA=str(tmp_path / "someone-else"))
    try:
        with Footprint(processes_with_env("PERFCOURSE_DATA", str(tmp_path)), interval_s=0.05) as footprint:
            time.sleep(0.3)
    finally:
        for process in [*mine, other]:
            process.kill()
            process.wait()
    assert 100 <= footprint.peak_bytes / 1024**2 < 170  # 60 + 40 MB and two interpreters, not the 80
    assert footprint.samples >= 3
    assert footprint.most_by_process and all("python" in name for name in footprint.most_by_process)
    assert "peak" in str(footprint)


def test_session_processes_finds_servers_by_their_pid_files(tmp_path):
    # A server whose environment does not name the folder (Redis overwrites it with its title).
    server = _holder(10)
    (tmp_path / REDIS_DIR).mkdir()
    (tmp_path / REDIS_DIR / "redis.pid").write_text(f"{server.pid}\n")
    (tmp_path / POSTGRES_DIR).mkdir()
    (tmp_path / POSTGRES_DIR / "postmaster.pid").write_text("999999999\n")  # stale: not running
    try:
        found = {process.pid for process in session_processes(tmp_path)()}
    finally:
        server.kill()
        server.wait()
    assert found == {server.pid}
