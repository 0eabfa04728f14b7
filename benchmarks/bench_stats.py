"""GetFusionStats and VerifyFusion against guest memory, on the user's path.

A fresh ``pagefusion-server`` subprocess, synthetic Windows 10 guests of
1 GiB started over gRPC, and at 2 GiB and again at 16 GiB of guests:

* GetFusionStats latency from one client (median and p99 of many calls);
* GetFusionStats calls per second from 50 concurrent clients (grpc.aio);
* the same 50-client rate against the standard health service of the same
  server (the floor set by gRPC and the server's per-call path);
* how long VerifyFusion takes and how long it holds the engine (a
  GetFusionStats issued meanwhile must still answer fast);
* metrics: every metric set up for every object, sampled each second
  (SetupMetrics), then QueryMetrics of all of them and a Prometheus scrape
  of ``--metrics-listen``'s /metrics, median of many calls each.

    python benchmarks/bench_stats.py [--small-gib 2] [--large-gib 16]

Prints a table; stats must not grow with guest memory (issue 10: within
1.5x from 2 to 16 GiB).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import threading
import time
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pagefusion.clients.testing import run_server
from pagefusion.v1 import fusion_pb2 as fpb
from pagefusion.v1 import fusion_pb2_grpc, machine_pb2_grpc, performance_pb2_grpc
from pagefusion.v1 import machine_pb2 as mpb
from pagefusion.v1 import performance_pb2 as ppb

GiB = 1 << 30


def _latency(address: str, calls: int = 300) -> tuple[float, float]:
    with grpc.insecure_channel(address) as channel:
        stub = fusion_pb2_grpc.FusionServiceStub(channel)
        stub.GetFusionStats(fpb.GetFusionStatsRequest())
        times = []
        for _ in range(calls):
            t = time.perf_counter()
            stub.GetFusionStats(fpb.GetFusionStatsRequest())
            times.append(time.perf_counter() - t)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.99) - 1]


async def _rate(address: str, what: str, clients: int = 50, seconds: float = 3.0) -> float:
    channel = grpc.aio.insecure_channel(address)
    fusion = fusion_pb2_grpc.FusionServiceStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    done = 0
    end = time.perf_counter() + seconds

    async def one() -> None:
        nonlocal done
        while time.perf_counter() < end:
            if what == "stats":
                await fusion.GetFusionStats(fpb.GetFusionStatsRequest())
            else:
                await health.Check(health_pb2.HealthCheckRequest())
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(clients)))
    elapsed = time.perf_counter() - start
    await channel.close()
    return done / elapsed


def _verify_while_polling(address: str) -> tuple[float, float, bool]:
    """VerifyFusion's time, and the slowest GetFusionStats answered meanwhile."""
    worst = 0.0
    stop = threading.Event()

    def poll() -> None:
        nonlocal worst
        with grpc.insecure_channel(address) as channel:
            stub = fusion_pb2_grpc.FusionServiceStub(channel)
            while not stop.is_set():
                t = time.perf_counter()
                stub.GetFusionStats(fpb.GetFusionStatsRequest())
                worst = max(worst, time.perf_counter() - t)
                time.sleep(0.005)

    poller = threading.Thread(target=poll)
    with grpc.insecure_channel(address) as channel:
        stub = fusion_pb2_grpc.FusionServiceStub(channel)
        poller.start()
        t = time.perf_counter()
        result = stub.VerifyFusion(fpb.VerifyFusionRequest(), timeout=600)
        took = time.perf_counter() - t
    stop.set()
    poller.join()
    return took, worst, result.consistent


