"""The frame table: the one owner of every frame's bookkeeping.

Everything the accounting identity stands on is written here and nowhere
else: each frame's user count (one byte, the few frames with 255 users or
more keep the true count on the side), its INDEXED and HINTED flags, which
machine holds it while it has one user, and each machine's page counts.
The engine asks for changes in guest-page terms (a machine's pages start or
stop using frames) and never touches a count itself; the pool (pool.py)
only hands out and takes back memory.

Per-machine counts without a reverse map. A machine's page is SHARED when
its frame has two or more users, so a frame going from one user to two (or
back) changes the state of a page of some *other* machine. Each frame keeps
the XOR of the slots (small machine numbers) of its users: while a frame has
one user, that XOR *is* the user. So when a second user arrives, the table
knows whose page just became SHARED, and when the second-to-last user
leaves, whose page became PRIVATE again, in O(1) and in one byte per frame
(two once a 256th machine runs at the same time).
The per-machine counts then stay exact as they change, and the figures cost
O(machines), not O(guest pages).

Invariants a recount can check (FusionEngine.verify does):

* refcount(f) = number of guest pages mapped to f, over running machines;
* owner(f) = XOR of those pages' machine slots (0 for a free frame);
* for each machine: private + shared + zero = its guest pages, where
  private/shared count its pages on frames with one / two or more users;
* frames used = sum of private pages + frames shared;
* a free frame has count 0 and no flags.

Not thread-safe: the engine calls it under its lock.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pagefusion.server.engine.errors import ResourceExhaustedError
from pagefusion.server.engine.pool import MAX_REFCOUNT, FrameBits, FramePool

#: Counts are stored in one byte; from this value on the true count is in a dict.
SATURATED = 0xFF
#: Detaching more frames than this at once (a machine stopping) counts them
#: with bincount instead of sorting.
BINCOUNT_ABOVE = 65536
#: Machine slots are 16-bit (0 means none): at most this many machines at once.
MAX_SLOTS = 0xFFFF


class FrameTable:
    """User counts, flags and owners of the pool's frames, and per-machine counts.

    Args:
        pool: where frames come from and go back to.
        on_free: called with frames about to be freed (their content still
            intact) and their fusion domain, so the fusion index and the
            hint path can forget them.
    """

    def __init__(self, pool: FramePool, on_free: Callable[[np.ndarray, str], None]) -> None:
        self.pool = pool
        self._on_free = on_free
        size = pool.capacity
        self.refcount = np.zeros(size, dtype=np.uint8)
        # One byte while slots fit in one; widened for the 256th machine.
        self.owner: np.ndarray = np.zeros(size, dtype=np.uint8)
        self.indexed = FrameBits(size)
        self.hinted = FrameBits(size)
        self.overflow: dict[int, int] = {}
        self.frames_shared = 0
        # Per machine slot: its pages on frames with one user / two or more.
        # Python lists: the write path changes one entry at a time, and a
        # list's += costs a fraction of a numpy element's.
        self.private: list[int] = [0] * 8
        self.shared: list[int] = [0] * 8
        self.domains: dict[int, str] = {}  # slot -> fusion domain of its machine
        self._free_slots: list[int] = []
        self._next_slot = 1

    # -- figures ------------------------------------------------------------

    @property
    def frames_used(self) -> int:
        return self.pool.used

    @property
    def nbytes(self) -> int:
        return int(
            self.refcount.nbytes
            + self.owner.nbytes
            + self.indexed.nbytes
            + self.hinted.nbytes
            + 16 * len(self.private)
        )

    def ref(self, frame: int) -> int:
        count = int(self.refcount[frame])
        return self.overflow[frame] if count == SATURATED else count

    def refs(self, frames: np.ndarray) -> np.ndarray:
        """True user counts of ``frames`` (int64)."""
        counts = self.refcount[frames].astype(np.int64)
        if self.overflow:
            saturated = np.flatnonzero(counts == SATURATED)
            if len(saturated):
                counts[saturated] = [self.overflow[f] for f in frames[saturated].tolist()]
        return counts

    # -- machines -----------------------------------------------------------

    def add_machine(self, domain: str) -> int:
        """A slot for a new machine of fusion ``domain`` (its counts start at zero).

        Raises:
            ResourceExhaustedError: MAX_SLOTS machines run already.
        """
        if self._free_slots:
            slot = self._free_slots.pop()
            self.domains[slot] = domain
            return slot
        if self._next_slot > MAX_SLOTS:
            raise ResourceExhaustedError(
                f"at most {MAX_SLOTS} machines can run at once", reason="TOO_MANY_MACHINES"
            )
        slot = self._next_slot
        if slot > np.iinfo(self.owner.dtype).max:
            self.owner = self.owner.astype(np.uint16)
        self.domains[slot] = domain
        self._next_slot += 1
        if slot >= len(self.private):
            more = len(self.private)
            self.private += [0] * more
            self.shared += [0] * more
        return slot

    def remove_machine(self, slot: int) -> None:
        """Give a slot back; the machine holds no frame any more."""
        self.private[slot] = 0
        self.shared[slot] = 0
        del self.domains[slot]
        self._free_slots.append(slot)

    # -- frames -------------------------------------------------------------

    def allocate(self, n: int) -> np.ndarray:
        """``n`` fresh frames with no user yet (attach them next).

        Raises:
            ResourceExhaustedError: the pool's budget would be exceeded.
        """
        frames = self.pool.alloc(n)
        self._fit()
        return frames

    def require_room(self, n: int) -> None:
        """Raise unless ``n`` more frames fit the budget; nothing changes either way.

        Raises:
            ResourceExhaustedError: the pool's budget would be exceeded.
        """
        self.pool.check_room(n)

    def attach(self, slot: int, frames: np.ndarray, counts: np.ndarray | None = None) -> None:
        """``counts[i]`` more pages of machine ``slot`` use distinct ``frames[i]``."""
        if not len(frames):
            return
        if counts is None:
            counts = np.ones(len(frames), dtype=np.int64)
        counts = np.asarray(counts, dtype=np.int64)
        before = self.refs(frames)
        after = before + counts
        if int(after.max()) > MAX_REFCOUNT:
            raise AssertionError("a frame would pass MAX_REFCOUNT users")  # engine bug
        sharing = after >= 2
        # The machine's own new pages.
        self.shared[slot] += int(counts[sharing].sum())
        self.private[slot] += int(np.count_nonzero(~sharing))
        # Frames that had one user: that user's page is SHARED now.
        joined = np.flatnonzero(before == 1)
        if len(joined):
            users = self.owner[frames[joined]]
            self._move(users, private_to_shared=True)
        self.frames_shared += int(np.count_nonzero(sharing & (before < 2)))
        self._set_refs(frames, after)
        odd = frames[(counts & 1) == 1]
        self.owner[odd] ^= self.owner.dtype.type(slot)

    def detach(self, slot: int, frames: np.ndarray) -> None:
        """One page of machine ``slot`` per entry stops using ``frames`` (repeats allowed).

        Frames left without users are freed.
        """
        if not len(frames):
            return
        if len(frames) > BINCOUNT_ABOVE:  # a machine stopping: counting beats sorting
            tally = np.bincount(frames)
            uniq = np.flatnonzero(tally).astype(np.uint32)
            counts = tally[uniq]
        elif len(frames) > 1:
            uniq, counts = np.unique(frames, return_counts=True)
        else:
            uniq, counts = frames.astype(np.uint32), np.ones(1, dtype=np.int64)
        before = self.refs(uniq)
        after = before - counts
        if int(after.min()) < 0:
            raise AssertionError("a frame would have fewer than 0 users")  # engine bug
        was_shared = before >= 2
        self.shared[slot] -= int(counts[was_shared].sum())
        self.private[slot] -= int(np.count_nonzero(~was_shared))
        odd = uniq[(counts & 1) == 1]
        self.owner[odd] ^= self.owner.dtype.type(slot)
        # Frames down to one user: that user's page is PRIVATE again.
        alone = np.flatnonzero(was_shared & (after == 1))
        if len(alone):
            self._move(self.owner[uniq[alone]], private_to_shared=False)
        self.frames_shared -= int(np.count_nonzero(was_shared & (after < 2)))
        self._set_refs(uniq, after)
        self._free(uniq[after == 0], self.domains[slot])

    def retarget(self, slot: int, old: np.ndarray, new: np.ndarray) -> None:
        """Pages of machine ``slot`` move from frames ``old[i]`` to ``new[i]``."""
        if not len(new):
            return
        uniq, counts = np.unique(new, return_counts=True)
        self.attach(slot, uniq, counts)
        self.detach(slot, old)

    def allocate_private(self, slot: int) -> int:
        """A fresh frame that one page of machine ``slot`` uses (copy on write's case).

        Raises:
            ResourceExhaustedError: the pool's budget would be exceeded.
        """
        frame = self.pool.alloc_one()
        if frame >= len(self.refcount):
            self._fit()
        self.refcount[frame] = 1
        self.owner[frame] = slot
        self.private[slot] += 1
        return frame

    def detach_one(self, slot: int, frame: int) -> None:
        """One page of machine ``slot`` stops using ``frame``; freed when unused."""
        stored = int(self.refcount[frame])
        if 2 < stored < SATURATED:  # the common case: it stays shared
            self.refcount[frame] = stored - 1
            self.owner[frame] ^= slot
            self.shared[slot] -= 1
            return
        before = self.ref(frame)
        if before <= 0:
            raise AssertionError(f"frame {frame} has no user to detach")  # engine bug
        self.owner[frame] ^= slot
        if before == 1:
            self.private[slot] -= 1
            self._set_ref(frame, 0)
            self._free(np.array([frame], dtype=np.uint32), self.domains[slot])
            return
        self.shared[slot] -= 1
        if before == 2:
            user = int(self.owner[frame])
            self.shared[user] -= 1
            self.private[user] += 1
            self.frames_shared -= 1
        self._set_ref(frame, before - 1)

    # -- internals ----------------------------------------------------------

    def _move(self, users: np.ndarray, *, private_to_shared: bool) -> None:
        """One page of each machine in ``users`` (repeats allowed) changes state."""
        slots, counts = np.unique(users, return_counts=True)
        sign = 1 if private_to_shared else -1
        for slot, count in zip(slots.tolist(), counts.tolist(), strict=True):
            self.private[slot] -= sign * count
            self.shared[slot] += sign * count

    def _free(self, frames: np.ndarray, domain: str) -> None:
        if not len(frames):
            return
        self._on_free(frames, domain)
        self.indexed.clear(frames)
        self.hinted.clear(frames)
        self.owner[frames] = 0
        if len(frames) == 1:
            self.pool.release_one(int(frames[0]))
        else:
            self.pool.release(frames)

    def _set_refs(self, frames: np.ndarray, counts: np.ndarray) -> None:
        if self.overflow:
            was = np.flatnonzero(self.refcount[frames] == SATURATED)
            for frame in frames[was].tolist():
                self.overflow.pop(frame, None)
        self.refcount[frames] = np.minimum(counts, SATURATED)
        big = np.flatnonzero(counts >= SATURATED)
        for frame, count in zip(frames[big].tolist(), counts[big].tolist(), strict=True):
            self.overflow[frame] = count

    def _set_ref(self, frame: int, count: int) -> None:
        if self.refcount[frame] == SATURATED:
            self.overflow.pop(frame, None)
        if count >= SATURATED:
            self.overflow[frame] = count
            count = SATURATED
        self.refcount[frame] = count

    def _fit(self) -> None:
        """Grow the per-frame arrays with the pool."""
        size = self.pool.capacity
        if size <= len(self.refcount):
            return
        refcount = np.zeros(size, dtype=np.uint8)
        refcount[: len(self.refcount)] = self.refcount
        owner = np.zeros(size, dtype=self.owner.dtype)
        owner[: len(self.owner)] = self.owner
        self.refcount, self.owner = refcount, owner
        self.indexed.grow(size)
        self.hinted.grow(size)
