"""Benchmark of ``pagefusion estimate``: throughput against hashing alone, memory, Dask.

Writes synthetic Windows guests (three profiles) to raw image files once,
then on the same files:

1. hash-only: read every page through the file adapter and hash it with the
   estimate's keyed mmh3 x64 128-bit hash, nothing else (the floor);
2. the local estimate (read, hash, keep and sort the hashes, replay ingest
   for every policy), timed in CPU seconds of this one process (per core);
3. the estimate's memory: the hashes it keeps per non-zero page (and per
   distinct page), and the peak of everything numpy and Python allocate
   during the estimate (tracemalloc) per non-zero page;
4. with Dask distributed installed: the estimate on a local cluster of one
   worker and of two (one thread each), wall time.

    python benchmarks/bench_estimate.py [--size-mib 1024] [--machines 4] [--no-dask]

Prints a small markdown report.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

from pagefusion.adapters.base import AdapterContext
from pagefusion.adapters.registry import load_adapters, open_source
from pagefusion.clients.estimate import (
    BATCH_PAGES,
    PAGE_SIZE,
    estimate,
    hash_pages,
    load_specs,
    open_spec,
    scan_source,
)

PROFILES = ("Windows10_64", "WindowsXP", "Windows7_64")
MiB = 1 << 20


def write_images(directory: Path, machines: int, size: int) -> Path:
    """Raw images of synthetic guests, and the SPEC file naming them."""
    adapters = load_adapters()
    items = []
    for i in range(machines):
        profile = PROFILES[i % len(PROFILES)]
        memory = open_source("synthetic-windows", {"profile": profile, "seed": str(i + 1)},
                             AdapterContext(f"g{i}", profile, size), adapters)
        path = directory / f"g{i}.raw"
        try:
            with open(path, "wb") as out:
                for r in memory.ranges():
                    for first in range(0, r.pages, BATCH_PAGES):
                        n = min(BATCH_PAGES, r.pages - first)
                        out.write(memory.read(r.address + first * PAGE_SIZE, n * PAGE_SIZE))
        finally:
            memory.close()
        items.append({"machine_id": f"g{i}", "machine": {
            "page_fusion_enabled": True, "os_type": profile,
            "memory_source": {"adapter": "file", "options": {"path": str(path)}}}})
    spec = directory / "spec.json"
    spec.write_text(json.dumps(items))
    return spec


def hash_only(spec: Path, seed: int) -> tuple[float, float, int]:
    """Wall and CPU seconds to read and hash every page; bytes hashed."""
    total = 0
    wall, cpu = time.perf_counter(), time.process_time()
    for machine in load_specs([spec]):
        memory = open_spec(machine)
        try:
            for r in memory.ranges():
                for first in range(0, r.pages, BATCH_PAGES):
                    n = min(BATCH_PAGES, r.pages - first)
                    buf = memory.read(r.address + first * PAGE_SIZE, n * PAGE_SIZE)
                    hash_pages(memoryview(buf).cast("B"), n, seed)
                    total += n * PAGE_SIZE
        finally:
            memory.close()
    return time.perf_counter() - wall, time.process_time() - cpu, total


def timed_estimate(spec: Path, seed: int) -> tuple[float, float, dict[str, Any]]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = estimate(load_specs([spec]), seed=seed)
    return time.perf_counter() - wall, time.process_time() - cpu, result


def memory_figures(spec: Path, seed: int) -> dict[str, float]:
    """Kept hash bytes and the traced peak, per non-zero and per distinct page."""
    from pagefusion.clients.estimate import MachineSpec, Options, evaluate

    # Imports and first-use caches are not the estimate's memory: warm them up first.
    estimate([MachineSpec("warm-up", "memory", {"size": "1MiB"})])
    tracemalloc.start()
    partials = [scan_source(m, seed, ordered=False) for m in load_specs([spec])]
    kept = sum(p.nbytes for p in partials)
    nonzero = sum(m.nonzero_pages for p in partials for m in p.machines)
    result = evaluate(partials, Options())
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    distinct = sum(result["sharing"]["distinct_pages"])
    return {
        "nonzero_pages": nonzero,
        "peak_above_kept_mib": (peak - kept) / MiB,
        "kept_per_nonzero": kept / max(nonzero, 1),
        "kept_per_distinct": kept / max(distinct, 1),
        "peak_per_nonzero": peak / max(nonzero, 1),
    }


def dask_seconds(spec: Path, workers: int, seed: int) -> float:
    from distributed import LocalCluster

    from pagefusion.clients.fleet import estimate_on_cluster

    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster:
        started = time.perf_counter()
        estimate_on_cluster(load_specs([spec]), cluster.scheduler_address, seed=seed)
        return time.perf_counter() - started


def run(size_mib: int, machines: int, repeat: int, dask: bool) -> str:
    """The whole benchmark; returns the report as markdown."""
    seed = 12345
    directory = Path(tempfile.mkdtemp(prefix="pagefusion-bench-estimate-"))
    out: list[str] = []
    try:
        spec = write_images(directory, machines, size_mib * MiB)
        hash_only(spec, seed)  # warm the page cache
        bases, ests = [], []
        for _ in range(repeat):  # interleaved: the host's load drifts
            bases.append(hash_only(spec, seed))
            ests.append(timed_estimate(spec, seed))
        base = min(bases, key=lambda t: t[1])
        est = min(ests, key=lambda t: t[1])
        mem = memory_figures(spec, seed)
        total = base[2]
        out.append(f"{machines} synthetic guests x {size_mib} MiB ({', '.join(PROFILES)}, "
                   f"page fusion on), {total / MiB:.0f} MiB in raw images read through the "
                   "file adapter; best of "
                   f"{repeat}; CPU seconds of the one estimating process.\n")
        out.append("| run | wall s | CPU s | MiB/s per core (CPU) | vs hash-only |")
        out.append("|---|---:|---:|---:|---:|")
        out.append(f"| hash-only (read + keyed mmh3 x64 128 of every page) | {base[0]:.2f} | "
                   f"{base[1]:.2f} | {total / MiB / base[1]:.0f} | 1.00 |")
        out.append(f"| `pagefusion estimate` (read, hash, sort, replay every policy) | "
                   f"{est[0]:.2f} | {est[1]:.2f} | {total / MiB / est[1]:.0f} | "
                   f"{base[1] / est[1]:.2f} |")
        out.append("")
        out.append(f"Memory: {mem['kept_per_nonzero']:.1f} B kept per non-zero page "
                   f"({mem['kept_per_distinct']:.1f} B per distinct page); traced peak "
                   f"(tracemalloc, everything numpy and Python allocate) "
                   f"{mem['peak_per_nonzero']:.1f} B per non-zero page "
                   f"({mem['nonzero_pages']:,} non-zero pages), of which "
                   f"{mem['peak_above_kept_mib']:.1f} MiB above the kept hashes (working set of "
                   "one ingest batch and one replay feed, a constant). A server holds 4,096 B.")
        host = est[2]["host"]
        out.append(f"Figures: {host['pages_saved']:,} pages saved, profit "
                   f"{host['profit_bytes'] / MiB:,.1f} MiB.")
        if dask:
            try:
                import distributed  # noqa: F401
            except ImportError:
                out.append("\nDask: not installed (pip install 'pagefusion[fleet]').")
            else:
                one = two = float("inf")
                for _ in range(repeat):  # interleaved: the host's load drifts
                    one = min(one, dask_seconds(spec, 1, seed))
                    two = min(two, dask_seconds(spec, 2, seed))
                out.append(f"\nDask (`--scheduler`), LocalCluster with one thread per worker, "
                           f"wall time: 1 worker {one:.2f} s, 2 workers {two:.2f} s, "
                           f"speed-up {one / two:.2f}x (on a host with "
                           f"{os.cpu_count()} cores shared with other work).")
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="memory of each guest")
    parser.add_argument("--machines", type=int, default=4)
    parser.add_argument("--no-dask", action="store_true")
    parser.add_argument("--repeat", type=int, default=2, help="best of N timings")
    args = parser.parse_args(argv)
    print("# pagefusion estimate\n")
    print(run(args.size_mib, args.machines, args.repeat, not args.no_dask), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
