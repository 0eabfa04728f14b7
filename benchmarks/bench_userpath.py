"""The user's path (issue 11): a fresh server, over gRPC, against bare gRPC.

    python benchmarks/bench_userpath.py [--guest-mib 256] [--repeats 3] [--growth 1,2,4,8]
        [--growth-runs 5] [--overhead-gib 4] [--overhead-rounds 1] [--overhead-seconds 3]
        [--only cold,overhead,growth]

1. Cold against warm: a fresh ``pagefusion-server`` subprocess starts two
   guests (their RAM as files in /dev/shm through the ``shm`` adapter, the
   way a live QEMU guest is read; synthetic Windows 10 bytes), stops them,
   and starts them again. Wall time of the StartMachine calls and the
   server's CPU time (user + system, from /proc). Repeated with a new
   server each time.
2. Per-call overhead, 50 concurrent grpc.aio clients on loopback, against a
   bare grpc.aio server with only the health service, in the same run:
   health, GetPageInfo, ReadGuestMemory (4 KiB), GetFusionStats; and health
   again against the bare server on uvloop, the loop pagefusion-server runs
   on by default (what our call path costs on the same loop).
3. Growth: guests of 1 GiB started one after another over gRPC: seconds per
   GiB started and GetFusionStats latency as guest memory grows. The curve
   is measured on several fresh servers and each row is the median of the
   runs (every run is printed too): one run's rows, single starts of a few
   seconds, moved by 10 to 25% here with the machine's load, more than the
   growth they are meant to show. Each row also gives the server's user and
   system CPU and page faults per GiB (from /proc), so a rise in wall time
   shows whether it is pagefusion's work or the cost of each fault.

Prints markdown tables; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import grpc
from bench_ksm import ProcUsage, proc_cpu_seconds
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pagefusion.adapters.base import AdapterContext
from pagefusion.adapters.registry import open_source
from pagefusion.clients.testing import run_server
from pagefusion.v1 import fusion_pb2 as fpb
from pagefusion.v1 import fusion_pb2_grpc, guest_memory_pb2, guest_memory_pb2_grpc, machine_pb2_grpc
from pagefusion.v1 import machine_pb2 as mpb

MiB = 1 << 20
GiB = 1 << 30
SHM = Path("/dev/shm")

BARE_SERVER = r"""
import asyncio, sys
import grpc
from grpc_health.v1 import health, health_pb2_grpc
async def main():
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()
if sys.argv[1:] == ["uvloop"]:
    import uvloop
    uvloop.run(main())
else:
    asyncio.run(main())
"""


def write_guests(mib: int, count: int) -> list[Path]:
    """Synthetic Windows 10 guests' bytes as RAM files in /dev/shm."""
    paths = []
    for i in range(count):
        path = SHM / f"pagefusion-userpath-{os.getpid()}-{i}"
        memory = open_source("synthetic-windows", {"seed": str(i + 1)}, AdapterContext(
            f"g{i}", os_type="Windows10_64", memory_size_bytes=mib * MiB))
        with open(path, "wb") as f:
            for address in range(0, mib * MiB, 64 * MiB):
                f.write(bytes(memory.read(address, min(64 * MiB, mib * MiB - address))))
        memory.close()
        paths.append(path)
    return paths


def create(machines: machine_pb2_grpc.MachineServiceStub, machine_id: str, path: Path) -> None:
    machine = mpb.Machine(page_fusion_enabled=True, memory_source=mpb.MemorySource(
        adapter="shm", options={"path": str(path)}))
    machines.CreateMachine(mpb.CreateMachineRequest(machine_id=machine_id, machine=machine))


def start_all(machines: machine_pb2_grpc.MachineServiceStub, ids: list[str]) -> float:
    t = time.perf_counter()
    for machine_id in ids:
        machines.StartMachine(mpb.StartMachineRequest(name=f"machines/{machine_id}"), timeout=600)
    return time.perf_counter() - t


def cold_warm(paths: list[Path], repeats: int) -> list[tuple[float, float, float, float]]:
    rows = []
    for _ in range(repeats):
        with run_server(allow_dir=SHM) as server, grpc.insecure_channel(server.address) as ch:
            machines = machine_pb2_grpc.MachineServiceStub(ch)
            ids = [f"g{i}" for i in range(len(paths))]
            for machine_id, path in zip(ids, paths, strict=True):
                create(machines, machine_id, path)
            c0 = proc_cpu_seconds(server.pid)
            cold = start_all(machines, ids)
            c1 = proc_cpu_seconds(server.pid)
            for machine_id in ids:
                machines.StopMachine(mpb.StopMachineRequest(name=f"machines/{machine_id}"))
            c2 = proc_cpu_seconds(server.pid)
            warm = start_all(machines, ids)
            c3 = proc_cpu_seconds(server.pid)
            rows.append((cold, c1 - c0, warm, c3 - c2))
    return rows


