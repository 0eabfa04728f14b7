"""An independent recount of the engine's bookkeeping (VerifyFusion).

Like a filesystem's fsck or a ZFS scrub: everything the frame table keeps
incrementally is recomputed from the page maps alone and compared. The
engine takes a :class:`Snapshot` under its lock (copies of the maps and of
the per-frame arrays: memcpy speed, milliseconds for GiBs of guests), lets
go of the lock, and :func:`recount` works on the copy. Checks that need
frame contents (each indexed frame is indexed under the hash of what it
holds now) run in short slices under the lock, against the live state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pagefusion.server.engine.frames import SATURATED
from pagefusion.server.engine.pool import CHUNK_FRAMES, MAX_REFCOUNT

#: At most this many problems are listed (the rest are counted).
MAX_PROBLEMS = 1000
#: At most this many examples per kind of problem.
_EXAMPLES = 5


@dataclass(frozen=True, slots=True)
class VerifyResult:
    consistent: bool
    pages_checked: int
    frames_checked: int
    problems: tuple[str, ...] = ()


@dataclass(slots=True)
class MachineCopy:
    machine_id: str
    slot: int
    domain: str
    page_fusion: bool
    map: np.ndarray  # the ingested part of its page map
    private: int  # the frame table's counts
    shared: int
    stable: np.ndarray | None
    stable_hist: np.ndarray


@dataclass(slots=True)
class Snapshot:
    """The bookkeeping at one instant, copied under the engine lock."""

    machines: list[MachineCopy]
    refcount: np.ndarray
    overflow: dict[int, int]
    owner: np.ndarray
    indexed: np.ndarray  # bool per frame
    hinted: np.ndarray  # bool per frame
    frames_used: int
    frames_shared: int
    high_water_mark: int
    free_stack: np.ndarray
    chunk_used: np.ndarray
    chunk_held: np.ndarray
    #: per domain: (live index entries, entries pending removal), uint64 each
    index_entries: dict[str, tuple[np.ndarray, np.ndarray]]
    #: (domain, module name, canonical frames of one region)
    canonical: list[tuple[str, str, np.ndarray]] = field(default_factory=list)


class _Problems:
    """Problems by kind: a few examples each and a total."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, kind: str, count: int, examples: list[str]) -> None:
        if count <= 0:
            return
        shown = "; ".join(examples[:_EXAMPLES])
        more = f" (and {count - _EXAMPLES} more)" if count > _EXAMPLES else ""
        self.lines.append(f"{kind}: {count}: {shown}{more}")

    def one(self, line: str) -> None:
        self.lines.append(line)


def true_counts(refcount: np.ndarray, overflow: dict[int, int]) -> np.ndarray:
    counts = refcount.astype(np.int64)
    for frame, count in overflow.items():
        if frame < len(counts) and refcount[frame] == SATURATED:
            counts[frame] = count
    return counts


