"""The fusion index of one fusion domain: page content hash -> frame.

An entry is one uint64: the top 32 bits of the page's keyed mmh3 128-bit
hash, then the 32-bit frame id. Entries live in a few sorted runs (a small
log-structured merge: a batch of inserts becomes a run, and a run merges
into the one before it unless that one is much longer), so a batch of
lookups is one search per run and an indexed frame costs 8 bytes, with no
per-entry Python object.

The index only proposes candidates. The engine confirms every candidate
with a full byte comparison before sharing, and ignores candidates whose
frame no longer carries the INDEXED flag (removed entries linger until the
next insert flushes them, which is why inserts flush first).

Entries are exactly 8 bytes each, runs or not, so the offline estimate
(clients/estimate.py) counts the index from its entries alone. A fence over
large runs (every 128th entry, searched first) was tried: it saved about 1%
of a start at 8 GiB of guests and would have made that count depend on how
the runs fell, so it is not kept.
"""

from __future__ import annotations

import numpy as np

_LOW = np.uint64(0xFFFFFFFF)
_SHIFT = np.uint64(32)


#: A new run merges into the one before it while that one is at most this
#: many times as long. Every run costs each batch's lookup one search (about
#: 0.3 ms for a large one here, whatever its length) and a merge is one
#: linear pass (sort finds the two sorted halves), so few runs win: at 8
#: GiB of guests, 3 runs instead of 5 (with a ratio of 2), with the same
#: merge time.
MERGE_RATIO = 8


def entries(keys: np.ndarray, frames: np.ndarray) -> np.ndarray:
    return (keys.astype(np.uint64) << _SHIFT) | frames.astype(np.uint64)


class FusionIndex:
    """Sorted runs of (key, frame) entries for one fusion domain."""

    def __init__(self) -> None:
        self._runs: list[np.ndarray] = []
        self._pending: list[np.ndarray] = []

    def __len__(self) -> int:
        return sum(len(r) for r in self._runs)

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self._runs) + sum(p.nbytes for p in self._pending)

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """For each key, the frame of its first entry (uint32), or 0 if none."""
        found = np.zeros(len(keys), dtype=np.uint32)
        if not len(keys):
            return found
        probe = keys.astype(np.uint64) << _SHIFT
        for run in self._runs:
            pos = np.searchsorted(run, probe)
            inside = pos < len(run)
            entry = run[np.minimum(pos, len(run) - 1)]
            take = inside & ((entry >> _SHIFT) == keys) & (found == 0)
            found[take] = (entry[take] & _LOW).astype(np.uint32)
        return found

    def candidates(self, key: int) -> list[int]:
        """Every frame indexed under ``key`` (the slow path for collisions)."""
        lo = np.uint64(key) << _SHIFT
        hi = lo | _LOW
        out: list[int] = []
        for run in self._runs:
            a = int(np.searchsorted(run, lo, side="left"))
            b = int(np.searchsorted(run, hi, side="right"))
            out.extend(int(e) & 0xFFFFFFFF for e in run[a:b])
        return out

    def live_entries(self) -> tuple[np.ndarray, np.ndarray]:
        """Copies of the entries in force (stored, not scheduled for removal) and the scheduled."""
        stored = np.concatenate(self._runs) if self._runs else np.zeros(0, dtype=np.uint64)
        pending = (
            np.unique(np.concatenate(self._pending)) if self._pending else np.zeros(0, np.uint64)
        )
        return stored[~np.isin(stored, pending)], pending

    def contains(self, keys: np.ndarray, frames: np.ndarray) -> np.ndarray:
        """Per (key, frame) pair: whether that entry is in force."""
        wanted = entries(keys, frames)
        found = np.zeros(len(wanted), dtype=bool)
        for run in self._runs:
            pos = np.searchsorted(run, wanted)
            inside = pos < len(run)
            found[inside] |= run[pos[inside]] == wanted[inside]
        if self._pending:
            found &= ~np.isin(wanted, np.concatenate(self._pending))
        return found

    def insert(self, keys: np.ndarray, frames: np.ndarray) -> None:
        """Add entries; the caller has flushed removals (see module docstring)."""
        if not len(keys):
            return
        self._runs.append(np.sort(entries(keys, frames)))
        while len(self._runs) > 1 and len(self._runs[-2]) <= MERGE_RATIO * len(self._runs[-1]):
            last = self._runs.pop()
            self._runs[-1] = np.sort(np.concatenate((self._runs[-1], last)), kind="stable")

    def remove(self, keys: np.ndarray, frames: np.ndarray) -> None:
        """Schedule entries for removal (applied by :meth:`flush`)."""
        if len(keys):
            self._pending.append(entries(keys, frames))

    def remove_one(self, key: int, frame: int) -> None:
        """:meth:`remove` of one (key, frame) entry."""
        self._pending.append(np.array([(key << 32) | frame], dtype=np.uint64))

    def flush(self) -> None:
        """Apply scheduled removals."""
        if not self._pending:
            return
        gone = np.unique(np.concatenate(self._pending))
        self._pending.clear()
        runs = []
        for run in self._runs:
            pos = np.searchsorted(run, gone)
            inside = pos < len(run)
            pos = pos[inside]
            pos = pos[run[pos] == gone[inside]]
            if len(pos):
                run = np.delete(run, pos)
            if len(run):
                runs.append(run)
        self._runs = runs