async def rate(address: str, what: str, clients: int = 50, seconds: float = 3.0) -> float:
    channel = grpc.aio.insecure_channel(address)
    health = health_pb2_grpc.HealthStub(channel)
    guest = guest_memory_pb2_grpc.GuestMemoryServiceStub(channel)
    fusion = fusion_pb2_grpc.FusionServiceStub(channel)
    calls = {
        "health": lambda: health.Check(health_pb2.HealthCheckRequest()),
        "GetPageInfo": lambda: guest.GetPageInfo(
            guest_memory_pb2.GetPageInfoRequest(name="machines/g0", address=4096)),
        "ReadGuestMemory": lambda: guest.ReadGuestMemory(
            guest_memory_pb2.ReadGuestMemoryRequest(name="machines/g0", address=0, length=4096)),
        "GetFusionStats": lambda: fusion.GetFusionStats(fpb.GetFusionStatsRequest()),
    }
    call = calls[what]
    done = 0
    end = time.perf_counter() + seconds

    async def one() -> None:
        nonlocal done
        while time.perf_counter() < end:
            await call()
            done += 1

    await call()
    start = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(clients)))
    elapsed = time.perf_counter() - start
    await channel.close()
    return done / elapsed


def settle(pid: int, limit: float = 60.0) -> float:
    """Wait until process ``pid`` is idle (under 5% of a CPU for 0.5 s); returns seconds waited.

    After a start the server may still be working (the pool's prefault
    thread filling its reserve, memory given back): measured calls would
    share the CPU with that instead of showing their own cost.
    """
    start = time.perf_counter()
    while time.perf_counter() - start < limit:
        before = proc_cpu_seconds(pid)
        time.sleep(0.5)
        if proc_cpu_seconds(pid) - before < 0.025:
            break
    return time.perf_counter() - start


#: The overhead row measured against the bare server on uvloop.
SAME_LOOP_HEALTH = "health, bare on uvloop too"


def overhead(
    paths: list[Path], gib_running: int, rounds: int = 1, seconds: float = 3.0
) -> list[tuple[str, float, float, float]]:
    """Per call: calls/s of ours, of bare health, and ours / bare.

    Each is the median over ``rounds`` pairs of ``seconds``-long windows
    (bare, then ours at once): the ratio is the median of the pairs' own
    ratios, so load that comes and goes between pairs cancels out.
    """
    bare = subprocess.Popen([sys.executable, "-c", BARE_SERVER], stdout=subprocess.PIPE, text=True)
    bare_uv = subprocess.Popen([sys.executable, "-c", BARE_SERVER, "uvloop"],
                               stdout=subprocess.PIPE, text=True)
    try:
        assert bare.stdout is not None and bare_uv.stdout is not None
        bare_address = f"127.0.0.1:{bare.stdout.readline().strip()}"
        bare_uv_address = f"127.0.0.1:{bare_uv.stdout.readline().strip()}"
        with run_server(allow_dir=SHM) as server, grpc.insecure_channel(server.address) as ch:
            machines = machine_pb2_grpc.MachineServiceStub(ch)
            create(machines, "g0", paths[0])
            start_all(machines, ["g0"])
            for i in range(gib_running):
                machine = mpb.Machine(
                    os_type="Windows10_64", memory_size_bytes=GiB, page_fusion_enabled=True,
                    memory_source=mpb.MemorySource(
                        adapter="synthetic-windows", options={"seed": str(100 + i)}))
                machines.CreateMachine(mpb.CreateMachineRequest(
                    machine_id=f"big{i}", machine=machine))
                start_all(machines, [f"big{i}"])
            settle(server.pid)
            rows = []
            # The last row: health against the bare server on uvloop, the loop ours
            # runs on by default, so the ratio shows what our call path costs alone.
            for what, call, base_address in (
                ("health", "health", bare_address),
                ("GetPageInfo", "GetPageInfo", bare_address),
                ("ReadGuestMemory", "ReadGuestMemory", bare_address),
                ("GetFusionStats", "GetFusionStats", bare_address),
                (SAME_LOOP_HEALTH, "health", bare_uv_address),
            ):
                bases, ours = [], []
                for _ in range(rounds):  # bare just before ours: the same minutes
                    bases.append(asyncio.run(rate(base_address, "health", seconds=seconds)))
                    ours.append(asyncio.run(rate(server.address, call, seconds=seconds)))
                ratio = statistics.median(o / b for o, b in zip(ours, bases, strict=True))
                rows.append((what, statistics.median(ours), statistics.median(bases), ratio))
            return rows
    finally:
        for process in (bare, bare_uv):
            process.terminate()
            process.wait()


