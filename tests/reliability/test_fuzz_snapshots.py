"""Hostile snapshot files of every format the ``file`` adapter reads.

Named variants (truncated, lying sizes and counts, overlapping runs, bitmaps
past the end, pages inflating past a page, headers claiming petabytes) must
be refused with an InvalidSourceError naming the problem, at open or, for a
page's compressed bytes, at the read that meets it; hypothesis mutates and
cuts good files of every format, and each either opens and reads whole or
is refused the same way (never another exception, never a wrong length).
Over a real server: a hostile file fails StartMachine with INVALID_ARGUMENT,
the machine stays powered off, and the server goes on serving.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagefusion.adapters.base import PAGE_SIZE, AdapterContext, GuestMemory, InvalidSourceError
from pagefusion.adapters.memory import InMemoryGuestMemory
from pagefusion.adapters.registry import open_source
from pagefusion.clients.errors import PageFusionError
from pagefusion.testing import (
    run_server,
    write_kdump,
    write_libvirt_save,
    write_lime,
    write_qemu_stream,
    write_windows_dump,
)

MiB = 1 << 20


def _guest(ranges: tuple[tuple[int, int], ...] = ((0, MiB), (2 * MiB, MiB))) -> GuestMemory:
    rng = np.random.default_rng(7)
    parts = []
    for address, size in ranges:
        pages = rng.integers(0, 256, (size // PAGE_SIZE, PAGE_SIZE), dtype=np.uint8)
        pages[:, 2048:] = 0  # compressible
        pages[::3] = 0
        parts.append((address, pages.tobytes()))
    return InMemoryGuestMemory(parts)


def _read_all(path: Path) -> None:
    """Open and read every page; only InvalidSourceError may stop it."""
    ctx = AdapterContext("h", allowed_paths=(path.parent,))
    mem = open_source("file", {"path": str(path)}, ctx)
    try:
        for r in mem.ranges():
            for at in range(r.address, r.end, 4 * MiB):
                n = min(4 * MiB, r.end - at)
                assert len(mem.read(at, n)) == n
    finally:
        mem.close()


def _patch(path: Path, offset: int, data: bytes) -> Path:
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))
    return path


def _cut(path: Path, keep: float) -> Path:
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])
    return path


def _stream(p: Path, **kw: object) -> Path:
    ram = bytes(_guest(((0, MiB),)).read(0, MiB))
    return write_qemu_stream(p, {"pc.ram": ram}, pages_per_part=64, **kw)  # type: ignore[arg-type]


def _ram_list_at(p: Path) -> int:
    """Offset of the size of the first RAM block in the block list."""
    return p.read_bytes().index(b"\x06pc.ram") + 7


def _mem_size_at(p: Path) -> int:
    """Offset of the RAM section's MEM_SIZE word."""
    return p.read_bytes().index(b"\x03ram") + 12


def _first_page_flags_at(p: Path) -> int:
    """Offset of the flags byte of the first page record (it names its block)."""
    raw = p.read_bytes()
    return raw.index(b"\x06pc.ram", _ram_list_at(p)) - 1


def _kdump(p: Path, **kw: object) -> Path:
    return write_kdump(p, _guest(), **kw)  # type: ignore[arg-type]


def _hook(stored: bytes, flags: int) -> Callable[[int, bytes, int], tuple[bytes, int]]:
    """Replace the first compressed page (pfn 1) with ``stored`` and ``flags``."""
    return lambda pfn, old, old_flags: (stored, flags) if pfn == 1 else (old, old_flags)


def _flat_overlap(p: Path) -> Path:
    raw = bytearray(_kdump(p, flattened=True).read_bytes())
    end = raw.rindex(struct.pack(">qq", -1, -1))
    raw[end:end] = struct.pack(">qq", 8, 4) + b"evil"
    p.write_bytes(bytes(raw))
    return p


