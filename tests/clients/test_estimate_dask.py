"""``estimate --scheduler``: a real Dask scheduler and two workers give the local figures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from clients_support import pagefusion_command
from estimate_support import machine, windows, write_image, write_spec

from pagefusion.clients.estimate import EstimateError, Options, estimate, load_specs

distributed = pytest.importorskip("distributed", reason="the fleet extra is in the dev extra")

STARTUP_SECONDS = 60


def _dask() -> str:
    beside = Path(sys.executable).parent / "dask"
    assert beside.exists(), "the dask command comes with the fleet extra"
    return str(beside)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[str]:
    """A ``dask scheduler`` and two ``dask worker`` processes on loopback; killed afterwards."""
    scheduler_file = tmp_path / "scheduler.json"
    logs = tmp_path / "dask-logs"
    logs.mkdir()
    processes: list[subprocess.Popen[bytes]] = []

    def spawn(name: str, *args: str) -> None:
        log = open(logs / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        processes.append(subprocess.Popen(
            [_dask(), *args], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env={**os.environ, "DASK_DISTRIBUTED__WORKER__DAEMON": "False"},
        ))
        log.close()

    try:
        spawn("scheduler", "scheduler", "--host", "127.0.0.1", "--port", "0",
              "--no-dashboard", "--scheduler-file", str(scheduler_file))
        deadline = time.monotonic() + STARTUP_SECONDS
        while not scheduler_file.exists():
            assert processes[0].poll() is None, (logs / "scheduler.log").read_text()
            assert time.monotonic() < deadline, "the Dask scheduler did not start"
            time.sleep(0.1)
        address = json.loads(scheduler_file.read_text())["address"]
        for i in range(2):
            spawn(f"worker{i}", "worker", address, "--host", "127.0.0.1", "--nworkers", "1",
                  "--nthreads", "1", "--no-dashboard", "--memory-limit", "2GiB",
                  "--death-timeout", "60")
        with distributed.Client(address, timeout=STARTUP_SECONDS) as client:
            client.wait_for_workers(2, timeout=STARTUP_SECONDS)
        yield address
    finally:
        for process in reversed(processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in reversed(processes):
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def test_dask_estimate_equals_local(cluster: str, tmp_path: Path) -> None:
    w10a = windows("w10a", "Windows10_64", 1, 32)
    items = [
        w10a,
        windows("w10b", "Windows10_64", 2, 32),
        windows("xp", "WindowsXP", 3, 32, domain="legacy"),
        windows("w7", "Windows7_64", 4, 32),
        windows("w7-off", "Windows7_64", 5, 16, fusion=False),
        machine("img", "file", {"path": str(write_image(tmp_path / "img.raw", 4000, 7, w10a))}),
        machine("same", "memory", {"size": str(300 << 20), "pattern": "same"}),
    ]
    spec = write_spec(tmp_path / "fleet.json", items)
    options = Options(hosts=2, host_memory=200 << 20)
    local = estimate(load_specs([spec]), options)
    from pagefusion.clients.fleet import estimate_on_cluster

    with distributed.Client(cluster, timeout=30) as watcher, \
            distributed.get_task_stream(client=watcher) as stream:
        remote = estimate_on_cluster(load_specs([spec]), cluster, options)
    assert remote == local
    assert local["host"]["pages_saved"] > 0 and "placement" in local
    # Each source was read by a task of its own, and both workers read some.
    scans = [t for t in stream.data if str(t["key"]).startswith("pagefusion-scan-")]
    assert len(scans) == len(items)
    assert len({t["worker"] for t in scans}) == 2

    done = subprocess.run(
        [pagefusion_command(), "estimate", "--json", "--scheduler", cluster, str(spec)],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    cli = json.loads(done.stdout)
    plain = estimate(load_specs([spec]))
    assert cli == plain


def test_unreachable_scheduler_is_one_error(tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "s.json", [machine("a", "memory", {"size": "1MiB"})])
    from pagefusion.clients import fleet

    saved = fleet.CONNECT_TIMEOUT
    fleet.CONNECT_TIMEOUT = 2
    try:
        with pytest.raises(EstimateError, match="cannot reach the Dask scheduler"):
            fleet.estimate_on_cluster(load_specs([spec]), "tcp://127.0.0.1:9")
    finally:
        fleet.CONNECT_TIMEOUT = saved
