"""QEMU migration streams and kdump-compressed cores written by real QEMU.

A SeaBIOS guest with its RAM in /dev/shm is paused; part of its RAM is
overwritten with zero, repeated and unique pages so fusion has something to
find; then QEMU itself writes its memory as an ELF core, a flattened zlib
kdump (``dump-guest-memory`` format ``kdump-zlib``) and a migration stream
(``migrate "exec:cat > FILE"``). The plain kdump is the flattened one
rewritten as ``makedumpfile -R`` would; the libvirt save image is the stream
behind a header written from libvirt's layout. Every page read through the
``file`` adapter must equal the paused RAM byte for byte (and QEMU's ELF
core for the BIOS above it), and an engine started from each file must show
the figures an independent count of those bytes gives.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np
import pytest
from qemu_support import QEMU, GiB, MiB, Qemu, migrate_to_file

from pagefusion.adapters.base import PAGE_SIZE, AdapterContext, GuestMemory, MemoryRange
from pagefusion.adapters.registry import open_source
from pagefusion.clients.snapshot_writers import unflatten_kdump, write_libvirt_save
from pagefusion.server.engine import FusionEngine

pytestmark = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")
BIOS = MemoryRange(0xFFFC0000, 0x40000)


def _fill_ram(ram: Path) -> None:
    """Zero, repeated and unique pages over 32 MiB from 16 MiB (a paused guest)."""
    rng = np.random.default_rng(13)
    pool = rng.integers(0, 256, (64, PAGE_SIZE), dtype=np.uint8)
    pages = pool[rng.integers(0, 64, 8192)]
    pages[::3] = 0
    pages[1::7] = rng.integers(0, 256, (len(pages[1::7]), PAGE_SIZE), dtype=np.uint8)
    with open(ram, "r+b") as f:
        f.seek(16 * MiB)
        f.write(pages.tobytes())


def _layout(size: int) -> list[tuple[MemoryRange, int]]:
    """(guest-physical range, offset in the RAM file) as i440fx places RAM."""
    low = size if size < 0xE0000000 else 3 * GiB
    out = [(MemoryRange(0, low), 0)]
    if size > low:
        out.append((MemoryRange(4 * GiB, size - low), low))
    return out


def _merged(ranges: list[MemoryRange]) -> list[tuple[int, int]]:
    """Ranges as (start, end) with touching ones joined (a kdump bitmap joins them)."""
    out: list[tuple[int, int]] = []
    for r in sorted(ranges, key=lambda r: r.address):
        if out and out[-1][1] == r.address:
            out[-1] = (out[-1][0], r.end)
        else:
            out.append((r.address, r.end))
    return out


def _same_as_ram(mem: GuestMemory, ram: mmap.mmap, elf: GuestMemory) -> None:
    size = len(ram)
    layout = _layout(size)
    assert _merged(list(mem.ranges())) == _merged([r for r, _ in layout] + [BIOS])
    assert _merged(list(mem.ranges())) == _merged(list(elf.ranges()))
    step = 64 * MiB
    for r, offset in layout:
        for at in range(0, r.size, step):
            n = min(step, r.size - at)
            got = bytes(mem.read(r.address + at, n))
            assert got == ram[offset + at : offset + at + n], hex(r.address + at)
    assert bytes(mem.read(BIOS.address, BIOS.size)) == bytes(elf.read(BIOS.address, BIOS.size))


def _independent_count(ram: mmap.mmap, bios: bytes) -> tuple[int, int, int]:
    """(pages, zero pages, pages saved) by exact content, without the engine."""
    rows = np.frombuffer(ram, dtype=np.uint8).reshape(-1, PAGE_SIZE)
    rows = np.concatenate((rows, np.frombuffer(bios, dtype=np.uint8).reshape(-1, PAGE_SIZE)))
    zero = ~rows.any(axis=1)
    nonzero = rows[~zero]
    distinct = len(np.unique(nonzero.view(np.dtype((np.void, PAGE_SIZE))).ravel()))
    return len(rows), int(zero.sum()), len(nonzero) - distinct


@pytest.mark.parametrize("qemu_guest", [128 * MiB, 3840 * MiB], indirect=True,
                         ids=["128M", "3840M-above-4G"])
def test_qemu_written_snapshots_read_as_the_paused_ram(
    qemu_guest: tuple[Qemu, Path], tmp_path: Path
) -> None:
    guest, ram_path = qemu_guest
    guest.command("stop")
    _fill_ram(ram_path)
    files = {name: tmp_path / name for name in ("core.elf", "kdump.flat", "stream.qevm")}
    guest.command("dump-guest-memory", paging=False, protocol=f"file:{files['core.elf']}")
    guest.command("dump-guest-memory", paging=False, protocol=f"file:{files['kdump.flat']}",
                  format="kdump-zlib")
    guest.command("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
    migrate_to_file(guest, files["stream.qevm"])
    files["kdump.plain"] = unflatten_kdump(files["kdump.flat"], tmp_path / "kdump.plain")
    files["libvirt.save"] = write_libvirt_save(tmp_path / "libvirt.save", files["stream.qevm"])
    formats = {"stream.qevm": "qemu-stream", "libvirt.save": "qemu-stream",
               "kdump.flat": "kdump-flattened", "kdump.plain": "kdump"}
    ctx = AdapterContext("q", allowed_paths=(tmp_path,))
    elf = open_source("file", {"path": str(files["core.elf"])}, ctx)
    with open(ram_path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as ram:
        for name, fmt in formats.items():
            mem = open_source("file", {"path": str(files[name])}, ctx)
            assert getattr(mem, "format", None) == fmt
            _same_as_ram(mem, ram, elf)
            mem.close()
        if len(ram) > GiB:
            elf.close()
            return
        pages, zero, saved = _independent_count(ram, bytes(elf.read(BIOS.address, BIOS.size)))
    elf.close()
    assert zero > 1000 and saved > 1000  # the filled RAM gives fusion something to find
    for name in formats:
        engine = FusionEngine(max_pool_bytes=1 << 30)
        try:
            mem = open_source("file", {"path": str(files[name])}, ctx)
            engine.start_machine("q", mem, page_fusion=True)
            host = engine.stats().host
            assert (host.guest_pages, host.zero_pages, host.pages_saved) == (pages, zero, saved)
            assert host.guest_pages == host.frames_used + host.pages_saved + host.zero_pages
        finally:
            engine.close()


def test_stream_of_a_running_guest_resends_pages(qemu_guest: tuple[Qemu, Path],
                                                 tmp_path: Path) -> None:
    """A live migration's stream (the guest keeps running) still reads back whole."""
    guest, ram_path = qemu_guest
    stream = tmp_path / "live.qevm"
    migrate_to_file(guest, stream)  # QEMU pauses the guest for the final pass itself
    ctx = AdapterContext("q", allowed_paths=(tmp_path,))
    mem = open_source("file", {"path": str(stream)}, ctx)
    with open(ram_path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as ram:
        size = len(ram)
        assert bytes(mem.read(0, size)) == ram[:size]
    mem.close()
    assert os.path.getsize(stream) < size  # zero pages cost a flag, not a page
