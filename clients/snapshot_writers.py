"""Writers of the memory snapshot formats the ``file`` adapter reads.

For tests and benchmarks, users' as well as ours (re-exported from
``pagefusion.testing``): each writes a file in a format's published layout
from guest memory you hold (any :class:`~pagefusion.adapters.base.GuestMemory`,
for example a ``synthetic-windows`` guest, whose savings are known exactly).
They are written from the layouts, not by the real tools: Windows'
crash dump writer and LiME cannot run here. Real QEMU produces migration
streams and flattened zlib kdump files; these writers add what QEMU here
cannot (lzo, snappy, zstd and excluded pages, as makedumpfile writes them),
streams with re-sent and fill pages, and libvirt's save header. Keyword
arguments produce the hostile variants a parser must refuse.

* :func:`write_lime`: LiME's ``lime`` format.
* :func:`write_windows_dump`: ``PAGEDU64`` full or bitmap dumps,
  ``PAGEDUMP`` (PAE) full dumps.
* :func:`write_kdump`: makedumpfile's kdump-compressed format, flattened or
  not, zlib/lzo/snappy/zstd or raw pages, zero pages excluded or shared.
* :func:`unflatten_kdump`: what ``makedumpfile -R`` does to a flattened file.
* :func:`write_qemu_stream`: a QEMU (QEVM v3) migration stream.
* :func:`write_libvirt_save`: libvirt's ``virsh save`` header before a stream.
"""

from __future__ import annotations

import importlib
import json
import os
import struct
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Protocol

import numpy as np

__all__ = [
    "MemoryLike",
    "unflatten_kdump",
    "write_kdump",
    "write_libvirt_save",
    "write_lime",
    "write_qemu_stream",
    "write_windows_dump",
]

PAGE = 4096
_CHUNK = 16 << 20


class MemoryLike(Protocol):
    """What the writers read: a GuestMemory's ``ranges`` and ``read``."""

    def ranges(self) -> Sequence[object]: ...

    def read(self, address: int, length: int) -> memoryview | bytes: ...


def _ranges(memory: MemoryLike) -> list[tuple[int, int]]:
    return [(int(r.address), int(r.size)) for r in memory.ranges()]  # type: ignore[attr-defined]


def _pages(memory: MemoryLike, address: int, size: int) -> Iterator[tuple[int, bytes]]:
    """(address, bytes) of each page of one range, read in large chunks."""
    for at in range(address, address + size, _CHUNK):
        n = min(_CHUNK, address + size - at)
        data = bytes(memory.read(at, n))
        for k in range(0, n, PAGE):
            yield at + k, data[k : k + PAGE]


def _zero(page: bytes) -> bool:
    return not any(page)


# ---------------------------------------------------------------- LiME


def write_lime(
    path: str | os.PathLike[str],
    memory: MemoryLike | None = None,
    *,
    ranges: Sequence[tuple[int, bytes]] = (),
    end_inclusive: bool = True,
) -> Path:
    """Write a LiME dump (``format=lime``): one 32-byte header per range.

    Args:
        memory: guest memory whose ranges become LiME ranges.
        ranges: extra (address, bytes) ranges, written after ``memory``'s;
            any length (LiME's ranges follow /proc/iomem and may be ragged).
        end_inclusive: False writes e_addr one past the end (a lying header).
    """
    out = Path(path)
    with open(out, "wb") as f:
        def record(address: int, length: int) -> None:
            last = address + length - (1 if end_inclusive else 0)
            f.write(struct.pack("<4sIQQ8x", b"EMiL", 1, address, last))

        if memory is not None:
            for address, size in _ranges(memory):
                record(address, size)
                for at in range(address, address + size, _CHUNK):
                    f.write(bytes(memory.read(at, min(_CHUNK, address + size - at))))
        for address, data in ranges:
            record(address, len(data))
            f.write(data)
    return out


# ---------------------------------------------------------------- Windows


