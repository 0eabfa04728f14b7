"""The pagefusion side of each report section (run by benchmarks/run_all.py).

Each ``run_*`` function measures and returns plain data (dicts and lists);
run_all.py turns them into the report. The overcommit run is also a
command of its own (``python benchmarks/bench_sections.py overcommit ...``)
so it runs in a clean process whose RSS is only Python, numpy and the engine.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import (
    PAGE,
    BufferMemory,
    GiB,
    GuestSpec,
    Timer,
    cpu_seconds,
    materialize,
    mem_available_bytes,
    mem_total_bytes,
    rss_bytes,
)
from engine_bench import hash_only, memcpy

from pagefusion.server.engine import (
    FusionConfig,
    FusionEngine,
    FusionMode,
    PageState,
)


def pf_savings(engine: FusionEngine) -> int:
    """Guest pages that need no frame of their own: pages saved + zero pages."""
    h = engine.stats().host
    return h.pages_saved + h.zero_pages


# ---------------------------------------------------------------- 1 + 2: ingest


def run_ingest(
    specs: Sequence[GuestSpec], buffers: Sequence[np.ndarray], repeats: int = 3
) -> dict[str, Any]:
    """Start the guests from in-process bytes in fresh engines; hash-only and memcpy baselines.

    Returns wall/CPU times (median of ``repeats``), the savings curve of one
    more run, and the last engine's stats (kept running for the CoW section).
    """
    total_bytes = sum(b.nbytes for b in buffers)
    walls, cpus = [], []
    engine = None
    for _ in range(repeats):
        if engine is not None:
            engine.close()
        gc.collect()
        engine = FusionEngine(hash_seed=5)
        # The sources exist before the clock starts, as KSM's memory does
        # (opening one lays out the synthetic guest's modules: 26 ms each).
        sources = [BufferMemory.of(spec, buf) for spec, buf in zip(specs, buffers, strict=True)]
        with Timer() as t:
            for i, source in enumerate(sources):
                engine.start_machine(f"vm-{i}", source, page_fusion=True)
        walls.append(t.wall)
        cpus.append(t.cpu)
    assert engine is not None
    host = engine.stats().host
    engine.close()

    # The savings curve: one more run, sampling the counters after each batch.
    curve: list[tuple[float, int]] = [(0.0, 0)]
    engine = FusionEngine(hash_seed=5)
    sources = [BufferMemory.of(spec, buf) for spec, buf in zip(specs, buffers, strict=True)]
    t0 = time.perf_counter()

    def progress(_done: int, _total: int) -> None:
        curve.append((time.perf_counter() - t0, pf_savings(engine)))

    for i, source in enumerate(sources):
        engine.start_machine(f"vm-{i}", source, page_fusion=True, progress=progress)
    hash_s = [sum(hash_only(b) for b in buffers) for _ in range(repeats)]
    copy_s = [sum(memcpy(b) for b in buffers) for _ in range(repeats)]
    return {
        "bytes": total_bytes,
        "wall": statistics.median(walls),
        "walls": walls,
        "cpu": statistics.median(cpus),
        "hash": statistics.median(hash_s),
        "memcpy": statistics.median(copy_s),
        "curve": curve,
        "host": host,
        "savings": host.pages_saved + host.zero_pages,
        "engine": engine,
    }


def run_adapter_ingest(specs: Sequence[GuestSpec]) -> dict[str, Any]:
    """The same guests started through the synthetic-windows adapter (synthesis included)."""
    gc.collect()
    engine = FusionEngine(hash_seed=5)
    with Timer() as t:
        for i, spec in enumerate(specs):
            engine.start_machine(f"vm-{i}", spec.open(), page_fusion=True)
    out = {"wall": t.wall, "cpu": t.cpu, "savings": pf_savings(engine)}
    engine.close()
    return out


def run_grpc_start(specs: Sequence[GuestSpec]) -> dict[str, Any]:
    """StartMachine over a real server subprocess: the call's wall time and the server's CPU."""
    from bench_ksm import proc_cpu_seconds

    from pagefusion.clients.testing import run_server

    out: dict[str, Any] = {}
    with run_server() as server, server.client(timeout=600) as client:
        for i, spec in enumerate(specs):
            client.create_machine(
                f"vm-{i}",
                memory_size_bytes=spec.size,
                os_type=spec.profile,
                page_fusion_enabled=True,
                memory_source=(
                    "synthetic-windows",
                    {"profile": spec.profile, "seed": str(spec.seed)},
                ),
            )
        cpu0 = proc_cpu_seconds(server.pid)
        t0 = time.perf_counter()
        for i in range(len(specs)):
            client.start_machine(f"vm-{i}")
        out["wall"] = time.perf_counter() - t0
        out["cpu"] = proc_cpu_seconds(server.pid) - cpu0
        host = client.get_fusion_stats().host
        out["savings"] = host.pages_saved + host.zero_pages
    return out


# ---------------------------------------------------------------- 5: copy on write


def run_cow(engine: FusionEngine, machine: str, pages: int, writes: int) -> dict[str, Any]:
    """Latency of 8-byte writes to distinct SHARED pages (each a copy on write),
    and to PRIVATE pages for contrast."""
    shared, private = [], []
    for p in range(pages):
        state = engine.page_info(machine, p * PAGE).state
        if state == PageState.SHARED and len(shared) < writes:
            shared.append(p)
        elif state == PageState.PRIVATE and len(private) < writes:
            private.append(p)
        if len(shared) >= writes and len(private) >= writes:
            break
    payload = b"\xa5" * 8
    out: dict[str, Any] = {}
    for label, targets in (("shared", shared), ("private", private)):
        lat = []
        copied = 0
        for p in targets:
            t = time.perf_counter_ns()
            copied += engine.write(machine, p * PAGE + 8, payload)
            lat.append(time.perf_counter_ns() - t)
        lat.sort()
        if lat:
            out[label] = {
                "n": len(lat),
                "copied": copied,
                "p50_us": lat[len(lat) // 2] / 1000,
                "p99_us": lat[int(len(lat) * 0.99)] / 1000,
                "mean_us": statistics.mean(lat) / 1000,
            }
    return out


# ---------------------------------------------------------------- 5: RPC throughput


def run_rpc(concurrency: Sequence[int], requests: int, guest_size: int) -> dict[str, Any]:
    """Calls per second of ReadGuestMemory (4 KiB), WriteGuestMemory (4 KiB) and
    QueryMetrics at each concurrency (one client and channel per thread) on loopback."""
    from pagefusion.clients.errors import PageFusionError
    from pagefusion.clients.testing import run_server

    results: dict[str, Any] = {"rows": [], "notes": []}
    with run_server() as server, server.client(timeout=600) as admin:
        admin.create_machine(
            "rpc",
            memory_size_bytes=guest_size,
            os_type="Windows10_64",
            page_fusion_enabled=True,
            memory_source=("synthetic-windows", {"profile": "Windows10_64", "seed": "11"}),
        )
        admin.start_machine("rpc")
        with __import__("contextlib").suppress(PageFusionError):
            admin.setup_metrics(period_seconds=1, sample_count=5)
        pages = guest_size // PAGE
        page = os.urandom(PAGE)

        calls: dict[str, Callable[[Any, int], object]] = {
            "ReadGuestMemory": lambda c, i: c.read_guest_memory(
                "rpc", (i * 7919 % pages) * PAGE, PAGE
            ),
            "WriteGuestMemory": lambda c, i: c.write_guest_memory(
                "rpc", (i * 7919 % pages) * PAGE, page
            ),
            "QueryMetrics": lambda c, i: c.query_metrics(),
        }
        for rpc, call in calls.items():
            for n in concurrency:
                clients = [server.client(timeout=60) for _ in range(n)]
                try:
                    per = max(1, requests // n)
                    errors: list[BaseException] = []
                    barrier = threading.Barrier(n + 1)

                    def worker(
                        c: Any,
                        k: int,
                        per: int = per,
                        call: Any = call,
                        barrier: threading.Barrier = barrier,
                        errors: list[BaseException] = errors,
                    ) -> None:
                        call(c, k)  # warm the channel up
                        barrier.wait()
                        try:
                            for j in range(per):
                                call(c, k * per + j)
                        except BaseException as exc:
                            errors.append(exc)

                    threads = [
                        threading.Thread(target=worker, args=(c, k)) for k, c in enumerate(clients)
                    ]
                    try:
                        for th in threads:
                            th.start()
                        cpu0 = _server_cpu(server.pid)
                        barrier.wait()
                        t0 = time.perf_counter()
                        for th in threads:
                            th.join()
                        wall = time.perf_counter() - t0
                        server_cpu = _server_cpu(server.pid) - cpu0
                    except PageFusionError as exc:  # the warm-up call failed
                        errors.append(exc)
                        barrier.abort()
                        for th in threads:
                            th.join()
                        wall, server_cpu = float("nan"), float("nan")
                    if errors:
                        err = errors[0]
                        code = getattr(err, "code", None)
                        name = getattr(code, "name", type(err).__name__)
                        results["rows"].append(
                            {"rpc": rpc, "clients": n, "error": name, "message": str(err)[:160]}
                        )
                        break  # the same error at every concurrency
                    results["rows"].append(
                        {
                            "rpc": rpc,
                            "clients": n,
                            "calls": per * n,
                            "seconds": wall,
                            "per_second": per * n / wall,
                            "server_cpu": server_cpu,
                        }
                    )
                finally:
                    for c in clients:
                        c.close()
    return results


def _server_cpu(pid: int) -> float:
    from bench_ksm import proc_cpu_seconds

    return proc_cpu_seconds(pid)


# ---------------------------------------------------------------- 6: hints vs content


def run_hints(specs: Sequence[GuestSpec]) -> dict[str, Any]:
    """Issue 5's benchmark: the hint path (HINTS mode, modules registered, then checked)
    against the content path (CONTENT mode at ingest), on the same bytes."""
    buffers = [materialize(s) for s in specs]
    out: dict[str, Any] = {}

    # Content path: every non-zero page hashed and matched at ingest.
    gc.collect()
    engine = FusionEngine(hash_seed=5, config=FusionConfig(mode=FusionMode.CONTENT))
    sources = [BufferMemory.of(s, b) for s, b in zip(specs, buffers, strict=True)]
    with Timer() as t:
        for i, source in enumerate(sources):
            engine.start_machine(f"vm-{i}", source, page_fusion=True)
    h = engine.stats().host
    out["content"] = {
        "wall": t.wall,
        "cpu": t.cpu,
        "examined": h.guest_pages - h.zero_pages,
        "saved": h.pages_saved,
        "zero": h.zero_pages,
        "guest": h.guest_pages,
    }
    engine.close()

    # Hint path: ingest only elides zero pages; the agent's modules are then checked.
    gc.collect()
    engine = FusionEngine(hash_seed=5, config=FusionConfig(mode=FusionMode.HINTS))
    sources = [BufferMemory.of(s, b) for s, b in zip(specs, buffers, strict=True)]
    with Timer() as t_ingest:
        for i, source in enumerate(sources):
            engine.start_machine(f"vm-{i}", source, page_fusion=True)
    checked = fused = modules = 0
    with Timer() as t_hint:
        for i in range(len(specs)):
            for module in engine.modules(f"vm-{i}"):
                engine.register_module(f"vm-{i}", module)
                modules += 1
            c, f = engine.check_shared_modules(f"vm-{i}")
            checked += c
            fused += f
    h = engine.stats().host
    out["hints"] = {
        "ingest_wall": t_ingest.wall,
        "ingest_cpu": t_ingest.cpu,
        "wall": t_hint.wall,
        "cpu": t_hint.cpu,
        "examined": checked,
        "fused": fused,
        "modules": modules,
        "saved": h.pages_saved,
        "zero": h.zero_pages,
    }
    engine.close()
    return out


# ---------------------------------------------------------------- 4: overcommit


def run_overcommit(
    profile: str, size: int, target_bytes: int, reserve: int, max_seconds: float
) -> dict[str, Any]:
    """Start synthetic Windows guests (lazily synthesised by the adapter) until their
    memory reaches ``target_bytes``; RSS against frames used after each start.

    Stops early, and says so, when MemAvailable would fall under ``reserve``
    (the next guest's growth estimated from the last one's) or time runs out.
    """
    gc.collect()
    engine = FusionEngine(hash_seed=5)
    rss0 = rss_bytes()
    rows = [
        {
            "guest_bytes": 0,
            "rss": rss0,
            "frames_bytes": 0,
            "saved_bytes": 0,
            "seconds": 0.0,
            "mem_available": mem_available_bytes(),
        }
    ]
    stop_reason = ""
    t0 = time.perf_counter()
    cpu0 = cpu_seconds()
    growth = 0
    i = 0
    while rows[-1]["guest_bytes"] < target_bytes:
        avail = mem_available_bytes()
        if avail - 1.5 * growth < reserve:
            stop_reason = (
                f"stopped early: MemAvailable {avail / GiB:.1f} GiB, the next guest "
                f"needs about {growth / GiB:.1f} GiB and {reserve / GiB:.1f} GiB stay "
                "free"
            )
            break
        if time.perf_counter() - t0 > max_seconds:
            stop_reason = f"stopped early: time budget of {max_seconds:.0f} s used"
            break
        spec = GuestSpec(profile, size, 1000 + i)
        before = rss_bytes()
        engine.start_machine(f"vm-{i}", spec.open(), page_fusion=True)
        i += 1
        h = engine.stats().host
        rss = rss_bytes()
        growth = rss - before  # the last guest's growth predicts the next one's
        rows.append(
            {
                "guest_bytes": h.guest_pages * PAGE,
                "rss": rss,
                "frames_bytes": h.frames_used * PAGE,
                "saved_bytes": h.pages_saved * PAGE,
                "zero_bytes": h.zero_pages * PAGE,
                "seconds": time.perf_counter() - t0,
                "mem_available": mem_available_bytes(),
                "metadata_bytes": h.metadata_bytes,
                "guest_pages": h.guest_pages,
            }
        )
    cpu = cpu_seconds() - cpu0
    engine.close()
    return {
        "rows": rows,
        "stop_reason": stop_reason,
        "machines": i,
        "cpu": cpu,
        "rss_base": rss0,
        "host_ram": mem_total_bytes(),
        "profile": profile,
        "size": size,
        "target": target_bytes,
    }


def overcommit_subprocess(
    profile: str, size: int, target_bytes: int, reserve: int, max_seconds: float
) -> dict[str, Any]:
    """run_overcommit in a clean child process (so RSS is the engine's, not the harness's)."""
    import subprocess

    argv = [
        sys.executable,
        __file__,
        "overcommit",
        "--profile",
        profile,
        "--size",
        str(size),
        "--target",
        str(target_bytes),
        "--reserve",
        str(reserve),
        "--max-seconds",
        str(max_seconds),
    ]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"overcommit child failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    oc = sub.add_parser("overcommit")
    oc.add_argument("--profile", default="Windows10_64")
    oc.add_argument("--size", type=int, default=2 * GiB)
    oc.add_argument("--target", type=int, required=True)
    oc.add_argument("--reserve", type=int, default=2 * GiB)
    oc.add_argument("--max-seconds", type=float, default=900)
    args = ap.parse_args()
    result = run_overcommit(args.profile, args.size, args.target, args.reserve, args.max_seconds)
    print(json.dumps(result))


if __name__ == "__main__":
    _main()
