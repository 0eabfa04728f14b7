"""QEMU migration streams (``QEVM``, version 3), bare or behind libvirt's header.

What ``migrate "exec:cat > FILE"`` and ``savevm`` write, and what libvirt's
``virsh save`` / ``managedsave`` write after their own header. The layout,
as QEMU's savevm.c and ram.c write it (all integers big-endian):

* ``QEVM``, version 3; then usually a configuration record (0x07: the
  machine type's name, a be32-length string, optionally followed by a
  ``configuration/capabilities`` subsection).
* Sections: 0x01 START and 0x04 FULL carry a be32 section id, a
  byte-length name, be32 instance id and be32 version; 0x02 PART and 0x03
  END only the id; each is followed by a footer (0x7e, the be32 id).
  Commands (0x08) are framed by a be16 length.
* The ``ram`` section: its START lists every RAM block (byte-length name,
  be64 size) after a be64 total flagged MEM_SIZE; then pages, each a be64
  of (offset in its block | flags) followed, unless flagged CONTINUE (same
  block as the page before), by the block's name, then 4096 bytes (PAGE)
  or one fill byte (ZERO). EOS ends each chunk. A page sent again later
  (dirtied during a live migration) replaces the earlier copy.
* Every iterative section (RAM) ends before any device state is written.
  Device state has no length framing at all (only the vmdesc JSON at the
  very end describes it), so reading stops at the RAM's END; the stream's
  end (QEMU_VM_EOF, and the vmdesc record after it) is checked separately,
  so a truncated file is refused wherever it was cut.

The stream is indexed once at open: one int64 per page (file offset of its
bytes, or a zero/fill marker), 1/512 of the guest's size, and never held in
memory. The main RAM block (``pc.ram``, or the memory backend's block: the
largest) lands at guest-physical addresses as a PC lays it out (i440fx: all
below 4 GiB up to 3.5 GiB, else 3 GiB low; q35: 2.75 GiB, else 2 GiB
low; the rest from 4 GiB); ``pc.bios`` sits right below 4 GiB as in
QEMU's ELF cores. Other blocks (option ROMs, ACPI tables, VRAM) have no
fixed guest-physical address and are left out. Compressed and XBZRLE
pages, postcopy, RDMA and ``x-ignore-shared`` streams are refused by name.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import as_strided

from pagefusion.adapters.base import PAGE_SIZE, MemoryRange
from pagefusion.adapters.helpers import MAX_PHYS_ADDRESS, MAX_TOTAL_BYTES
from pagefusion.adapters.paged import FILL, Special, fail

__all__ = ["LIBVIRT_MAGIC", "QEVM_MAGIC", "QemuStreamTable", "parse_stream"]

QEVM_MAGIC = b"QEVM"
LIBVIRT_MAGIC = b"LibvirtQemudSave"
LIBVIRT_PARTIAL = b"LibvirtQemudPart"
_LIBVIRT_HEADER = 92
_LIBVIRT_COMPRESSION = {1: "gzip", 2: "bzip2", 3: "xz", 4: "lzop", 5: "zstd"}

EOF, START, PART, END, FULL, SUBSECTION, VMDESC, CONFIGURATION, COMMAND = range(9)
FOOTER = 0x7E

F_ZERO, F_MEM_SIZE, F_PAGE, F_EOS, F_CONTINUE, F_XBZRLE, F_HOOK = 2, 4, 8, 0x10, 0x20, 0x40, 0x80
F_COMPRESS, F_MULTIFD_FLUSH = 0x100, 0x200
_FLAGS = PAGE_SIZE - 1
_POSTCOPY_COMMANDS = {3: "POSTCOPY_ADVISE", 4: "POSTCOPY_LISTEN", 5: "POSTCOPY_RUN",
                      9: "PACKAGED"}
_4G = 1 << 32
#: Stored per page: never sent, or a fill byte b as -2 - b; >= 0 is a file offset.
_UNSENT = -1
_ZERO = -2


class _Cut(Exception):
    """The stream ends inside a record (turned into a precise message)."""


class _Reader:
    """Big-endian fields of a mapping, with truncation reported by position."""

    def __init__(self, data: memoryview, pos: int) -> None:
        self.data = data
        self.bytes = np.frombuffer(data, dtype=np.uint8)
        self.pos = pos
        self.size = len(data)

    def need(self, n: int) -> int:
        at = self.pos
        if at + n > self.size:
            raise _Cut(at)
        self.pos = at + n
        return at

    def u8(self) -> int:
        return self.data[self.need(1)]

    def be16(self) -> int:
        at = self.need(2)
        return int.from_bytes(self.data[at : at + 2], "big")

    def be32(self) -> int:
        at = self.need(4)
        return int.from_bytes(self.data[at : at + 4], "big")

    def be64(self) -> int:
        at = self.need(8)
        return int.from_bytes(self.data[at : at + 8], "big")

    def name(self) -> str:
        n = self.u8()
        at = self.need(n)
        return bytes(self.data[at : at + n]).decode("latin-1")


@dataclass
class _Block:
    name: str
    size: int
    pages: np.ndarray


@dataclass(frozen=True, slots=True)
class _Placed:
    block: _Block
    first: int


class QemuStreamTable:
    """The page index of one stream: where each RAM page's bytes are."""

    def __init__(self, placed: Sequence[tuple[MemoryRange, _Placed]], machine: str) -> None:
        self.ranges = tuple(r for r, _ in placed)
        self._placed = [p for _, p in placed]
        self.machine = machine

    def locate(self, index: int, first: int, count: int) -> tuple[np.ndarray, list[Special]]:
        placed = self._placed[index]
        start = placed.first + first
        offsets = placed.block.pages[start : start + count].copy()
        specials: list[Special] = []
        fills = np.flatnonzero(offsets < _ZERO)
        for i in fills.tolist():
            specials.append(Special(i, FILL, _ZERO - int(offsets[i])))
        offsets[offsets < 0] = -1
        return offsets, specials


