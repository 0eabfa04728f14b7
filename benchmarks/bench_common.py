"""Shared helpers of the benchmark harness (benchmarks/run_all.py).

Guest content, process figures (RSS, CPU, MemAvailable), markdown tables and
optional plots. Plots need matplotlib (benchmarks/requirements.txt); without
it the report is still written and says which figures are missing.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # engine_bench lives next to us
    sys.path.insert(0, str(HERE))

from pagefusion.adapters.base import GuestMemory, GuestModule, MemoryRange  # noqa: E402
from pagefusion.adapters.helpers import page_aligned  # noqa: E402
from pagefusion.adapters.synthetic_windows import (  # noqa: E402
    PROFILES,
    SyntheticWindowsMemory,
)

PAGE = 4096
KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30


# ---------------------------------------------------------------- process figures


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def mem_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * KiB
    return 0


def mem_total_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * KiB
    return 0


def cpu_seconds() -> float:
    """CPU time of this process, all threads, user + system."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


_FIRST_TOUCH = r"""
import mmap, sys, time
import numpy as np
size = int(sys.argv[1])
m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
t = time.perf_counter()
try:
    m.madvise(23)  # MADV_POPULATE_WRITE (Linux 5.14): fault every page in, writable
except OSError:  # an older kernel: one write per page, in one numpy call
    np.frombuffer(m, dtype=np.uint8)[::4096] = 1
print(time.perf_counter() - t)
"""


def first_touch_seconds_per_gib(size: int = 4 * GiB, timeout: float = 120.0) -> float | None:
    """Seconds per GiB to fault in fresh anonymous memory, in a child process (None: it failed).

    What the host charges for memory the guest kernel has not used lately
    (on a VM with free page reporting, the hypervisor backs it again): every
    start pays it for its new frames, so a report shows it next to them.
    """
    try:
        out = subprocess.run([sys.executable, "-c", _FIRST_TOUCH, str(size)], capture_output=True,
                             text=True, timeout=timeout, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return None
    return float(out) / (size / GiB)


class Timer:
    """Wall and CPU time of a block: ``with Timer() as t: ...; t.wall, t.cpu``."""

    def __enter__(self) -> Timer:
        self._w = time.perf_counter()
        self._c = cpu_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._w
        self.cpu = cpu_seconds() - self._c


# ---------------------------------------------------------------- guest content


@dataclass(frozen=True)
class GuestSpec:
    """One synthetic Windows guest: byte-identical for equal (profile, size, seed)."""

    profile: str
    size: int
    seed: int

    def open(self) -> SyntheticWindowsMemory:
        return SyntheticWindowsMemory(PROFILES[self.profile], self.size, self.seed)

    @property
    def pages(self) -> int:
        return self.size // PAGE


def materialize(spec: GuestSpec, out: np.ndarray | None = None) -> np.ndarray:
    """The guest's linear pages as a (pages, 4096) uint8 array (filled in ``out`` if given)."""
    mem = spec.open()
    if out is None:  # page aligned, as guest RAM is (see adapters.helpers.page_aligned)
        out = page_aligned(spec.pages * PAGE).reshape(spec.pages, PAGE)
    step = 16384
    for first in range(0, spec.pages, step):
        mem.synthesize(first, out[first : first + step])
    mem.close()
    return out


class BufferMemory(GuestMemory):
    """A guest whose bytes already sit in this process (so ingest, not synthesis, is timed).

    Reports the synthetic guest's ranges and modules, so hints work too.
    """

    def __init__(
        self, data: np.ndarray, ranges: Sequence[MemoryRange], modules: Sequence[GuestModule] = ()
    ) -> None:
        self.data = data.reshape(-1)
        self._ranges = tuple(ranges)
        self._modules = tuple(modules)
        self._offsets = []
        total = 0
        for r in self._ranges:
            self._offsets.append(total)
            total += r.size
        if total != self.data.nbytes:
            raise ValueError("buffer size does not match the ranges")

    @classmethod
    def of(cls, spec: GuestSpec, data: np.ndarray) -> BufferMemory:
        mem = spec.open()
        try:
            return cls(data, mem.ranges(), mem.modules())
        finally:
            mem.close()

    def ranges(self) -> Sequence[MemoryRange]:
        return self._ranges

    def modules(self) -> Sequence[GuestModule]:
        return self._modules

    def read(self, address: int, length: int) -> memoryview:
        for r, off in zip(self._ranges, self._offsets, strict=True):
            if r.address <= address < r.end:
                start = off + address - r.address
                return self.data[start : start + length].data
        raise ValueError(f"address {address:#x} unmapped")

    def close(self) -> None:
        pass


def expected_savings(guests: Sequence[np.ndarray]) -> tuple[int, int, int]:
    """(pages, zero pages, distinct non-zero contents) over all guests, exact."""
    import mmh3

    seen: set[bytes] = set()
    zero = total = 0
    digest = mmh3.mmh3_x64_128_digest
    for g in guests:
        nz = g.view(np.uint64).any(axis=1)
        total += len(g)
        zero += int(len(g) - np.count_nonzero(nz))
        flat = g.reshape(-1).data
        for p in np.flatnonzero(nz).tolist():
            seen.add(digest(flat[p * PAGE : (p + 1) * PAGE], 0))
    return total, zero, len(seen)


# ---------------------------------------------------------------- report output


def fmt(x: float, digits: int = 2) -> str:
    if x != x:  # NaN
        return "n/a"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        out.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(out) + "\n"


def verdict(ok: bool | None) -> str:
    if ok is None:
        return "not measured"
    return "**met**" if ok else "**not met**"


class Plotter:
    """Writes PNGs with matplotlib's Agg backend, or records why it cannot."""

    def __init__(self, report_dir: Path, enabled: bool = True, subdir: str = "figures") -> None:
        self.report_dir = report_dir
        self.subdir = subdir
        self.plt: Any = None
        self.reason = ""
        if not enabled:
            self.reason = "plots turned off (--no-plots)"
            return
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            self.plt = plt
        except ImportError:
            self.reason = (
                "matplotlib is not installed: "
                "`pip install -r benchmarks/requirements.txt` "
                "for the PNG plots"
            )
            print(f"note: {self.reason}", file=sys.stderr)

    @property
    def available(self) -> bool:
        return self.plt is not None

    def figure(self) -> tuple[Any, Any]:
        fig, ax = self.plt.subplots(figsize=(7.5, 4.5), dpi=100)
        return fig, ax

    def save(self, fig: Any, name: str) -> str:
        out = self.report_dir / self.subdir
        out.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        fig.savefig(out / name)
        self.plt.close(fig)
        return f"{self.subdir}/{name}"

    def markdown(self, name: str | None, alt: str) -> str:
        if name is None:
            return f"*(plot not drawn: {self.reason})*\n"
        return f"![{alt}]({name})\n"
