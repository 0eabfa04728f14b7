"""kill -9 while a 2 GiB machine is STARTING, then a restart with the registry intact.

A real server subprocess starts a 2 GiB synthetic-windows guest; once the
machine reports part of its source read (``load_progress``), the process is
killed with SIGKILL. The registry must pass SQLite's integrity check, the
restarted server must list every machine (all powered off, with the values
last acknowledged), and the interrupted machine must start again.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2

from pagefusion.clients.testing import run_server
from pagefusion.server.registry import DB_NAME
from pagefusion.v1 import fusion_pb2, fusion_pb2_grpc, machine_pb2, machine_pb2_grpc

GIB = 1 << 30
PAGE = 4096
WAIT = 120.0  # seconds for the start to show progress (a guard, not an assertion)
Machine = machine_pb2.Machine


def _create(stub: machine_pb2_grpc.MachineServiceStub, machine_id: str, size: int) -> None:
    stub.CreateMachine(machine_pb2.CreateMachineRequest(machine_id=machine_id, machine=Machine(
        os_type="Windows10_64", memory_size_bytes=size,
        memory_source=machine_pb2.MemorySource(adapter="synthetic-windows"))))


def _get(stub: machine_pb2_grpc.MachineServiceStub, machine_id: str) -> Machine:
    return stub.GetMachine(machine_pb2.GetMachineRequest(name=f"machines/{machine_id}"))


def test_kill_during_a_2_gib_start(tmp_path: Any) -> None:
    data_dir = tmp_path / "data"
    with run_server(data_dir=data_dir) as server:
        channel = grpc.insecure_channel(server.address)
        machines = machine_pb2_grpc.MachineServiceStub(channel)
        fusion = fusion_pb2_grpc.FusionServiceStub(channel)
        _create(machines, "small", 64 << 20)
        _create(machines, "big", 2 * GIB)
        fusion.UpdateFusionConfig(fusion_pb2.UpdateFusionConfigRequest(
            config=fusion_pb2.FusionConfig(pages_per_second=4321),
            update_mask=field_mask_pb2.FieldMask(paths=["pages_per_second"])))

        errors: list[grpc.RpcError] = []

        def start_big() -> None:
            try:
                machines.StartMachine(machine_pb2.StartMachineRequest(name="machines/big"))
            except grpc.RpcError as err:  # the kill cuts it: UNAVAILABLE
                errors.append(err)

        starter = threading.Thread(target=start_big, daemon=True)
        starter.start()
        deadline = time.monotonic() + WAIT
        while True:
            big = _get(machines, "big")
            if big.state == Machine.STATE_STARTING and 0.02 < big.load_progress < 0.9:
                break
            if big.state == Machine.STATE_RUNNING or time.monotonic() > deadline:
                pytest.fail(f"never saw the start under way (state {Machine.State.Name(big.state)},"
                            f" progress {big.load_progress}): too fast to kill mid-start")
            time.sleep(0.01)
        # A write acknowledged during the start must survive the kill too.
        machines.UpdateMachine(machine_pb2.UpdateMachineRequest(
            machine=Machine(name="machines/small", display_name="renamed during the start"),
            update_mask=field_mask_pb2.FieldMask(paths=["display_name"])))
        progress_at_kill = _get(machines, "big").load_progress
        assert server.kill() == -9
        starter.join(WAIT)
        assert errors and errors[0].code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
        channel.close()
    assert 0.02 < progress_at_kill < 1

    with sqlite3.connect(data_dir / DB_NAME) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)

    with run_server(data_dir=data_dir) as server:
        channel = grpc.insecure_channel(server.address)
        machines = machine_pb2_grpc.MachineServiceStub(channel)
        fusion = fusion_pb2_grpc.FusionServiceStub(channel)
        listed = machines.ListMachines(machine_pb2.ListMachinesRequest()).machines
        assert sorted(m.name for m in listed) == ["machines/big", "machines/small"]
        assert all(m.state == Machine.STATE_POWERED_OFF and m.load_progress == 0 for m in listed)
        assert _get(machines, "small").display_name == "renamed during the start"
        assert _get(machines, "big").memory_size_bytes == 2 * GIB
        config = fusion.GetFusionConfig(fusion_pb2.GetFusionConfigRequest())
        assert config.pages_per_second == 4321

        started = machines.StartMachine(machine_pb2.StartMachineRequest(name="machines/big"))
        assert started.state == Machine.STATE_RUNNING
        stats = fusion.GetFusionStats(fusion_pb2.GetFusionStatsRequest()).host
        assert stats.guest_pages == 2 * GIB // PAGE
        assert stats.guest_pages == stats.frames_used + stats.pages_saved + stats.zero_pages
        machines.StopMachine(machine_pb2.StopMachineRequest(name="machines/big"))
        channel.close()
