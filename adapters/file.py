"""The ``file`` adapter: memory snapshots in the formats users hold.

The format is told from the content:

* Raw images (VMware .vmem, ``dd`` of a memory device, QEMU's ``pmemsave``,
  LiME's ``raw`` and ``padded`` formats): one range from address 0. A tail
  that is not a whole page reads back zero padded. Anything without a known
  signature is raw, except files that start with the signature of a format
  not read here (Windows hibernation files, VMware suspend state,
  gzip/xz/zstd/bzip2), which are refused by name.
* ELF64 core files as ``virsh dump --memory-only``, QEMU's
  ``dump-guest-memory`` and VirtualBox's ``debugvm dumpvmcore`` write them:
  each PT_LOAD segment is guest-physical memory at ``p_paddr``. QEMU puts the
  segment data right after the notes, so file offsets are rarely page
  aligned; segments may be ragged, leave holes, or sit high (firmware just
  below 4 GiB); ``p_memsz`` beyond ``p_filesz`` reads as zeros. VirtualBox
  writes MMIO ranges as PT_LOAD segments with no file data; those are device
  memory, not RAM, and stay unmapped.
* LiME dumps (:mod:`.lime`) and Windows full crash dumps
  (:mod:`.windows_dump`): runs of raw pages at known offsets, read like
  ELF segments.
* QEMU migration streams and libvirt save images (:mod:`.qemu_stream`),
  kdump-compressed cores (:mod:`.kdump`) and Windows bitmap dumps: pages
  indexed one by one, read through :class:`.paged.PagedFileMemory`.

The file is mapped read-only and reads return memoryviews of the mapping
wherever the bytes lie contiguously; only pages a segment covers partly (a
ragged edge, two segments sharing a page) are assembled in a buffer.
Everything is validated at open, so a bad file fails ``StartMachine`` with a
precise INVALID_ARGUMENT instead of failing halfway through ingest.
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import IO, cast

from elftools.elf.elffile import ELFFile

from pagefusion.adapters.base import (
    PAGE_SIZE,
    Adapter,
    AdapterContext,
    GuestMemory,
    InvalidOptionError,
    InvalidSourceError,
    MemoryRange,
)
from pagefusion.adapters.helpers import (
    MAX_PHYS_ADDRESS,
    MAX_TOTAL_BYTES,
    open_allowed,
    page_round_up,
    parse_size,
)
from pagefusion.adapters.kdump import FLAT_MAGIC, KDUMP_MAGIC, parse_kdump
from pagefusion.adapters.lime import LIME_MAGIC, parse_lime
from pagefusion.adapters.paged import MappedSnapshot, PagedFileMemory, PageTable
from pagefusion.adapters.qemu_stream import (
    LIBVIRT_MAGIC,
    LIBVIRT_PARTIAL,
    QEVM_MAGIC,
    parse_stream,
)
from pagefusion.adapters.windows_dump import parse_windows_dump

__all__ = ["FileAdapter", "FileGuestMemory", "Segment", "open_snapshot", "parse_core"]

ELF_MAGIC = b"\x7fELF"
PT_LOAD = 1
PN_XNUM = 0xFFFF
_ELF64_EHDR = 64
_ELF64_PHDR = 56
_ELF64_SHDR = 64


@dataclass(frozen=True, slots=True)
class Segment:
    """File bytes placed in guest-physical memory: ``filesz`` bytes at file
    ``offset`` land at ``paddr``; up to ``memsz`` the rest reads as zeros."""

    paddr: int
    offset: int
    filesz: int
    memsz: int

    @property
    def end(self) -> int:
        return self.paddr + self.memsz


# Files users hold that are memory dumps but not raw images: refuse them by
# name rather than fuse their headers and compressed pages as guest memory.
_NOT_RAW = (
    (b"hibr", "a Windows hibernation file"),
    (b"HIBR", "a Windows hibernation file"),
    (b"wake", "a Windows hibernation file"),
    (b"\xd2\xbe\xd2\xbe", "a VMware suspend state (.vmss/.vmsn)"),
    (b"\xd0\xbe\xd2\xbe", "a VMware suspend state (.vmss/.vmsn)"),
    (b"\xd1\xba\xd1\xba", "a VMware suspend state (.vmss/.vmsn)"),
    (b"\xd3\xbe\xd3\xbe", "a VMware suspend state (.vmss/.vmsn)"),
    (b"\x1f\x8b", "gzip-compressed; decompress it first"),
    (b"\xfd7zXZ\x00", "xz-compressed; decompress it first"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed; decompress it first"),
    (b"BZh", "bzip2-compressed; decompress it first"),
)


def _fail(path: str, message: str) -> InvalidSourceError:
    return InvalidSourceError(f"{path}: {message}", option="path")


def parse_core(data: mmap.mmap | bytes, path: str = "core") -> list[Segment]:
    """Validate an ELF64 core and return its PT_LOAD segments, sorted by address.

    Raises:
        InvalidSourceError: with a message naming what is wrong and where.
    """
    size = len(data)
    ident = bytes(data[:16])
    if len(ident) < 16 or size < 52:
        raise _fail(path, f"truncated ELF header ({size} bytes)")
    if ident[4] == 1:
        raise _fail(path, "ELF32 file: guest memory cores are ELF64 (ELFCLASS64)")
    if ident[4] != 2:
        raise _fail(path, f"invalid ELF class {ident[4]} (expected 2, ELFCLASS64)")
    if ident[5] not in (1, 2):
        raise _fail(path, f"invalid ELF data encoding {ident[5]}")
    if size < _ELF64_EHDR:
        raise _fail(path, f"truncated ELF header ({size} of {_ELF64_EHDR} bytes)")
    try:
        elf = ELFFile(cast(IO[bytes], _Stream(data)))
        header = elf.header
        if header["e_type"] != "ET_CORE":
            raise _fail(path, f"not a core file: e_type is {header['e_type']}, expected ET_CORE")
        if header["e_phentsize"] != _ELF64_PHDR:
            raise _fail(path, f"program header entry size {header['e_phentsize']}, expected 56")
        phoff = header["e_phoff"]
        phnum = header["e_phnum"]
        if phnum == PN_XNUM:  # QEMU with >= 65535 segments: real count in section 0
            shoff = header["e_shoff"]
            if shoff == 0 or shoff + _ELF64_SHDR > size:
                raise _fail(path, "e_phnum is PN_XNUM but section header 0 is missing or truncated")
        phnum = elf.num_segments()
        if phnum == 0:
            raise _fail(path, "ELF core has no program headers")
        if phoff + phnum * _ELF64_PHDR > size:
            raise _fail(
                path,
                f"truncated program header table: {phnum} entries at offset {phoff:#x} "
                f"need {phoff + phnum * _ELF64_PHDR} bytes, file has {size}",
            )
        raw = [elf.get_segment(i).header for i in range(phnum)]
    except InvalidSourceError:
        raise
    except Exception as exc:  # pyelftools: ELFError, construct errors, struct.error
        raise _fail(path, f"malformed ELF header: {exc}") from None

    segments: list[tuple[int, Segment]] = []
    total = 0
    for i, ph in enumerate(raw):
        if ph["p_type"] != "PT_LOAD":
            continue
        paddr, offset, filesz, memsz = ph["p_paddr"], ph["p_offset"], ph["p_filesz"], ph["p_memsz"]
        where = f"PT_LOAD segment {i} (p_paddr {paddr:#x})"
        if filesz > memsz:
            raise _fail(path, f"{where}: p_filesz {filesz:#x} exceeds p_memsz {memsz:#x}")
        if offset + filesz > size:
            raise _fail(
                path,
                f"{where} extends past the end of the file: data at {offset:#x}+{filesz:#x} "
                f"ends at {offset + filesz:#x}, file size {size:#x}",
            )
        if memsz == 0:
            continue
        if memsz > MAX_TOTAL_BYTES or paddr + memsz > MAX_PHYS_ADDRESS:
            raise _fail(
                path,
                f"{where}: absurd size or address (p_memsz {memsz:#x}, end {paddr + memsz:#x})",
            )
        if filesz == 0:
            # VirtualBox writes MMIO ranges as PT_LOAD without file data: device
            # memory, not RAM, so it stays unmapped.
            continue
        total += memsz
        if total > MAX_TOTAL_BYTES:
            raise _fail(path, "PT_LOAD segments add up to more than 1 TiB of guest memory")
        segments.append((i, Segment(paddr, offset, filesz, memsz)))
    if not segments:
        raise _fail(path, "ELF core has no PT_LOAD segments (no guest memory)")
    segments.sort(key=lambda s: s[1].paddr)
    for (ia, a), (ib, b) in itertools.pairwise(segments):
        if b.paddr < a.end:
            process_core = a.paddr == b.paddr == 0
            hint = " (a process core, not a guest-physical dump?)" if process_core else ""
            raise _fail(
                path,
                f"PT_LOAD segments {ia} ({a.paddr:#x}-{a.end:#x}) and {ib} "
                f"({b.paddr:#x}-{b.end:#x}) overlap in guest-physical memory{hint}",
            )
    return [s for _, s in segments]


class _Stream:
    """A read-only file-like view of a mapping for pyelftools (mmap's own
    ``read`` moves a shared position and may return short reads silently)."""

    def __init__(self, data: mmap.mmap | bytes) -> None:
        self._data = data
        self._pos = 0

    def seek(self, pos: int, whence: int = 0) -> int:
        base = (0, self._pos, len(self._data))[whence]
        self._pos = base + pos
        return self._pos

    def tell(self) -> int:
        return self._pos

    def read(self, n: int = -1) -> bytes:
        end = len(self._data) if n < 0 else self._pos + n
        chunk = bytes(self._data[self._pos : end])
        self._pos += len(chunk)
        return chunk


def _group(segments: Sequence[Segment]) -> list[tuple[MemoryRange, tuple[Segment, ...]]]:
    """Page-round segments into ranges; segments sharing a page share a range."""
    groups: list[tuple[int, int, list[Segment]]] = []
    for seg in segments:
        start = seg.paddr - seg.paddr % PAGE_SIZE
        end = page_round_up(seg.end)
        if groups and start < groups[-1][1]:
            groups[-1] = (groups[-1][0], max(end, groups[-1][1]), [*groups[-1][2], seg])
        else:
            groups.append((start, end, [seg]))
    return [(MemoryRange(start, end - start), tuple(segs)) for start, end, segs in groups]


class FileGuestMemory(MappedSnapshot):
    """A snapshot file mapped read-only whose memory lies in contiguous segments."""

    def __init__(
        self, fd: int, path: str, mapping: mmap.mmap, segments: Sequence[Segment], fmt: str
    ) -> None:
        grouped = _group(sorted(segments, key=lambda seg: seg.paddr))
        super().__init__(fd, path, mapping, memoryview(mapping), [r for r, _ in grouped], fmt)
        self._segments = [segs for _, segs in grouped]

    def read(self, address: int, length: int) -> memoryview | bytes:
        i = self._range_of(address, length)
        end = address + length
        segs = self._segments[i]
        if len(segs) == 1:
            seg = segs[0]
            if seg.paddr <= address and end <= seg.paddr + seg.filesz:
                start = seg.offset + address - seg.paddr
                return self._view[start : start + length]
        out = bytearray(length)
        for seg in segs:
            lo = max(address, seg.paddr)
            hi = min(end, seg.paddr + seg.filesz)
            if lo < hi:
                src = seg.offset + lo - seg.paddr
                out[lo - address : hi - address] = self._view[src : src + hi - lo]
        return memoryview(out)


def _below_4g(options: Mapping[str, str]) -> int | None:
    if not options.get("below_4g", "").strip():
        return None
    value = parse_size(options, "below_4g")
    if value < 0 or value % PAGE_SIZE or value > 1 << 32:
        raise InvalidOptionError(
            "option 'below_4g' must be a multiple of 4096 of at most 4 GiB", option="below_4g"
        )
    return value


def open_snapshot(fd: int, path: str, below_4g: int | None = None) -> GuestMemory:
    """Map a snapshot file, detect its format, validate it and open it.

    Args:
        fd: an open descriptor of the file; owned by the result on success.
        path: the name used in messages.
        below_4g: QEMU streams only: bytes of the main RAM block below 4 GiB
            (default: from the machine type the stream records).

    Raises:
        InvalidSourceError: an empty, truncated, hostile or unsupported file.
        InvalidOptionError: ``below_4g`` given for a file that is not a QEMU stream.
    """
    size = os.fstat(fd).st_size
    if size == 0:
        raise _fail(path, "empty file")
    mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
    view = memoryview(mapping)
    try:
        head = bytes(view[:16])
        if head.startswith((QEVM_MAGIC, LIBVIRT_MAGIC, LIBVIRT_PARTIAL)):
            table: PageTable = parse_stream(view, path, below_4g)
            return _paged(fd, path, mapping, view, table, "qemu-stream")
        if below_4g is not None:
            raise InvalidOptionError(
                "option 'below_4g' applies to QEMU migration streams only", option="below_4g"
            )
        if head.startswith((KDUMP_MAGIC, FLAT_MAGIC)):
            kdump = parse_kdump(view, path)
            fmt = "kdump-flattened" if kdump.flattened else "kdump"
            return _paged(fd, path, mapping, view, kdump, fmt)
        if head.startswith((b"PAGEDU64", b"PAGEDUMP")):
            fmt, found = parse_windows_dump(view, path)
            if isinstance(found, list):
                segments = [Segment(r.base * PAGE_SIZE, r.offset, r.count * PAGE_SIZE,
                                    r.count * PAGE_SIZE) for r in found]
                return _extents(fd, path, mapping, view, segments, fmt)
            return _paged(fd, path, mapping, view, found, fmt)
        if head.startswith(LIME_MAGIC):
            segments = [Segment(a, o, n, n) for a, o, n in parse_lime(view, path)]
            return _extents(fd, path, mapping, view, segments, "lime")
        if head.startswith(ELF_MAGIC):
            return _extents(fd, path, mapping, view, parse_core(mapping, path), "elf")
        for magic, what in _NOT_RAW:
            if head.startswith(magic):
                raise _fail(path, f"not a memory image pagefusion reads: {what}")
        if size > MAX_TOTAL_BYTES:
            raise _fail(path, "raw image larger than 1 TiB")
        return _extents(fd, path, mapping, view, [Segment(0, 0, size, size)], "raw")
    except BaseException:
        # A parser's arrays may still export the view (the traceback holds
        # them): the mapping then goes when they do.
        with contextlib.suppress(BufferError):
            view.release()
            mapping.close()
        raise


def _paged(fd: int, path: str, mapping: mmap.mmap, view: memoryview, table: PageTable,
           fmt: str) -> GuestMemory:
    return PagedFileMemory(fd, path, mapping, view, table, fmt)


def _extents(fd: int, path: str, mapping: mmap.mmap, view: memoryview,
             segments: Sequence[Segment], fmt: str) -> GuestMemory:
    view.release()
    return FileGuestMemory(fd, path, mapping, segments, fmt)


class FileAdapter(Adapter):
    """Memory snapshots under the server's --allow-path roots, format detected."""

    name = "file"
    options = {
        "path": "absolute path of a memory snapshot: raw image, ELF64 core, QEMU migration "
                "stream or libvirt save image, kdump-compressed core, Windows crash dump, LiME",
        "below_4g": "QEMU migration streams only: bytes of RAM below 4 GiB "
                    "(default: from the machine type)",
    }

    def check_options(self, options: Mapping[str, str]) -> None:
        path = options.get("path", "")
        if not path:
            raise InvalidOptionError("option 'path' is required", option="path")
        if not os.path.isabs(path) or "\x00" in path:
            raise InvalidOptionError(
                "option 'path' must be an absolute path on the server", option="path"
            )
        _below_4g(options)

    def open(self, options: Mapping[str, str], context: AdapterContext) -> GuestMemory:
        self.check_options(options)
        below_4g = _below_4g(options)
        path = options["path"]
        fd = open_allowed(path, context.allowed_paths, "path")
        try:
            return open_snapshot(fd, path, below_4g)
        except BaseException:
            os.close(fd)
            raise
