"""Windows crash dumps: 64-bit full and bitmap dumps, 32-bit (PAE) full dumps.

What Windows writes to MEMORY.DMP (and ``livekd``/``dumpit``/``winpmem``
write in the same format). The published layouts (``DUMP_HEADER64`` and
``DUMP_HEADER32`` of the Windows debugger SDK, as wdbgexts.h and the
forensic tools document them), little-endian:

* ``PAGEDU64``: a 0x2000-byte header; ``PhysicalMemoryBlock`` at 0x88
  (NumberOfRuns u32, NumberOfPages u64 at 0x90, then up to 43 runs of
  BasePage u64, PageCount u64 from 0x98); ``DumpType`` u32 at 0xF98.
  A full dump (DumpType 1) stores every page of every run, in run order,
  from 0x2000. A bitmap dump (DumpType 5 full, 2/6 kernel) has at 0x2000 a
  ``SDMP``/``FDMP`` + ``DUMP`` header: FirstPage u64 at 0x20 (file offset
  of the first page), TotalPresentPages u64 at 0x28, Pages u64 at 0x30 (bits
  in the bitmap), the bitmap from 0x38; present pages are stored in frame
  order from FirstPage.
* ``PAGEDUMP``: a 0x1000-byte header; ``PaeEnabled`` at 0x5C;
  PhysicalMemoryBlock at 0x64 (NumberOfRuns u32, NumberOfPages u32, up to
  86 runs of BasePage u32, PageCount u32 from 0x6C); DumpType at 0xF88;
  a full dump stores the pages from 0x1000.

The runs are the machine's ranges; in a bitmap dump, pages of a run the
bitmap leaves out (a kernel dump's user pages) read as zero and cost no
read. Triage (mini) dumps hold no physical memory and are refused.
"""

from __future__ import annotations

import itertools

import numpy as np

from pagefusion.adapters.base import PAGE_SIZE, MemoryRange
from pagefusion.adapters.helpers import MAX_PHYS_ADDRESS, MAX_TOTAL_BYTES
from pagefusion.adapters.paged import POPCOUNT, BitmapRank, Special, fail

__all__ = ["BitmapDumpTable", "Run", "parse_windows_dump"]

HEADER64 = 0x2000
HEADER32 = 0x1000
MAX_RUNS64 = (704 - 16) // 16
MAX_RUNS32 = (700 - 8) // 8
DUMP_FULL = 1
_BITMAP_TYPES = {2: "kernel (summary)", 5: "full bitmap", 6: "kernel bitmap", 7: "automatic"}
_OTHER_TYPES = {3: "header-only", 4: "triage (mini)"}


class Run:
    """One physical memory run of a dump header, with its file offset."""

    __slots__ = ("base", "count", "offset")

    def __init__(self, base: int, count: int, offset: int) -> None:
        self.base = base
        self.count = count
        self.offset = offset


class BitmapDumpTable:
    """Pages of a bitmap dump: present pages follow each other from FirstPage."""

    def __init__(self, ranges: list[MemoryRange], bitmap: np.ndarray, first_page: int) -> None:
        self.ranges = tuple(ranges)
        self._present = BitmapRank(bitmap)
        self._first = first_page

    def locate(self, index: int, first: int, count: int) -> tuple[np.ndarray, list[Special]]:
        lo = self.ranges[index].address // PAGE_SIZE + first
        offsets = np.full(count, -1, dtype=np.int64)
        present, rank = self._present.stored(lo, count)
        offsets[present] = self._first + (rank + np.arange(len(present))) * PAGE_SIZE
        return offsets, []


