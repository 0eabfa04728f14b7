"""The file adapter: raw images and ELF64 cores in QEMU's layout, and hostile files."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagefusion.adapters.base import (
    PAGE_SIZE,
    AdapterContext,
    GuestMemory,
    InvalidOptionError,
    InvalidSourceError,
    MemoryRange,
    SourceError,
    SourceNotFoundError,
    SourcePermissionError,
)
from pagefusion.adapters.file import FileAdapter
from pagefusion.adapters.registry import open_source
from pagefusion.adapters.testing import CoreSegment, write_elf_core

MiB = 1 << 20


def _rand(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _open(path: Path, root: Path | None = None) -> GuestMemory:
    ctx = AdapterContext("vm1", allowed_paths=(root or path.parent,))
    return open_source("file", {"path": str(path)}, ctx)




def _image(mem: GuestMemory) -> dict[int, bytes]:
    out = {}
    for r in mem.ranges():
        out[r.address] = bytes(mem.read(r.address, r.size))
    return out


def test_raw_image(tmp_path: Path) -> None:
    data = _rand(3 * PAGE_SIZE, 1)
    (tmp_path / "a.raw").write_bytes(data)
    mem = _open(tmp_path / "a.raw")
    assert list(mem.ranges()) == [MemoryRange(0, 3 * PAGE_SIZE)]
    view = mem.read(PAGE_SIZE, 2 * PAGE_SIZE)
    assert isinstance(view, memoryview)  # mapped, not copied
    assert bytes(view) == data[PAGE_SIZE:]
    mem.close()


def test_raw_ragged_is_zero_padded(tmp_path: Path) -> None:
    data = _rand(10000, 2)
    (tmp_path / "a.raw").write_bytes(data)
    mem = _open(tmp_path / "a.raw")
    assert list(mem.ranges()) == [MemoryRange(0, 3 * PAGE_SIZE)]
    assert bytes(mem.read(0, 3 * PAGE_SIZE)) == data + bytes(3 * PAGE_SIZE - 10000)
    mem.close()


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "e").write_bytes(b"")
    with pytest.raises(InvalidSourceError, match="empty") as err:
        _open(tmp_path / "e")
    assert err.value.option == "path"


def test_qemu_layout_core(tmp_path: Path) -> None:
    low = _rand(640 * 1024, 3)
    high = _rand(3 * MiB + 123, 4)  # ragged
    bios = _rand(256 * 1024, 5)  # firmware just below 4 GiB
    above4g = _rand(MiB, 6)
    segs = [
        CoreSegment(0, low),
        CoreSegment(0x100000, high),
        CoreSegment(0xFFFC0000, bios),
        CoreSegment(0x100000000, above4g),
    ]
    path = write_elf_core(tmp_path / "core", segs)
    mem = _open(path)
    assert list(mem.ranges()) == [
        MemoryRange(0, 640 * 1024),
        MemoryRange(0x100000, 3 * MiB + PAGE_SIZE),
        MemoryRange(0xFFFC0000, 256 * 1024),
        MemoryRange(0x100000000, MiB),
    ]
    img = _image(mem)
    assert img[0] == low
    assert img[0x100000] == high + bytes(PAGE_SIZE - 123)
    assert img[0xFFFC0000] == bios
    assert img[0x100000000] == above4g
    # QEMU packs data after the notes: offsets are unaligned, yet reads are mapped
    assert isinstance(mem.read(0x100000, PAGE_SIZE), memoryview)
    mem.close()


def test_unaligned_paddr_shared_pages_and_bss(tmp_path: Path) -> None:
    a = _rand(0x1000, 7)
    b = _rand(0x800, 8)
    c = _rand(0x1800, 9)
    segs = [
        CoreSegment(0x200800, a),  # starts mid-page
        CoreSegment(0x300000, b),  # b and c share the page at 0x300000
        CoreSegment(0x300800, c),
        CoreSegment(0x400000, _rand(PAGE_SIZE, 10), memsz=3 * PAGE_SIZE),  # zero tail
    ]
    mem = _open(write_elf_core(tmp_path / "core", segs, align=8))
    assert list(mem.ranges()) == [
        MemoryRange(0x200000, 0x2000),
        MemoryRange(0x300000, 0x2000),
        MemoryRange(0x400000, 0x3000),
    ]
    img = _image(mem)
    assert img[0x200000] == bytes(0x800) + a + bytes(0x800)
    assert img[0x300000] == b + c
    assert img[0x400000] == segs[3].data + bytes(2 * PAGE_SIZE)
    assert bytes(mem.read(0x401000, PAGE_SIZE)) == bytes(PAGE_SIZE)
    mem.close()


def test_virtualbox_layout_core(tmp_path: Path) -> None:
    """DBGFCoreWrite's layout: 8-byte aligned VBCORE/VBCPU notes, one PT_LOAD per
    PGM RAM range, MMIO ranges as PT_LOAD with p_filesz 0."""
    low = _rand(0xA0000, 20)
    rom = _rand(0x40000, 21)
    high = _rand(62 * MiB, 22)
    vram = _rand(16 * MiB, 23)
    bios = _rand(0x20000, 24)
    segs = [
        CoreSegment(0, low),
        CoreSegment(0xA0000, b"", memsz=0x20000),  # VGA MMIO
        CoreSegment(0xC0000, rom),
        CoreSegment(0x100000, high),
        CoreSegment(0xE0000000, vram),  # MMIO2 (VRAM) has data
        CoreSegment(0xFEC00000, b"", memsz=PAGE_SIZE),  # I/O APIC
        CoreSegment(0xFFFE0000, bios),
    ]
    path = write_elf_core(tmp_path / "vbox.core", segs, align=8)
    mem = _open(path)
    assert list(mem.ranges()) == [
        MemoryRange(0, 0xA0000),
        MemoryRange(0xC0000, 0x40000),
        MemoryRange(0x100000, 62 * MiB),
        MemoryRange(0xE0000000, 16 * MiB),
        MemoryRange(0xFFFE0000, 0x20000),
    ]
    img = _image(mem)
    assert img[0] == low and img[0xC0000] == rom and img[0x100000] == high
    assert img[0xE0000000] == vram and img[0xFFFE0000] == bios
    mem.close()


def test_pn_xnum_segment_count(tmp_path: Path) -> None:
    segs = [CoreSegment(i * 0x10000, _rand(PAGE_SIZE, i)) for i in range(5)]
    mem = _open(write_elf_core(tmp_path / "core", segs, pn_xnum=True))
    assert len(mem.ranges()) == 5
    assert bytes(mem.read(0x40000, PAGE_SIZE)) == segs[4].data
    mem.close()


def _good_core(tmp_path: Path) -> bytes:
    segs = [CoreSegment(0, _rand(2 * PAGE_SIZE, 11)), CoreSegment(0x10000, _rand(PAGE_SIZE, 12))]
    return write_elf_core(tmp_path / "good", segs).read_bytes()


def _hostile(tmp_path: Path, kind: str) -> Path:
    p = tmp_path / kind
    good = _good_core(tmp_path)
    if kind == "truncated-ehdr":
        p.write_bytes(good[:40])
    elif kind == "truncated-ehdr-60":
        p.write_bytes(good[:60])
    elif kind == "truncated-phdrs":
        p.write_bytes(good[:100])
    elif kind == "past-eof":
        p.write_bytes(good[:-100])
    elif kind == "overlap":
        write_elf_core(p, [CoreSegment(0, bytes(2 * PAGE_SIZE)), CoreSegment(PAGE_SIZE, b"x")])
    elif kind == "process-core":
        write_elf_core(p, [CoreSegment(0, b"a" * 10), CoreSegment(0, b"b" * 10)])
    elif kind == "absurd":
        write_elf_core(p, [CoreSegment(0, b"", memsz=2 << 40)])
    elif kind == "only-mmio":
        write_elf_core(p, [CoreSegment(0xFEC00000, b"", memsz=PAGE_SIZE)])
    elif kind == "absurd-total":
        write_elf_core(p, [CoreSegment(i << 40, b"x", memsz=(1 << 40) - 4096) for i in range(2)])
    elif kind == "absurd-address":
        write_elf_core(p, [CoreSegment(1 << 60, b"x")])
    elif kind == "filesz-gt-memsz":
        write_elf_core(p, [CoreSegment(0, b"x" * 100, memsz=10)])
    elif kind == "offset-past-eof":
        write_elf_core(p, [CoreSegment(0, b"x" * 100, offset=1 << 40, filesz=100)])
    elif kind == "elf32":
        p.write_bytes(b"\x7fELF\x01\x01\x01" + bytes(9) + bytes(100))
    elif kind == "bad-class":
        p.write_bytes(b"\x7fELF\x07\x01\x01" + bytes(9) + bytes(100))
    elif kind == "exec":
        write_elf_core(p, [CoreSegment(0, b"x")], e_type=2)
    elif kind == "no-load":
        write_elf_core(p, [])
    elif kind == "garbage":
        p.write_bytes(b"\x7fELF" + _rand(5000, 13))
    elif kind == "kdump":
        p.write_bytes(b"KDUMP   " + bytes(8184))
    elif kind == "windows-dmp":
        p.write_bytes(b"PAGEDU64" + bytes(8184))
    elif kind == "gzip":
        import gzip

        p.write_bytes(gzip.compress(bytes(8192)))
    elif kind == "xnum-no-section":
        raw = bytearray(good)
        raw[56:58] = struct.pack("<H", 0xFFFF)  # e_phnum = PN_XNUM, no section header
        p.write_bytes(bytes(raw))
    else:
        raise AssertionError(kind)
    return p


HOSTILE = {
    "truncated-ehdr": "truncated ELF header",
    "truncated-ehdr-60": "truncated ELF header",
    "truncated-phdrs": "truncated program header table",
    "past-eof": "past the end of the file",
    "overlap": "overlap",
    "process-core": "process core",
    "absurd": "absurd",
    "only-mmio": "no PT_LOAD",
    "absurd-total": "more than 1 TiB",
    "absurd-address": "absurd",
    "filesz-gt-memsz": "exceeds p_memsz",
    "offset-past-eof": "past the end of the file",
    "elf32": "ELF32",
    "bad-class": "invalid ELF class",
    "exec": "not a core file",
    "no-load": "no PT_LOAD",
    "garbage": "ELF",
    "xnum-no-section": "PN_XNUM",
    "kdump": "kdump block size 0",
    "windows-dmp": "claims 0 physical memory runs",
    "gzip": "gzip-compressed",
}


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_hostile_files_are_refused(tmp_path: Path, kind: str) -> None:
    with pytest.raises(InvalidSourceError, match=HOSTILE[kind]) as err:
        _open(_hostile(tmp_path, kind))
    assert err.value.option == "path"
    assert str(_hostile(tmp_path, kind)) in str(err.value)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.data())
def test_mutated_cores_open_or_fail_cleanly(tmp_path: Path, data: st.DataObject) -> None:
    raw = bytearray(_good_core(tmp_path))
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, min(len(raw) - 1, 400)))
        raw[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(raw)))
    path = tmp_path / "mutant"
    path.write_bytes(bytes(raw[:cut]))
    try:
        mem = _open(path)
    except InvalidSourceError:
        return
    for r in mem.ranges():
        assert len(mem.read(r.address, min(r.size, 4 * MiB))) == min(r.size, 4 * MiB)
    mem.close()


def test_missing_and_permissions(tmp_path: Path) -> None:
    root = tmp_path / "allowed"
    root.mkdir()
    secret = tmp_path / "secret.raw"
    secret.write_bytes(bytes(PAGE_SIZE))
    (root / "link.raw").symlink_to(secret)
    with pytest.raises(SourceNotFoundError):
        _open(root / "missing.raw", root)
    with pytest.raises(SourcePermissionError):
        _open(secret, root)
    with pytest.raises(SourcePermissionError):
        _open(root / "link.raw", root)
    with pytest.raises(SourcePermissionError):
        _open(root / ".." / "secret.raw", root)
    with pytest.raises(SourcePermissionError):
        open_source("file", {"path": str(secret)}, AdapterContext("vm1"))
    with pytest.raises(InvalidOptionError) as err:
        FileAdapter().open({}, AdapterContext("vm1", allowed_paths=(root,)))
    assert err.value.option == "path"


def test_shrunk_file_is_a_source_error(tmp_path: Path) -> None:
    path = tmp_path / "a.raw"
    path.write_bytes(_rand(4 * PAGE_SIZE, 14))
    mem = _open(path)
    os.truncate(path, PAGE_SIZE)
    with pytest.raises(SourceError, match="shrank"):
        mem.read(0, PAGE_SIZE)
    mem.close()


def test_close_with_outstanding_views(tmp_path: Path) -> None:
    path = tmp_path / "a.raw"
    path.write_bytes(_rand(2 * PAGE_SIZE, 15))
    mem = _open(path)
    view = mem.read(0, PAGE_SIZE)
    arr = np.frombuffer(view, np.uint8)
    mem.close()  # must not raise although a view is alive
    del arr, view


@st.composite
def _layouts(draw: st.DrawFn) -> list[CoreSegment]:
    """Non-overlapping segments at byte addresses, ragged, some with a zero tail."""
    segments = []
    cursor = draw(st.integers(0, 3 * PAGE_SIZE))
    for i in range(draw(st.integers(1, 5))):
        filesz = draw(st.integers(1, 3 * PAGE_SIZE))
        memsz = filesz + draw(st.sampled_from([0, 0, 1, PAGE_SIZE + 7]))
        data = bytes([i + 1]) * filesz
        segments.append(CoreSegment(cursor, data, memsz=memsz))
        cursor += memsz + draw(st.integers(0, 2 * PAGE_SIZE))
    order = draw(st.permutations(range(len(segments))))
    return [segments[i] for i in order]


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(_layouts(), st.sampled_from([1, 8, PAGE_SIZE]))
def test_any_layout_reads_like_the_model(
    tmp_path: Path, segs: list[CoreSegment], align: int
) -> None:
    path = write_elf_core(tmp_path / "model.core", segs, align=align)
    mem = _open(path)
    model = bytearray(max(s.paddr + (s.memsz or len(s.data)) for s in segs) + 2 * PAGE_SIZE)
    covered = set()
    for s in segs:
        model[s.paddr : s.paddr + len(s.data)] = s.data
        end = s.paddr + (s.memsz or len(s.data))
        covered |= set(range(s.paddr // PAGE_SIZE, -(-end // PAGE_SIZE)))
    mapped = set()
    for r in mem.ranges():
        assert bytes(mem.read(r.address, r.size)) == bytes(model[r.address : r.end])
        for page in range(r.address // PAGE_SIZE, r.end // PAGE_SIZE):
            assert bytes(mem.read(page * PAGE_SIZE, PAGE_SIZE)) == bytes(
                model[page * PAGE_SIZE : (page + 1) * PAGE_SIZE]
            )
            mapped.add(page)
    assert mapped == covered  # exactly the pages a segment touches
    mem.close()
