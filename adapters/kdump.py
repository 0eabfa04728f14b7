"""kdump-compressed cores: makedumpfile's format, flattened or not.

What ``virsh dump --format kdump-*``, QEMU's ``dump-guest-memory -z|-l|-s``
(and ``-z`` in newer QEMU's ``kdump-raw-*`` formats) and makedumpfile write.
The layout (makedumpfile's diskdump_mod.h; little-endian on x86-64),
counted in blocks of ``block_size`` bytes (the page size):

* block 0: ``disk_dump_header``: ``KDUMP   ``, header_version, utsname,
  timestamp, then at byte 424 status, block_size, sub_hdr_size,
  bitmap_blocks, max_mapnr (32-bit; the sub-header's 64-bit one from
  version 6 on);
* block 1: ``kdump_sub_header`` (sub_hdr_size blocks; max_mapnr_64 at 96);
* two bitmaps of bitmap_blocks / 2 blocks each, one bit per page frame,
  least significant bit first: the first marks the frames that exist (the
  machine's ranges), the second the frames dumped; a frame that exists but
  was not dumped (makedumpfile's excluded zero, free or cache pages) reads
  as zero and costs no read;
* one 24-byte ``page_desc`` per dumped frame, in frame order: file offset,
  stored size, flags (0 raw, 0x1 zlib, 0x2 lzo, 0x4 snappy, 0x20 zstd),
  page flags. QEMU stores every zero page as one shared raw zero page; pages
  pointing at it cost no read either.

The flattened variant (makedumpfile -F, QEMU's default so it can write to a
pipe) starts with a 4 KiB ``makedumpfile`` header, then records of a
big-endian (offset, size) pair and the bytes to place at that offset of the
virtual file, ended by offset -1. It is read in place through a record map
(three int64 per record) instead of being rewritten.

Nothing but the record map and one rank per 4096 frames is kept: page
descriptors are read from the file for the span being read. Everything is
validated at open (every descriptor inside the file, known flags, sizes of
at most one page, codecs installed); whether a compressed page inflates to
exactly one page is checked as it is read, which fails StartMachine with an
INVALID_ARGUMENT naming the page.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np

from pagefusion.adapters.base import PAGE_SIZE, MemoryRange
from pagefusion.adapters.helpers import MAX_PHYS_ADDRESS, MAX_TOTAL_BYTES
from pagefusion.adapters.paged import RAW, BitmapRank, Special, codec, fail, runs_of_bits

__all__ = ["FLAT_MAGIC", "KDUMP_MAGIC", "KdumpTable", "parse_kdump"]

KDUMP_MAGIC = b"KDUMP   "
FLAT_MAGIC = b"makedumpfile\0\0\0\0"
_FLAT_HEADER = 4096
_HEADER = 464
_SUB_HEADER = 104
DESC = np.dtype([("offset", "<i8"), ("size", "<u4"), ("flags", "<u4"), ("page_flags", "<u8")])
_CHECK_CHUNK = 1 << 20
_MAX_FRAMES = MAX_PHYS_ADDRESS // PAGE_SIZE


class _Plain:
    """The file itself is the dump."""

    flattened = False

    def __init__(self, data: memoryview) -> None:
        self.data = data
        self.size = len(data)

    def read(self, offset: int, length: int) -> memoryview | bytes:
        return self.data[offset : offset + length]

    def physical(self, offsets: np.ndarray, length: int) -> np.ndarray:
        return offsets


class _Flat:
    """A flattened dump: virtual file offsets mapped onto the records holding them."""

    flattened = True

    def __init__(self, data: memoryview, path: str) -> None:
        self.data = data
        size = len(data)
        starts: list[int] = []
        lengths: list[int] = []
        where: list[int] = []
        pos = _FLAT_HEADER
        while True:
            if pos + 16 > size:
                raise fail(path, f"truncated flattened kdump: no end marker (the record at "
                                 f"{pos:#x} is cut)")
            offset = int.from_bytes(data[pos : pos + 8], "big", signed=True)
            length = int.from_bytes(data[pos + 8 : pos + 16], "big", signed=True)
            if offset == -1:
                break
            pos += 16
            if offset < 0 or length < 0 or offset + length > MAX_TOTAL_BYTES:
                raise fail(path, f"flattened kdump record at {pos - 16:#x}: offset {offset} "
                                 f"size {length} is impossible")
            if pos + length > size:
                raise fail(path, f"flattened kdump record at {pos - 16:#x} claims {length} "
                                 f"bytes; the file ends {size - pos} bytes after its header")
            if length:
                starts.append(offset)
                lengths.append(length)
                where.append(pos)
            pos += length
        order = np.argsort(np.array(starts, dtype=np.int64), kind="stable")
        self.starts = np.array(starts, dtype=np.int64)[order]
        self.lengths = np.array(lengths, dtype=np.int64)[order]
        self.where = np.array(where, dtype=np.int64)[order]
        ends = self.starts + self.lengths
        if len(ends) > 1:
            bad = np.flatnonzero(self.starts[1:] < ends[:-1])
            if len(bad):
                k = int(bad[0])
                raise fail(path, f"flattened kdump records overlap: bytes {self.starts[k]:#x}+"
                                 f"{self.lengths[k]:#x} and {self.starts[k + 1]:#x}+"
                                 f"{self.lengths[k + 1]:#x}")
        self.size = int(ends.max()) if len(ends) else 0
        self._starts_list = self.starts.tolist()

    def read(self, offset: int, length: int) -> memoryview | bytes:
        k = bisect.bisect_right(self._starts_list, offset) - 1
        if k >= 0 and offset + length <= self.starts[k] + self.lengths[k]:
            at = int(self.where[k] + offset - self.starts[k])
            return self.data[at : at + length]
        # Spans several records, or bytes no record wrote (those read as zero,
        # as in the file makedumpfile -R would write).
        out = bytearray(length)
        k = max(k, 0)
        end = offset + length
        while k < len(self._starts_list) and self._starts_list[k] < end:
            lo = max(offset, int(self.starts[k]))
            hi = min(end, int(self.starts[k] + self.lengths[k]))
            if lo < hi:
                at = int(self.where[k] + lo - self.starts[k])
                out[lo - offset : hi - offset] = self.data[at : at + hi - lo]
            k += 1
        return bytes(out)

    def physical(self, offsets: np.ndarray, length: int) -> np.ndarray:
        """File offsets of ``length``-byte extents, -1 where one spans records."""
        k = np.searchsorted(self.starts, offsets, side="right") - 1
        k = np.maximum(k, 0)
        inside = (k >= 0) & (offsets >= self.starts[k]) & (
            offsets + length <= self.starts[k] + self.lengths[k]
        )
        return np.where(inside, self.where[k] + offsets - self.starts[k], -1)


class KdumpTable:
    """Bitmaps and descriptors of one kdump-compressed core."""

    def __init__(self, vf: _Plain | _Flat, ranges: Sequence[MemoryRange], dumped: BitmapRank,
                 desc_offset: int, zero_offset: int) -> None:
        self.ranges = tuple(ranges)
        self.flattened = vf.flattened
        self._vf = vf
        self._dumped = dumped
        self._desc_offset = desc_offset
        self._zero_offset = zero_offset

    def locate(self, index: int, first: int, count: int) -> tuple[np.ndarray, list[Special]]:
        lo = self.ranges[index].address // PAGE_SIZE + first
        offsets = np.full(count, -1, dtype=np.int64)
        present, rank = self._dumped.stored(lo, count)
        if len(present) == 0:
            return offsets, []
        raw = self._vf.read(self._desc_offset + rank * DESC.itemsize, len(present) * DESC.itemsize)
        desc = np.frombuffer(raw, dtype=DESC)
        stored = desc["offset"]
        plain = (desc["flags"] == 0) & (stored != self._zero_offset)
        phys = self._vf.physical(stored[plain], PAGE_SIZE)
        offsets[present[plain]] = phys
        specials = []
        for k in np.flatnonzero(plain)[phys < 0].tolist():
            specials.append(Special(int(present[k]), RAW, self._vf.read(int(stored[k]), PAGE_SIZE)))
        for k in np.flatnonzero(desc["flags"] != 0).tolist():
            data = self._vf.read(int(stored[k]), int(desc["size"][k]))
            specials.append(Special(int(present[k]), int(desc["flags"][k]), data))
        return offsets, specials


def _u32(b: bytes, at: int) -> int:
    return int.from_bytes(b[at : at + 4], "little")


def _u64(b: bytes, at: int) -> int:
    return int.from_bytes(b[at : at + 8], "little")


def parse_kdump(data: memoryview, path: str) -> KdumpTable:
    """Validate a kdump-compressed core (flattened or not) and index it.

    Raises:
        InvalidSourceError: naming what is wrong.
    """
    vf: _Plain | _Flat
    if bytes(data[:16]) == FLAT_MAGIC:
        if len(data) < _FLAT_HEADER:
            raise fail(path, f"truncated flattened kdump header ({len(data)} of 4096 bytes)")
        kind, version = (int.from_bytes(data[at : at + 8], "big") for at in (16, 24))
        if kind != 1 or version != 1:
            raise fail(path, f"flattened kdump header type {kind} version {version} "
                             "(expected 1 and 1)")
        vf = _Flat(data, path)
    else:
        vf = _Plain(data)
    head = bytes(vf.read(0, _HEADER))
    if len(head) < _HEADER or head[:8] != KDUMP_MAGIC:
        shown = "truncated" if head[:8] == KDUMP_MAGIC else "missing"
        raise fail(path, f"kdump header {shown} ({len(head)} of {_HEADER} bytes)")
    version = _u32(head, 8)
    if version > 0xFFFF:
        raise fail(path, "a big-endian kdump (s390x, ppc64): only little-endian ones are read")
    block = _u32(head, 428)
    sub_blocks, bitmap_blocks, mapnr32 = _u32(head, 432), _u32(head, 436), _u32(head, 440)
    if block != PAGE_SIZE:
        raise fail(path, f"kdump block size {block}: only {PAGE_SIZE}-byte pages are read")
    sub = bytes(vf.read(block, _SUB_HEADER))
    if len(sub) < _SUB_HEADER:
        raise fail(path, "truncated kdump sub-header")
    frames = _u64(sub, 96) if version >= 6 else mapnr32
    if frames == 0 or frames > _MAX_FRAMES:
        raise fail(path, f"kdump header claims {frames} page frames (max_mapnr): impossible")
    if bitmap_blocks == 0 or bitmap_blocks % 2:
        raise fail(path, f"kdump bitmap of {bitmap_blocks} blocks: must be two equal halves")
    half = bitmap_blocks // 2 * block
    if half * 8 < frames:
        raise fail(path, f"kdump bitmaps of {half} bytes each cannot cover {frames} frames")
    bitmap_at = block * (1 + sub_blocks)
    desc_at = bitmap_at + 2 * half
    if desc_at > vf.size or 2 * half > len(data):
        raise fail(path, f"truncated kdump: bitmaps end at {desc_at:#x}, the dump at "
                         f"{vf.size:#x}")
    used = (frames + 7) // 8
    exists = np.frombuffer(bytes(vf.read(bitmap_at, used)), dtype=np.uint8).copy()
    dumped = np.frombuffer(bytes(vf.read(bitmap_at + half, used)), dtype=np.uint8).copy()
    for name, bitmap, at in (("memory", exists, bitmap_at), ("dump", dumped, bitmap_at + half)):
        if len(bitmap) < used:
            raise fail(path, f"truncated kdump {name} bitmap")
        if frames % 8 and bitmap[-1] >> (frames % 8):
            raise fail(path, f"kdump {name} bitmap marks frames past max_mapnr ({frames})")
        # The rest of each half must be clear; read it in chunks, never whole.
        for lo in range(at + used, at + half, _CHECK_CHUNK * 16):
            chunk = vf.read(lo, min(_CHECK_CHUNK * 16, at + half - lo))
            if np.frombuffer(chunk, dtype=np.uint8).any():
                raise fail(path, f"kdump {name} bitmap marks frames past max_mapnr ({frames})")
    orphans = np.flatnonzero(dumped & ~exists)
    if len(orphans):
        b = int(orphans[0])
        pfn = b * 8 + int(np.flatnonzero(np.unpackbits(dumped[b : b + 1] & ~exists[b : b + 1],
                                                       bitorder="little"))[0])
        raise fail(path, f"kdump dump bitmap marks frame {pfn:#x}, which the memory bitmap "
                         "says does not exist")
    bits = np.unpackbits(exists, bitorder="little")[:frames]
    ranges = [MemoryRange(a * PAGE_SIZE, n * PAGE_SIZE) for a, n in runs_of_bits(bits)]
    del bits
    if not ranges:
        raise fail(path, "kdump memory bitmap is empty (no guest memory)")
    if sum(r.size for r in ranges) > MAX_TOTAL_BYTES:
        raise fail(path, "kdump memory bitmap marks more than 1 TiB of guest memory")
    rank = BitmapRank(dumped)
    total = rank.total
    desc_end = desc_at + total * DESC.itemsize
    if desc_end > vf.size or total * DESC.itemsize > len(data):
        raise fail(path, f"truncated kdump: {total} page descriptors need bytes up to "
                         f"{desc_end:#x}, the dump ends at {vf.size:#x}")
    zero_offset = _check_descriptors(vf, desc_at, total, path)
    return KdumpTable(vf, ranges, rank, desc_at, zero_offset)


def _check_descriptors(vf: _Plain | _Flat, desc_at: int, total: int, path: str) -> int:
    """Check every descriptor; return the offset of QEMU's shared zero page (or -2)."""
    lowest = -1
    for first in range(0, total, _CHECK_CHUNK):
        n = min(_CHECK_CHUNK, total - first)
        desc = np.frombuffer(bytes(vf.read(desc_at + first * DESC.itemsize, n * DESC.itemsize)),
                             dtype=DESC)
        off, size, flags = desc["offset"], desc["size"].astype(np.int64), desc["flags"]
        bad = np.flatnonzero((off < 0) | (off + size > vf.size))
        if len(bad):
            k = int(bad[0])
            raise fail(path, f"kdump page descriptor {first + k}: data at {int(off[k]):#x}+"
                             f"{int(size[k])} lies outside the dump ({vf.size:#x} bytes)")
        bad = np.flatnonzero(((flags == 0) & (size != PAGE_SIZE))
                             | (size == 0) | (size > PAGE_SIZE))
        if len(bad):
            k = int(bad[0])
            raise fail(path, f"kdump page descriptor {first + k}: stored size {int(size[k])} "
                             f"with flags {int(flags[k]):#x} (a page is {PAGE_SIZE} bytes)")
        for flag in np.unique(flags[flags != 0]).tolist():
            k = int(np.flatnonzero(flags == flag)[0])
            codec(int(flag), path, f"kdump page descriptor {first + k}")
        raw = off[flags == 0]
        if len(raw):
            low = int(raw.min())
            lowest = low if lowest < 0 else min(lowest, low)
    if lowest >= 0 and not any(bytes(vf.read(lowest, PAGE_SIZE))):
        return lowest
    return -2
