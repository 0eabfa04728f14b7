"""Helpers for tests of adapters and of code that consumes guest memory.

:func:`write_elf_core` writes ELF64 core files in the layout QEMU's
``dump-guest-memory`` uses (ELF header, program headers with one PT_NOTE
first, the notes, then segment data packed right after them, so segment
file offsets are not page aligned), with knobs to produce the hostile
variants a parser must refuse.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CoreSegment", "write_elf_core"]

ET_CORE = 4
EM_X86_64 = 62
PT_LOAD = 1
PT_NOTE = 4
PN_XNUM = 0xFFFF


@dataclass(frozen=True, slots=True)
class CoreSegment:
    """One PT_LOAD segment: ``data`` at guest-physical ``paddr``; ``memsz``
    defaults to ``len(data)``; ``offset`` forces a file offset (hostile tests)."""

    paddr: int
    data: bytes
    memsz: int | None = None
    offset: int | None = None
    filesz: int | None = None


def _note(name: bytes, ntype: int, desc: bytes) -> bytes:
    def pad(b: bytes) -> bytes:
        return b + b"\0" * (-len(b) % 4)

    return struct.pack("<III", len(name) + 1, len(desc), ntype) + pad(name + b"\0") + pad(desc)


def write_elf_core(
    path: str | Path,
    segments: Sequence[CoreSegment],
    *,
    e_type: int = ET_CORE,
    pn_xnum: bool = False,
    align: int = 1,
    note: bool = True,
) -> Path:
    """Write an ELF64 little-endian x86-64 core file and return its path.

    Args:
        segments: the PT_LOAD segments, written in the given order.
        e_type: ELF type (ET_CORE = 4; ET_EXEC = 2 for a not-a-core test).
        pn_xnum: store the program header count in section header 0 as QEMU
            does for 65535 or more segments.
        align: alignment of each segment's file offset (1 = QEMU's packing).
        note: include a PT_NOTE with an NT_PRSTATUS-like note, as QEMU does.
    """
    notes = _note(b"CORE", 1, bytes(336)) + _note(b"QEMU", 0, bytes(432)) if note else b""
    phnum = len(segments) + (1 if note else 0)
    phoff = 64
    note_offset = phoff + 56 * phnum
    shoff = note_offset + len(notes) if pn_xnum else 0
    data_offset = note_offset + len(notes) + (64 if pn_xnum else 0)

    phdrs = []
    if note:
        phdrs.append(struct.pack("<IIQQQQQQ", PT_NOTE, 0, note_offset, 0, 0, len(notes), 0, 0))
    cursor = data_offset
    placed: list[tuple[int, bytes]] = []
    for seg in segments:
        cursor += -cursor % align
        offset = cursor if seg.offset is None else seg.offset
        filesz = len(seg.data) if seg.filesz is None else seg.filesz
        memsz = len(seg.data) if seg.memsz is None else seg.memsz
        phdrs.append(
            struct.pack("<IIQQQQQQ", PT_LOAD, 0, offset, 0, seg.paddr, filesz, memsz, 0)
        )
        if seg.offset is None:
            placed.append((offset, seg.data))
            cursor = offset + len(seg.data)
    ehdr = struct.pack(
        "<16sHHIQQQIHHHHHH",
        b"\x7fELF\x02\x01\x01" + bytes(9),
        e_type,
        EM_X86_64,
        1,
        0,
        phoff,
        shoff,
        0,
        64,
        56,
        PN_XNUM if pn_xnum else phnum,
        64,
        1 if pn_xnum else 0,
        0,
    )
    out = bytearray(ehdr + b"".join(phdrs) + notes)
    if pn_xnum:
        out += struct.pack("<IIQQQQIIQQ", 0, 0, 0, 0, 0, 0, 0, phnum, 0, 0)
    for offset, data in placed:
        if len(out) < offset:
            out += bytes(offset - len(out))
        out[offset : offset + len(data)] = data
    target = Path(path)
    target.write_bytes(bytes(out))
    return target