def recount(snap: Snapshot) -> list[str]:
    """Every disagreement between the snapshot's incremental state and a recount."""
    out = _Problems()
    size = len(snap.refcount)
    stored = true_counts(snap.refcount, snap.overflow)
    _check_overflow(snap, out)
    counted = np.zeros(size, dtype=np.int64)
    xor = np.zeros(size, dtype=np.uint16)
    domain_of = np.full(size, -1, dtype=np.int32)
    domains = sorted({m.domain for m in snap.machines} | set(snap.index_entries))
    domain_id = {d: i for i, d in enumerate(domains)}
    for m in snap.machines:
        frames = m.map[m.map != 0]
        if len(frames) and int(frames.max()) >= size:
            bad = frames[frames >= size]
            out.add(
                f"machine {m.machine_id!r}: pages mapped to frames past the table",
                len(bad),
                [str(int(f)) for f in bad[:_EXAMPLES]],
            )
            frames = frames[frames < size]
        users = np.bincount(frames, minlength=size)
        counted += users
        xor[(users & 1) == 1] ^= np.uint16(m.slot)
        mine = np.flatnonzero(users)
        d = domain_id[m.domain]
        clash = mine[(domain_of[mine] != -1) & (domain_of[mine] != d)]
        out.add(
            f"machine {m.machine_id!r}: frames shared across fusion domains",
            len(clash),
            [f"frame {int(f)} also used in {domains[domain_of[f]]!r}" for f in clash[:_EXAMPLES]],
        )
        domain_of[mine] = d
    _compare(out, "frames whose stored user count differs from the page maps", counted, stored)
    wrong_owner = np.flatnonzero(xor != snap.owner)
    out.add(
        "frames whose owner record differs from the page maps",
        len(wrong_owner),
        [f"frame {int(f)}: stored {int(snap.owner[f])}, counted {int(xor[f])}"
         for f in wrong_owner[:_EXAMPLES]],
    )
    over = np.flatnonzero(counted > MAX_REFCOUNT)
    out.add(
        f"frames with more than {MAX_REFCOUNT} users",
        len(over),
        [f"frame {int(f)}: {int(counted[f])}" for f in over[:_EXAMPLES]],
    )
    for m in snap.machines:
        _check_machine(out, m, counted)
    used = np.flatnonzero(counted > 0)
    if len(used) != snap.frames_used:
        out.one(f"frames used: pool says {snap.frames_used}, page maps use {len(used)}")
    shared = int(np.count_nonzero(counted >= 2))
    if shared != snap.frames_shared:
        out.one(f"frames shared: stored {snap.frames_shared}, counted {shared}")
    _check_pool(out, snap, counted)
    _check_flags(out, snap, counted, domain_of, domains)
    return out.lines[:MAX_PROBLEMS]


def _compare(out: _Problems, kind: str, counted: np.ndarray, stored: np.ndarray) -> None:
    wrong = np.flatnonzero(counted != stored)
    out.add(
        kind,
        len(wrong),
        [f"frame {int(f)}: stored {int(stored[f])}, counted {int(counted[f])}"
         for f in wrong[:_EXAMPLES]],
    )


def _check_overflow(snap: Snapshot, out: _Problems) -> None:
    saturated = set(np.flatnonzero(snap.refcount == SATURATED).tolist())
    missing = sorted(saturated - set(snap.overflow))
    out.add("saturated counts with no exact count on the side", len(missing),
            [str(f) for f in missing[:_EXAMPLES]])
    stale = sorted(set(snap.overflow) - saturated)
    out.add("exact counts on the side for frames that are not saturated", len(stale),
            [str(f) for f in stale[:_EXAMPLES]])
    low = sorted(f for f, c in snap.overflow.items() if c < SATURATED)
    out.add(f"exact counts on the side below {SATURATED}", len(low),
            [str(f) for f in low[:_EXAMPLES]])


def _check_machine(out: _Problems, m: MachineCopy, counted: np.ndarray) -> None:
    frames = m.map
    inside = frames < len(counted)
    users = np.zeros(len(frames), dtype=np.int64)
    users[inside] = counted[frames[inside]]
    nonzero = frames != 0
    private = int(np.count_nonzero(nonzero & (users == 1)))
    shared = int(np.count_nonzero(nonzero & (users >= 2)))
    zero = int(np.count_nonzero(~nonzero))
    name = f"machine {m.machine_id!r}"
    if private != m.private:
        out.one(f"{name}: private pages stored {m.private}, counted {private}")
    if shared != m.shared:
        out.one(f"{name}: shared pages stored {m.shared}, counted {shared}")
    stored_zero = len(frames) - m.private - m.shared
    if zero != stored_zero:
        out.one(f"{name}: zero pages stored {stored_zero}, counted {zero}")
    if not m.page_fusion and shared:
        out.one(f"{name}: page fusion is off but {shared} of its pages are shared")
    if m.stable is not None:
        hist = np.bincount(m.stable, minlength=len(m.stable_hist))
        if not np.array_equal(hist, m.stable_hist):
            out.one(f"{name}: the histogram of stable scans differs from the pages' counts")


