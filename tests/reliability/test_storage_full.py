"""The data dir out of space (DESIGN.md, "Rules every error follows").

A real server keeps its registry on a small tmpfs the test mounts (so it
needs root; skipped with the reason otherwise) and fills with a file. Writes
then fail with RESOURCE_EXHAUSTED / STORAGE_FULL naming the data dir, reads
and fusion go on, nothing acknowledged is lost (checked after a kill -9 and a
restart), and writes work again by themselves once the file is removed.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from pagefusion.clients.testing import RunningServer, run_server
from pagefusion.v1 import fusion_pb2, fusion_pb2_grpc, machine_pb2, machine_pb2_grpc

TMPFS_SIZE = "2m"
MAX_CREATES = 20_000  # a guard: the tmpfs is full long before


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs for the full data dir needs root")
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700", "tmpfs", str(mount_point)],
        capture_output=True, text=True, check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {(result.stderr or result.stdout).strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _fill(path: Path) -> None:
    """Write ``path`` until its file system has no byte left."""
    with path.open("wb", buffering=0) as filler:
        for chunk in (1 << 16, 4096, 512, 1):
            try:
                while True:
                    filler.write(b"\xff" * chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC


def _request(machine_id: str) -> machine_pb2.CreateMachineRequest:
    return machine_pb2.CreateMachineRequest(machine_id=machine_id, machine=machine_pb2.Machine(
        display_name=f"{machine_id} " + "d" * 200,
        memory_source=machine_pb2.MemorySource(adapter="memory", options={"size": "64KiB"})))


def _storage_full(err: grpc.RpcError, data_dir: Path) -> bool:
    """True for RESOURCE_EXHAUSTED / STORAGE_FULL naming the data dir; fails on anything else."""
    call: Any = err
    assert call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, f"{call.code()}: {call.details()}"
    status: status_pb2.Status | None = rpc_status.from_call(call)
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info) and info.reason == "STORAGE_FULL"
    assert str(data_dir) in status.message
    return True


class Client:
    def __init__(self, server: RunningServer) -> None:
        self.channel = grpc.insecure_channel(server.address)
        self.machines = machine_pb2_grpc.MachineServiceStub(self.channel)
        self.fusion = fusion_pb2_grpc.FusionServiceStub(self.channel)

    def names(self) -> set[str]:
        reply = self.machines.ListMachines(machine_pb2.ListMachinesRequest(page_size=1000))
        assert not reply.next_page_token
        return {m.name for m in reply.machines}

    def display_name(self, machine_id: str) -> str:
        request = machine_pb2.GetMachineRequest(name=f"machines/{machine_id}")
        return self.machines.GetMachine(request).display_name


def test_full_data_dir(small_fs: Path) -> None:
    data_dir = small_fs / "data"
    stored: set[str] = set()
    names: dict[str, str] = {}  # machine id -> display name acknowledged
    pages_per_second = 0
    with run_server(data_dir=data_dir) as server:
        client = Client(server)
        for i in range(5):
            client.machines.CreateMachine(_request(f"before-{i}"))
            stored.add(f"machines/before-{i}")
        client.machines.StartMachine(machine_pb2.StartMachineRequest(name="machines/before-0"))
        _fill(small_fs / "filler")

        # Creates go on while they fit in pages SQLite already has, then fail.
        failures = 0
        for i in range(MAX_CREATES):
            try:
                client.machines.CreateMachine(_request(f"m{i}"))
                stored.add(f"machines/m{i}")
            except grpc.RpcError as err:
                assert _storage_full(err, data_dir)
                failures += 1
                if failures == 3:
                    break
        assert failures == 3, "the tmpfs never filled up"

        # Other writes fail the same way or succeed; what is acknowledged holds.
        try:
            client.machines.UpdateMachine(machine_pb2.UpdateMachineRequest(
                machine=machine_pb2.Machine(name="machines/before-1", display_name="renamed"),
                update_mask=field_mask_pb2.FieldMask(paths=["display_name"])))
            names["before-1"] = "renamed"
        except grpc.RpcError as err:
            assert _storage_full(err, data_dir)
        names.setdefault("before-1", client.display_name("before-1"))
        assert client.display_name("before-1") == names["before-1"]
        try:
            reply = client.fusion.UpdateFusionConfig(fusion_pb2.UpdateFusionConfigRequest(
                config=fusion_pb2.FusionConfig(pages_per_second=12345),
                update_mask=field_mask_pb2.FieldMask(paths=["pages_per_second"])))
            pages_per_second = reply.pages_per_second
        except grpc.RpcError as err:
            assert _storage_full(err, data_dir)
        config = client.fusion.GetFusionConfig(fusion_pb2.GetFusionConfigRequest())
        pages_per_second = pages_per_second or config.pages_per_second
        assert config.pages_per_second == pages_per_second

        # The server keeps serving: reads, a scan, stats.
        assert client.names() == stored
        client.fusion.RunScan(fusion_pb2.RunScanRequest())
        stats = client.fusion.GetFusionStats(fusion_pb2.GetFusionStatsRequest())
        assert stats.host.guest_pages == 16

        # Space freed: the next write works, without a restart.
        (small_fs / "filler").unlink()
        client.machines.CreateMachine(_request("after"))
        stored.add("machines/after")
        client.machines.DeleteMachine(machine_pb2.DeleteMachineRequest(name="machines/before-4"))
        stored.discard("machines/before-4")
        assert client.names() == stored
        client.channel.close()
        server.kill()  # a crash right after: everything acknowledged must be on disk

    with run_server(data_dir=data_dir) as server:
        client = Client(server)
        assert client.names() == stored
        assert client.display_name("before-1") == names["before-1"]
        config = client.fusion.GetFusionConfig(fusion_pb2.GetFusionConfigRequest())
        assert config.pages_per_second == pages_per_second
        client.channel.close()
