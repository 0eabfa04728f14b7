"""A log line that cannot be written never fails an RPC (DESIGN.md, "Rules every error follows").

The server's log goes to stderr. Here stderr is /dev/full (every write fails
with ENOSPC) or a pipe whose reader has gone (EPIPE), and in-process the
structlog pipeline itself raises: every call still gets its real answer.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import grpc
import pytest
import structlog
from grpc import aio

from pagefusion.server import logs
from pagefusion.server.app import PagefusionServer, Settings
from pagefusion.v1 import fusion_pb2, fusion_pb2_grpc, machine_pb2, machine_pb2_grpc

STARTUP = 60.0  # seconds the server gets to come up (a guard, not an assertion)


def _spawn(tmp_path: Path, stderr: int | IO[Any]) -> tuple[subprocess.Popen[bytes], int]:
    port_file = tmp_path / "port"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pagefusion.server.main", "--listen", "127.0.0.1:0",
         "--data-dir", str(tmp_path / "data"), "--port-file", str(port_file),
         "--log-format", "json"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
    )
    deadline = time.monotonic() + STARTUP
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the server did not start (exit status {proc.wait()})")
        time.sleep(0.05)
    return proc, int(port_file.read_text())


def _exercise(port: int) -> None:
    """Successful and failing calls, a start and a stop: each must answer as usual."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        machines = machine_pb2_grpc.MachineServiceStub(channel)
        fusion = fusion_pb2_grpc.FusionServiceStub(channel)
        for i in range(20):  # enough lines to fill any buffer in between
            created = machines.CreateMachine(machine_pb2.CreateMachineRequest(
                machine_id=f"m{i}", machine=machine_pb2.Machine(memory_source=machine_pb2.
                MemorySource(adapter="memory", options={"size": "64KiB"}))))
            assert created.name == f"machines/m{i}"
        running = machines.StartMachine(machine_pb2.StartMachineRequest(name="machines/m0"))
        assert running.state == machine_pb2.Machine.STATE_RUNNING
        assert fusion.GetFusionStats(fusion_pb2.GetFusionStatsRequest()).host.guest_pages == 16
        with pytest.raises(grpc.RpcError) as info:
            machines.GetMachine(machine_pb2.GetMachineRequest(name="machines/missing"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
        with pytest.raises(grpc.RpcError) as info:
            machines.DeleteMachine(machine_pb2.DeleteMachineRequest(name="machines/m0"))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
        stopped = machines.StopMachine(machine_pb2.StopMachineRequest(name="machines/m0"))
        assert stopped.state == machine_pb2.Machine.STATE_POWERED_OFF
        listed = machines.ListMachines(machine_pb2.ListMachinesRequest(page_size=100))
        assert len(listed.machines) == 20


@pytest.fixture
def stop_later() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(STARTUP)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full on this system")
def test_rpcs_answer_when_stderr_is_full(tmp_path: Path, stop_later: list) -> None:
    with open("/dev/full", "wb") as full:
        proc, port = _spawn(tmp_path, full)
    stop_later.append(proc)
    _exercise(port)
    assert proc.poll() is None


def test_rpcs_answer_when_the_log_reader_is_gone(tmp_path: Path, stop_later: list) -> None:
    read_end, write_end = os.pipe()
    try:
        proc, port = _spawn(tmp_path, write_end)
    finally:
        os.close(write_end)
    stop_later.append(proc)
    os.close(read_end)  # from now on every log write fails with EPIPE
    _exercise(port)
    assert proc.poll() is None


def test_a_failing_log_pipeline_does_not_fail_calls(tmp_path: Path) -> None:
    def broken(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
        raise OSError(28, "No space left on device")

    async def scenario() -> tuple[list[str], int]:
        server = PagefusionServer(Settings(listen="127.0.0.1:0", data_dir=tmp_path / "data"))
        port = await server.start()
        # Only the calls' own lines break: start and stop log outside any RPC.
        structlog.configure(processors=[broken])
        try:
            async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                machines = machine_pb2_grpc.MachineServiceStub(channel)
                before = logs.dropped_lines()
                await machines.CreateMachine(machine_pb2.CreateMachineRequest(
                    machine_id="w10", machine=machine_pb2.Machine(memory_source=machine_pb2.
                    MemorySource(adapter="memory", options={"size": "64KiB"}))))
                codes = []
                for name in ("machines/w10", "machines/nope"):
                    try:
                        await machines.GetMachine(machine_pb2.GetMachineRequest(name=name))
                        codes.append("OK")
                    except aio.AioRpcError as err:
                        codes.append(err.code().name)
                return codes, logs.dropped_lines() - before
        finally:
            structlog.reset_defaults()
            await server.stop(0)

    codes, dropped = asyncio.run(scenario())
    assert codes == ["OK", "NOT_FOUND"]
    assert dropped >= 3  # the per-RPC line of each call was dropped and counted


def test_safe_print_logger_counts_what_it_drops(tmp_path: Path) -> None:
    closed = (tmp_path / "log").open("w")
    closed.close()
    logger = logs.SafePrintLoggerFactory(closed)()
    before = logs.dropped_lines()
    logger.info("a line")
    logger.error("another")
    assert logs.dropped_lines() - before == 2
