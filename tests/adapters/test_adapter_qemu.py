"""Real QEMU guests, when qemu-system-x86_64 is installed (skipped otherwise).

A guest runs SeaBIOS (no disk needed) with its RAM in a shared memory file;
QEMU's own ``dump-guest-memory`` then writes an ELF core. The file adapter
reading the core and the shm adapter reading the live RAM must agree byte
for byte, including the PC layout above 4 GiB.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pagefusion.adapters.base import AdapterContext, GuestMemory, MemoryRange
from pagefusion.adapters.registry import open_source

QEMU = shutil.which("qemu-system-x86_64")
pytestmark = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")
MiB = 1 << 20
GiB = 1 << 30
SHM = Path("/dev/shm")


class Qemu:
    def __init__(self, ram: Path, size: int, sock: Path) -> None:
        assert QEMU is not None
        self.proc = subprocess.Popen(
            [QEMU, "-machine", "pc,memory-backend=mem", "-m", f"{size // MiB}M",
             "-object", f"memory-backend-file,id=mem,size={size // MiB}M,mem-path={ram},share=on",
             "-display", "none", "-nodefaults", "-serial", "none", "-accel", "tcg",
             "-qmp", f"unix:{sock},server=on,wait=off"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 30
        while not sock.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                pytest.skip(f"QEMU did not start: {err.strip()[:200]}")
            time.sleep(0.05)
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(120)  # a wedged QEMU fails the test instead of hanging it
        self.sock.connect(str(sock))
        self.io = self.sock.makefile("rw")
        self.io.readline()
        self.command("qmp_capabilities")

    def command(self, name: str, **arguments: object) -> object:
        self.io.write(json.dumps({"execute": name, "arguments": arguments}) + "\n")
        self.io.flush()
        while True:
            reply = json.loads(self.io.readline())
            if "error" in reply:
                raise RuntimeError(reply["error"])
            if "return" in reply:
                return reply["return"]

    def close(self) -> None:
        with contextlib.suppress(OSError, RuntimeError, ValueError):
            self.command("quit")
        self.sock.close()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def qemu_guest(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Qemu, Path]]:
    size = getattr(request, "param", 128 * MiB)
    if size > GiB and not os.environ.get("PAGEFUSION_QEMU_BIG"):
        pytest.skip("set PAGEFUSION_QEMU_BIG=1 for the 3.75 GiB guest (about a minute)")
    free_shm, free_tmp = shutil.disk_usage(SHM).free, shutil.disk_usage(tmp_path).free
    if free_shm < size + 512 * MiB or free_tmp < 2 * size:
        pytest.skip("not enough space for the guest's RAM and core")
    ram = SHM / f"pagefusion-test-{uuid.uuid4().hex[:8]}"
    guest = Qemu(ram, size, tmp_path / "qmp.sock")
    try:
        time.sleep(1.5)  # let SeaBIOS write its tables into RAM
        yield guest, ram
    finally:
        guest.close()
        ram.unlink(missing_ok=True)


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