def _metrics(address: str, scrape_url: str, calls: int = 100) -> tuple[float, float, int]:
    """Medians of QueryMetrics (all series) and of a Prometheus scrape; series returned."""
    with grpc.insecure_channel(address) as channel:
        perf = performance_pb2_grpc.PerformanceServiceStub(channel)
        perf.SetupMetrics(ppb.SetupMetricsRequest(period_seconds=1, sample_count=10))
        time.sleep(2.5)  # a couple of samples of every series
        query, scrape = [], []
        series = 0
        for _ in range(calls):
            t = time.perf_counter()
            series = len(perf.QueryMetrics(ppb.QueryMetricsRequest()).data)
            query.append(time.perf_counter() - t)
            t = time.perf_counter()
            with urllib.request.urlopen(scrape_url, timeout=30) as response:
                response.read()
            scrape.append(time.perf_counter() - t)
    return statistics.median(query), statistics.median(scrape), series


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start(address: str, first: int, count: int) -> None:
    with grpc.insecure_channel(address) as channel:
        machines = machine_pb2_grpc.MachineServiceStub(channel)
        for i in range(first, first + count):
            machine = mpb.Machine(
                os_type="Windows10_64", memory_size_bytes=GiB, page_fusion_enabled=True,
                memory_source=mpb.MemorySource(
                    adapter="synthetic-windows", options={"seed": str(i)}))
            machines.CreateMachine(mpb.CreateMachineRequest(machine_id=f"g{i}", machine=machine))
            machines.StartMachine(mpb.StartMachineRequest(name=f"machines/g{i}"), timeout=600)


def run(small_gib: int, large_gib: int) -> str:
    """The table as markdown."""
    rows = []
    port = _free_port()
    scrape_url = f"http://127.0.0.1:{port}/metrics"
    extra = ["--log-format", "json", "--metrics-listen", f"127.0.0.1:{port}"]
    with run_server(extra_args=extra) as server:
        started = 0
        for gib in (small_gib, large_gib):
            _start(server.address, started, gib - started)
            started = gib
            p50, p99 = _latency(server.address)
            stats_rate = asyncio.run(_rate(server.address, "stats"))
            health_rate = asyncio.run(_rate(server.address, "health"))
            verify_s, worst, consistent = _verify_while_polling(server.address)
            query, scrape, series = _metrics(server.address, scrape_url)
            rows.append((gib, p50, p99, stats_rate, health_rate, verify_s, worst, consistent,
                         query, scrape, series))
    md = ["| guests | stats p50 | stats p99 | stats calls/s (50 clients) | health calls/s "
          "(50 clients) | stats/health | VerifyFusion | slowest stats during verify | "
          "consistent |", "|---|---|---|---|---|---|---|---|---|"]
    for gib, p50, p99, rate, health, verify_s, worst, ok, *_ in rows:
        md.append(f"| {gib} GiB | {p50 * 1e3:.2f} ms | {p99 * 1e3:.2f} ms | {rate:,.0f} | "
                  f"{health:,.0f} | {rate / health:.2f} | {verify_s:.2f} s | "
                  f"{worst * 1e3:.1f} ms | {ok} |")
    md.append(f"\nGetFusionStats p50 at {rows[-1][0]} GiB / at {rows[0][0]} GiB: "
              f"{rows[-1][1] / rows[0][1]:.2f}x (target within 1.5x).\n")
    md.append("Metrics, every metric set up for every object and sampled each second:\n")
    md.append("| guests | series | QueryMetrics (all) p50 | Prometheus /metrics scrape p50 |")
    md.append("|---|---|---|---|")
    for gib, *_, query, scrape, series in rows:
        md.append(f"| {gib} GiB | {series} | {query * 1e3:.2f} ms | {scrape * 1e3:.2f} ms |")
    per_series = [(r[8] / r[10], r[9] / r[10]) for r in rows]
    md.append(f"\nPer series, {rows[-1][0]} GiB against {rows[0][0]} GiB: QueryMetrics "
              f"{per_series[-1][0] / per_series[0][0]:.2f}x, scrape "
              f"{per_series[-1][1] / per_series[0][1]:.2f}x (flat in guest memory: the series "
              f"grow with the machines, not with their memory).")
    return "\n".join(md) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small-gib", type=int, default=2)
    parser.add_argument("--large-gib", type=int, default=16)
    args = parser.parse_args()
    print(run(args.small_gib, args.large_gib))


if __name__ == "__main__":
    main()
