"""A real QEMU guest for tests (the adapter tests use it through ``qemu_guest``).

A guest runs SeaBIOS (no disk needed; or a kernel, through ``extra_args``)
with its RAM in a shared memory file in /dev/shm and a QMP socket; tests
pause it and have QEMU write its memory in every format QEMU writes, or
scan it while it runs.
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
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

QEMU = shutil.which("qemu-system-x86_64")
MiB = 1 << 20
GiB = 1 << 30
SHM = Path("/dev/shm")


class Qemu:
    """One QEMU process with a QMP connection."""

    def __init__(
        self, ram: Path, size: int, sock: Path, extra_args: Sequence[str] = ()
    ) -> None:
        assert QEMU is not None
        self.proc = subprocess.Popen(
            [QEMU, "-machine", "pc,memory-backend=mem", "-m", f"{size // MiB}M",
             "-object", f"memory-backend-file,id=mem,size={size // MiB}M,mem-path={ram},share=on",
             "-display", "none", "-nodefaults", "-serial", "none", "-accel", "tcg",
             "-qmp", f"unix:{sock},server=on,wait=off", *extra_args],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        try:  # a QEMU that never answers is killed, not left running
            deadline = time.monotonic() + 30
            while not sock.exists():
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                    pytest.skip(f"QEMU did not start: {err.strip()[:200]}")
                time.sleep(0.05)
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.settimeout(120)  # a wedged QEMU fails the test instead of hanging it
            while True:  # the socket file appears a moment before QEMU listens on it
                try:
                    self.sock.connect(str(sock))
                    break
                except ConnectionRefusedError:
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            self.io = self.sock.makefile("rw")
            self.io.readline()
            self.command("qmp_capabilities")
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            raise

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


@contextlib.contextmanager
def guest(tmp_path: Path, size: int) -> Iterator[tuple[Qemu, Path]]:
    """A running guest of ``size`` bytes and its RAM file; quit and removed after."""
    if QEMU is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    if size > GiB and not os.environ.get("PAGEFUSION_QEMU_BIG"):
        pytest.skip("set PAGEFUSION_QEMU_BIG=1 for the 3.75 GiB guest (about a minute)")
    free_shm, free_tmp = shutil.disk_usage(SHM).free, shutil.disk_usage(tmp_path).free
    if free_shm < size + 512 * MiB or free_tmp < 2 * size:
        pytest.skip("not enough space for the guest's RAM and core")
    ram = SHM / f"pagefusion-test-{uuid.uuid4().hex[:8]}"
    try:
        qemu = Qemu(ram, size, tmp_path / "qmp.sock")
        try:
            time.sleep(1.5)  # let SeaBIOS write its tables into RAM
            yield qemu, ram
        finally:
            qemu.close()
    finally:
        ram.unlink(missing_ok=True)


def migrate_to_file(qemu: Qemu, path: Path) -> None:
    """``migrate \"exec:cat > FILE\"`` and wait until QEMU reports it complete."""
    qemu.command("migrate", uri=f"exec:cat > {path}")
    deadline = time.monotonic() + 300
    while True:
        status = qemu.command("query-migrate")
        state = status.get("status") if isinstance(status, dict) else None
        if state == "completed":
            return
        if state in ("failed", "cancelled") or time.monotonic() > deadline:
            raise RuntimeError(f"migration did not complete: {status}")
        time.sleep(0.1)