def _check_pool(out: _Problems, snap: Snapshot, counted: np.ndarray) -> None:
    free = snap.free_stack.astype(np.int64)
    uniq, reps = np.unique(free, return_counts=True)
    dup = uniq[reps > 1]
    out.add("frames on the free stack twice", len(dup), [str(int(f)) for f in dup[:_EXAMPLES]])
    inside = free[free < len(counted)]
    busy = inside[counted[inside] > 0]
    out.add("free frames that guest pages use", len(busy), [str(int(f)) for f in busy[:_EXAMPLES]])
    past = free[free >= snap.high_water_mark]
    out.add("free frames past the high-water mark", len(past),
            [str(int(f)) for f in past[:_EXAMPLES]])
    if 0 in free:
        out.one("the zero frame is on the free stack")
    beyond = np.flatnonzero(counted[snap.high_water_mark :]) + snap.high_water_mark
    out.add("used frames past the high-water mark", len(beyond),
            [str(int(f)) for f in beyond[:_EXAMPLES]])
    if counted[0] != 0:
        out.one(f"the zero frame has {int(counted[0])} users")
    used = np.flatnonzero(counted > 0)
    per_chunk = np.bincount(used // CHUNK_FRAMES, minlength=len(snap.chunk_used))
    n = min(len(per_chunk), len(snap.chunk_used))
    wrong = np.flatnonzero(per_chunk[:n] != snap.chunk_used[:n])
    out.add(
        "chunks whose count of used frames differs",
        len(wrong),
        [f"chunk {int(c)}: stored {int(snap.chunk_used[c])}, counted {int(per_chunk[c])}"
         for c in wrong[:_EXAMPLES]],
    )
    dropped = np.flatnonzero((per_chunk[:n] > 0) & ~snap.chunk_held[:n])
    out.add("chunks given back to the kernel while frames in them are used", len(dropped),
            [str(int(c)) for c in dropped[:_EXAMPLES]])


def _check_flags(
    out: _Problems,
    snap: Snapshot,
    counted: np.ndarray,
    domain_of: np.ndarray,
    domains: list[str],
) -> None:
    size = len(counted)
    for name, bits in (("INDEXED", snap.indexed), ("HINTED", snap.hinted)):
        stray = np.flatnonzero(bits[:size] & (counted[: len(bits)] == 0))
        out.add(f"free frames flagged {name}", len(stray), [str(int(f)) for f in stray[:_EXAMPLES]])
    # Every INDEXED frame is indexed exactly once, in its own domain's index;
    # every live entry names an INDEXED frame.
    named = np.zeros(size, dtype=np.int64)
    for domain, (live, _pending) in snap.index_entries.items():
        frames = (live & np.uint64(0xFFFFFFFF)).astype(np.int64)
        frames = frames[frames < size]
        np.add.at(named, frames, 1)
        if domain in domains:
            d = domains.index(domain)
            wrong = frames[(domain_of[frames] != -1) & (domain_of[frames] != d)]
            out.add(f"index of domain {domain!r} names frames of another domain", len(wrong),
                    [str(int(f)) for f in wrong[:_EXAMPLES]])
    indexed = snap.indexed[:size]
    unnamed = np.flatnonzero(indexed & (named == 0))
    out.add("INDEXED frames missing from the index", len(unnamed),
            [str(int(f)) for f in unnamed[:_EXAMPLES]])
    twice = np.flatnonzero(named > 1)
    out.add("frames in the index more than once", len(twice),
            [str(int(f)) for f in twice[:_EXAMPLES]])
    unflagged = np.flatnonzero(~indexed & (named > 0))
    out.add("index entries naming frames not flagged INDEXED", len(unflagged),
            [str(int(f)) for f in unflagged[:_EXAMPLES]])
    for domain, module, canonical in snap.canonical:
        frames = canonical[canonical != 0].astype(np.int64)
        frames = frames[frames < size]
        live = frames[snap.hinted[frames]]
        gone = live[counted[live] == 0]
        out.add(f"module {module!r} in {domain!r}: canonical frames that are free", len(gone),
                [str(int(f)) for f in gone[:_EXAMPLES]])
        d = domains.index(domain) if domain in domains else -2
        wrong = live[(domain_of[live] != -1) & (domain_of[live] != d)]
        out.add(f"module {module!r} in {domain!r}: canonical frames of another domain",
                len(wrong), [str(int(f)) for f in wrong[:_EXAMPLES]])
