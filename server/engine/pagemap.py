"""A machine's page map: guest page -> frame id (0 for a ZERO page).

It is the engine's largest piece of metadata, one entry per guest page, so
an entry is three bytes while frame ids fit in 24 bits (2^24 frames are
64 GiB of distinct page content, more than most hosts' pools) and four
after. The entries are planar: the low 16 bits of every entry in one
uint16 array and the high bits in a uint8 array, so a batch of lookups is
two numpy gathers, a shift and an or, with no unaligned access. The map
widens itself (the high array becomes uint16) the first time a frame id of
2^24 or more is written into it, so no caller has to know the width.

Indexing mirrors a uint32 numpy array's: an int gives an int; a slice or an
integer array gives a new uint32 array; assignment takes an int or an
array of frame ids.
"""

from __future__ import annotations

from typing import overload

import numpy as np

#: Frame ids below this fit a three-byte entry.
NARROW_LIMIT = 1 << 24

_Key = slice | np.ndarray
_Frames = int | np.integer | np.ndarray


class PageMap:
    """Frame ids of ``pages`` guest pages, all 0 (ZERO) at first."""

    # The views serve one-entry reads and writes (the copy-on-write path)
    # as Python ints, without a numpy scalar on the way.
    __slots__ = ("_hi", "_hi_view", "_lo", "_lo_view")

    def __init__(self, pages: int) -> None:
        self._lo = np.zeros(pages, dtype=np.uint16)
        self._hi: np.ndarray = np.zeros(pages, dtype=np.uint8)
        self._lo_view = self._lo.data
        self._hi_view = self._hi.data

    def __len__(self) -> int:
        return len(self._lo)

    @property
    def nbytes(self) -> int:
        return int(self._lo.nbytes + self._hi.nbytes)

    @property
    def wide(self) -> bool:
        """Whether entries take four bytes (a frame id of 2^24 or more was written)."""
        return self._hi.dtype == np.uint16

    @overload
    def __getitem__(self, key: int | np.integer) -> int: ...

    @overload
    def __getitem__(self, key: _Key) -> np.ndarray: ...

    def __getitem__(self, key: int | np.integer | _Key) -> int | np.ndarray:
        if type(key) is int or isinstance(key, np.integer):
            return self._lo_view[key] | self._hi_view[key] << 16
        out = self._hi[key].astype(np.uint32)
        out <<= 16
        out |= self._lo[key]
        return out

    def __setitem__(self, key: int | np.integer | _Key, frames: _Frames) -> None:
        if type(frames) is not int:
            if isinstance(frames, np.ndarray):
                self._set_many(key, frames)
                return
            frames = int(frames)
        if frames >= NARROW_LIMIT:
            self._widen()
        if type(key) is int or isinstance(key, np.integer):  # the copy-on-write path
            self._lo_view[key] = frames & 0xFFFF
            self._hi_view[key] = frames >> 16
        else:  # one frame id for several pages
            self._lo[key] = frames & 0xFFFF
            self._hi[key] = frames >> 16

    def _set_many(self, key: int | np.integer | _Key, frames: np.ndarray) -> None:
        if len(frames) and not self.wide and int(frames.max()) >= NARROW_LIMIT:
            self._widen()
        # Assigning a uint32 array into uint16 keeps the low bits (a C cast).
        self._lo[key] = frames
        self._hi[key] = frames >> 16

    def _widen(self) -> None:
        if not self.wide:
            self._hi = self._hi.astype(np.uint16)
            self._hi_view = self._hi.data


def entry_bytes(frames: int) -> int:
    """Bytes per page-map entry once frame ids up to ``frames`` have been written."""
    return 3 if frames < NARROW_LIMIT else 4