def _page_fill(size: int) -> bytearray:
    # Windows initialises the header to the "PAGE" signature before filling it.
    return bytearray(b"PAGE" * (size // 4))


def write_windows_dump(
    path: str | os.PathLike[str],
    memory: MemoryLike,
    *,
    kind: str = "full64",
    number_of_pages: int | None = None,
    present_pages: int | None = None,
    runs: Sequence[tuple[int, int]] | None = None,
) -> Path:
    """Write a Windows crash dump of ``memory`` from the DUMP_HEADER layouts.

    Args:
        kind: ``full64`` (PAGEDU64, DumpType 1, pages by run), ``bitmap64``
            (PAGEDU64, DumpType 5, an FDMP bitmap leaving zero pages out) or
            ``full32`` (PAGEDUMP with PaeEnabled, DumpType 1).
        number_of_pages: overrides NumberOfPages (a lying header).
        present_pages: overrides the bitmap's TotalPresentPages.
        runs: overrides the (BasePage, PageCount) runs in the header.
    """
    spans = _ranges(memory)
    header_runs = list(runs) if runs is not None else [(a // PAGE, n // PAGE) for a, n in spans]
    total = sum(n for _, n in header_runs) if number_of_pages is None else number_of_pages
    wide = kind != "full32"
    size = 0x2000 if wide else 0x1000
    head = _page_fill(size)
    if wide:
        struct.pack_into("<8sII", head, 0, b"PAGEDU64", 15, 19041)
        struct.pack_into("<QQQQII", head, 0x10, 0x1AD000, 0xFFFFFA8000000000,
                         0xFFFFF80002A4A990, 0xFFFFF80002A2DB90, 0x8664, 1)
        struct.pack_into("<I4xQ", head, 0x88, len(header_runs), total)
        for i, (base, count) in enumerate(header_runs):
            struct.pack_into("<QQ", head, 0x98 + 16 * i, base, count)
        struct.pack_into("<I", head, 0xF98, 1 if kind == "full64" else 5)
    else:
        struct.pack_into("<8sII", head, 0, b"PAGEDUMP", 15, 2600)
        struct.pack_into("<IIIIII", head, 0x10, 0x185000, 0x80000000, 0x8055B1C0, 0x8055D0D8,
                         0x14C, 1)
        head[0x5C] = 1  # PaeEnabled
        struct.pack_into("<II", head, 0x64, len(header_runs), total)
        for i, (base, count) in enumerate(header_runs):
            struct.pack_into("<II", head, 0x6C + 8 * i, base, count)
        struct.pack_into("<I", head, 0xF88, 1)
    out = Path(path)
    with open(out, "wb") as f:
        f.write(head)
        if kind != "bitmap64":
            for address, length in spans:
                for at in range(address, address + length, _CHUNK):
                    f.write(bytes(memory.read(at, min(_CHUNK, address + length - at))))
            return out
        top = max(a + n for a, n in spans) // PAGE
        bitmap = bytearray(-(-top // 8))
        present = 0
        for address, length in spans:
            for at, page in _pages(memory, address, length):
                if not _zero(page):
                    pfn = at // PAGE
                    bitmap[pfn // 8] |= 1 << (pfn % 8)
                    present += 1
        first = -(-(0x2038 + len(bitmap)) // PAGE) * PAGE
        bmp = _page_fill(0x38)
        struct.pack_into("<8s", bmp, 0, b"FDMPDUMP")
        struct.pack_into("<QQQ", bmp, 0x20, first,
                         present if present_pages is None else present_pages, top)
        f.write(bmp + bitmap)
        f.write(bytes(first - 0x2038 - len(bitmap)))
        for address, length in spans:
            for _at, page in _pages(memory, address, length):
                if not _zero(page):
                    f.write(page)
    return out


# ---------------------------------------------------------------- kdump

_KDUMP_FLAGS = {"none": 0, "zlib": 0x1, "lzo": 0x2, "snappy": 0x4, "zstd": 0x20}


def _compressor(codec: str) -> object:
    if codec == "zlib":
        return lambda page: zlib.compress(page)
    if codec == "lzo":
        lzo = importlib.import_module("lzallright").LZOCompressor()
        return lambda page: bytes(lzo.compress(page))
    if codec == "snappy":
        cramjam = importlib.import_module("cramjam")
        return lambda page: bytes(cramjam.snappy.compress_raw(page))
    if codec == "zstd":
        zstd = importlib.import_module("zstandard").ZstdCompressor()
        return lambda page: zstd.compress(page)
    return None


class _Flattener:
    """Writes (offset, bytes) pieces either in place or as flattened records."""

    def __init__(self, f: IO[bytes], flattened: bool) -> None:
        self.f = f
        self.flattened = flattened
        if flattened:
            head = bytearray(4096)
            struct.pack_into(">16sqq", head, 0, b"makedumpfile", 1, 1)
            f.write(head)

    def put(self, offset: int, data: bytes) -> None:
        if self.flattened:
            self.f.write(struct.pack(">qq", offset, len(data)))
        else:
            self.f.seek(offset)
        self.f.write(data)

    def end(self) -> None:
        if self.flattened:
            self.f.write(struct.pack(">qq", -1, -1))


def write_kdump(
    path: str | os.PathLike[str],
    memory: MemoryLike,
    *,
    codec: str = "zlib",
    flattened: bool = False,
    exclude_zero: bool = True,
    max_mapnr: int | None = None,
    bitmap_blocks: int | None = None,
    descriptor_size: int | None = None,
    page_hook: object = None,
) -> Path:
    """Write a kdump-compressed core (header version 6) of ``memory``.

    Args:
        codec: ``zlib``, ``lzo``, ``snappy``, ``zstd`` or ``none``; a page is
            stored compressed only when that makes it smaller, as
            makedumpfile does.
        flattened: write makedumpfile's flattened format (as ``-F`` and QEMU).
        exclude_zero: leave zero pages out of the dump bitmap (makedumpfile
            ``-d 1``); otherwise they share one stored zero page (QEMU).
        max_mapnr, bitmap_blocks, descriptor_size: override header fields
            and the first descriptor's size (hostile variants).
        page_hook: ``f(pfn, stored_bytes, flags) -> (bytes, flags)``, to store
            something else for a page (hostile variants).
    """
    spans = _ranges(memory)
    frames = max(a + n for a, n in spans) // PAGE
    mapnr = frames if max_mapnr is None else max_mapnr
    half_blocks = -(-frames // (PAGE * 8))
    blocks = 2 * half_blocks if bitmap_blocks is None else bitmap_blocks
    exists = bytearray(half_blocks * PAGE)
    dumped = bytearray(half_blocks * PAGE)
    compress = _compressor(codec)
    flag = _KDUMP_FLAGS[codec]
    pages: list[tuple[int, bytes | None, int]] = []  # pfn, stored (None: zero page), flags
    for address, length in spans:
        for at, page in _pages(memory, address, length):
            pfn = at // PAGE
            exists[pfn // 8] |= 1 << (pfn % 8)
            if _zero(page):
                if exclude_zero:
                    continue
                stored: bytes | None = None
                flags = 0
            else:
                stored, flags = page, 0
                if compress is not None:
                    packed = compress(page)  # type: ignore[operator]
                    if len(packed) < PAGE:
                        stored, flags = packed, flag
            if page_hook is not None and stored is not None:
                stored, flags = page_hook(pfn, stored, flags)  # type: ignore[operator]
            dumped[pfn // 8] |= 1 << (pfn % 8)
            pages.append((pfn, stored, flags))
    head = bytearray(PAGE)
    struct.pack_into("<8si", head, 0, b"KDUMP   ", 6)
    for i, field in enumerate((b"Linux", b"pagefusion", b"6.1.0", b"#1 SMP", b"x86_64", b"")):
        head[12 + 65 * i : 12 + 65 * i + len(field)] = field
    struct.pack_into("<IIIIIIIIII", head, 424, flag, PAGE, 1, blocks, min(mapnr, 0xFFFFFFFF),
                     0, 0, 0, 0, 1)
    sub = bytearray(PAGE)
    struct.pack_into("<QiiQQQQQQQQQQQ", sub, 0, 0, 1 if exclude_zero else 0, 0, 0, 0,
                     0, 0, 0, 0, 0, 0, 0, frames, mapnr)
    desc_at = PAGE * (2 + blocks)
    data_at = desc_at + 24 * len(pages)
    zero_at = data_at
    if not exclude_zero:
        data_at += PAGE
    descs = bytearray()
    data = bytearray()
    for k, (_pfn, stored, flags) in enumerate(pages):
        if stored is None:
            descs += struct.pack("<qIIQ", zero_at, PAGE, 0, 0)
            continue
        size = len(stored) if descriptor_size is None or k else descriptor_size
        descs += struct.pack("<qIIQ", data_at + len(data), size, flags, 0)
        data += stored
    out = Path(path)
    with open(out, "wb") as f:
        w = _Flattener(f, flattened)
        w.put(0, bytes(head))
        w.put(PAGE, bytes(sub))
        half = blocks // 2 * PAGE
        # Only the real bitmaps' bytes: a header claiming more lies about them.
        w.put(2 * PAGE, bytes(exists[:half]))
        w.put(2 * PAGE + half, bytes(dumped[:half]))
        for k in range(0, len(descs), 24 * 682):  # QEMU's page-descriptor cache size
            w.put(desc_at + k, bytes(descs[k : k + 24 * 682]))
        if not exclude_zero:
            w.put(zero_at, bytes(PAGE))
        base = zero_at + (0 if exclude_zero else PAGE)
        for k in range(0, len(data), 4 * PAGE):
            w.put(base + k, bytes(data[k : k + 4 * PAGE]))
        w.end()
    return out


def unflatten_kdump(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Rewrite a flattened kdump file as a plain one (``makedumpfile -R``)."""
    out = Path(dst)
    with open(src, "rb") as f, open(out, "wb") as g:
        head = f.read(4096)
        if not head.startswith(b"makedumpfile"):
            raise ValueError(f"{src}: not a flattened kdump file")
        while True:
            offset, size = struct.unpack(">qq", f.read(16))
            if offset < 0:
                break
            g.seek(offset)
            g.write(f.read(size))
    return out


# ---------------------------------------------------------------- QEMU


def write_qemu_stream(
    path: str | os.PathLike[str],
    blocks: Mapping[str, bytes | int],
    *,
    machine: str = "pc-i440fx-7.2",
    resend: Sequence[tuple[str, int, bytes]] = (),
    fill_pages: Mapping[tuple[str, int], int] | None = None,
    pages_per_part: int = 4096,
    end: bool = True,
    capabilities: Sequence[str] = (),
) -> Path:
    """Write a QEVM v3 migration stream carrying ``blocks`` (name -> RAM bytes,
    or a size for an all-zero block).

    Pages go out as QEMU's precopy sends them: zero pages as the ZERO flag,
    others as PAGE, CONTINUE for pages of the block named before, chunks of
    ``pages_per_part`` in PART sections, then END, a device section, EOF and
    the vmdesc record.

    Args:
        resend: (block, page index, stale bytes) pages first sent with the
            stale bytes, then again with their real bytes (a live migration).
        fill_pages: (block, page index) -> fill byte, sent as ZERO pages with
            that byte (old QEMU); the page's bytes in ``blocks`` must match.
        end: False stops after the RAM (a stream cut in the device state).
        capabilities: names for the configuration's capabilities subsection.
    """
    fills = dict(fill_pages or {})
    out = bytearray(b"QEVM" + struct.pack(">I", 3))
    out += bytes([7]) + struct.pack(">I", len(machine)) + machine.encode()
    if capabilities:
        subsection = b"configuration/capabilities"
        out += bytes([5, len(subsection)]) + subsection + struct.pack(">II", 1, len(capabilities))
        for cap in capabilities:
            out += bytes([len(cap)]) + cap.encode()
    ram_id = 2

    def section(kind: int, sid: int, name: bytes | None = None) -> None:
        out.append(kind)
        out.extend(struct.pack(">I", sid))
        if name is not None:
            out.extend(bytes([len(name)]) + name + struct.pack(">II", 0, 4))

    def footer(sid: int) -> None:
        out.extend(b"\x7e" + struct.pack(">I", sid))

    section(1, ram_id, b"ram")
    sizes = {name: data if isinstance(data, int) else len(data) for name, data in blocks.items()}
    out += struct.pack(">Q", sum(sizes.values()) | 4)
    for block, size in sizes.items():
        out += bytes([len(block)]) + block.encode() + struct.pack(">Q", size)
    out += struct.pack(">Q", 0x10)
    footer(ram_id)
    last: list[str | None] = [None]

    def page(name: str, index: int, data: bytes) -> None:
        flags = 0 if last[0] != name else 0x20
        fill = fills.get((name, index))
        zero = fill is not None or _zero(data)
        out.extend(struct.pack(">Q", index * PAGE | flags | (2 if zero else 8)))
        if not flags:
            out.extend(bytes([len(name)]) + name.encode())
        last[0] = name
        out.extend(bytes([fill or 0]) if zero else data)

    sends: list[tuple[str, int, bytes]] = [(n, i, d) for n, i, d in resend]
    for block, data in blocks.items():
        if isinstance(data, int):
            continue
        sends += [(block, i, data[i * PAGE : (i + 1) * PAGE]) for i in range(len(data) // PAGE)]
    for k in range(0, len(sends), pages_per_part):
        section(2, ram_id)
        for block, index, data in sends[k : k + pages_per_part]:
            page(block, index, data)
        out += struct.pack(">Q", 0x10)
        footer(ram_id)
    for block, data in blocks.items():
        if not isinstance(data, int):
            continue
        # An all-zero block: one part of ZERO records, built at memory speed.
        section(2, ram_id)
        page(block, 0, bytes(PAGE))
        records = np.zeros(data // PAGE - 1, dtype=[("word", ">u8"), ("fill", "u1")])
        records["word"] = (np.arange(1, data // PAGE, dtype=np.uint64) * PAGE) | 0x22
        out += records.tobytes()
        out += struct.pack(">Q", 0x10)
        footer(ram_id)
    section(3, ram_id)
    out += struct.pack(">Q", 0x10)
    footer(ram_id)
    if end:
        section(4, 3, b"timer")
        out += struct.pack(">QQQ", 1, 2, 3)
        footer(3)
        desc = json.dumps({"page_size": PAGE, "devices": [
            {"name": "timer", "instance_id": 0, "vmsd_name": "timer", "version": 2,
             "fields": [{"name": "cpu_ticks_offset", "type": "int64", "size": 8}]}]})
        out += b"\x00\x06" + struct.pack(">I", len(desc)) + desc.encode()
    target = Path(path)
    target.write_bytes(bytes(out))
    return target


def write_libvirt_save(
    path: str | os.PathLike[str],
    stream: str | os.PathLike[str],
    *,
    xml: str = "<domain type='kvm'><name>guest</name></domain>",
    compressed: int = 0,
) -> Path:
    """Write libvirt's save-image header (``virsh save``) and then ``stream``.

    The header: ``LibvirtQemudSave``, then version 2, the length of the
    domain XML (NUL-padded), was_running, compressed, cookie offset and 14
    unused words (little-endian), the XML, then QEMU's stream.
    """
    text = xml.encode() + b"\0"
    text += bytes(-len(text) % 1024)
    header = b"LibvirtQemudSave" + struct.pack("<5I", 2, len(text), 1, compressed, 0)
    header += bytes(4 * 14)
    target = Path(path)
    with open(target, "wb") as f, open(stream, "rb") as s:
        f.write(header + text)
        while chunk := s.read(_CHUNK):
            f.write(chunk)
    return target