def _libvirt_start(data: memoryview, path: str) -> int:
    """Offset of the QEMU stream behind libvirt's save-image header."""
    if len(data) < _LIBVIRT_HEADER:
        raise fail(path, f"truncated libvirt save header ({len(data)} of 92 bytes)")
    fields = struct.unpack_from("<5I", data, 16)
    if fields[0] not in (1, 2):  # written in the host's byte order
        fields = struct.unpack_from(">5I", data, 16)
    version, data_len, _running, compressed, _cookie = fields
    if version not in (1, 2):
        raise fail(path, f"libvirt save header version {version} (expected 1 or 2)")
    if compressed:
        tool = _LIBVIRT_COMPRESSION.get(compressed, f"format {compressed}")
        raise fail(path, f"libvirt save image compressed with {tool}; save it with "
                         "save_image_format = \"raw\" or decompress the stream first")
    start = _LIBVIRT_HEADER + data_len
    if start + 8 > len(data):
        raise fail(path, f"libvirt save header: {data_len} bytes of domain XML run past "
                         f"the end of the file ({len(data)} bytes)")
    if bytes(data[start : start + 4]) != QEVM_MAGIC:
        raise fail(path, f"libvirt save image: no QEMU migration stream at offset {start:#x}")
    return start


def _split(machine: str, size: int, below_4g: int | None, path: str) -> int:
    """Bytes of the main RAM block below 4 GiB, from the machine type."""
    if below_4g is not None:
        return min(below_4g, size)
    if "q35" in machine:
        return size if size < 0xB0000000 else 0x80000000
    if machine == "pc" or machine.startswith(("pc-i440fx", "pc-", "xenfv")):
        return size if size < 0xE0000000 else 0xC0000000
    shown = repr(machine) if machine else "not recorded in the stream"
    raise fail(path, f"machine type {shown}: its RAM layout is not known (x86 pc and q35 "
                     "are); give the option below_4g (bytes of RAM below 4 GiB)")