class GrowthRow(NamedTuple):
    """One row of a growth curve: per GiB started since the row before, and stats latency."""

    gib: int  # GiB of guests running after the row's starts
    seconds: float  # wall seconds per GiB started
    stats_p50: float  # GetFusionStats p50, seconds, with ``gib`` running
    user: float  # the server's user CPU seconds per GiB started
    system: float  # the server's system CPU seconds per GiB started
    faults: float  # the server's minor page faults per GiB started

    @property
    def fault_us(self) -> float:
        """System time per page fault, microseconds: what the kernel (and the host) charge."""
        return 1e6 * self.system / self.faults if self.faults else 0.0


def growth(steps: list[int]) -> tuple[float, list[GrowthRow]]:
    """One fresh server's curve: the warm-up's seconds, and a row per step.

    A 256 MiB guest is started and stopped first, so the curve shows how the
    cost grows with guest memory, not a fresh server's one-time costs (the
    synthetic adapter's template pages, first touches); its time is reported.
    The cold path has its own section. Each row also takes the server's CPU
    time and page faults from /proc: where wall time per GiB rises but user
    CPU per GiB does not, the rise is the cost of each fault.
    """
    rows = []
    with run_server() as server, grpc.insecure_channel(server.address) as ch:
        machines = machine_pb2_grpc.MachineServiceStub(ch)
        fusion = fusion_pb2_grpc.FusionServiceStub(ch)
        warm = mpb.Machine(
            os_type="Windows10_64", memory_size_bytes=256 << 20, page_fusion_enabled=True,
            memory_source=mpb.MemorySource(adapter="synthetic-windows", options={"seed": "999"}))
        machines.CreateMachine(mpb.CreateMachineRequest(machine_id="warmup", machine=warm))
        warmup = start_all(machines, ["warmup"])
        machines.StopMachine(mpb.StopMachineRequest(name="machines/warmup"))
        started = 0
        for gib in steps:
            before = ProcUsage.of(server.pid)
            t = time.perf_counter()
            for i in range(started, gib):
                machine = mpb.Machine(
                    os_type="Windows10_64", memory_size_bytes=GiB, page_fusion_enabled=True,
                    memory_source=mpb.MemorySource(
                        adapter="synthetic-windows", options={"seed": str(i)}))
                request = mpb.CreateMachineRequest(machine_id=f"n{i}", machine=machine)
                machines.CreateMachine(request)
                start_all(machines, [f"n{i}"])
            n = gib - started
            per_gib = (time.perf_counter() - t) / n
            after = ProcUsage.of(server.pid)
            started = gib
            times = []
            for _ in range(100):
                s = time.perf_counter()
                fusion.GetFusionStats(fpb.GetFusionStatsRequest())
                times.append(time.perf_counter() - s)
            rows.append(GrowthRow(
                gib, per_gib, statistics.median(times), (after.user - before.user) / n,
                (after.system - before.system) / n, (after.faults - before.faults) / n))
    return warmup, rows


SECTIONS = ("cold", "overhead", "growth")


def run(
    guest_mib: int,
    repeats: int,
    overhead_gib: int,
    growth_steps: list[int],
    ksm: dict[str, tuple[float | None, float | None]] | None = None,
    only: tuple[str, ...] = SECTIONS,
    overhead_rounds: int = 1,
    overhead_seconds: float = 3.0,
    growth_runs: int | None = None,
) -> str:
    """The measurements in ``only`` as markdown; ``ksm``: label -> (t99, cpu) from the same run.

    ``growth_runs``: fresh servers the growth curve is measured on (default 5,
    1 for a curve of one step, which has no spread to show).
    """
    if growth_runs is None:
        growth_runs = 5 if len(growth_steps) > 1 else 1
    md: list[str] = []
    paths = write_guests(guest_mib, 2 if "cold" in only else 1)
    try:
        if "cold" in only:
            md += cold_section(paths, guest_mib, repeats, ksm)
        if "overhead" in only:
            md += overhead_section(paths, overhead_gib, overhead_rounds, overhead_seconds)
        if "growth" in only:
            md += growth_section(growth_steps, growth_runs)
    finally:
        for path in paths:
            path.unlink(missing_ok=True)
    return "\n".join(md) + "\n"