def _runs(data: memoryview, path: str, wide: bool) -> list[Run]:
    at, runs_at, limit = (0x88, 0x98, MAX_RUNS64) if wide else (0x64, 0x6C, MAX_RUNS32)
    n = int.from_bytes(data[at : at + 4], "little")
    claimed = int.from_bytes(data[at + 8 : at + 16] if wide else data[at + 4 : at + 8], "little")
    if n == 0 or n > limit:
        raise fail(path, f"Windows dump header claims {n} physical memory runs "
                         f"(the header holds 1 to {limit})")
    width = 8 if wide else 4
    runs: list[Run] = []
    total = 0
    for i in range(n):
        pos = runs_at + 2 * width * i
        base = int.from_bytes(data[pos : pos + width], "little")
        count = int.from_bytes(data[pos + width : pos + 2 * width], "little")
        if count == 0 or (base + count) * PAGE_SIZE > MAX_PHYS_ADDRESS:
            raise fail(path, f"physical memory run {i} (page {base:#x}, {count} pages) "
                             "is empty or lies beyond the 52-bit address space")
        runs.append(Run(base, count, 0))
        total += count
    if total != claimed:
        raise fail(path, f"physical memory runs add up to {total} pages but the header says "
                         f"NumberOfPages is {claimed}")
    if total * PAGE_SIZE > MAX_TOTAL_BYTES:
        raise fail(path, "physical memory runs add up to more than 1 TiB")
    ordered = sorted(runs, key=lambda r: r.base)
    for a, b in itertools.pairwise(ordered):
        if b.base < a.base + a.count:
            raise fail(path, f"physical memory runs overlap: pages {a.base:#x}+{a.count:#x} "
                             f"and {b.base:#x}+{b.count:#x}")
    return runs


def parse_windows_dump(
    data: memoryview, path: str
) -> tuple[str, list[Run] | BitmapDumpTable]:
    """Validate a Windows crash dump.

    Returns:
        ``("windows-full64"|"windows-full32", runs with file offsets)`` for
        full dumps, ``("windows-bitmap", table)`` for bitmap dumps.

    Raises:
        InvalidSourceError: naming what is wrong.
    """
    size = len(data)
    wide = bytes(data[4:8]) == b"DU64"
    header = HEADER64 if wide else HEADER32
    if size < header:
        raise fail(path, f"truncated Windows dump header ({size} of {header:#x} bytes)")
    type_at = 0xF98 if wide else 0xF88
    dump_type = int.from_bytes(data[type_at : type_at + 4], "little")
    if dump_type in _OTHER_TYPES:
        raise fail(path, f"a {_OTHER_TYPES[dump_type]} Windows dump holds no physical memory")
    runs = _runs(data, path, wide)
    total = sum(r.count for r in runs)
    if dump_type == DUMP_FULL:
        offset = header
        for r in runs:
            r.offset = offset
            offset += r.count * PAGE_SIZE
        if offset > size:
            raise fail(path, f"truncated Windows full dump: {total} pages of runs need "
                             f"{offset:#x} bytes, the file has {size:#x}")
        return ("windows-full64" if wide else "windows-full32"), runs
    if not wide or dump_type not in _BITMAP_TYPES:
        what = "32-bit " if not wide else ""
        raise fail(path, f"{what}Windows dump type {dump_type} is not supported "
                         "(64-bit full and bitmap dumps, 32-bit full dumps are)")
    return "windows-bitmap", _bitmap(data, path, runs)