def _configuration(r: _Reader, path: str) -> str:
    n = r.be32()
    if n > 256:
        raise fail(path, f"configuration record: machine type name of {n} bytes")
    at = r.need(n)
    machine = bytes(r.data[at : at + n]).decode("latin-1")
    while r.pos < r.size and r.data[r.pos] == SUBSECTION:
        r.pos += 1
        name = r.name()
        r.be32()  # version
        if name != "configuration/capabilities":
            raise fail(path, f"configuration record: unknown subsection {name!r}")
        caps = [r.name() for _ in range(r.be32())]
        for cap in caps:
            if cap in ("x-ignore-shared", "mapped-ram"):
                raise fail(path, f"stream written with migration capability {cap!r}: "
                                 "its RAM is not in the stream as pages")
    return machine


def _ram_setup(r: _Reader, path: str) -> dict[str, _Block]:
    total = r.be64()
    if not total & F_MEM_SIZE:
        raise fail(path, f"ram section at {r.pos - 8:#x} does not start with the RAM size")
    remaining = total & ~_FLAGS
    if remaining > MAX_TOTAL_BYTES:
        raise fail(path, f"ram section claims {remaining} bytes of RAM (limit 1 TiB)")
    # Each page takes at least a 9-byte record: a claim the rest of the file
    # cannot hold is refused before its index is allocated.
    if remaining // PAGE_SIZE * 9 > r.size - r.pos:
        raise fail(path, f"ram section claims {remaining} bytes of RAM; the {r.size - r.pos} "
                         "bytes left in the stream cannot hold that many pages")
    blocks: dict[str, _Block] = {}
    while remaining:
        at = r.pos
        name = r.name()
        size = r.be64()
        if not name or size == 0 or size % PAGE_SIZE or size > remaining:
            raise fail(path, f"RAM block list at {at:#x}: block {name!r} of {size} bytes does "
                             f"not fit the {total & ~_FLAGS} bytes announced")
        if name in blocks:
            raise fail(path, f"RAM block {name!r} listed twice")
        remaining -= size
        blocks[name] = _Block(name, size, np.full(size // PAGE_SIZE, _UNSENT, dtype=np.int64))
    return blocks


def _ram_chunk(r: _Reader, blocks: dict[str, _Block], last: list[_Block | None],
               path: str) -> None:
    """Pages up to the chunk's EOS; ``last`` carries the CONTINUE block across chunks."""
    data, size = r.data, r.size
    block = last[0]
    previous, streak, batch = -1, 0, 64
    while True:
        at = r.pos
        if at + 8 > size:
            raise _Cut(at)
        word = int.from_bytes(data[at : at + 8], "big")
        pos = at + 8
        flags = word & _FLAGS
        if flags != previous:
            previous, streak = flags, 0
        streak += 1
        if streak > 8 and block is not None and flags in (_ZERO_RUN, _PAGE_RUN):
            # A long run of one kind: take it in batches that grow while it lasts.
            after = _run(r, at, block, flags, batch)
            if after > at:
                full = after - at == batch * (_ZERO_RECORD.itemsize if flags == _ZERO_RUN
                                               else _PAGE_RECORD)
                batch = min(batch * 4, _RUN) if full else 64
                r.pos = after
                streak = 0
                continue
        if flags & F_EOS:
            r.pos = pos
            last[0] = block
            return
        if flags & (F_XBZRLE | F_COMPRESS | F_HOOK | F_MEM_SIZE) or not flags & (F_PAGE | F_ZERO):
            if flags == F_MULTIFD_FLUSH:
                r.pos = pos
                continue
            what = ("XBZRLE-encoded" if flags & F_XBZRLE else "compressed" if flags & F_COMPRESS
                    else "RDMA" if flags & F_HOOK else f"flags {flags:#x}")
            raise fail(path, f"RAM page record at {at:#x}: {what} pages are not supported "
                             "(migrate without compression and XBZRLE)")
        if not flags & F_CONTINUE:
            if pos >= size:
                raise _Cut(pos)
            n = data[pos]
            if pos + 1 + n > size:
                raise _Cut(pos)
            name = bytes(data[pos + 1 : pos + 1 + n]).decode("latin-1")
            pos += 1 + n
            block = blocks.get(name)
            if block is None:
                raise fail(path, f"RAM page record at {at:#x} names unknown block {name!r}")
        elif block is None:
            raise fail(path, f"RAM page record at {at:#x} continues a block before any is named")
        offset = word & ~_FLAGS
        if offset >= block.size:
            raise fail(path, f"RAM page record at {at:#x}: offset {offset:#x} lies past the end "
                             f"of block {block.name!r} ({block.size:#x} bytes)")
        if flags & F_PAGE:
            if pos + PAGE_SIZE > size:
                raise _Cut(pos)
            block.pages[offset >> 12] = pos
            pos += PAGE_SIZE
        else:
            if pos >= size:
                raise _Cut(pos)
            block.pages[offset >> 12] = _ZERO - data[pos]
            pos += 1
        r.pos = pos


_ZERO_RUN = F_ZERO | F_CONTINUE
_PAGE_RUN = F_PAGE | F_CONTINUE
_ZERO_RECORD = np.dtype([("word", ">u8"), ("fill", "u1")])
_PAGE_RECORD = 8 + PAGE_SIZE
_RUN = 1 << 16


def _run(r: _Reader, at: int, block: _Block, flags: int, limit: int = _RUN) -> int:
    """Index a run of same-kind CONTINUE records from ``at``; the offset after it.

    Zero pages are 9-byte records and pages 4104-byte ones, so a run is a
    strided array: numpy checks and indexes thousands at once. Records that
    do not match (or lie past the block) end the run; the record-by-record
    path then reads them and names any fault.
    """
    if flags == _ZERO_RUN:
        count = min(limit, (r.size - at) // _ZERO_RECORD.itemsize)
        records = np.frombuffer(r.data, dtype=_ZERO_RECORD, count=count, offset=at)
        words = records["word"]
        good = ((words & _FLAGS) == _ZERO_RUN) & (records["fill"] == 0)
        stride = _ZERO_RECORD.itemsize
    else:
        count = min(limit, (r.size - at) // _PAGE_RECORD)
        raw = as_strided(r.bytes[at:], shape=(count, 8), strides=(_PAGE_RECORD, 1))
        words = raw.copy().view(">u8").ravel()
        good = (words & _FLAGS) == _PAGE_RUN
        stride = _PAGE_RECORD
    offsets = words & ~np.uint64(_FLAGS)
    good &= offsets < block.size
    n = count if good.all() else int(np.argmin(good))
    if n < 2:
        return at
    pages = (offsets[:n] >> np.uint64(12)).astype(np.int64)
    if flags == _ZERO_RUN:
        block.pages[pages] = _ZERO
    else:
        block.pages[pages] = at + 8 + stride * np.arange(n, dtype=np.int64)
    return at + stride * n


def _check_end(data: memoryview, after: int, path: str) -> None:
    """The stream must end with QEMU_VM_EOF, optionally then the vmdesc record."""
    size = len(data)
    if data[size - 1] == EOF and size - 1 >= after:
        return
    # The vmdesc is JSON, which holds no NUL byte: its record starts at one of
    # the last "EOF, VMDESC" pairs (its be32 length may hold NULs too).
    tail = bytes(data[max(after, size - (16 << 20)) :])
    base = size - len(tail)
    end = len(tail)
    for _ in range(4):
        k = tail.rfind(b"\x00\x06", 0, end)
        if k < 0:
            break
        length = int.from_bytes(tail[k + 2 : k + 6], "big")
        if base + k + 6 + length == size:
            try:
                json.loads(tail[k + 6 :])
            except ValueError:
                raise fail(path, "the stream's closing device description is not JSON") from None
            return
        end = k + 1
    raise fail(path, "truncated QEMU migration stream: it does not end with QEMU's "
                     "end-of-stream marker (the device state after the RAM is cut)")


def parse_stream(data: memoryview, path: str, below_4g: int | None = None) -> QemuStreamTable:
    """Validate and index a migration stream (or a libvirt save image).

    Raises:
        InvalidSourceError: naming what is wrong and at which offset.
    """
    start = _libvirt_start(data, path) if bytes(data[:16]) == LIBVIRT_MAGIC else 0
    if bytes(data[:16]) == LIBVIRT_PARTIAL:
        raise fail(path, "an incomplete libvirt save image (the save did not finish)")
    r = _Reader(data, start)
    try:
        machine, blocks = _sections(r, path)
    except _Cut as cut:
        raise fail(path, f"truncated QEMU migration stream: it ends at {len(data):#x} inside "
                         f"a record starting near {cut.args[0]:#x}") from None
    _check_end(data, r.pos, path)
    return _place(blocks, machine, below_4g, path)


def _sections(r: _Reader, path: str) -> tuple[str, dict[str, _Block]]:
    if r.be32() != int.from_bytes(QEVM_MAGIC, "big"):
        raise fail(path, "not a QEMU migration stream")
    version = r.be32()
    if version != 3:
        raise fail(path, f"QEMU migration stream version {version} (only version 3 is known)")
    machine = ""
    blocks: dict[str, _Block] | None = None
    ram_id = -1
    last: list[_Block | None] = [None]
    current = -1
    while True:
        at = r.pos
        kind = r.u8()
        if kind == CONFIGURATION:
            machine = _configuration(r, path)
        elif kind in (START, FULL):
            current = r.be32()
            name = r.name()
            r.be32()  # instance id
            r.be32()  # version id
            if name != "ram":
                if blocks is not None and ram_id == -2:
                    r.pos = at  # the RAM is complete; device state follows
                    return machine, blocks
                raise fail(path, f"section {name!r} at {at:#x} comes before the RAM is complete; "
                                 "its data has no length framing, so the RAM after it cannot be "
                                 "found (migrate without block migration or dirty bitmaps)")
            if kind == FULL or blocks is not None:
                raise fail(path, f"ram section at {at:#x}: a second or non-iterative RAM start")
            ram_id = current
            blocks = _ram_setup(r, path)
            _ram_chunk(r, blocks, last, path)
        elif kind in (PART, END):
            current = r.be32()
            if blocks is None or current != ram_id:
                raise fail(path, f"section record at {at:#x} continues section {current}, "
                                 "which is not the RAM's")
            _ram_chunk(r, blocks, last, path)
            if kind == END:
                ram_id = -2
        elif kind == FOOTER:
            if r.be32() != current:
                raise fail(path, f"section footer at {at:#x} does not match section {current}")
        elif kind == COMMAND:
            command = r.be16()
            length = r.be16()
            if command in _POSTCOPY_COMMANDS:
                raise fail(path, f"a postcopy stream (command {_POSTCOPY_COMMANDS[command]} at "
                                 f"{at:#x}): its RAM is not all in the stream")
            r.need(length)
        elif kind == EOF:
            if blocks is None or ram_id != -2:
                raise fail(path, f"the stream ends at {at:#x} before its RAM is complete")
            r.pos = at
            return machine, blocks
        else:
            raise fail(path, f"unknown record type {kind:#x} at {at:#x}")


def _place(blocks: dict[str, _Block], machine: str, below_4g: int | None,
           path: str) -> QemuStreamTable:
    for block in blocks.values():
        unsent = int(np.count_nonzero(block.pages == _UNSENT))
        if unsent:
            raise fail(path, f"{unsent} pages of RAM block {block.name!r} never appear in the "
                             "stream (an incomplete migration)")
    main = blocks.get("pc.ram") or max(blocks.values(), key=lambda b: b.size)
    low = _split(machine, main.size, below_4g, path)
    if low % PAGE_SIZE:
        raise fail(path, f"below_4g {low} is not a multiple of the page size")
    placed: list[tuple[MemoryRange, _Placed]] = []
    if low:
        placed.append((MemoryRange(0, low), _Placed(main, 0)))
    if main.size > low:
        placed.append((MemoryRange(_4G, main.size - low), _Placed(main, low // PAGE_SIZE)))
    bios = blocks.get("pc.bios")
    if bios is not None and bios is not main and low <= _4G - bios.size:
        placed.append((MemoryRange(_4G - bios.size, bios.size), _Placed(bios, 0)))
    placed.sort(key=lambda p: p[0].address)
    if placed[-1][0].end > MAX_PHYS_ADDRESS:
        raise fail(path, "RAM ends beyond the 52-bit physical address space")
    return QemuStreamTable(placed, machine)
