"""Real QEMU guests scanned while they run (issue 10), when QEMU is installed.

Two guests boot with their RAM in /dev/shm (a Linux kernel from /boot when
one is installed, else SeaBIOS alone) and are started on a real server
through the ``shm`` adapter while they boot. RunScan runs over and over as
they write their memory: both must stay running with healthy sources. Once
they are paused and rescanned, the figures must equal an independent count
of their RAM (SHA-1 per page, not the engine's hash) and every read must
equal the RAM file; VerifyFusion must find nothing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2
from qemu_support import QEMU, SHM, MiB, Qemu

from pagefusion.clients.testing import run_server
from pagefusion.v1 import fusion_pb2 as fpb
from pagefusion.v1 import fusion_pb2_grpc, guest_memory_pb2, guest_memory_pb2_grpc, machine_pb2_grpc
from pagefusion.v1 import machine_pb2 as mpb

pytestmark = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")
PAGE = 4096
SIZE = 256 * MiB
SCAN_SECONDS = 6.0
STABLE = 1


def _kernel() -> Path | None:
    kernels = sorted(p for p in Path("/boot").glob("vmlinuz-*") if os.access(p, os.R_OK))
    return kernels[-1] if kernels else None


def _boot_args() -> list[str]:
    """A kernel boots, writes its memory, then panics (no root): fine. Else SeaBIOS."""
    kernel = _kernel()
    return ["-kernel", str(kernel), "-append", "console=ttyS0 panic=0 quiet"] if kernel else []


@pytest.fixture
def guests(tmp_path: Path) -> Iterator[list[tuple[Qemu, Path]]]:
    if shutil.disk_usage(SHM).free < 2 * SIZE + 256 * MiB:
        pytest.skip("not enough space in /dev/shm for two guests' RAM")
    made: list[tuple[Qemu, Path]] = []
    rams: list[Path] = []
    try:
        for i in range(2):
            ram = SHM / f"pagefusion-live-{uuid.uuid4().hex[:8]}"
            rams.append(ram)
            made.append((Qemu(ram, SIZE, tmp_path / f"qmp-{i}.sock", _boot_args()), ram))
            deadline = time.monotonic() + 30
            while not ram.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
        yield made
    finally:
        for guest, _ram in made:
            guest.close()
        for ram in rams:
            ram.unlink(missing_ok=True)


def test_running_guests_stay_healthy_and_end_exact(guests):
    with run_server(allow_dir=SHM) as server:
        channel = grpc.insecure_channel(server.address)
        machines = machine_pb2_grpc.MachineServiceStub(channel)
        guest_api = guest_memory_pb2_grpc.GuestMemoryServiceStub(channel)
        fusion = fusion_pb2_grpc.FusionServiceStub(channel)
        fusion.UpdateFusionConfig(fpb.UpdateFusionConfigRequest(
            config=fpb.FusionConfig(stable_scans_before_merge=STABLE),
            update_mask=field_mask_pb2.FieldMask(paths=["stable_scans_before_merge"])))
        names = []
        for i, (_guest, ram) in enumerate(guests):
            machine = mpb.Machine(page_fusion_enabled=True, os_type="Linux_64",
                                  memory_source=mpb.MemorySource(
                                      adapter="shm", options={"name": ram.name}))
            machines.CreateMachine(mpb.CreateMachineRequest(machine_id=f"q{i}", machine=machine))
            machines.StartMachine(mpb.StartMachineRequest(name=f"machines/q{i}"), timeout=120)
            names.append(f"machines/q{i}")
        end = time.monotonic() + SCAN_SECONDS
        scans = volatile = 0
        while time.monotonic() < end:
            # Naming the machines: a failed source would be FAILED_PRECONDITION here.
            fusion.RunScan(fpb.RunScanRequest(names=names), timeout=120)
            scans += 1
            host = fusion.GetFusionStats(fpb.GetFusionStatsRequest()).host
            assert host.guest_pages == host.frames_used + host.pages_saved + host.zero_pages
            volatile = max(volatile, host.volatile_pages)
        assert scans >= 2
        if _kernel() is not None:  # a booting kernel writes its memory under the scans
            assert volatile > 0
        for name in names:
            assert machines.GetMachine(mpb.GetMachineRequest(name=name)).state == (
                mpb.Machine.STATE_RUNNING)
        assert fusion.VerifyFusion(fpb.VerifyFusionRequest(), timeout=120).consistent

        for guest, _ram in guests:
            guest.command("stop")
        for _ in range(STABLE + 1):
            fusion.RunScan(fpb.RunScanRequest(names=names), timeout=120)

        distinct: set[bytes] = set()
        nonzero = zero = 0
        zero_digest = hashlib.sha1(bytes(PAGE)).digest()
        for name, (_guest, ram) in zip(names, guests, strict=True):
            data = ram.read_bytes()
            for off in range(0, len(data), PAGE):
                digest = hashlib.sha1(data[off : off + PAGE]).digest()
                if digest == zero_digest:
                    zero += 1
                else:
                    nonzero += 1
                    distinct.add(digest)
            step = 2 * MiB  # under the client's default 4 MiB message limit
            for off in range(0, len(data), step):
                got = guest_api.ReadGuestMemory(guest_memory_pb2.ReadGuestMemoryRequest(
                    name=name, address=off, length=step), timeout=60).data
                assert got == data[off : off + step], hex(off)
        host = fusion.GetFusionStats(fpb.GetFusionStatsRequest()).host
        assert host.guest_pages == 2 * SIZE // PAGE
        assert host.zero_pages == zero
        assert host.frames_used == len(distinct)
        assert host.pages_saved == nonzero - len(distinct)
        result = fusion.VerifyFusion(fpb.VerifyFusionRequest(), timeout=120)
        assert result.consistent, list(result.problems)
        channel.close()
