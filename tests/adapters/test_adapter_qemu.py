"""Real QEMU guests, when qemu-system-x86_64 is installed (skipped otherwise).

A guest runs SeaBIOS (no disk needed) with its RAM in a shared memory file;
QEMU's own ``dump-guest-memory`` then writes an ELF core. The file adapter
reading the core and the shm adapter reading the live RAM must agree byte
for byte, including the PC layout above 4 GiB.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from qemu_support import QEMU, SHM, GiB, MiB, Qemu

from pagefusion.adapters.base import AdapterContext, GuestMemory, MemoryRange
from pagefusion.adapters.registry import open_source

pytestmark = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")


def _same(a: GuestMemory, b: GuestMemory, address: int, size: int) -> None:
    step = 64 * MiB
    for addr in range(address, address + size, step):
        n = min(step, address + size - addr)
        assert bytes(a.read(addr, n)) == bytes(b.read(addr, n)), hex(addr)


@pytest.mark.parametrize("qemu_guest", [128 * MiB, 3840 * MiB], indirect=True,
                         ids=["128M", "3840M-above-4G"])
def test_qemu_core_matches_live_ram(qemu_guest: tuple[Qemu, Path], tmp_path: Path) -> None:
    guest, ram = qemu_guest
    size = os.path.getsize(ram)
    ctx = AdapterContext("q", allowed_paths=(tmp_path, SHM))
    below_4g = size if size < 0xE0000000 else 3 * GiB  # i440fx: 3 GiB low when RAM >= 3.5 GiB
    live = open_source("shm", {"name": ram.name, "below_4g": str(below_4g)}, ctx)
    assert live.live
    live.read(0, 64 * MiB)  # reading a running guest works
    guest.command("stop")
    core_path = tmp_path / "guest.core"
    guest.command("dump-guest-memory", paging=False, protocol=f"file:{core_path}")
    core = open_source("file", {"path": str(core_path)}, ctx)
    ranges = list(core.ranges())
    ram_ranges = [r for r in ranges if r.address != 0xFFFC0000]
    assert ram_ranges == list(live.ranges())
    assert MemoryRange(0xFFFC0000, 0x40000) in ranges  # the BIOS ROM, high
    for r in ram_ranges:
        _same(core, live, r.address, r.size)
    bios = bytes(core.read(0xFFFC0000, 0x40000))
    assert bios[-16:] != bytes(16)  # the reset vector is there
    core.close()
    live.close()
