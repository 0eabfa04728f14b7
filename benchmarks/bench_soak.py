"""Soak: mixed RPCs from many clients against a real server for minutes.

    python benchmarks/bench_soak.py [--minutes 10] [--clients 50] [--interval 30]

A ``pagefusion-server`` subprocess (temporary data dir) serves ``--clients``
concurrent clients, each on its own channel, for ``--minutes``. Each client
runs a seeded random mix: reads (GetMachine, ListMachines, GetFusionStats,
GetFusionConfig, QueryMetrics, GetPageInfo, ReadGuestMemory), guest writes
(copy on write) to shared running machines, the lifecycle of a machine of
its own (start, stop, UpdateMachine with a field mask), create/delete of a
scratch machine, and now and then RunScan and VerifyFusion. Every call is
one that must succeed, so any failure is a finding.

Every ``--interval`` seconds it prints the server's RSS, the engine's pool
(frames held and metadata, from GetFusionStats), RSS minus the pool, open
file descriptors and threads, and the calls per second of the interval; at
the end the totals, the failed calls (must be 0) and the RSS figures after
the warm-up (first interval): range and the means of the first and second
half. Exit status 1 if any call failed.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import field_mask_pb2
from grpc import aio

from pagefusion.clients.testing import RunningServer, run_server
from pagefusion.v1 import (
    fusion_pb2,
    fusion_pb2_grpc,
    guest_memory_pb2,
    guest_memory_pb2_grpc,
    machine_pb2,
    machine_pb2_grpc,
    performance_pb2,
    performance_pb2_grpc,
)

PAGE = 4096
MiB = 1 << 20
SHARED_MACHINES = 5
SHARED_SIZE = 16 * MiB
OWN_SIZE = 2 * MiB
Machine = machine_pb2.Machine


def _machine(size: int, seed: int) -> Machine:
    return Machine(memory_source=machine_pb2.MemorySource(
        adapter="memory", options={"size": str(size), "pattern": "mixed", "seed": str(seed)}))


def proc_status(pid: int) -> dict[str, int]:
    """The server's RSS (bytes), threads and open file descriptors, from /proc."""
    figures = {"rss": 0, "threads": 0, "fds": 0}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                figures["rss"] = int(line.split()[1]) * 1024
            elif line.startswith("Threads:"):
                figures["threads"] = int(line.split()[1])
    figures["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return figures


@dataclass
class Tally:
    """Calls made and failed, per method, over the whole run and the current interval."""

    calls: collections.Counter[str] = field(default_factory=collections.Counter)
    failures: collections.Counter[str] = field(default_factory=collections.Counter)
    examples: list[str] = field(default_factory=list)
    interval_calls: int = 0

    async def call(self, method: str, rpc: Any, request: Any) -> Any:
        self.calls[method] += 1
        self.interval_calls += 1
        try:
            return await rpc(request, timeout=120)
        except grpc.RpcError as err:
            self.failures[method] += 1
            if len(self.examples) < 10:
                self.examples.append(f"{method}: {err.code().name} {err.details()}")  # type: ignore[attr-defined]
            return None


class Client:
    """One client: its own channel, machine and scratch machine, and a random mix."""

    def __init__(self, address: str, index: int, tally: Tally, seed: int) -> None:
        self.channel = aio.insecure_channel(address)
        self.machines = machine_pb2_grpc.MachineServiceStub(self.channel)
        self.guest = guest_memory_pb2_grpc.GuestMemoryServiceStub(self.channel)
        self.fusion = fusion_pb2_grpc.FusionServiceStub(self.channel)
        self.perf = performance_pb2_grpc.PerformanceServiceStub(self.channel)
        self.index = index
        self.own = f"machines/own-{index}"
        self.scratch = f"scratch-{index}"
        self.own_running = False
        self.scratch_exists = False
        self.tally = tally
        self.rng = random.Random(seed * 1000 + index)

    async def run(self, until: float) -> None:
        ops = [
            (20, self.read_machine), (8, self.list_machines), (10, self.fusion_stats),
            (4, self.fusion_config), (8, self.query_metrics), (10, self.page_info),
            (10, self.read_memory), (12, self.write_memory), (6, self.lifecycle),
            (3, self.rename), (4, self.scratch_machine), (1, self.scan), (1, self.verify),
        ]
        weights = [w for w, _ in ops]
        actions = [a for _, a in ops]
        while time.monotonic() < until:
            await self.rng.choices(actions, weights)[0]()
        if self.own_running:
            await self.tally.call("StopMachine", self.machines.StopMachine,
                                  machine_pb2.StopMachineRequest(name=self.own))
        await self.channel.close()

    def _shared(self) -> str:
        return f"machines/shared-{self.rng.randrange(SHARED_MACHINES)}"

    async def read_machine(self) -> None:
        name = self.own if self.rng.random() < 0.5 else self._shared()
        await self.tally.call("GetMachine", self.machines.GetMachine,
                              machine_pb2.GetMachineRequest(name=name))

    async def list_machines(self) -> None:
        await self.tally.call("ListMachines", self.machines.ListMachines,
                              machine_pb2.ListMachinesRequest(page_size=20))

    async def fusion_stats(self) -> None:
        await self.tally.call("GetFusionStats", self.fusion.GetFusionStats,
                              fusion_pb2.GetFusionStatsRequest())

    async def fusion_config(self) -> None:
        await self.tally.call("GetFusionConfig", self.fusion.GetFusionConfig,
                              fusion_pb2.GetFusionConfigRequest())

    async def query_metrics(self) -> None:
        await self.tally.call("QueryMetrics", self.perf.QueryMetrics,
                              performance_pb2.QueryMetricsRequest(metric_names=["RAM/VMM/*"]))

    async def page_info(self) -> None:
        address = self.rng.randrange(SHARED_SIZE // PAGE) * PAGE
        await self.tally.call("GetPageInfo", self.guest.GetPageInfo,
                              guest_memory_pb2.GetPageInfoRequest(name=self._shared(),
                                                                  address=address))

    async def read_memory(self) -> None:
        address = self.rng.randrange(SHARED_SIZE // PAGE - 4) * PAGE
        await self.tally.call("ReadGuestMemory", self.guest.ReadGuestMemory,
                              guest_memory_pb2.ReadGuestMemoryRequest(
                                  name=self._shared(), address=address, length=4 * PAGE))

    async def write_memory(self) -> None:
        address = self.rng.randrange(SHARED_SIZE // PAGE) * PAGE
        # Mostly a few distinct contents, so fusion can share them again.
        data = bytes([self.rng.randrange(4)]) * PAGE
        await self.tally.call("WriteGuestMemory", self.guest.WriteGuestMemory,
                              guest_memory_pb2.WriteGuestMemoryRequest(
                                  name=self._shared(), address=address, data=data))

    async def lifecycle(self) -> None:
        if self.own_running:
            reply = await self.tally.call("StopMachine", self.machines.StopMachine,
                                          machine_pb2.StopMachineRequest(name=self.own))
        else:
            reply = await self.tally.call("StartMachine", self.machines.StartMachine,
                                          machine_pb2.StartMachineRequest(name=self.own))
        if reply is not None:
            self.own_running = not self.own_running

    async def rename(self) -> None:
        await self.tally.call("UpdateMachine", self.machines.UpdateMachine,
                              machine_pb2.UpdateMachineRequest(
                                  machine=Machine(name=self.own,
                                                  display_name=f"own {self.rng.random():.6f}"),
                                  update_mask=field_mask_pb2.FieldMask(paths=["display_name"])))

    async def scratch_machine(self) -> None:
        if self.scratch_exists:
            reply = await self.tally.call("DeleteMachine", self.machines.DeleteMachine,
                                          machine_pb2.DeleteMachineRequest(
                                              name=f"machines/{self.scratch}"))
        else:
            reply = await self.tally.call("CreateMachine", self.machines.CreateMachine,
                                          machine_pb2.CreateMachineRequest(
                                              machine_id=self.scratch,
                                              machine=_machine(OWN_SIZE, self.index)))
        if reply is not None:
            self.scratch_exists = not self.scratch_exists

    async def scan(self) -> None:
        await self.tally.call("RunScan", self.fusion.RunScan,
                              fusion_pb2.RunScanRequest(names=[self._shared()]))

    async def verify(self) -> None:
        reply = await self.tally.call("VerifyFusion", self.fusion.VerifyFusion,
                                      fusion_pb2.VerifyFusionRequest())
        if reply is not None and reply.problems:
            self.tally.failures["VerifyFusion (inconsistent)"] += 1
            self.tally.examples.append(f"VerifyFusion: {list(reply.problems)[:3]}")


async def setup(address: str, clients: int) -> None:
    async with aio.insecure_channel(address) as channel:
        machines = machine_pb2_grpc.MachineServiceStub(channel)
        for i in range(SHARED_MACHINES):
            await machines.CreateMachine(machine_pb2.CreateMachineRequest(
                machine_id=f"shared-{i}", machine=_machine(SHARED_SIZE, 1)))
            await machines.StartMachine(
                machine_pb2.StartMachineRequest(name=f"machines/shared-{i}"))
        for i in range(clients):
            await machines.CreateMachine(machine_pb2.CreateMachineRequest(
                machine_id=f"own-{i}", machine=_machine(OWN_SIZE, 100 + i)))
        await performance_pb2_grpc.PerformanceServiceStub(channel).SetupMetrics(
            performance_pb2.SetupMetricsRequest(period_seconds=1, sample_count=10))


async def soak(server: RunningServer, minutes: float, clients: int, interval: float,
               seed: int) -> int:
    await setup(server.address, clients)
    tally = Tally()
    start = time.monotonic()
    until = start + minutes * 60
    workers = [asyncio.create_task(Client(server.address, i, tally, seed).run(until))
               for i in range(clients)]
    samples: list[tuple[float, dict[str, int], float]] = []
    # RSS moves with how many machines happen to run (each client toggles its
    # own); "RSS - pool" takes the engine's frames and metadata out, so what
    # is left (Python, gRPC, the registry) is what a leak would grow.
    print(f"{'t (s)':>7} {'RSS (MiB)':>10} {'pool (MiB)':>11} {'RSS - pool':>11} {'fds':>5}"
          f" {'threads':>8} {'calls/s':>9} {'failed':>7}", flush=True)
    stats_channel = aio.insecure_channel(server.address)
    stats_stub = fusion_pb2_grpc.FusionServiceStub(stats_channel)

    async def sample(end: bool = False) -> None:
        host = (await stats_stub.GetFusionStats(fusion_pb2.GetFusionStatsRequest())).host
        figures = proc_status(server.pid)
        now = time.monotonic()
        since = samples[-1][0] if samples else start
        rate = tally.interval_calls / max(now - since, 1e-9)
        tally.interval_calls = 0
        pool = (host.frames_used + host.frames_free) * PAGE + host.metadata_bytes
        figures["other"] = figures["rss"] - pool
        samples.append((now, figures, rate))
        print(f"{now - start:7.0f} {figures['rss'] / MiB:10.1f} {pool / MiB:11.1f}"
              f" {figures['other'] / MiB:11.1f} {figures['fds']:5d}"
              f" {figures['threads']:8d} {rate:9.1f} {sum(tally.failures.values()):7d}"
              + ("  (end: clients stopped)" if end else ""), flush=True)

    while time.monotonic() < until:
        await asyncio.sleep(min(interval, max(until - time.monotonic(), 0.01)))
        await sample()
    await asyncio.gather(*workers)
    elapsed = time.monotonic() - start
    await sample(end=True)
    await stats_channel.close()

    total = sum(tally.calls.values())
    failed = sum(tally.failures.values())
    print(f"\n{clients} clients, {elapsed / 60:.1f} min: {total} calls, "
          f"{total / elapsed:.1f} calls/s, {failed} failed")
    for method, count in sorted(tally.calls.items(), key=lambda kv: -kv[1]):
        print(f"  {method:<18} {count:8d} calls {tally.failures[method]:4d} failed")
    for example in tally.examples:
        print(f"  failure: {example}")
    if len(samples) >= 3:
        warm = samples[1:-1]  # after the first interval (warm-up), before the clients stop
        for key, label in (("rss", "RSS"), ("other", "RSS - pool")):
            values = [s[1][key] / MiB for s in warm]
            half = len(values) // 2
            first, second = values[:half] or values, values[half:]
            print(f"{label} after warm-up: min {min(values):.1f}, max {max(values):.1f} MiB;"
                  f" mean of the first half {sum(first) / len(first):.1f},"
                  f" of the second half {sum(second) / len(second):.1f} MiB")
        print(f"fds {samples[1][1]['fds']} -> {samples[-1][1]['fds']},"
              f" threads {samples[1][1]['threads']} -> {samples[-1][1]['threads']}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long (default: 10)")
    parser.add_argument("--clients", type=int, default=50, help="concurrent clients (default: 50)")
    parser.add_argument("--interval", type=float, default=30.0,
                        help="seconds between RSS samples (default: 30)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the clients' mixes")
    args = parser.parse_args(argv)
    with run_server() as server:
        print(f"pagefusion-server pid {server.pid} on {server.address}; "
              f"{args.clients} clients for {args.minutes:g} min", flush=True)
        status = asyncio.run(soak(server, args.minutes, args.clients, args.interval, args.seed))
        log = Path(server.log_path)
        errors = sum(1 for line in log.read_text(errors="replace").splitlines()
                     if '"level": "error"' in line)
        print(f"server log: {errors} error lines")
    return status


if __name__ == "__main__":
    sys.exit(main())
