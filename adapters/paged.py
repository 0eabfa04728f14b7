"""Snapshot files whose pages are indexed one by one.

QEMU migration streams, kdump-compressed cores and Windows bitmap dumps do
not store guest memory as a few contiguous runs: pages come with headers,
compressed, deduplicated or left out. Their parsers validate the whole file
at open and build a :class:`PageTable`: for any span of a range it says,
page by page, where the bytes are. :class:`PagedFileMemory` turns that into
reads:

* a page stored raw is copied from the read-only mapping; runs of raw pages
  at a constant stride (QEMU puts an 8-byte header between pages, a bitmap
  dump none) are copied by one strided numpy assignment, and a span that is
  one contiguous run is returned as a view of the mapping, without a copy;
* a page the format marks zero, excluded or never written costs no read: it
  is a memset of the reused output buffer;
* compressed pages (kdump's zlib, lzo, snappy, zstd) are inflated one by one
  and must give exactly one page; anything else fails the read with an
  INVALID_ARGUMENT naming the page, so a machine never starts with it.

The optional codecs come from PyPI (``pip install 'pagefusion[formats]'``);
a file that needs one that is not installed is refused at open, naming the
package.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import mmap
import os
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from numpy.lib.stride_tricks import as_strided

from pagefusion.adapters.base import (
    PAGE_SIZE,
    GuestMemory,
    InvalidSourceError,
    MemoryRange,
    SourceError,
)
from pagefusion.adapters.helpers import RangeLookup

__all__ = [
    "CODECS",
    "FILL",
    "RAW",
    "BitmapRank",
    "Codec",
    "PageTable",
    "PagedFileMemory",
    "Special",
    "codec",
    "fail",
    "runs_of_bits",
]

#: A special page whose payload is raw bytes (a page split across records).
RAW = 0
#: A special page filled with one byte (QEMU's zero-page flag with a fill byte).
FILL = -1

#: Byte counts of set bits, for ranks over bitmaps.
POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def fail(path: str, message: str) -> InvalidSourceError:
    """The error every snapshot parser raises: the file named, option ``path``."""
    return InvalidSourceError(f"{path}: {message}", option="path")


@dataclass(frozen=True, slots=True)
class Special:
    """A page that is not a plain raw page of the mapping.

    Attributes:
        index: the page's index within the span being read.
        codec: a :data:`CODECS` number, :data:`RAW` or :data:`FILL`.
        payload: the stored bytes (compressed or raw), or for FILL the byte.
    """

    index: int
    codec: int
    payload: Any


class PageTable(Protocol):
    """What a page-indexed parser hands to :class:`PagedFileMemory`."""

    #: The guest-physical ranges, sorted and disjoint.
    ranges: tuple[MemoryRange, ...]

    def locate(self, index: int, first: int, count: int) -> tuple[np.ndarray, list[Special]]:
        """Where pages ``first .. first + count`` of range ``index`` are.

        Returns:
            An int64 array of ``count`` file offsets of raw pages in the
            mapping, -1 for pages that read as zero or are in the list of
            specials; and the specials.
        """
        ...


@dataclass(frozen=True, slots=True)
class Codec:
    """A page compression a format may use."""

    name: str
    #: PyPI distribution that provides it (empty: the standard library).
    package: str
    #: Inflates one stored page; raises ValueError unless it is one page.
    inflate: Callable[[Any], bytes]


def _inflate_zlib(payload: Any) -> bytes:
    d = zlib.decompressobj()
    try:
        out = d.decompress(payload, PAGE_SIZE)
    except zlib.error as exc:
        raise ValueError(f"corrupt zlib data ({exc})") from None
    if not d.eof:
        try:
            more = d.decompress(d.unconsumed_tail, 1)
        except zlib.error as exc:
            raise ValueError(f"corrupt zlib data ({exc})") from None
        if more:
            raise ValueError("zlib data inflates to more than one page")
        if not d.eof:
            raise ValueError("zlib data ends before its stream does")
    return out


def _inflate_lzo(payload: Any) -> bytes:
    lzallright = importlib.import_module("lzallright")
    try:
        return bytes(lzallright.LZOCompressor.decompress(bytes(payload), PAGE_SIZE))
    except Exception as exc:
        raise ValueError(f"corrupt lzo data ({exc})") from None


def _inflate_snappy(payload: Any) -> bytes:
    cramjam = importlib.import_module("cramjam")
    # The raw format starts with the inflated length as a varint: check it
    # before inflating, so a lying page cannot make a large allocation.
    length, shift = 0, 0
    for i in range(min(len(payload), 10)):
        byte = payload[i]
        length |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            break
    if length != PAGE_SIZE:
        raise ValueError(f"snappy data claims {length} bytes, not one page")
    try:
        return bytes(cramjam.snappy.decompress_raw(bytes(payload)))
    except Exception as exc:
        raise ValueError(f"corrupt snappy data ({exc})") from None


def _inflate_zstd(payload: Any) -> bytes:
    zstandard = importlib.import_module("zstandard")
    data = bytes(payload)
    try:
        size = zstandard.frame_content_size(data)
        if size not in (-1, PAGE_SIZE):
            raise ValueError(f"zstd frame claims {size} bytes, not one page")
        return bytes(zstandard.ZstdDecompressor().decompress(data, max_output_size=PAGE_SIZE))
    except zstandard.ZstdError as exc:
        raise ValueError(f"corrupt zstd data ({exc})") from None


#: makedumpfile's page descriptor flags (DUMP_DH_COMPRESSED_*) and their codecs.
CODECS: dict[int, Codec] = {
    0x01: Codec("zlib", "", _inflate_zlib),
    0x02: Codec("lzo", "lzallright", _inflate_lzo),
    0x04: Codec("snappy", "cramjam", _inflate_snappy),
    0x20: Codec("zstd", "zstandard", _inflate_zstd),
}


def codec(flag: int, path: str, where: str) -> Codec:
    """The codec of a descriptor flag, checked to be installed.

    Raises:
        InvalidSourceError: unknown flag, or its package is missing.
    """
    found = CODECS.get(flag)
    if found is None:
        raise fail(path, f"{where}: unknown compression flags {flag:#x}")
    if found.package and importlib.util.find_spec(found.package) is None:
        raise fail(
            path,
            f"{where}: pages are {found.name}-compressed and the Python package "
            f"{found.package!r} is not installed (pip install 'pagefusion[formats]')",
        )
    return found


#: Frames per entry of a :class:`BitmapRank`.
RANK_FRAMES = 4096


class BitmapRank:
    """A bitmap of stored frames (bit i = frame i, least significant first) and
    the number of set bits before every 4096 frames: a frame's rank is the
    index of its stored page among all stored pages, found in O(span)."""

    def __init__(self, bitmap: np.ndarray) -> None:
        per = RANK_FRAMES // 8
        padded = np.zeros(-(-len(bitmap) // per) * per, dtype=np.uint8)
        padded[: len(bitmap)] = bitmap
        sums = POPCOUNT[padded].reshape(-1, per).sum(axis=1, dtype=np.int64)
        self.bitmap = bitmap
        self.ranks = np.concatenate(([0], np.cumsum(sums)))

    @property
    def total(self) -> int:
        """Set bits in the whole bitmap."""
        return int(self.ranks[-1])

    def stored(self, lo: int, count: int) -> tuple[np.ndarray, int]:
        """Indices (from ``lo``) of the stored frames among ``lo .. lo + count``,
        and the rank of the first of them."""
        byte0 = lo // 8
        bits = np.unpackbits(self.bitmap[byte0 : (lo + count + 7) // 8], bitorder="little")
        present = np.flatnonzero(bits[lo % 8 : lo % 8 + count])
        if len(present) == 0:
            return present, 0
        block = lo // RANK_FRAMES
        rank = int(self.ranks[block])
        rank += int(POPCOUNT[self.bitmap[block * (RANK_FRAMES // 8) : byte0]].sum(dtype=np.int64))
        rank += int(bits[: lo % 8].sum())
        return present, rank


def runs_of_bits(bits: np.ndarray) -> list[tuple[int, int]]:
    """(first, count) of each run of set bits in a bool or 0/1 array."""
    padded = np.concatenate(([0], bits.astype(np.int8), [0]))
    edges = np.flatnonzero(np.diff(padded))
    return [(int(a), int(b - a)) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def copy_pages(src: np.ndarray, offsets: np.ndarray, out: np.ndarray) -> None:
    """Copy raw pages ``src[offsets[i]:+PAGE]`` into ``out[i]`` where offsets >= 0.

    Consecutive pages at one constant stride of at least a page are copied
    as one strided block; a page on the border of two blocks is copied twice
    (same bytes), which keeps the run detection free of Python loops.
    """
    idx = np.flatnonzero(offsets >= 0)
    if len(idx) == 0:
        return
    o = offsets[idx]
    covered = np.zeros(len(idx), dtype=bool)
    if len(idx) > 1:
        step = np.diff(o)
        linked = (np.diff(idx) == 1) & (step >= PAGE_SIZE)
        key = np.where(linked, step, -1 - np.arange(len(step)))
        change = np.flatnonzero(np.diff(key)) + 1
        starts = np.concatenate(([0], change))
        ends = np.concatenate((change, [len(key)]))
        for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
            if not linked[a]:
                continue
            count = b - a + 1
            block = as_strided(src[int(o[a]):], shape=(count, PAGE_SIZE),
                               strides=(int(step[a]), 1), writeable=False)
            out[idx[a] : idx[a] + count] = block
            covered[a : b + 1] = True
    for k in np.flatnonzero(~covered).tolist():
        start = int(o[k])
        out[idx[k]] = src[start : start + PAGE_SIZE]


class MappedSnapshot(GuestMemory):
    """A snapshot file mapped read-only: its descriptor, mapping and ranges.

    Owns what every file-backed reader shares: the checks each read makes
    first, and giving the mapping and the descriptor back on close.
    """

    live = False

    def __init__(
        self, fd: int, path: str, mapping: mmap.mmap, view: memoryview,
        ranges: Sequence[MemoryRange], fmt: str,
    ) -> None:
        """Take over ``fd``, ``mapping`` and ``view``."""
        self.path = path
        self.format = fmt
        self._fd = fd
        self._map = mapping
        self._size = len(mapping)
        self._view = view
        self._ranges = tuple(ranges)
        self._lookup = RangeLookup(self._ranges)
        self._closed = False

    def ranges(self) -> Sequence[MemoryRange]:
        return self._ranges

    def _range_of(self, address: int, length: int) -> int:
        """Index of the range a read falls in, after the checks every read makes."""
        if self._closed:
            raise SourceError(f"{self.path}: source is closed")
        i = self._lookup.find(address, length)
        # A file cut short under a mapping raises SIGBUS on access: look first.
        if os.fstat(self._fd).st_size < self._size:
            raise SourceError(f"{self.path}: the file shrank while in use")
        return i

    def _release(self) -> None:
        """Drop what a subclass holds on the mapping (called once, before it goes)."""

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._release()
        self._view.release()
        # A caller may still hold a view; the mapping then goes when it does.
        with contextlib.suppress(BufferError):
            self._map.close()
        os.close(self._fd)


class PagedFileMemory(MappedSnapshot):
    """A snapshot file read through a :class:`PageTable` over its mapping."""

    def __init__(
        self, fd: int, path: str, mapping: mmap.mmap, view: memoryview, table: PageTable,
        fmt: str,
    ) -> None:
        """Take over ``fd``, ``mapping`` and ``view`` (the one ``table`` reads through)."""
        super().__init__(fd, path, mapping, view, table.ranges, fmt)
        self._src = np.frombuffer(mapping, dtype=np.uint8)
        self._table = table
        self._scratch: np.ndarray | None = None

    def read(self, address: int, length: int) -> memoryview | bytes:
        i = self._range_of(address, length)
        count = length // PAGE_SIZE
        first = (address - self._ranges[i].address) // PAGE_SIZE
        offsets, specials = self._table.locate(i, first, count)
        start = int(offsets[0])
        if not specials and start >= 0 and (
            count == 1 or bool(np.all(np.diff(offsets) == PAGE_SIZE))
        ):
            return self._view[start : start + length]
        if self._scratch is None or len(self._scratch) < count:
            self._scratch = np.empty((count, PAGE_SIZE), dtype=np.uint8)
        out = self._scratch[:count]
        out[offsets < 0] = 0
        copy_pages(self._src, offsets, out)
        for sp in specials:
            out[sp.index] = self._special(sp, address)
        return memoryview(out.reshape(-1))  # type: ignore[arg-type]

    def _special(self, sp: Special, address: int) -> np.ndarray | int:
        if sp.codec == FILL:
            return int(sp.payload)
        if sp.codec == RAW:
            return np.frombuffer(sp.payload, dtype=np.uint8)
        where = f"page at {address + sp.index * PAGE_SIZE:#x}"
        try:
            page = CODECS[sp.codec].inflate(sp.payload)
        except ValueError as exc:
            raise fail(self.path, f"{where}: {exc}") from None
        if len(page) != PAGE_SIZE:
            raise fail(
                self.path,
                f"{where}: {CODECS[sp.codec].name} data inflates to {len(page)} bytes, "
                f"not one {PAGE_SIZE}-byte page",
            )
        return np.frombuffer(page, dtype=np.uint8)

    def idle(self) -> None:
        self._scratch = None

    def _release(self) -> None:
        self._scratch = None
        self._table = None  # type: ignore[assignment]
        del self._src