def cold_section(
    paths: list[Path],
    guest_mib: int,
    repeats: int,
    ksm: dict[str, tuple[float | None, float | None]] | None,
) -> list[str]:
    md: list[str] = []
    rows = cold_warm(paths, repeats)
    md.append(f"### Cold and warm: two {guest_mib} MiB synthetic Windows 10 guests "
              "(seeds 1, 2: section 1's bytes) as RAM files in /dev/shm, read through "
              "`shm`; a fresh `pagefusion-server` each run\n")
    md.append("| run | first StartMachine of both (cold) | server CPU | again after "
              "StopMachine (warm) | server CPU | cold / warm |")
    md.append("|---|---|---|---|---|---|")
    for i, (cold, cold_cpu, warm, warm_cpu) in enumerate(rows):
        md.append(f"| {i + 1} | {cold:.3f} s | {cold_cpu:.2f} s | {warm:.3f} s | "
                  f"{warm_cpu:.2f} s | {cold / warm:.2f} |")
    cold_med = statistics.median(r[0] for r in rows)
    warm_med = statistics.median(r[2] for r in rows)
    cpu_med = statistics.median(r[1] for r in rows)
    md.append(f"\nMedian: cold {cold_med:.3f} s ({cpu_med:.2f} s server CPU), warm "
              f"{warm_med:.3f} s, cold / warm {cold_med / warm_med:.2f} (target <= 1.3).\n")
    for label, (t99, cpu) in (ksm or {}).items():
        if t99:
            md.append(f"- against KSM {label} (section 1, same bytes, same run): KSM "
                      f"{t99:.3f} s with {cpu or 0:.2f} s of ksmd CPU; cold pagefusion "
                      f"is {t99 / cold_med:.1f}x faster")
    return md


def overhead_section(
    paths: list[Path], overhead_gib: int, rounds: int = 1, seconds: float = 3.0
) -> list[str]:
    md: list[str] = []
    over = overhead(paths, overhead_gib, rounds, seconds)
    each = "just before each row" if rounds == 1 else (
        f"just before each of ours; medians of {rounds} such pairs of {seconds:g} s, "
        "the ratio the median of the pairs' ratios")
    md.append(f"\n### Per-call overhead: 50 grpc.aio clients on loopback, {overhead_gib} GiB "
              "of guests running, against a bare grpc.aio server with only the health "
              f"service (measured {each})\n")
    md.append("pagefusion-server runs on uvloop (`--event-loop auto`); the bare server on "
              "asyncio's own loop, as grpc.aio comes, except in the last row, where it runs "
              "on uvloop too, so that row's ratio is what pagefusion's call path (interceptor, "
              "request id, access log line, more services) costs on the same loop.\n")
    md.append("| call | pagefusion calls/s | bare grpc.aio health calls/s | ratio |")
    md.append("|---|---|---|---|")
    for what, ours, base, ratio in over:
        md.append(f"| {what} | {ours:,.0f} | {base:,.0f} | {ratio:.2f} |")
    return md


#: The last growth measurement's rows, for plots: medians over the runs.
LAST_GROWTH: list[GrowthRow] = []


def growth_curves(steps: list[int], runs: int) -> tuple[list[float], list[list[GrowthRow]]]:
    """:func:`growth` on ``runs`` fresh servers, one after another: warm-ups and curves."""
    results = [growth(steps) for _ in range(runs)]
    return [w for w, _ in results], [c for _, c in results]


def median_rows(curves: list[list[GrowthRow]]) -> list[GrowthRow]:
    """Row by row, the median of each field over the curves."""
    return [
        GrowthRow(rows[0].gib, *(statistics.median(getattr(r, f) for r in rows)
                                 for f in GrowthRow._fields[1:]))
        for rows in zip(*curves, strict=True)
    ]