def _bitmap(data: memoryview, path: str, runs: list[Run]) -> BitmapDumpTable:
    size = len(data)
    at = HEADER64
    if size < at + 0x38:
        raise fail(path, "truncated Windows bitmap dump: no bitmap header")
    sig = bytes(data[at : at + 8])
    if sig not in (b"SDMPDUMP", b"FDMPDUMP"):
        raise fail(path, f"Windows bitmap dump: bitmap header signature {sig!r} "
                         "(expected SDMPDUMP or FDMPDUMP)")
    first_page, present, bits = (int.from_bytes(data[at + k : at + k + 8], "little")
                                 for k in (0x20, 0x28, 0x30))
    nbytes = -(-bits // 8)
    if bits == 0 or bits > MAX_PHYS_ADDRESS // PAGE_SIZE or at + 0x38 + nbytes > size:
        raise fail(path, f"Windows bitmap dump: a bitmap of {bits} pages does not fit in the "
                         f"file ({size:#x} bytes)")
    # Bits past the last run must be clear: check them in place and keep
    # only the bytes the runs cover (a sparse file may claim a huge bitmap).
    top = max(r.base + r.count for r in runs)
    keep = min(nbytes, -(-top // 8))
    start = at + 0x38
    for lo in range(start + keep, start + nbytes, 16 << 20):
        if np.frombuffer(data[lo : min(lo + (16 << 20), start + nbytes)], dtype=np.uint8).any():
            raise fail(path, "Windows bitmap dump: pages past the last physical memory run "
                             "are marked present")
    bitmap = np.frombuffer(bytes(data[start : start + keep]), dtype=np.uint8).copy()
    if bits % 8 and keep == nbytes:
        bitmap[-1] &= (1 << (bits % 8)) - 1
    counted = int(POPCOUNT[bitmap].sum(dtype=np.int64))
    if counted != present:
        raise fail(path, f"Windows bitmap dump: the bitmap marks {counted} pages present, the "
                         f"header says TotalPresentPages is {present}")
    if first_page < at + 0x38 + nbytes or first_page + present * PAGE_SIZE > size:
        raise fail(path, f"Windows bitmap dump: {present} pages from offset {first_page:#x} do "
                         f"not lie after the bitmap and inside the file ({size:#x} bytes)")
    ordered = sorted(runs, key=lambda r: r.base)
    gaps = [(0, ordered[0].base)]
    gaps += [(a.base + a.count, b.base) for a, b in itertools.pairwise(ordered)]
    gaps.append((ordered[-1].base + ordered[-1].count, bits))
    for lo, hi in gaps:
        if _count_bits(bitmap, lo, hi):
            first = _first_bit(bitmap, lo, hi)
            raise fail(path, f"Windows bitmap dump: page {first:#x} is marked present outside "
                             "every physical memory run")
    merged: list[MemoryRange] = []
    for r in ordered:
        if merged and merged[-1].end == r.base * PAGE_SIZE:
            merged[-1] = MemoryRange(merged[-1].address, merged[-1].size + r.count * PAGE_SIZE)
        else:
            merged.append(MemoryRange(r.base * PAGE_SIZE, r.count * PAGE_SIZE))
    # Ranks count bits beyond the bitmap as absent: pad it with zero bytes.
    top = merged[-1].end // PAGE_SIZE
    if top > len(bitmap) * 8:
        bitmap = np.concatenate((bitmap, np.zeros(-(-(top - len(bitmap) * 8) // 8), np.uint8)))
    return BitmapDumpTable(merged, bitmap, first_page)


def _count_bits(bitmap: np.ndarray, lo: int, hi: int) -> int:
    """Set bits of ``bitmap`` in ``[lo, hi)``; bits past its end count as clear."""
    hi = min(hi, len(bitmap) * 8)
    if hi <= lo:
        return 0
    b0, b1 = lo // 8, hi // 8
    if b0 == b1:
        return bin(int(bitmap[b0]) >> (lo % 8) & ((1 << (hi - lo)) - 1)).count("1")
    n = int(POPCOUNT[bitmap[b0 + 1 : b1]].sum(dtype=np.int64))
    n += bin(int(bitmap[b0]) >> (lo % 8)).count("1")
    if b1 < len(bitmap):
        n += bin(int(bitmap[b1]) & ((1 << (hi % 8)) - 1)).count("1")
    return n


def _first_bit(bitmap: np.ndarray, lo: int, hi: int) -> int:
    """The first set bit in ``[lo, hi)`` (one is known to be there)."""
    b0 = lo // 8
    chunk = np.unpackbits(bitmap[b0 : -(-min(hi, len(bitmap) * 8) // 8)], bitorder="little")
    return b0 * 8 + int(np.flatnonzero(chunk[lo % 8 :])[0]) + lo % 8
