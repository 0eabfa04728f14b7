"""The adapters against the engine: what they supply is what the engine counts.

Contract checks across the layer boundary: exact savings of synthetic guests
by content, transparency of reads, and live segments under scans.
"""

from __future__ import annotations

import os
from pathlib import Path

import mmh3
import numpy as np
import pytest

from pagefusion.adapters.base import PAGE_SIZE, AdapterContext
from pagefusion.adapters.registry import open_source
from pagefusion.adapters.synthetic_windows import SyntheticWindowsMemory

engine_module = pytest.importorskip("pagefusion.server.engine.engine")

MiB = 1 << 20
ZERO = mmh3.hash64(bytes(PAGE_SIZE), signed=False)[0]


def _digests(mem: SyntheticWindowsMemory) -> np.ndarray:
    out = []
    for r in mem.ranges():
        for addr in range(r.address, r.end, 16 * MiB):
            rows = np.frombuffer(mem.read(addr, min(16 * MiB, r.end - addr)), np.uint8)
            out += [mmh3.hash64(p.tobytes(), signed=False)[0] for p in rows.reshape(-1, PAGE_SIZE)]
    return np.array(out, dtype=np.uint64)


def test_synthetic_guests_fuse_exactly_as_their_content_says() -> None:
    size = 128 * MiB
    ctx = [AdapterContext(f"win{i}", memory_size_bytes=size) for i in range(2)]
    opts = [{"profile": "Windows10_64", "seed": str(i + 1)} for i in range(2)]
    sources = list(zip(opts, ctx, strict=True))
    both = np.concatenate([_digests(open_source("synthetic-windows", o, c)) for o, c in sources])
    nonzero = both[both != ZERO]
    engine = engine_module.FusionEngine(max_pool_bytes=1 << 30)
    try:
        for o, c in sources:
            engine.start_machine(c.machine_id, open_source("synthetic-windows", o, c),
                                 page_fusion=True)
        host = engine.stats().host
        assert host.guest_pages == len(both)
        assert host.zero_pages == int((both == ZERO).sum())
        assert host.pages_saved == len(nonzero) - len(np.unique(nonzero))
        assert host.guest_pages == host.frames_used + host.pages_saved + host.zero_pages
        check = open_source("synthetic-windows", opts[1], ctx[1])
        for addr in (0, 37 * MiB, size - MiB):
            assert engine.read("win1", addr, MiB) == bytes(check.read(addr, MiB))
    finally:
        engine.close()


def test_live_segment_scans_and_shrink(tmp_path: Path) -> None:
    path = tmp_path / "ram"
    path.write_bytes(bytes(4 * MiB))
    ctx = AdapterContext("live", allowed_paths=(tmp_path,))
    engine = engine_module.FusionEngine(max_pool_bytes=1 << 28)
    try:
        engine.start_machine("live", open_source("shm", {"path": str(path)}, ctx),
                             page_fusion=True)
        with open(path, "r+b") as f:
            f.seek(5 * PAGE_SIZE)
            f.write(b"\x42" * PAGE_SIZE)
        engine.scan(["live"])
        assert engine.read("live", 5 * PAGE_SIZE, PAGE_SIZE) == b"\x42" * PAGE_SIZE
        os.truncate(path, MiB)
        with pytest.raises(Exception, match="shrank") as err:
            engine.scan(["live"])
        assert "Traceback" not in str(err.value)
    finally:
        engine.close()