def growth_profile(grow: list[GrowthRow], limit: float = 0.15) -> str:
    """What the server did per GiB, row by row, and whether that explains the wall time.

    The claim that a rise is the faults' cost is made only when the numbers
    show it: wall time per GiB spreads past ``limit``, user CPU per GiB does
    not, and system time per fault at least doubles. (Faults per GiB are
    shown, not judged: the first guest needs more new frames than the ones
    that share its pages.)
    """
    user = [r.user for r in grow]
    faults = [r.faults for r in grow]
    fault_us = [r.fault_us for r in grow]
    text = (f"The server's work per GiB started (medians, from /proc): user CPU {min(user):.2f} "
            f"to {max(user):.2f} s ({spread(user):.0%} spread), page faults {min(faults):,.0f} "
            f"to {max(faults):,.0f}; system time per fault {min(fault_us):.1f} to "
            f"{max(fault_us):.1f} us.")
    wall = [r.seconds for r in grow]
    if (spread(wall) > limit and spread(user) <= limit
            and min(fault_us) > 0 and max(fault_us) >= 2 * min(fault_us)):
        text += (f" User CPU per GiB stays within {limit:.0%} while each fault costs "
                 f"{max(fault_us) / min(fault_us):.1f} times more in one row than in another: "
                 "the rise is the kernel's cost of backing fresh memory (on this VM, the "
                 "hypervisor's: see the first-touch probe above), not more work by pagefusion.")
    return text


def spread(values: list[float]) -> float:
    """Largest over smallest, minus one."""
    return max(values) / min(values) - 1


def growth_section(growth_steps: list[int], runs: int = 5) -> list[str]:
    md: list[str] = []
    load = os.getloadavg()[0]
    warmups, curves = growth_curves(growth_steps, max(1, runs))
    load_after = os.getloadavg()[0]
    grow = median_rows(curves)
    LAST_GROWTH[:] = grow
    warmup = f"{statistics.median(warmups):.2f} s"
    if len(warmups) > 1:
        warmup += ", median"
    md.append("\n### Growth: synthetic Windows 10 guests of 1 GiB started over gRPC, one "
              "after another\n")
    spans, before = [], 0
    for gib in growth_steps:
        if gib - before > 1:
            spans.append(f"row {gib}: guests {before + 1} to {gib}")
        before = gib
    rows_are = (f" A row averages the guests started since the row before ({'; '.join(spans)})."
                if spans else "")
    runs_are = (f"Medians of {len(curves)} runs, each on a fresh server (every run below: "
                "single starts swing with the machine's load)" if len(curves) > 1
                else "One run")
    md.append("After a warm-up start and stop of one 256 MiB guest on the same fresh server "
              f"({warmup}: the server's one-time costs, which the cold rows above measure), "
              f"so the rows show how the cost grows with guest memory.{rows_are} "
              f"{runs_are}; load average {load:.2f} before, {load_after:.2f} after.\n")
    md.append("| GiB running | seconds per GiB started (median) | GetFusionStats p50 (median) | "
              "each run (s per GiB) | server CPU per GiB: user, system | page faults per GiB | "
              "system time per fault |")
    md.append("|---|---|---|---|---|---|---|")
    for i, row in enumerate(grow):
        each = ", ".join(f"{c[i].seconds:.2f}" for c in curves)
        md.append(f"| {row.gib} | {row.seconds:.2f} s | {row.stats_p50 * 1e3:.2f} ms | {each} | "
                  f"{row.user:.2f} s, {row.system:.2f} s | {row.faults:,.0f} | "
                  f"{row.fault_us:.1f} us |")
    per = [r.seconds for r in grow]
    md.append(f"\nSeconds per GiB (medians): {min(per):.2f} to {max(per):.2f} "
              f"({spread(per):.0%} spread; target within 15%).")
    if len(curves) > 1:
        each = ", ".join(f"{spread([r.seconds for r in c]):.0%}" for c in curves)
        md.append(f"Spread of each run alone: {each}.")
    md.append(growth_profile(grow))
    return md


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--guest-mib", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--overhead-gib", type=int, default=4,
                        help="GiB of guests running while per-call overhead is measured")
    parser.add_argument("--growth", default="1,2,4,8")
    parser.add_argument("--growth-runs", type=int, default=None,
                        help="fresh servers the growth curve runs on; rows are medians "
                        "(default: 5, or 1 for a single step)")
    parser.add_argument("--overhead-rounds", type=int, default=1,
                        help="pairs of 3 s measurements (bare, ours) per call; medians shown")
    parser.add_argument("--overhead-seconds", type=float, default=3.0,
                        help="length of each measurement window (default: %(default)s)")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help="comma-separated sections to run (default: %(default)s)")
    args = parser.parse_args()
    steps = [int(x) for x in args.growth.split(",") if x]
    only = tuple(x for x in args.only.split(",") if x)
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        parser.error(f"--only: unknown section(s) {', '.join(unknown)} "
                     f"(sections: {', '.join(SECTIONS)})")
    print(run(args.guest_mib, args.repeats, args.overhead_gib, steps, only=only,
              overhead_rounds=args.overhead_rounds, overhead_seconds=args.overhead_seconds,
              growth_runs=args.growth_runs))


if __name__ == "__main__":
    main()
