"""Snapshot formats written from their layouts (pagefusion.testing's writers).

Every format reads back exactly the memory it was written from, and a
machine started from it shows the figures of that memory; format details
(kdump codecs and excluded pages, re-sent and fill pages of QEMU streams,
libvirt's header, Windows bitmap dumps' absent pages, LiME's ragged ranges)
are checked one by one. Real-QEMU files: test_adapter_snapshots_qemu.py.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pagefusion.adapters.base import (
    PAGE_SIZE,
    AdapterContext,
    GuestMemory,
    InvalidOptionError,
    InvalidSourceError,
    MemoryRange,
)
from pagefusion.adapters.memory import InMemoryGuestMemory
from pagefusion.adapters.registry import open_source
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


def _guest(ranges: list[tuple[int, int]], seed: int = 1) -> InMemoryGuestMemory:
    """Memory with zero, repeated and unique pages in each range."""
    rng = np.random.default_rng(seed)
    pool = rng.integers(0, 256, (16, PAGE_SIZE), dtype=np.uint8)
    pool[:, 1024:] = 7  # compressible; the unique pages below are not
    parts = []
    for address, size in ranges:
        pages = pool[rng.integers(0, 16, size // PAGE_SIZE)].copy()
        pages[::4] = 0
        pages[1::5] = rng.integers(0, 256, (len(pages[1::5]), PAGE_SIZE), dtype=np.uint8)
        parts.append((address, pages.tobytes()))
    return InMemoryGuestMemory(parts)


def _open(path: Path, **options: str) -> GuestMemory:
    ctx = AdapterContext("vm", allowed_paths=(path.parent,))
    return open_source("file", {"path": str(path), **options}, ctx)


def _image(mem: GuestMemory) -> list[tuple[int, bytes]]:
    return [(r.address, bytes(mem.read(r.address, r.size))) for r in mem.ranges()]


def _figures(mem: GuestMemory) -> tuple[int, int, int]:
    engine = FusionEngine(max_pool_bytes=1 << 30)
    try:
        engine.start_machine("vm", mem, page_fusion=True)
        host = engine.stats().host
        return host.guest_pages, host.zero_pages, host.pages_saved
    finally:
        engine.close()


def _count(mem: GuestMemory) -> tuple[int, int, int]:
    rows = np.concatenate([np.frombuffer(d, np.uint8).reshape(-1, PAGE_SIZE)
                           for _, d in _image(mem)])
    zero = ~rows.any(axis=1)
    nonzero = rows[~zero]
    distinct = len(np.unique(nonzero.view(np.dtype((np.void, PAGE_SIZE))).ravel()))
    return len(rows), int(zero.sum()), len(nonzero) - distinct


LAYOUT = [(0, 2 * MiB), (3 * MiB, MiB), (4 * GiB, MiB)]


@pytest.mark.parametrize("codec", ["zlib", "lzo", "snappy", "zstd", "none"])
@pytest.mark.parametrize("flattened", [False, True], ids=["plain", "flattened"])
@pytest.mark.parametrize("exclude_zero", [True, False], ids=["excluded", "shared-zero"])
def test_kdump_codecs_and_layouts(tmp_path: Path, codec: str, flattened: bool,
                                  exclude_zero: bool) -> None:
    guest = _guest(LAYOUT)
    path = write_kdump(tmp_path / "vmcore", guest, codec=codec, flattened=flattened,
                       exclude_zero=exclude_zero)
    mem = _open(path)
    assert getattr(mem, "format", "") == ("kdump-flattened" if flattened else "kdump")
    specials = mem._table.locate(0, 0, 512)[1]  # type: ignore[attr-defined]
    assert (codec == "none") == (not specials)  # compressed pages are there to inflate
    assert _image(mem) == _image(guest)
    assert _figures(mem) == _count(guest)
    if flattened:
        plain = _open(unflatten_kdump(path, tmp_path / "vmcore.plain"))
        assert _image(plain) == _image(guest)


def test_kdump_excluded_and_zero_pages_cost_no_read(tmp_path: Path) -> None:
    guest = _guest([(0, 4 * MiB)])
    for exclude in (True, False):
        mem = _open(write_kdump(tmp_path / f"vmcore{exclude}", guest, exclude_zero=exclude))
        table = mem._table  # type: ignore[attr-defined]
        offsets, specials = table.locate(0, 0, 1024)
        zero_rows = ~np.frombuffer(bytes(guest.read(0, 4 * MiB)), np.uint8).reshape(
            -1, PAGE_SIZE).any(axis=1)
        assert (offsets[zero_rows] == -1).all()
        assert not {s.index for s in specials} & set(np.flatnonzero(zero_rows).tolist())


@pytest.mark.parametrize(("codec", "package"),
                         [("lzo", "lzallright"), ("snappy", "cramjam"), ("zstd", "zstandard")])
def test_kdump_missing_codec_is_a_precise_error(tmp_path: Path, codec: str, package: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_kdump(tmp_path / "vmcore", _guest([(0, MiB)]), codec=codec)
    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return None if name == package else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(InvalidSourceError, match=rf"{codec}-compressed.*{package!r}.*formats"):
        _open(path)


def test_qemu_stream_resent_and_fill_pages(tmp_path: Path) -> None:
    ram = bytearray(_guest([(0, 2 * MiB)]).read(0, 2 * MiB))
    ram[5 * PAGE_SIZE : 6 * PAGE_SIZE] = b"\x7f" * PAGE_SIZE
    stale = [("pc.ram", 3, b"\x01" * PAGE_SIZE), ("pc.ram", 4, b"\x02" * PAGE_SIZE)]
    path = write_qemu_stream(tmp_path / "s", {"pc.ram": bytes(ram), "pc.bios": b"\xaa" * 65536,
                                              "vga.vram": bytes(MiB)},
                             resend=stale, fill_pages={("pc.ram", 5): 0x7F}, pages_per_part=100)
    mem = _open(path)
    assert list(mem.ranges()) == [MemoryRange(0, 2 * MiB), MemoryRange(4 * GiB - 65536, 65536)]
    assert bytes(mem.read(0, 2 * MiB)) == bytes(ram)
    assert bytes(mem.read(4 * GiB - 65536, 65536)) == b"\xaa" * 65536
    saved = write_libvirt_save(tmp_path / "save", path)
    assert _image(_open(saved)) == _image(mem)


@pytest.mark.parametrize(("machine", "size", "low"), [
    ("pc-i440fx-7.2", 3584 * MiB, 3 * GiB), ("pc-i440fx-7.2", 3580 * MiB, 3580 * MiB),
    ("pc-q35-7.2", 2816 * MiB, 2 * GiB), ("pc-q35-7.2", 2812 * MiB, 2812 * MiB),
])
def test_qemu_stream_pc_layouts(tmp_path: Path, machine: str, size: int, low: int) -> None:
    path = write_qemu_stream(tmp_path / "s", {"pc.ram": size}, machine=machine)
    ranges = [MemoryRange(0, low)] + ([MemoryRange(4 * GiB, size - low)] if size > low else [])
    assert list(_open(path).ranges()) == ranges


def test_qemu_stream_below_4g_option(tmp_path: Path) -> None:
    path = write_qemu_stream(tmp_path / "s", {"mach-virt.ram": bytes(MiB)}, machine="virt-7.2")
    with pytest.raises(InvalidSourceError, match=r"'virt-7\.2'.*below_4g"):
        _open(path)
    mem = _open(path, below_4g="512K")
    assert list(mem.ranges()) == [MemoryRange(0, 512 * 1024), MemoryRange(4 * GiB, 512 * 1024)]
    with pytest.raises(InvalidOptionError, match="QEMU migration streams only") as err:
        _open(write_lime(tmp_path / "l", _guest([(0, MiB)])), below_4g="1M")
    assert err.value.option == "below_4g"


@pytest.mark.parametrize("kind", ["full64", "bitmap64", "full32"])
def test_windows_dumps(tmp_path: Path, kind: str) -> None:
    guest = _guest([(0x1000, 0x9F000), (MiB, 3 * MiB), (5 * GiB, MiB)])
    mem = _open(write_windows_dump(tmp_path / "MEMORY.DMP", guest, kind=kind))
    assert getattr(mem, "format", "") == {"full64": "windows-full64", "full32": "windows-full32",
                                          "bitmap64": "windows-bitmap"}[kind]
    assert _image(mem) == _image(guest)
    assert _figures(mem) == _count(guest)


def test_lime_ragged_ranges(tmp_path: Path) -> None:
    low = bytes(range(256)) * (0x9EC00 // 256)  # 0x1000-0x9fbff, as /proc/iomem has it
    guest = _guest([(MiB, 2 * MiB)])
    mem = _open(write_lime(tmp_path / "mem.lime", guest, ranges=[(0x1000, low)]))
    assert list(mem.ranges()) == [MemoryRange(0x1000, 0xA0000 - 0x1000), MemoryRange(MiB, 2 * MiB)]
    got = bytes(mem.read(0x1000, 0x9F000))
    assert got[: len(low)] == low and got[len(low) :] == bytes(0x9F000 - len(low))
    assert bytes(mem.read(MiB, 2 * MiB)) == bytes(guest.read(MiB, 2 * MiB))


def test_reads_never_touch_a_closed_source(tmp_path: Path) -> None:
    mem = _open(write_kdump(tmp_path / "vmcore", _guest([(0, MiB)])))
    mem.close()
    mem.close()
    with pytest.raises(Exception, match="closed"):
        mem.read(0, PAGE_SIZE)




@pytest.mark.parametrize("kind", ["full64", "bitmap64", "full32", "lime", "kdump-zstd"])
def test_synthetic_windows_guests_save_exactly_as_through_their_adapter(
    tmp_path: Path, kind: str
) -> None:
    """Two Windows 10 guests written as snapshots fuse exactly as the guests do."""
    size = 96 * MiB
    guests = [(f"w{i}", {"profile": "Windows10_64", "seed": str(i + 1)}) for i in range(2)]

    def synthetic(name: str, options: dict[str, str]) -> GuestMemory:
        return open_source("synthetic-windows", options,
                           AdapterContext(name, memory_size_bytes=size))

    paths = []
    for name, options in guests:
        guest, path = synthetic(name, options), tmp_path / name
        if kind == "lime":
            write_lime(path, guest)
        elif kind == "kdump-zstd":
            write_kdump(path, guest, codec="zstd")
        else:
            write_windows_dump(path, guest, kind=kind)
        paths.append(path)
    figures = []
    for sources in ([synthetic(n, o) for n, o in guests], [_open(p) for p in paths]):
        engine = FusionEngine(max_pool_bytes=1 << 30)
        try:
            for (name, _), mem in zip(guests, sources, strict=True):
                engine.start_machine(name, mem, page_fusion=True)
            host = engine.stats().host
            figures.append((host.guest_pages, host.zero_pages, host.pages_saved, host.frames_used))
            for name, options in guests:
                check = synthetic(name, options)
                for r in check.ranges():
                    assert engine.read(name, r.address, r.size) == bytes(check.read(r.address,
                                                                                     r.size))
        finally:
            engine.close()
    assert figures[0] == figures[1]
    assert figures[0][2] > 0  # the two guests share pages: there are savings to match