def _orphan(p: Path) -> Path:
    """A dumped frame (pfn 300, in the hole at 1-2 MiB) that does not exist."""
    _kdump(p)
    half = PAGE_SIZE * 1  # one bitmap block per half for 3 MiB of frames
    return _patch(p, 2 * PAGE_SIZE + half + 300 // 8, bytes([1 << (300 % 8)]))


def _win(p: Path, **kw: object) -> Path:
    return write_windows_dump(p, _guest(), **kw)  # type: ignore[arg-type]


def _append(p: Path, data: bytes) -> Path:
    p.write_bytes(p.read_bytes() + data)
    return p


def _lime_raw(p: Path, start: int, last: int, data: bytes = b"") -> Path:
    p.write_bytes(struct.pack("<4sIQQ8x", b"EMiL", 1, start, last) + data)
    return p


#: name -> (builder, what the error must say, whether the read (not the open) finds it)
HOSTILE: dict[str, tuple[Callable[[Path], Path], str, bool]] = {
    # QEMU migration streams
    "qemu-cut-in-ram": (lambda p: _cut(_stream(p), 0.5), "truncated QEMU migration stream", False),
    "qemu-cut-after-ram": (lambda p: _stream(p, end=False), "truncated QEMU migration stream",
                           False),
    "qemu-cut-device-state": (lambda p: p.write_bytes(_stream(p).read_bytes()[:-10]) and p,
                              "end-of-stream marker", False),
    "qemu-version": (lambda p: _patch(_stream(p), 4, struct.pack(">I", 2)), "version 2", False),
    "qemu-petabyte": (lambda p: _patch(p := _stream(p), _mem_size_at(p),
                                       struct.pack(">Q", 1 << 50 | 4)),
                      "limit 1 TiB", False),
    "qemu-lying-block-size": (lambda p: _patch(p := _stream(p), _ram_list_at(p),
                                               struct.pack(">Q", 2 * MiB)),
                              "does not fit", False),
    "qemu-page-past-block": (lambda p: _stream(p, resend=[("pc.ram", 1 << 20, bytes(4096))]),
                             "past the end of block", False),
    "qemu-unknown-block": (lambda p: _stream(p, resend=[("nope", 0, bytes(4096))]),
                           "unknown block 'nope'", False),
    "qemu-xbzrle": (lambda p: _patch(p := _stream(p), _first_page_flags_at(p), b"\x48"),
                    "XBZRLE", False),
    "qemu-ignore-shared": (lambda p: _stream(p, capabilities=["x-ignore-shared"]),
                           "x-ignore-shared", False),
    "libvirt-gzip": (lambda p: write_libvirt_save(p, _stream(p.with_suffix(".s")), compressed=1),
                     "compressed with gzip", False),
    "libvirt-xml-past-end": (lambda p: _patch(write_libvirt_save(p, _stream(p.with_suffix(".s"))),
                                              20, struct.pack("<I", 1 << 30)),
                             "past the end of the file", False),
    # kdump-compressed
    "kdump-cut": (lambda p: _cut(_kdump(p), 0.6), "outside the dump", False),
    "kdump-cut-bitmaps": (lambda p: _cut(_kdump(p), 0.01), "truncated kdump", False),
    "kdump-petabyte": (lambda p: _kdump(p, max_mapnr=1 << 45), "impossible", False),
    "kdump-mapnr-past-bitmap": (lambda p: _kdump(p, max_mapnr=1 << 39), "cannot cover", False),
    "kdump-bitmap-past-end": (lambda p: _patch(_kdump(p), 436, struct.pack("<I", 1 << 20)),
                              "bitmaps end", False),
    "kdump-odd-bitmap": (lambda p: _kdump(p, bitmap_blocks=3), "two equal halves", False),
    "kdump-bits-past-mapnr": (lambda p: _kdump(p, max_mapnr=700), "past max_mapnr", False),
    "kdump-orphan-frame": (_orphan, "does not exist", False),
    "kdump-oversize-page": (lambda p: _kdump(p, descriptor_size=5000), "stored size 5000", False),
    "kdump-short-raw-page": (lambda p: _kdump(p, codec="none", descriptor_size=100),
                             "stored size 100", False),
    "kdump-unknown-codec": (lambda p: _kdump(p, page_hook=_hook(b"x" * 10, 0x40)),
                            "unknown compression flags 0x40", False),
    "kdump-inflates-past-a-page": (lambda p: _kdump(p, page_hook=_hook(zlib.compress(bytes(8192)),
                                                                       1)),
                                   "more than one page", True),
    "kdump-inflates-short": (lambda p: _kdump(p, page_hook=_hook(zlib.compress(b"x" * 100), 1)),
                             "inflates to 100 bytes", True),
    "kdump-corrupt-zlib": (lambda p: _kdump(p, page_hook=_hook(b"\x78\x9c" + b"\xff" * 30, 1)),
                           "corrupt zlib", True),
    "kdump-snappy-lies": (lambda p: _kdump(p, codec="snappy", page_hook=_hook(b"\x80\x40" + b"\0"
                                                                              * 8, 4)),
                          "snappy data claims 8192 bytes", True),
    "kdump-big-endian": (lambda p: _patch(_kdump(p), 8, struct.pack(">i", 6)), "big-endian",
                         False),
    "kdump-flat-cut": (lambda p: _cut(_kdump(p, flattened=True), 0.5), "flattened kdump", False),
    "kdump-flat-overlap": (_flat_overlap, "records overlap", False),
    # Windows crash dumps
    "win-cut": (lambda p: _cut(_win(p), 0.5), "truncated Windows full dump", False),
    "win-cut-header": (lambda p: _cut(_win(p), 0.001), "truncated Windows dump header", False),
    "win-lying-pages": (lambda p: _win(p, number_of_pages=769), "NumberOfPages", False),
    "win-overlapping-runs": (lambda p: _win(p, runs=[(0, 256), (128, 256)]), "overlap", False),
    "win-too-many-runs": (lambda p: _patch(_win(p), 0x88, struct.pack("<I", 1000)),
                          "claims 1000 physical memory runs", False),
    "win-petabyte-run": (lambda p: _win(p, runs=[(1 << 45, 10)]), "52-bit", False),
    "win-triage": (lambda p: _patch(_win(p), 0xF98, struct.pack("<I", 4)), "triage", False),
    "win-bitmap-lying-count": (lambda p: _win(p, kind="bitmap64", present_pages=1),
                               "TotalPresentPages", False),
    "win-bitmap-past-end": (lambda p: _patch(_win(p, kind="bitmap64"), 0x2030,
                                             struct.pack("<Q", 1 << 40)), "does not fit", False),
    "win-bitmap-outside-runs": (lambda p: _win(p, kind="bitmap64", runs=[(0, 128)]),
                                "marked present", False),
    "win32-cut": (lambda p: _cut(_win(p, kind="full32"), 0.5), "truncated Windows full dump",
                  False),
    "win32-lying-pages": (lambda p: _win(p, kind="full32", number_of_pages=1), "NumberOfPages",
                          False),
    # LiME
    "lime-cut": (lambda p: _cut(write_lime(p, _guest()), 0.3), "claims", False),
    "lime-cut-late": (lambda p: _cut(write_lime(p, _guest()), 0.99), "claims", False),
    "lime-overlap": (lambda p: write_lime(p, ranges=[(0, b"x" * 8192), (4096, b"y" * 8192)]),
                     "overlap", False),
    "lime-bad-magic": (lambda p: _append(write_lime(p, _guest()), b"x" * 40), "no EMiL magic",
                       False),
    "lime-reversed": (lambda p: _lime_raw(p, 8192, 4095), "reversed", False),
    "lime-petabyte": (lambda p: _lime_raw(p, 0, (1 << 50) - 1, b"x" * 100), "claims", False),
    "lime-beyond-52-bits": (lambda p: _lime_raw(p, 0, 1 << 60), "52-bit", False),
}


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_hostile_snapshots_are_refused_by_name(tmp_path: Path, kind: str) -> None:
    build, message, at_read = HOSTILE[kind]
    path = build(tmp_path / kind)
    ctx = AdapterContext("h", allowed_paths=(tmp_path,))
    if at_read:
        mem = open_source("file", {"path": str(path)}, ctx)
        with pytest.raises(InvalidSourceError, match=message) as err:
            for r in mem.ranges():
                mem.read(r.address, r.size)
        mem.close()
    else:
        with pytest.raises(InvalidSourceError, match=message) as err:
            open_source("file", {"path": str(path)}, ctx)
    assert err.value.option == "path"
    assert str(path) in str(err.value)
    assert len(str(err.value)) < 400 + len(str(path))


GOOD: dict[str, Callable[[Path], Path]] = {
    "qemu": _stream,
    "libvirt": lambda p: write_libvirt_save(p, _stream(p.with_suffix(".s"))),
    "kdump": _kdump,
    "kdump-flat": lambda p: _kdump(p, flattened=True, exclude_zero=False),
    "kdump-snappy": lambda p: _kdump(p, codec="snappy"),
    "win-full64": _win,
    "win-bitmap": lambda p: _win(p, kind="bitmap64"),
    "win-full32": lambda p: _win(p, kind="full32"),
    "lime": lambda p: write_lime(p, _guest()),
}


@pytest.mark.parametrize("fmt", list(GOOD))
def test_good_files_read_back(tmp_path: Path, fmt: str) -> None:
    path = GOOD[fmt](tmp_path / fmt)
    _read_all(path)
    mem = open_source("file", {"path": str(path)}, AdapterContext("h", allowed_paths=(tmp_path,)))
    guest = _guest()
    if fmt not in ("qemu", "libvirt"):
        for r in guest.ranges():
            assert bytes(mem.read(r.address, r.size)) == bytes(guest.read(r.address, r.size))
    mem.close()


@pytest.mark.parametrize("fmt", list(GOOD))
def test_truncated_anywhere_is_refused(tmp_path: Path, fmt: str) -> None:
    raw = GOOD[fmt](tmp_path / fmt).read_bytes()
    path = tmp_path / "cut"
    step = len(raw) // 23
    # Fewer bytes than a signature are a (tiny) raw image: cut after it.
    cuts = sorted({16, 31, 33, 100, 464, 4095, 4097, 8193, *range(16, len(raw), step)})
    for cut in cuts:
        path.write_bytes(raw[:cut])
        try:
            _read_all(path)
        except InvalidSourceError:
            continue
        # Only LiME can be cut into a shorter valid file: between two ranges.
        assert fmt == "lime" and raw[cut : cut + 4] == b"EMiL", cut


_FILES: dict[str, bytes] = {}


def _good_bytes(fmt: str, tmp: Path) -> bytes:
    if fmt not in _FILES:
        _FILES[fmt] = GOOD[fmt](tmp / f"good-{fmt}").read_bytes()
    return _FILES[fmt]


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.data())
def test_mutated_snapshots_open_or_fail_cleanly(tmp_path: Path, data: st.DataObject) -> None:
    fmt = data.draw(st.sampled_from(sorted(GOOD)))
    raw = bytearray(_good_bytes(fmt, tmp_path))
    hot = data.draw(st.sampled_from([64, 512, 0x2100, 0x5000, len(raw)]))
    for _ in range(data.draw(st.integers(1, 6))):
        pos = data.draw(st.integers(0, min(len(raw), hot) - 1))
        if data.draw(st.booleans()):
            raw[pos] = data.draw(st.integers(0, 255))
        else:  # a field set to an extreme: zero, all ones, a huge count
            width = data.draw(st.sampled_from([4, 8]))
            raw[pos : pos + width] = data.draw(st.sampled_from(
                [bytes(width), b"\xff" * width, (1 << 40).to_bytes(width * 2, "little")[:width]]))
    cut = data.draw(st.one_of(st.just(len(raw)), st.integers(1, len(raw))))
    path = tmp_path / "mutant"
    path.write_bytes(bytes(raw[:cut]))
    try:
        _read_all(path)
    except InvalidSourceError as exc:
        assert exc.option == "path" and "Traceback" not in str(exc)


def test_hostile_files_fail_start_and_the_server_serves_on(tmp_path: Path) -> None:
    kinds = ["qemu-cut-device-state", "kdump-inflates-past-a-page", "kdump-flat-overlap",
             "win-lying-pages", "win-bitmap-outside-runs", "lime-overlap"]
    with run_server() as server, server.client() as client:
        for kind in kinds:
            build, message, _ = HOSTILE[kind]
            path = build(server.allow_dir / kind)
            client.create_machine(kind, memory_source=("file", {"path": str(path)}))
            with pytest.raises(PageFusionError) as err:
                client.start_machine(kind)
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert message in str(err.value)
            assert client.get_machine(kind).state == client.get_machine(kind).STATE_POWERED_OFF
        good = _kdump(server.allow_dir / "good")
        client.create_machine("good", memory_source=("file", {"path": str(good)}))
        assert client.start_machine("good").state == client.get_machine("good").STATE_RUNNING
        guest = _guest()
        assert client.read_guest_memory("good", 2 * MiB, MiB) == bytes(guest.read(2 * MiB, MiB))
