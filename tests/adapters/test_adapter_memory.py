"""The in-memory adapter and InMemoryGuestMemory."""

from __future__ import annotations

import numpy as np
import pytest

from pagefusion.adapters.base import (
    PAGE_SIZE,
    AdapterContext,
    GuestModule,
    InvalidOptionError,
    MemoryRange,
    SourceError,
    SourceNotFoundError,
)
from pagefusion.adapters.memory import (
    PATTERNS,
    InMemoryGuestMemory,
    register_image,
    unregister_image,
)
from pagefusion.adapters.registry import open_source

CTX = AdapterContext(machine_id="vm1")


def test_ranges_from_buffers() -> None:
    mem = InMemoryGuestMemory(
        [(0x100000, np.arange(10, dtype=np.uint8)), (0, b"\x01" * PAGE_SIZE)],
        modules=[GuestModule("a.dll", "1", 0x1000, 0x1000, "Windows10_64")],
    )
    assert list(mem.ranges()) == [MemoryRange(0, PAGE_SIZE), MemoryRange(0x100000, PAGE_SIZE)]
    page = bytes(mem.read(0x100000, PAGE_SIZE))
    assert page[:10] == bytes(range(10)) and page[10:] == bytes(PAGE_SIZE - 10)
    assert mem.modules()[0].module_name == "a.dll"
    with pytest.raises(ValueError):
        mem.read(0x1000, PAGE_SIZE)  # a hole
    with pytest.raises(ValueError):
        mem.read(0, 100)  # not page aligned


def test_write_and_live() -> None:
    data = bytearray(2 * PAGE_SIZE)
    mem = InMemoryGuestMemory.from_bytes(data)
    mem.write(PAGE_SIZE + 5, b"abc")
    assert data == bytearray(2 * PAGE_SIZE)  # the caller's buffer was copied
    assert bytes(mem.read(PAGE_SIZE, PAGE_SIZE))[5:8] == b"abc"
    mem.array(0, 4)[:] = 7
    assert bytes(mem.read(0, PAGE_SIZE))[:5] == b"\x07\x07\x07\x07\x00"
    assert not mem.live
    mem.live = True
    assert mem.live
    with pytest.raises(ValueError):
        mem.write(2 * PAGE_SIZE - 1, b"ab")
    mem.close()
    with pytest.raises(SourceError):
        mem.read(0, PAGE_SIZE)


def test_rejects_bad_layouts() -> None:
    with pytest.raises(ValueError):
        InMemoryGuestMemory([(0x10, b"x")])
    with pytest.raises(Exception, match="overlaps"):
        InMemoryGuestMemory([(0, bytes(2 * PAGE_SIZE)), (PAGE_SIZE, b"x")])


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_patterns_are_deterministic(pattern: str) -> None:
    opts = {"size": "64KiB", "pattern": pattern, "seed": "3"}
    a = open_source("memory", opts, CTX)
    b = open_source("memory", opts, CTX)
    assert a.ranges() == [MemoryRange(0, 65536)] or list(a.ranges()) == [MemoryRange(0, 65536)]
    assert bytes(a.read(0, 65536)) == bytes(b.read(0, 65536))


def test_mixed_pattern_mix() -> None:
    mem = open_source("memory", {"size": str(64 * PAGE_SIZE)}, CTX)
    pages = np.frombuffer(mem.read(0, 64 * PAGE_SIZE), np.uint8).reshape(64, PAGE_SIZE)
    zero = int((~pages.any(axis=1)).sum())
    distinct = len({p.tobytes() for p in pages})
    assert zero == 16
    assert distinct == 1 + 16 + 16


def test_size_from_machine_and_option_errors() -> None:
    mem = open_source("memory", {"pattern": "zero"}, AdapterContext("vm", memory_size_bytes=8192))
    assert list(mem.ranges()) == [MemoryRange(0, 8192)]
    for opts, option in [
        ({}, "size"),
        ({"size": "4097"}, "size"),
        ({"size": "lots"}, "size"),
        ({"size": "4096", "pattern": "plaid"}, "pattern"),
        ({"size": "4096", "seed": "x"}, "seed"),
        ({"size": "4096", "live": "maybe"}, "live"),
    ]:
        with pytest.raises(InvalidOptionError) as err:
            open_source("memory", opts, CTX)
        assert err.value.option == option, opts


def test_registered_image() -> None:
    image = InMemoryGuestMemory.zeros(4 * PAGE_SIZE)
    register_image("test-image", image)
    try:
        view = open_source("memory", {"image": "test-image", "live": "true"}, CTX)
        assert view.live
        image.write(0, b"hello")
        assert bytes(view.read(0, PAGE_SIZE))[:5] == b"hello"
        view.close()
        assert bytes(image.read(0, PAGE_SIZE))[:5] == b"hello"  # the image outlives the view
        with pytest.raises(InvalidOptionError):
            open_source("memory", {"image": "test-image", "size": "4096"}, CTX)
    finally:
        unregister_image("test-image")
    with pytest.raises(SourceNotFoundError):
        open_source("memory", {"image": "test-image"}, CTX)
