"""A storm of concurrent RPCs against a real server, then VerifyFusion (issue 10).

16 clients call StartMachine, StopMachine, UpdateMachine, WriteGuestMemory,
RunScan and GetFusionStats at random on 4 synthetic machines of 16 MiB for a
few seconds. Refusals the contract allows (a machine in the wrong state) are
fine; INTERNAL or UNKNOWN never is. Afterwards the engine's recount must
agree with its incremental state, and with every machine stopped every
count is back to zero.
"""

from __future__ import annotations

import random
import threading
import time

import grpc
from google.protobuf import field_mask_pb2

from pagefusion.clients.testing import run_server
from pagefusion.v1 import fusion_pb2 as fpb
from pagefusion.v1 import fusion_pb2_grpc, guest_memory_pb2, guest_memory_pb2_grpc, machine_pb2_grpc
from pagefusion.v1 import machine_pb2 as mpb

CLIENTS = 16
MACHINES = [f"storm-{i}" for i in range(4)]
SECONDS = 6.0
MAX_CALLS = 20000  # per client: the loop is bounded in count as well as time
ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.FAILED_PRECONDITION,  # not running / not powered off / starting
    grpc.StatusCode.ALREADY_EXISTS,  # started twice at once
}


def _stubs(address: str):
    channel = grpc.insecure_channel(address)
    return (
        channel,
        machine_pb2_grpc.MachineServiceStub(channel),
        guest_memory_pb2_grpc.GuestMemoryServiceStub(channel),
        fusion_pb2_grpc.FusionServiceStub(channel),
    )


def _client(address: str, seed: int, deadline: float, seen: dict, lock: threading.Lock) -> None:
    rng = random.Random(seed)
    channel, machines, guest, fusion = _stubs(address)
    try:
        for _ in range(MAX_CALLS):
            if time.monotonic() > deadline:
                break
            name = f"machines/{rng.choice(MACHINES)}"
            op = rng.choice(["start", "stop", "update", "write", "write", "scan", "stats"])
            try:
                if op == "start":
                    machines.StartMachine(mpb.StartMachineRequest(name=name), timeout=60)
                elif op == "stop":
                    machines.StopMachine(mpb.StopMachineRequest(name=name), timeout=60)
                elif op == "update":
                    machines.UpdateMachine(mpb.UpdateMachineRequest(
                        machine=mpb.Machine(name=name, page_fusion_enabled=rng.random() < 0.7),
                        update_mask=field_mask_pb2.FieldMask(paths=["page_fusion_enabled"])),
                        timeout=60)
                elif op == "write":
                    page = rng.randrange(16 << 8)  # 16 MiB of 4 KiB pages
                    data = bytes([rng.choice([0, 1, 2, 0x41])]) * rng.choice([4, 4096])
                    guest.WriteGuestMemory(guest_memory_pb2.WriteGuestMemoryRequest(
                        name=name, address=page * 4096, data=data), timeout=60)
                elif op == "scan":
                    fusion.RunScan(fpb.RunScanRequest(), timeout=60)
                else:
                    host = fusion.GetFusionStats(fpb.GetFusionStatsRequest(), timeout=60).host
                    assert host.guest_pages == host.frames_used + host.pages_saved + host.zero_pages
                code = grpc.StatusCode.OK
                detail = ""
            except grpc.RpcError as exc:
                code, detail = exc.code(), exc.details()
            with lock:
                seen.setdefault((op, code), [0, detail])[0] += 1
    finally:
        channel.close()


def test_storm_of_concurrent_rpcs_leaves_the_engine_consistent():
    with run_server() as server:
        channel, machines, _guest, fusion = _stubs(server.address)
        for i, machine_id in enumerate(MACHINES):
            machine = mpb.Machine(
                os_type="Windows10_64", memory_size_bytes=16 << 20, page_fusion_enabled=True,
                memory_source=mpb.MemorySource(
                    adapter="synthetic-windows", options={"seed": str(i % 2)}))
            machines.CreateMachine(mpb.CreateMachineRequest(machine_id=machine_id, machine=machine))
        seen: dict = {}
        lock = threading.Lock()
        deadline = time.monotonic() + SECONDS
        threads = [
            threading.Thread(target=_client, args=(server.address, s, deadline, seen, lock))
            for s in range(CLIENTS)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        bad = {k: v for k, v in seen.items() if k[1] not in ALLOWED}
        assert not bad, bad
        ok = sum(n for (_op, code), (n, _d) in seen.items() if code == grpc.StatusCode.OK)
        assert ok > 100, seen  # the storm really ran
        assert any(op == "start" and code == grpc.StatusCode.OK for op, code in seen)

        result = fusion.VerifyFusion(fpb.VerifyFusionRequest(), timeout=120)
        assert result.consistent, list(result.problems)
        host = fusion.GetFusionStats(fpb.GetFusionStatsRequest()).host
        assert result.pages_checked == host.guest_pages
        assert result.frames_checked == host.frames_used

        for machine_id in MACHINES:
            try:
                machines.StopMachine(mpb.StopMachineRequest(name=f"machines/{machine_id}"))
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION  # already off
        host = fusion.GetFusionStats(fpb.GetFusionStatsRequest()).host
        assert (host.guest_pages, host.frames_used, host.pages_saved, host.zero_pages) == (0,) * 4
        assert fusion.VerifyFusion(fpb.VerifyFusionRequest()).consistent
        channel.close()
