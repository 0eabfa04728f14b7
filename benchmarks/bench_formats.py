"""Snapshot formats against a raw image of the same memory (issue 13).

One synthetic Windows 10 guest is written in every format the ``file``
adapter reads (pagefusion.testing's writers; the raw image and ELF core
from the same bytes), then each file is

* opened (format detection, validation, the page index of QEMU streams),
* read whole in 64 MiB spans through the adapter with every word looked at
  (the OR-reduction the engine's zero-page check does), and
* started in a fresh in-process engine with page fusion on (what
  StartMachine does), checking the figures equal the raw image's.

Throughputs are GiB of guest memory per second; "vs raw" is the format's
over the raw image's (the target: at least 0.5). Files sit in the page cache
(written just before), so this measures the readers, not the disk.

``python benchmarks/bench_formats.py [--size-mib N] [--json]`` prints the
table; benchmarks/run_all.py includes it as a report section.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pagefusion.adapters.base import AdapterContext, GuestMemory
from pagefusion.adapters.registry import open_source
from pagefusion.adapters.testing import CoreSegment, write_elf_core
from pagefusion.server.engine import FusionEngine
from pagefusion.testing import (
    unflatten_kdump,
    write_kdump,
    write_libvirt_save,
    write_lime,
    write_qemu_stream,
    write_windows_dump,
)

MiB = 1 << 20
GiB = 1 << 30
SPAN = 64 * MiB


def _writers(guest: GuestMemory, image: bytes) -> dict[str, Callable[[Path], Path]]:
    def raw(p: Path) -> Path:
        p.write_bytes(image)
        return p

    def stream(p: Path) -> Path:
        return write_qemu_stream(p, {"pc.ram": image})

    return {
        "raw image": raw,
        "ELF core": lambda p: write_elf_core(p, [CoreSegment(0, image)]),
        "QEMU migration stream": stream,
        "libvirt save image": lambda p: write_libvirt_save(p, stream(p.with_suffix(".s"))),
        "kdump zlib, flattened": lambda p: write_kdump(p, guest, flattened=True,
                                                       exclude_zero=False),
        "kdump zlib": lambda p: write_kdump(p, guest),
        "kdump lzo": lambda p: write_kdump(p, guest, codec="lzo"),
        "kdump snappy": lambda p: write_kdump(p, guest, codec="snappy"),
        "kdump zstd": lambda p: write_kdump(p, guest, codec="zstd"),
        "kdump raw pages": lambda p: write_kdump(p, guest, codec="none"),
        "Windows full dump (64-bit)": lambda p: write_windows_dump(p, guest),
        "Windows bitmap dump": lambda p: write_windows_dump(p, guest, kind="bitmap64"),
        "Windows full dump (32-bit PAE)": lambda p: write_windows_dump(p, guest, kind="full32"),
        "LiME": lambda p: write_lime(p, guest),
    }


def _read_all(mem: GuestMemory) -> float:
    t = time.perf_counter()
    for r in mem.ranges():
        for at in range(r.address, r.end, SPAN):
            data = np.frombuffer(mem.read(at, min(SPAN, r.end - at)), dtype=np.uint64)
            np.bitwise_or.reduce(data.reshape(-1, 512), axis=1)
    return time.perf_counter() - t


def measure(size: int, workdir: Path) -> list[dict[str, Any]]:
    """Write the guest in every format, then open, read and start each file."""
    ctx = AdapterContext("bench", memory_size_bytes=size, allowed_paths=(workdir,))
    guest = open_source("synthetic-windows", {"profile": "Windows10_64", "seed": "1"}, ctx)
    ranges = list(guest.ranges())
    assert len(ranges) == 1 and ranges[0].address == 0, ranges
    image = bytes(guest.read(0, size))
    rows: list[dict[str, Any]] = []
    for name, write in _writers(guest, image).items():
        path = workdir / name.replace(" ", "-").replace(",", "").replace("(", "").replace(")", "")
        t = time.perf_counter()
        write(path)
        if name == "kdump zlib, flattened":  # also check the makedumpfile -R rewrite reads
            unflatten_kdump(path, path.with_suffix(".plain"))
        written = time.perf_counter() - t
        t = time.perf_counter()
        mem = open_source("file", {"path": str(path)}, ctx)
        opened = time.perf_counter() - t
        read = min(_read_all(mem) for _ in range(2))
        mem.close()
        engine = FusionEngine(max_pool_bytes=2 * size + GiB)
        try:
            t = time.perf_counter()
            engine.start_machine("bench", open_source("file", {"path": str(path)}, ctx),
                                 page_fusion=True)
            started = time.perf_counter() - t
            host = engine.stats().host
            figures = (host.guest_pages, host.zero_pages, host.pages_saved)
        finally:
            engine.close()
        rows.append({"format": name, "file_bytes": path.stat().st_size, "write_s": written,
                     "open_s": opened, "read_s": read, "start_s": started, "figures": figures})
        print(f"  {name}: open {opened:.2f} s, read {size / GiB / read:.2f} GiB/s, "
              f"start {size / GiB / started:.2f} GiB/s", file=sys.stderr, flush=True)
        path.unlink()
        for extra in (path.with_suffix(".s"), path.with_suffix(".plain")):
            extra.unlink(missing_ok=True)
    raw = rows[0]
    for row in rows:
        row["read_gib_s"] = size / GiB / row["read_s"]
        row["start_gib_s"] = size / GiB / row["start_s"]
        row["read_vs_raw"] = raw["read_s"] / row["read_s"]
        row["start_vs_raw"] = raw["start_s"] / row["start_s"]
        row["same_figures"] = row["figures"] == raw["figures"]
    return rows


def markdown(rows: list[dict[str, Any]], size: int) -> str:
    """The report section's table."""
    out = [
        f"One synthetic Windows 10 guest of {size // MiB} MiB written in each format "
        "(pagefusion.testing's writers: from the published layouts, not by the real tools; "
        "real QEMU's streams and kdump files are checked byte for byte in "
        "tests/adapters/test_adapter_snapshots_qemu.py). *read*: the whole guest through the "
        "adapter, every word looked at; *start*: an in-process engine's StartMachine with page "
        "fusion on. Target: every format at least half the raw image's throughput.\n",
        "| format | file MiB | open s | read GiB/s | read vs raw | start GiB/s | start vs raw "
        "| same figures as raw |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['format']} | {r['file_bytes'] / MiB:.0f} | {r['open_s']:.2f} | "
            f"{r['read_gib_s']:.2f} | {r['read_vs_raw']:.2f} | {r['start_gib_s']:.2f} | "
            f"{r['start_vs_raw']:.2f} | {'yes' if r['same_figures'] else '**no**'} |"
        )
    return "\n".join(out) + "\n"


def run(size_mib: int) -> str:
    """Measure and return the markdown section body."""
    size = size_mib * MiB
    with tempfile.TemporaryDirectory(prefix="pf-bench-formats-") as tmp:
        rows = measure(size, Path(tmp))
    return markdown(rows, size)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--json", action="store_true", help="print the rows as JSON too")
    args = ap.parse_args(argv)
    size = args.size_mib * MiB
    with tempfile.TemporaryDirectory(prefix="pf-bench-formats-") as tmp:
        rows = measure(size, Path(tmp))
    print(markdown(rows, size))
    if args.json:
        print(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
