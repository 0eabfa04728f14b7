"""LiME dumps (Linux Memory Extractor, ``format=lime``).

The layout (LiME's lime.h): records to the end of the file, each a 32-byte
little-endian header (magic ``0x4C694D45``, ``EMiL`` on disk; version 1;
s_addr and e_addr, the first and the *last* physical byte of the range;
8 reserved bytes) followed by ``e_addr - s_addr + 1`` bytes of memory.
Ranges follow /proc/iomem's System RAM, so they need not be page aligned
(0x1000-0x9fbff is typical); a ragged edge reads back zero padded.
LiME's ``raw`` and ``padded`` formats have no headers and are raw images.
"""

from __future__ import annotations

import itertools

from pagefusion.adapters.helpers import MAX_PHYS_ADDRESS, MAX_TOTAL_BYTES
from pagefusion.adapters.paged import fail

__all__ = ["LIME_MAGIC", "MAX_RANGES", "parse_lime"]

LIME_MAGIC = b"EMiL"
_HEADER = 32
#: More ranges than any machine's memory map has; bounds a hostile file's cost.
MAX_RANGES = 1 << 16


def parse_lime(data: memoryview, path: str) -> list[tuple[int, int, int]]:
    """Validate a LiME dump.

    Returns:
        (physical address, file offset, length) of each range, sorted by address.

    Raises:
        InvalidSourceError: naming the record at fault.
    """
    size = len(data)
    pos = 0
    found: list[tuple[int, int, int, int]] = []
    total = 0
    while pos < size:
        i = len(found)
        if pos + _HEADER > size:
            raise fail(path, f"truncated LiME range header {i} at {pos:#x}")
        if bytes(data[pos : pos + 4]) != LIME_MAGIC:
            raise fail(path, f"LiME range header {i} at {pos:#x} has no EMiL magic")
        version = int.from_bytes(data[pos + 4 : pos + 8], "little")
        if version != 1:
            raise fail(path, f"LiME range header {i} at {pos:#x}: version {version} (expected 1)")
        start = int.from_bytes(data[pos + 8 : pos + 16], "little")
        last = int.from_bytes(data[pos + 16 : pos + 24], "little")
        if last < start or last >= MAX_PHYS_ADDRESS:
            raise fail(path, f"LiME range {i}: {start:#x}-{last:#x} is empty, reversed or "
                             "beyond the 52-bit address space")
        length = last - start + 1
        if pos + _HEADER + length > size:
            raise fail(path, f"LiME range {i} ({start:#x}-{last:#x}) claims {length} bytes; the "
                             f"file ends {size - pos - _HEADER} bytes after its header")
        total += length
        if total > MAX_TOTAL_BYTES:
            raise fail(path, "LiME ranges add up to more than 1 TiB")
        if len(found) == MAX_RANGES:
            raise fail(path, f"more than {MAX_RANGES} LiME ranges")
        found.append((start, pos + _HEADER, length, i))
        pos += _HEADER + length
    if not found:
        raise fail(path, "LiME dump without ranges")
    found.sort()
    for a, b in itertools.pairwise(found):
        if b[0] < a[0] + a[2]:
            raise fail(path, f"LiME ranges {a[3]} ({a[0]:#x}+{a[2]:#x}) and {b[3]} "
                             f"({b[0]:#x}+{b[2]:#x}) overlap")
    return [(s, o, n) for s, o, n, _ in found]
