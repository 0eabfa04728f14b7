"""Small guest-memory sources for engine tests."""

from __future__ import annotations

from collections.abc import Sequence

from pagefusion.adapters.base import GuestMemory, MemoryRange

PAGE = 4096


class FakeMemory(GuestMemory):
    """Guest memory held in bytearrays: [(address, bytearray), ...]."""

    def __init__(self, ranges: Sequence[tuple[int, bytearray]], live: bool = False) -> None:
        self.blocks = [(a, bytearray(b)) for a, b in ranges]
        self.live = live
        self.closed = 0

    def ranges(self) -> list[MemoryRange]:
        return [MemoryRange(a, len(b)) for a, b in self.blocks]

    def read(self, address: int, length: int) -> bytes:
        for a, b in self.blocks:
            if a <= address < a + len(b):
                return bytes(b[address - a : address - a + length])
        raise AssertionError(f"read outside ranges at {address:#x}")

    def write(self, address: int, data: bytes) -> None:
        for a, b in self.blocks:
            if a <= address < a + len(b):
                b[address - a : address - a + len(data)] = data
                return

    def close(self) -> None:
        self.closed += 1


def page(fill: int, marker: int = 0) -> bytes:
    """A page of one byte value, optionally with a distinguishing first byte."""
    body = bytearray([fill]) * PAGE
    if marker:
        body[0] = marker & 0xFF
        body[1] = (marker >> 8) & 0xFF
    return bytes(body)
