"""Live sources that change under scans (issue 10).

Two shm segments, each rewritten by its own writer process (a guest
stand-in that never waits for the server) while RunScan runs over and over
on a real server. Once the writers stop, ``stable_scans_before_merge`` more
scans (plus one to see the last writes) must leave figures equal to an
independent count of the segments' bytes, every read equal to the segment,
both machines healthy, and VerifyFusion consistent.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
from google.protobuf import field_mask_pb2

from pagefusion.clients.testing import run_server
from pagefusion.v1 import fusion_pb2 as fpb
from pagefusion.v1 import fusion_pb2_grpc, guest_memory_pb2, guest_memory_pb2_grpc, machine_pb2_grpc
from pagefusion.v1 import machine_pb2 as mpb

PAGE = 4096
PAGES = 1024  # 4 MiB per segment
STABLE = 2

# Rewrites random pages with one of a few contents (so pages fuse, unfuse and
# refuse) as fast as it can, until its time is up; bounded in count and time.
WRITER = r"""
import mmap, os, random, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
m = mmap.mmap(fd, os.fstat(fd).st_size)
rng = random.Random(int(sys.argv[2]))
end = time.monotonic() + float(sys.argv[3])
pages = len(m) // 4096
for _ in range(2_000_000):
    if time.monotonic() > end:
        break
    p = rng.randrange(pages)
    v = rng.choice([0, 1, 2, 3, 0x55])
    m[p * 4096:(p + 1) * 4096] = bytes([v]) * 4096
m.flush()
"""


def _initial(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    values = rng.choice([0, 1, 2, 3], size=PAGES).astype(np.uint8)
    return np.repeat(values, PAGE).tobytes()


def test_scans_under_writers_end_exact_once_writers_stop(tmp_path: Path):
    allow = tmp_path / "segments"
    allow.mkdir()
    paths = [allow / f"guest-{i}.ram" for i in range(2)]
    for i, path in enumerate(paths):
        path.write_bytes(_initial(i))
    with run_server(allow_dir=allow) as server:
        channel = grpc.insecure_channel(server.address)
        machines = machine_pb2_grpc.MachineServiceStub(channel)
        guest = guest_memory_pb2_grpc.GuestMemoryServiceStub(channel)
        fusion = fusion_pb2_grpc.FusionServiceStub(channel)
        fusion.UpdateFusionConfig(fpb.UpdateFusionConfigRequest(
            config=fpb.FusionConfig(stable_scans_before_merge=STABLE),
            update_mask=field_mask_pb2.FieldMask(paths=["stable_scans_before_merge"])))
        for i, path in enumerate(paths):
            machine = mpb.Machine(page_fusion_enabled=True, memory_source=mpb.MemorySource(
                adapter="shm", options={"path": str(path)}))
            request = mpb.CreateMachineRequest(machine_id=f"live-{i}", machine=machine)
            machines.CreateMachine(request)
            machines.StartMachine(mpb.StartMachineRequest(name=f"machines/live-{i}"))
        writers = [
            subprocess.Popen([sys.executable, "-c", WRITER, str(p), str(i), "3"])
            for i, p in enumerate(paths)
        ]
        try:
            scans = 0
            while any(w.poll() is None for w in writers) and scans < 500:
                fusion.RunScan(fpb.RunScanRequest(), timeout=60)
                scans += 1
                host = fusion.GetFusionStats(fpb.GetFusionStatsRequest()).host
                assert host.guest_pages == host.frames_used + host.pages_saved + host.zero_pages
        finally:
            for w in writers:
                w.wait(timeout=30)
        assert scans >= 2  # scans really raced the writers
        assert fusion.VerifyFusion(fpb.VerifyFusionRequest()).consistent
        for _ in range(STABLE + 1):
            fusion.RunScan(fpb.RunScanRequest(), timeout=60)

        contents: Counter[bytes] = Counter()
        zero = 0
        for i, path in enumerate(paths):
            data = path.read_bytes()
            for p in range(PAGES):
                page = data[p * PAGE : (p + 1) * PAGE]
                if any(page):
                    contents[page] += 1
                else:
                    zero += 1
            for off in range(0, len(data), 1 << 20):
                got = guest.ReadGuestMemory(guest_memory_pb2.ReadGuestMemoryRequest(
                    name=f"machines/live-{i}", address=off, length=1 << 20)).data
                assert got == data[off : off + (1 << 20)]
            state = machines.GetMachine(mpb.GetMachineRequest(name=f"machines/live-{i}"))
            assert state.state == mpb.Machine.STATE_RUNNING
        stats = fusion.GetFusionStats(fpb.GetFusionStatsRequest())
        host = stats.host
        assert host.guest_pages == 2 * PAGES
        assert host.zero_pages == zero
        assert host.frames_used == len(contents)  # fully fused: one frame per content
        assert host.pages_saved == sum(contents.values()) - len(contents)
        assert host.volatile_pages == 0
        result = fusion.VerifyFusion(fpb.VerifyFusionRequest())
        assert result.consistent, list(result.problems)
        channel.close()
