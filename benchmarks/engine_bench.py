"""Engine benchmark: ingest throughput against hash-only and memcpy, metadata,
RSS, copy-on-write latency. Prints figures; asserts nothing.

    python benchmarks/engine_bench.py [--machines 4] [--gib 1.0]

The content is a synthetic mix shaped like idle Windows guests (see
reference/windows-guests.md): ~38% zero pages, ~30% pages common to every
machine (system images), the rest unique per machine (heap, stacks).
"""

from __future__ import annotations

import argparse
import gc
import resource
import statistics
import time

import mmh3
import numpy as np

from pagefusion.adapters.base import GuestMemory, MemoryRange
from pagefusion.adapters.helpers import page_aligned
from pagefusion.server.engine import FusionEngine

PAGE = 4096


class ArrayMemory(GuestMemory):
    def __init__(self, data: np.ndarray) -> None:
        self.data = data

    def ranges(self):
        return [MemoryRange(0, self.data.nbytes)]

    def read(self, address, length):
        return self.data.reshape(-1)[address : address + length].data

    def close(self):
        pass


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def make_guests(machines: int, pages: int, seed: int = 7) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    kinds = rng.choice(3, size=pages, p=[0.38, 0.30, 0.32])  # zero, common, unique
    common_idx = np.flatnonzero(kinds == 1)
    common = rng.integers(0, 2**63, size=(len(common_idx), PAGE // 8), dtype=np.uint64)
    guests = []
    for m in range(machines):
        # Page aligned, as guest RAM is (see adapters.helpers.page_aligned).
        g = page_aligned(pages * PAGE).view(np.uint64).reshape(pages, PAGE // 8)
        g[common_idx] = common
        uniq = np.flatnonzero(kinds == 2)
        g[uniq] = np.random.default_rng(seed + 1 + m).integers(
            0, 2**63, size=(len(uniq), PAGE // 8), dtype=np.uint64
        )
        guests.append(g.view(np.uint8))
    return guests


def hash_only(data: np.ndarray) -> float:
    flat = data.reshape(-1).data
    digest = mmh3.mmh3_x64_128_digest
    t = time.perf_counter()
    b"".join([digest(flat[i * PAGE : (i + 1) * PAGE], 1) for i in range(len(data))])
    return time.perf_counter() - t


def memcpy(data: np.ndarray) -> float:
    # Page aligned like the guest (an unequally aligned copy runs at a quarter of the speed).
    dst = page_aligned(data.nbytes).reshape(data.shape)
    dst[:] = 1  # touched first: this measures the copy, not page faults
    t = time.perf_counter()
    np.copyto(dst, data)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--machines", type=int, default=4)
    ap.add_argument("--gib", type=float, default=1.0, help="guest memory per machine")
    ap.add_argument("--cow-writes", type=int, default=20000)
    args = ap.parse_args()
    pages = int(args.gib * (1 << 30)) // PAGE
    total = args.machines * pages * PAGE
    guests = make_guests(args.machines, pages)
    print(f"content: {args.machines} machines x {args.gib:g} GiB = {total / 2**30:.2f} GiB")

    t_hash = sum(hash_only(g) for g in guests)
    t_copy = sum(memcpy(g) for g in guests)
    gc.collect()
    engine = FusionEngine(hash_seed=5)
    rss0 = rss_bytes()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    for i, guest in enumerate(guests):
        engine.start_machine(f"vm-{i}", ArrayMemory(guest), page_fusion=True)
    t_ingest = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    rss1 = rss_bytes()
    h = engine.stats().host
    gb = total / 1e9
    print(f"hash-only (mmh3 x64-128 per page): {gb / t_hash:6.2f} GB/s")
    print(f"memcpy (into touched memory):      {gb / t_copy:6.2f} GB/s")
    print(
        f"ingest with fusion:                {gb / t_ingest:6.2f} GB/s"
        f"  ({t_ingest / t_hash * 100:.0f}% of hash-only time; ratio ingest/hash-only throughput "
        f"{t_hash / t_ingest:.2f})"
    )
    print(f"ingest CPU time: {cpu1.ru_utime - cpu0.ru_utime + cpu1.ru_stime - cpu0.ru_stime:.2f} s")
    print(
        f"guest pages {h.guest_pages}, zero {h.zero_pages}, frames used {h.frames_used}, "
        f"pages saved {h.pages_saved}, frames shared {h.frames_shared}"
    )
    assert h.guest_pages == h.frames_used + h.pages_saved + h.zero_pages
    print(
        f"metadata: {h.metadata_bytes / h.guest_pages:.2f} bytes per guest page "
        f"(KSM: 64 per scanned page; VMware: 16 per frame)"
    )
    print(
        f"RSS: before start {rss0 / 2**20:.0f} MiB, after start {rss1 / 2**20:.0f} MiB "
        f"(frames used x 4 KiB = {h.frames_used * PAGE / 2**20:.0f} MiB; source buffers "
        f"{total / 2**20:.0f} MiB live in this process too)"
    )

    # Copy on write: each write hits a different SHARED page of vm-0.
    shared = np.flatnonzero(guests[0].view(np.uint64).reshape(pages, -1).any(axis=1))
    shared = [
        int(p) for p in shared if engine.page_info("vm-0", int(p) * PAGE).state.name == "SHARED"
    ]
    lat = []
    for p in shared[: args.cow_writes]:
        t = time.perf_counter_ns()
        engine.write("vm-0", p * PAGE + 8, b"\xff" * 8)
        lat.append(time.perf_counter_ns() - t)
    lat.sort()
    print(
        f"copy-on-write write ({len(lat)} writes): p50 {lat[len(lat) // 2] / 1000:.1f} us, "
        f"p99 {lat[int(len(lat) * 0.99)] / 1000:.1f} us, mean {statistics.mean(lat) / 1000:.1f} us"
    )

    for i in range(args.machines):
        engine.stop_machine(f"vm-{i}")
    del guests, guest  # the loop variable would keep the last guest alive
    gc.collect()
    h = engine.stats().host
    print(
        f"RSS after stop (sources freed too): {rss_bytes() / 2**20:.0f} MiB; "
        f"frames used {h.frames_used}, pool holds {h.frames_free} free frames"
    )


if __name__ == "__main__":
    main()
