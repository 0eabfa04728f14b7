"""The shm adapter: live segments changed by another process, shrink and vanish."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np
import pytest

from pagefusion.adapters.base import (
    PAGE_SIZE,
    AdapterContext,
    GuestMemory,
    InvalidOptionError,
    InvalidSourceError,
    MemoryRange,
    SourceError,
    SourcePermissionError,
)
from pagefusion.adapters.registry import open_source

MiB = 1 << 20

# A guest stand-in: maps the segment and changes pages when told to over stdin.
WRITER = r"""
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
m = mmap.mmap(fd, os.fstat(fd).st_size)
for line in sys.stdin:
    page, value = map(int, line.split())
    m[page * 4096:(page + 1) * 4096] = bytes([value]) * 4096
    m.flush()
    print("ok", flush=True)
"""


class Writer:
    def __init__(self, path: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )

    def fill(self, page: int, value: int) -> None:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(f"{page} {value}\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "ok"

    def stop(self) -> None:
        assert self.proc.stdin
        self.proc.stdin.close()
        self.proc.wait(timeout=10)


@pytest.fixture
def segment(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "guest.ram"
    path.write_bytes(bytes(4 * MiB))
    yield path


def _open(path: Path, **options: str) -> GuestMemory:
    ctx = AdapterContext("vm1", allowed_paths=(path.parent,))
    return open_source("shm", {"path": str(path), **options}, ctx)


@pytest.mark.parametrize("use_map", ["false", "true"])
def test_reads_see_a_writer_process(segment: Path, use_map: str) -> None:
    mem = _open(segment, map=use_map)
    assert mem.live
    assert list(mem.ranges()) == [MemoryRange(0, 4 * MiB)]
    writer = Writer(segment)
    try:
        for scan in range(3):
            writer.fill(scan * 10, scan + 1)
            writer.fill(1023, 0xAB + scan)
            pages = np.frombuffer(mem.read(0, 4 * MiB), np.uint8).reshape(-1, PAGE_SIZE)
            assert (pages[scan * 10] == scan + 1).all()
            assert (pages[1023] == 0xAB + scan).all()
            changed = np.flatnonzero(pages.any(axis=1)).tolist()
            assert changed == [i * 10 for i in range(scan + 1)] + [1023]
    finally:
        writer.stop()
    mem.close()


@pytest.mark.parametrize("use_map", ["false", "true"])
def test_shrink_and_vanish_are_source_errors(segment: Path, use_map: str) -> None:
    mem = _open(segment, map=use_map)
    mem.read(0, 4 * MiB)
    os.truncate(segment, 2 * MiB)
    with pytest.raises(SourceError, match="shrank"):
        mem.read(0, 4 * MiB)
    assert len(mem.read(0, MiB)) == MiB  # what is still there stays readable
    segment.unlink()
    with pytest.raises(SourceError, match="vanished"):
        mem.read(0, MiB)
    segment.write_bytes(bytes(4 * MiB))
    with pytest.raises(SourceError, match="replaced"):
        mem.read(0, MiB)
    mem.close()


def test_shrink_between_check_and_copy_is_caught(
    segment: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mem = _open(segment)
    from pagefusion.adapters import shm

    monkeypatch.setattr(shm.ShmGuestMemory, "_check", lambda self, end: None)
    os.truncate(segment, MiB)
    with pytest.raises(SourceError, match="while reading"):
        mem.read(0, 4 * MiB)
    mem.close()


def test_posix_shm_by_name() -> None:
    name = f"pagefusion-test-{uuid.uuid4().hex[:8]}"
    seg = shared_memory.SharedMemory(name=name, create=True, size=10000)
    try:
        seg.buf[:5] = b"hello"
        ctx = AdapterContext("vm1", allowed_paths=(Path("/dev/shm"),))
        mem = open_source("shm", {"name": name}, ctx)
        assert list(mem.ranges()) == [MemoryRange(0, 3 * PAGE_SIZE)]  # ragged: padded
        data = bytes(mem.read(0, 3 * PAGE_SIZE))
        assert data[:5] == b"hello" and data[10000:] == bytes(3 * PAGE_SIZE - 10000)
        mem.close()
        with pytest.raises(SourcePermissionError):
            open_source("shm", {"name": name}, AdapterContext("vm1"))
    finally:
        seg.close()
        seg.unlink()


def test_pc_layout_and_write_through(segment: Path) -> None:
    mem = _open(segment, below_4g=str(3 * MiB), writable="true")
    assert list(mem.ranges()) == [MemoryRange(0, 3 * MiB), MemoryRange(4 << 30, MiB)]
    mem.write((4 << 30) + 5, b"abc")
    assert segment.read_bytes()[3 * MiB + 5 : 3 * MiB + 8] == b"abc"
    assert bytes(mem.read(4 << 30, PAGE_SIZE))[5:8] == b"abc"
    mem.close()
    ro = _open(segment)
    with pytest.raises(NotImplementedError, match="read-only"):
        ro.write(0, b"x")
    ro.close()


def test_option_errors(segment: Path, tmp_path: Path) -> None:
    ctx = AdapterContext("vm1", allowed_paths=(tmp_path,))
    for options, option in [
        ({}, "path"),
        ({"path": str(segment), "name": "x"}, "name"),
        ({"name": "a/b"}, "name"),
        ({"name": ".."}, "name"),
        ({"path": str(segment), "map": "sometimes"}, "map"),
        ({"path": str(segment), "below_4g": "1000"}, "below_4g"),
    ]:
        with pytest.raises(InvalidOptionError) as err:
            open_source("shm", options, ctx)
        assert err.value.option == option, options
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(InvalidSourceError, match="empty"):
        open_source("shm", {"path": str(empty)}, ctx)
    (tmp_path / "escape").symlink_to("/etc/passwd")
    with pytest.raises(SourcePermissionError):
        open_source("shm", {"path": str(tmp_path / "escape")}, ctx)


def test_a_source_between_passes_holds_no_read_buffer_and_the_next_reuses_it(
    tmp_path: Path,
) -> None:
    first, second = tmp_path / "a.ram", tmp_path / "b.ram"
    first.write_bytes(b"\x01" * (2 * MiB))
    second.write_bytes(b"\x02" * (2 * MiB))
    a, b = _open(first), _open(second)
    view = np.frombuffer(a.read(0, 2 * MiB), np.uint8)
    held = view.ctypes.data
    assert (view == 1).all()
    del view
    a.idle()  # the pass is over: the buffer goes to the next reader
    assert a._buffer.size == 0
    reread = np.frombuffer(b.read(0, MiB), np.uint8)
    assert reread.ctypes.data == held  # its pages are resident already
    assert (reread == 2).all()
    del reread
    assert (np.frombuffer(a.read(MiB, MiB), np.uint8) == 1).all()  # reads go on after idle
    a.close()
    b.close()


def test_a_closed_source_gives_no_buffer_a_read_may_still_fill(tmp_path: Path) -> None:
    from pagefusion.adapters.helpers import read_buffer

    path = tmp_path / "a.ram"
    path.write_bytes(b"\x01" * MiB)
    a = _open(path)
    in_flight = np.frombuffer(a.read(0, MiB), np.uint8)  # as if a scan were still reading
    a.close()  # a stop does not wait for that read
    assert read_buffer(MiB).ctypes.data != in_flight.ctypes.data
