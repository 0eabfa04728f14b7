"""The fusion engine: one host copy of every identical guest page.

Read this first.

pagefusion hosts the memory of many virtual machines. Each machine's
guest-physical memory is a set of page ranges read from a source (an
adapter: a snapshot file, a live shared-memory segment, a synthetic Windows
guest). The engine keeps every mapped guest page in exactly one state:

    ZERO     all bytes zero; backed by no host memory (frame 0, the zero frame)
    PRIVATE  backed by a host frame no other guest page uses
    SHARED   backed by a frame that two or more guest pages use

and an address outside the ranges is UNMAPPED. Reading a guest page always
returns exactly what a machine without fusion would return (transparency);
writing a SHARED page first gives the writer its own copy (copy on write).

The data structures, and why they are shaped this way:

* The frame pool (pool.py): one reserved anonymous mapping carved into 4 KiB
  frames, grown in 2 MiB chunks (transparent huge pages only on request)
  and shrunk by handing fully free chunks back to the kernel; a helper
  thread populates the frames a start will take (MADV_POPULATE_WRITE) on
  the second core while this one hashes. It only hands frames out and takes them back;
  a frame at or above its high-water mark comes from the mark, never from a
  chunk taken back, so no frame ever has two owners. The pool, not Python
  objects, is what the host pays for.
* The frame table (frames.py), the one owner of frame state: each frame's
  user count (one byte; the few frames with 255 users or more keep the true
  count on the side; at 65,535 users, VirtualBox's limit, a new frame
  starts), its INDEXED and HINTED flags, the XOR of its users' machine slots
  (while a frame has one user, that is the user), and each machine's
  private and shared page counts. The engine never writes a count: it says
  which pages of which machine start or stop using which frames (attach,
  detach, retarget), and the table updates everything that follows, so the
  figures cost O(machines), not O(guest pages). A frame's last user leaving
  frees it, after the index and the hint path have forgotten it.
* Guest page maps (pagemap.py): per machine, guest page -> frame id, in 3
  bytes per guest page while frame ids fit in 24 bits (4 after; the map
  widens itself); state is derived: frame 0 is ZERO, refcount 1 is
  PRIVATE, refcount >= 2 is SHARED. No per-page Python object anywhere.
* The fusion index (index.py): per fusion domain, keyed mmh3 128-bit hashes
  of page content (the seed is a secret chosen at start) in sorted numpy
  runs. The index only proposes; a full byte comparison decides. Machines of
  different domains never share a frame, and only machines with page fusion
  on take part. Frames that are indexed carry the INDEXED flag; a frame
  whose content changes or that is freed drops out of the index.

Paths that share pages:

* Ingest (start_machine): a source is read in batches of 16 MiB (they stay
  in the last-level cache from the read to the last compare, and every
  buffer a page is copied through starts on a page boundary, as frames and
  guest RAM do: unequally aligned copies ran at a quarter of the speed on
  the AMD VMs this was measured on); zero pages are found vectorised and
  elided; the rest are hashed, grouped inside the
  batch, looked up in the domain's index, confirmed byte by byte and shared.
  New frames are handed out in guest-page order, so a guest like one seen
  before matches runs of frames, compared a run at a time.
  All savings exist when start_machine returns, unlike KSM, which needs two
  full passes before it merges anything.
* Hints (register_module, check_shared_modules; modules.py): VirtualBox's
  path. A guest agent names the modules a machine has loaded; pages are
  fused by position within a module (its identity ignores base addresses,
  so ASLR does not matter), each confirmed byte by byte.
* Scans (scan): live sources are re-read; a changed page is a guest write
  (copy on write applies) and is held back from fusion until it has stayed
  unchanged for ``stable_scans_before_merge`` scans (KSM's volatile rule);
  pages the index does not know yet are then fused like at ingest.

Accounting is exact at every instant, because every operation runs under
one lock and the frame table changes the counts with the maps:

    guest pages = frames used + pages saved + zero pages

where pages saved is the sum over frames of (refcount - 1), KSM's
pages_sharing, and a machine's zero pages are its ingested pages less its
private and shared ones. Counts of a machine that is still starting cover
the pages ingested so far, so the identity holds while machines load too.

Locking: one engine lock (re-entrant) guards the maps, the frame table, the
indexes and the module registry. Sources are read outside it (ingest and
scans), and each batch is applied under it; a scan's live read that raced
a guest write (machine.writes moved) is read again, so older bytes never
undo a newer write. Scans run one at a time (a source reuses its read
buffer, so two reading one machine could swap each other's bytes). The
fusion config and the set of running machines are read without the lock
(they are replaced, never changed in place), so the event loop's
background scanner and metrics sampler never wait for a batch.

Flag rules: INDEXED means the frame has exactly one entry in force in its
domain's index, under the hash of what it holds now (it is cleared before
the content changes or the frame is freed); HINTED means some module
position names it as canonical (cleared the same way).

verify() (VerifyFusion; verify.py) recounts all of this from the page maps
alone and names every disagreement. It copies the bookkeeping under the
lock (memcpy speed), recounts outside it, and checks index entries against
frame contents in short slices under the lock.
"""

from __future__ import annotations

import bisect
import contextlib
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TypeVar

import mmh3
import numpy as np

from pagefusion.adapters.base import GuestMemory, GuestModule, InvalidSourceError, MemoryRange
from pagefusion.adapters.helpers import page_aligned, validate_ranges
from pagefusion.server.engine.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    MachineNotRunningError,
    OutOfRangeError,
    SourceFailedError,
)
from pagefusion.server.engine.frames import FrameTable
from pagefusion.server.engine.index import FusionIndex
from pagefusion.server.engine.modules import ModuleRegistry, module_key, region_pages
from pagefusion.server.engine.pagemap import PageMap
from pagefusion.server.engine.pool import (
    CHUNK_FRAMES,
    MAX_REFCOUNT,
    MEMCMP,
    FramePool,
    host_memory_bytes,
)
from pagefusion.server.engine.types import (
    PAGE_SIZE,
    FusionConfig,
    FusionMode,
    FusionStats,
    HostStats,
    MachineStats,
    PageInfo,
    PageState,
    ScanResult,
)
from pagefusion.server.engine.verify import MachineCopy, Snapshot, VerifyResult, recount

#: Pages per ingest batch: large enough to amortise numpy calls, small
#: enough that a batch stays in the last-level cache between the read, the
#: hashing and the compares, and that a source's read buffer (16 MiB) costs
#: few page faults. Measured on the 2-core VMs against 16,384 pages: the
#: same user time and a third of the system time.
BATCH_PAGES = 4096
#: Pairs of consecutive pages on both sides from which a compare reads them
#: in place: shorter runs go through the scratch (a gather costs less than
#: the numpy calls per run).
_RUN_PAIRS = 8
#: How far ahead of need the pool populates fresh frames (in batches).
PREFAULT_BATCHES = 2
_ZERO_PAGE = bytes(PAGE_SIZE)
_STABLE_MAX = 255
#: Pause between slices of VerifyFusion's content check (seconds).
_VERIFY_PAUSE = 0.0005
#: Tries to read a live batch that no write raced with, before skipping it.
_SCAN_READ_TRIES = 3


T = TypeVar("T")


class _Reading:
    """Holds the engine lock for a read-only path: the version stays."""

    __slots__ = ("_lock",)

    def __init__(self, lock: threading.RLock) -> None:
        self._lock = lock

    def __enter__(self) -> None:
        self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


class _VersionedLock:
    """The engine lock (re-entrant), counting its holds.

    Every ``with lock:`` moves ``version`` before the holder can change
    anything, so state read under the lock at one version is the state
    until the version moves: stats() keeps its last answer for that long.
    Paths that only read hold it through ``reading`` and leave the version
    alone; one that forgets costs a recount, never a stale figure.
    """

    __slots__ = ("_lock", "reading", "version")

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.reading = _Reading(self._lock)
        self.version = 0

    def __enter__(self) -> None:
        self._lock.acquire()
        self.version += 1

    def __exit__(self, *exc: object) -> None:
        self._lock.release()

    def acquire(self, blocking: bool = True) -> bool:
        """Take the lock without moving the version (run_if_free: its call takes it again)."""
        return self._lock.acquire(blocking)

    def release(self) -> None:
        self._lock.release()


class _Busy:
    """The engine was busy: see FusionEngine.run_if_free."""


BUSY = _Busy()


class _SourceReadError(Exception):
    """A live source could not be read during a scan (the cause is chained)."""


def _ranks(groups: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stable order of ``groups``, the groups in that order, and each one's rank in its group."""
    order = np.argsort(groups, kind="stable")
    ordered = groups[order]
    return order, ordered, np.arange(len(order)) - np.searchsorted(ordered, ordered)


def _pair_runs(left: np.ndarray, right: np.ndarray, shortest: int) -> tuple[np.ndarray, np.ndarray]:
    """Runs of at least ``shortest`` positions where both ``left`` and ``right`` step by one.

    Returns (starts, ends), positions into the arrays (ends exclusive).
    """
    n = len(left)
    if n < shortest:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    breaks = (np.diff(left.astype(np.int64)) != 1) | (np.diff(right.astype(np.int64)) != 1)
    bounds = np.concatenate(([0], np.flatnonzero(breaks) + 1, [n]))
    lengths = np.diff(bounds)
    long = np.flatnonzero(lengths >= shortest)
    return bounds[long], bounds[long] + lengths[long]


def _rows_equal(x: np.ndarray, y: np.ndarray, diff: np.ndarray, out: np.ndarray) -> None:
    """out[i] = whether rows x[i] and y[i] are equal (``diff``: scratch of their shape)."""
    np.not_equal(x, y, out=diff)
    np.logical_not(diff.any(axis=1), out=out)


def _idle(memory: GuestMemory) -> None:
    """Tell a source a pass is over (optional in the interface; never fatal)."""
    idle = getattr(memory, "idle", None)
    if idle is not None:
        with contextlib.suppress(Exception):
            idle()


class _Machine:
    """One machine's guest page map and where its pages came from."""

    def __init__(
        self,
        machine_id: str,
        memory: GuestMemory,
        ranges: list[MemoryRange],
        page_fusion: bool,
        domain: str,
    ) -> None:
        self.machine_id = machine_id
        self.slot = 0  # its slot in the frame table, given when it is registered
        self.memory = memory
        self.ranges = ranges
        self.page_fusion = page_fusion
        self.domain = domain
        self.starts = [r.address for r in ranges]
        self.offsets: list[int] = []
        total = 0
        for r in ranges:
            self.offsets.append(total)
            total += r.pages
        self.pages = total
        self.map = PageMap(total)
        self.ingested = 0
        self.running = False
        self.writes = 0  # guest writes so far: a scan's read that raced one is read again
        self.live = bool(getattr(memory, "live", False))
        self.source_error: str | None = None  # why the last scan could not read the source
        # Scans seen unchanged, per page; only live sources change by themselves.
        # The histogram of those values keeps the volatile count O(1) to read.
        self.stable = np.full(total, _STABLE_MAX, dtype=np.uint8) if self.live else None
        self.stable_hist = np.zeros(_STABLE_MAX + 1, dtype=np.int64)
        self.stable_hist[_STABLE_MAX] = total if self.live else 0

    def mark_volatile(self, page: int) -> None:
        """The page just changed: it must stay unchanged for a while before it fuses."""
        if self.stable is not None:
            self.stable_hist[self.stable[page]] -= 1
            self.stable_hist[0] += 1
            self.stable[page] = 0

    def volatile_pages(self, threshold: int) -> int:
        return int(self.stable_hist[:threshold].sum()) if self.stable is not None else 0

    def index_of(self, address: int) -> int:
        """Flat page index of the page holding ``address``, or -1 if unmapped."""
        i = bisect.bisect_right(self.starts, address) - 1
        if i < 0:
            return -1
        r = self.ranges[i]
        if address >= r.end:
            return -1
        return self.offsets[i] + (address - r.address) // PAGE_SIZE

    def span(self, address: int, length: int) -> np.ndarray:
        """Flat page indices covering [address, address + length).

        Raises:
            OutOfRangeError: any byte of the span is unmapped.
        """
        if address < 0 or length < 0:
            raise InvalidArgumentError("address and length must not be negative", field="address")
        first = address // PAGE_SIZE
        last = (address + max(length, 1) - 1) // PAGE_SIZE
        out = np.empty(last - first + 1, dtype=np.int64)
        page = first
        while page <= last:
            i = bisect.bisect_right(self.starts, page * PAGE_SIZE) - 1
            r = self.ranges[i] if i >= 0 else None
            if r is None or page * PAGE_SIZE >= r.end:
                raise OutOfRangeError(
                    f"guest-physical address {page * PAGE_SIZE:#x} of machine "
                    f"{self.machine_id!r} is unmapped (mapped: {self.describe_ranges()})",
                    field="address",
                )
            run_end = min(last + 1, r.end // PAGE_SIZE)
            base = self.offsets[i] + page - r.address // PAGE_SIZE
            out[page - first : run_end - first] = np.arange(base, base + run_end - page)
            page = run_end
        return out

    def describe_ranges(self, limit: int = 4) -> str:
        shown = ", ".join(f"{r.address:#x}-{r.end - 1:#x}" for r in self.ranges[:limit])
        return shown + (", ..." if len(self.ranges) > limit else "")


class FusionEngine:
    """Hosts guest memory and fuses identical pages. Thread-safe.

    Args:
        max_pool_bytes: the most host memory the frame pool may use; default
            the host's physical memory.
        hash_seed: seed of the keyed content hash; default a secret random one.
        config: initial fusion settings.
        huge_pages: back the frame pool with transparent huge pages (see
            FramePool; off by default).
    """

    def __init__(
        self,
        *,
        max_pool_bytes: int | None = None,
        hash_seed: int | None = None,
        config: FusionConfig | None = None,
        huge_pages: bool = False,
    ) -> None:
        self._lock = _VersionedLock()
        self._last_stats: tuple[int, FusionStats] | None = None  # (lock version, stats)
        self._scan_lock = threading.Lock()  # taken before _lock, never while holding it
        limit = max_pool_bytes if max_pool_bytes is not None else host_memory_bytes()
        self._pool = FramePool(max(1, limit // PAGE_SIZE), huge_pages=huge_pages)
        self._frames = FrameTable(self._pool, self._forget_frames)
        self._arena = self._pool.frames.data.cast("B")
        self._seed = hash_seed if hash_seed is not None else secrets.randbits(32)
        self._config = replace(config) if config is not None else FusionConfig()
        self._validate_config(self._config)
        self._machines: dict[str, _Machine] = {}
        self._running_ids: frozenset[str] = frozenset()
        self._indexes: dict[str, FusionIndex] = {}
        self._full_scans = 0
        self._scan_cursor: tuple[str, int] = ("", 0)
        self._modules = ModuleRegistry()
        rows = 512  # 2 MiB per scratch buffer
        self._scratch = (  # page aligned, like the frames and sources they copy
            page_aligned(rows * PAGE_SIZE).view(np.uint64).reshape(rows, -1),
            page_aligned(rows * PAGE_SIZE).view(np.uint64).reshape(rows, -1),
            np.zeros((rows, PAGE_SIZE // 8), dtype=bool),
        )

    # -- calling ------------------------------------------------------------

    def run_if_free(self, fn: Callable[..., T], *args: object) -> T | _Busy:
        """``fn(*args)`` at once if no other thread holds the engine; else BUSY.

        For short calls from an event loop: when the lock is free the call
        costs microseconds, far less than a hop to a worker thread; when a
        batch of a start or scan holds it, the caller hops instead of
        blocking its loop. ``fn`` is an engine method (the lock is
        re-entrant, so its own locking passes straight through).
        """
        if not self._lock.acquire(blocking=False):
            return BUSY
        try:
            return fn(*args)
        finally:
            self._lock.release()

    # -- configuration ------------------------------------------------------

    @property
    def config(self) -> FusionConfig:
        # Without the lock: set_config replaces the object, never changes it,
        # and the background scanner reads this on the event loop.
        return replace(self._config)

    def set_config(self, config: FusionConfig) -> FusionConfig:
        """Replace the fusion settings; returns the new settings."""
        self._validate_config(config)
        with self._lock:
            self._config = replace(config)
            return replace(self._config)

    @staticmethod
    def _validate_config(config: FusionConfig) -> None:
        if config.mode not in (FusionMode.HINTS, FusionMode.CONTENT, FusionMode.ALL):
            raise InvalidArgumentError(
                "mode must be FUSION_MODE_HINTS, FUSION_MODE_CONTENT or FUSION_MODE_ALL",
                field="config.mode",
            )
        if config.pages_per_second < 1:
            raise InvalidArgumentError(
                "pages_per_second must be at least 1", field="config.pages_per_second"
            )
        if not 0 <= config.stable_scans_before_merge <= _STABLE_MAX - 1:
            raise InvalidArgumentError(
                f"stable_scans_before_merge must be between 0 and {_STABLE_MAX - 1}",
                field="config.stable_scans_before_merge",
            )

    # -- machines -----------------------------------------------------------

    def start_machine(
        self,
        machine_id: str,
        memory: GuestMemory,
        *,
        page_fusion: bool,
        fusion_domain: str = "default",
        progress: Callable[[int, int], None] | None = None,
    ) -> MachineStats:
        """Read a machine's memory from ``memory`` and fuse it.

        Blocks until every page is ingested; all savings exist on return.
        Takes ownership of ``memory``: it is closed when the machine stops
        or when the start fails, in which case nothing of it remains.

        Args:
            progress: called with (pages done, pages total) after each batch.

        Raises:
            AlreadyExistsError: the machine is already running or starting.
            InvalidArgumentError: the source's ranges are unusable.
            ResourceExhaustedError: the pool's budget would be exceeded.
            SourceFailedError: the source could not be read.
        """
        try:
            ranges = self._checked_ranges(machine_id, memory)
            machine = _Machine(machine_id, memory, ranges, page_fusion, fusion_domain or "default")
            with self._lock:
                if machine_id in self._machines:
                    raise AlreadyExistsError(
                        f"machine {machine_id!r} is already running", reason="MACHINE_RUNNING"
                    )
                machine.slot = self._frames.add_machine(machine.domain)
                self._machines[machine_id] = machine
        except BaseException:
            memory.close()
            raise
        try:
            fresh = -1  # new frames the last batch took (unknown before the first)
            for r, offset in zip(ranges, machine.offsets, strict=True):
                for first in range(0, r.pages, BATCH_PAGES):
                    n = min(BATCH_PAGES, r.pages - first)
                    with self._lock:
                        # Ahead by what batches like the last one take, and at
                        # most what this machine's other pages may need: every
                        # frame populated and not taken is work thrown away.
                        left = machine.pages - offset - first
                        guess = n if fresh < 0 else max(fresh, CHUNK_FRAMES)
                        self._pool.prefault(min(PREFAULT_BATCHES * guess, left))
                    data = self._read_source(machine, r.address + first * PAGE_SIZE, n)
                    with self._lock:
                        before = self._pool.used
                        self._ingest(machine, offset + first, data)
                        fresh = self._pool.used - before
                    if progress is not None:
                        progress(machine.ingested, machine.pages)
            _idle(memory)
            with self._lock:
                machine.running = True
                self._publish_running()
                return self._machine_stats(machine)
        except BaseException:
            with self._lock:
                self._drop(machine)
            memory.close()
            raise
        finally:
            with self._lock:
                self._pool.trim()

    def stop_machine(self, machine_id: str) -> None:
        """Release a running machine's pages and close its source."""
        with self._lock:
            machine = self._running(machine_id)
            self._drop(machine)
            self._pool.trim()
        with contextlib.suppress(Exception):  # a vanished source must not block the stop
            machine.memory.close()

    def is_running(self, machine_id: str) -> bool:
        return machine_id in self._running_ids

    def running_machines(self) -> list[str]:
        # Without the lock (see _publish_running): the metrics sampler and
        # the background scanner ask this from the event loop while a start
        # holds the lock for a batch.
        return sorted(self._running_ids)

    def _publish_running(self) -> None:
        """Replace the lock-free set of running ids (under the lock, after a change)."""
        self._running_ids = frozenset(k for k, m in self._machines.items() if m.running)

    def modules(self, machine_id: str) -> Sequence[GuestModule]:
        """The modules the machine's source reports (a guest agent's view)."""
        with self._lock.reading:
            machine = self._running(machine_id)
            return tuple(machine.memory.modules())

    def _checked_ranges(self, machine_id: str, memory: GuestMemory) -> list[MemoryRange]:
        ranges = list(memory.ranges())
        try:
            validate_ranges(ranges, f"the memory source of machine {machine_id!r}")
        except InvalidSourceError as exc:
            raise InvalidArgumentError(str(exc), field="machine.memory_source") from None
        return ranges

    def _read_source(self, machine: _Machine, address: int, pages: int) -> np.ndarray:
        length = pages * PAGE_SIZE
        try:
            buf = machine.memory.read(address, length)
        except Exception as exc:
            if hasattr(exc, "option"):  # an adapter error: the server maps it
                raise
            raise SourceFailedError(
                f"reading {length} bytes at {address:#x} from the source of machine "
                f"{machine.machine_id!r} failed: {exc}"
            ) from exc
        data = np.frombuffer(buf, dtype=np.uint8)
        if len(data) != length:
            raise SourceFailedError(
                f"the source of machine {machine.machine_id!r} returned {len(data)} bytes "
                f"at {address:#x}, expected {length}"
            )
        return data.reshape(pages, PAGE_SIZE)

    def _running(self, machine_id: str) -> _Machine:
        m = self._machines.get(machine_id)
        if m is None or not m.running:
            state = "still starting" if m is not None else "not running"
            raise MachineNotRunningError(f"machine {machine_id!r} is {state}")
        return m

    def _drop(self, machine: _Machine) -> None:
        """Forget a machine and release every frame it holds (under the lock)."""
        if self._machines.get(machine.machine_id) is not machine:
            return
        self._modules.drop_machine(machine.machine_id)
        if not any(
            m.domain == machine.domain for m in self._machines.values() if m is not machine
        ):
            # The domain's last machine: its index goes whole, so the frames
            # freed below need not be hashed again to find their entries.
            self._indexes.pop(machine.domain, None)
        frames = machine.map[: machine.ingested]
        self._frames.detach(machine.slot, frames[frames != 0])
        self._frames.remove_machine(machine.slot)
        machine.map = PageMap(0)
        machine.ingested = 0
        machine.running = False
        del self._machines[machine.machine_id]
        self._publish_running()
        # Its frames' entries are stale now: lookups that meet stale entries
        # take the slow path, so apply the removals at once.
        index = self._indexes.get(machine.domain)
        if index is not None:
            index.flush()

    # -- ingest -------------------------------------------------------------

    def _ingest(self, machine: _Machine, base: int, data: np.ndarray) -> None:
        """Map one batch of freshly read pages at flat index ``base``."""
        n = len(data)
        words = data.view(np.uint64)
        nonzero = np.flatnonzero(np.bitwise_or.reduce(words, axis=1))
        if len(nonzero):
            if machine.page_fusion and self._config.mode.content:
                frames = self._fuse_new(data, words, nonzero, machine)
            else:
                frames = self._frames.allocate(len(nonzero))
                self._copy_into(frames, data, nonzero)
                self._frames.attach(machine.slot, frames)
            machine.map[base + nonzero] = frames
        machine.ingested = base + n

    def _hash(self, flat: memoryview, rows: np.ndarray) -> np.ndarray:
        """Keyed mmh3 x64 128-bit hashes of 4 KiB rows of ``flat``, as (k, 2) uint64."""
        digest = mmh3.mmh3_x64_128_digest
        seed = self._seed
        starts = (rows.astype(np.int64) * PAGE_SIZE).tolist()
        out = b"".join([digest(flat[s : s + PAGE_SIZE], seed) for s in starts])
        return np.frombuffer(out, dtype=np.uint64).reshape(-1, 2)

    def _index(self, domain: str) -> FusionIndex:
        index = self._indexes.get(domain)
        if index is None:
            index = self._indexes[domain] = FusionIndex()
        return index

    def _insert(self, index: FusionIndex, keys: np.ndarray, frames: np.ndarray) -> None:
        # A removed entry must be gone before its frame can be indexed again.
        for other in self._indexes.values():
            other.flush()
        self._frames.indexed.set(frames)
        index.insert(keys, frames)

    def _find(
        self, index: FusionIndex, key: int, page: np.ndarray, extra: int, exclude: int = 0
    ) -> int:
        """Slow path: an indexed frame equal to ``page`` that can take ``extra`` users."""
        table = self._frames
        for frame in index.candidates(key):
            if frame == exclude or not table.indexed.test(frame):
                continue
            if not np.array_equal(self._pool.words[frame], page):
                continue
            users = table.ref(frame)
            if users + extra <= MAX_REFCOUNT:
                return frame
            if users >= MAX_REFCOUNT:
                # Saturated: let the next copy of this content start a new frame.
                index.remove(np.array([key], dtype=np.uint32), np.array([frame], dtype=np.uint32))
                table.indexed.clear(np.array([frame]))
        return 0

    def _equal_rows(
        self,
        left: np.ndarray,
        left_rows: np.ndarray,
        right: np.ndarray,
        right_rows: np.ndarray | None = None,
    ) -> np.ndarray:
        """Full byte comparison of page pairs: left[left_rows[i]] == right[right_rows[i]].

        ``right_rows`` None means right's rows in order (compared in place).

        Works through small reused scratch buffers: gathering a whole batch
        would allocate (and page-fault in) tens of MiB of temporaries each time.
        Runs of consecutive pairs on both sides (a guest matching the frames
        of one like it: frames are handed out in guest-page order) are
        compared in place, without the two gathers (see _equal_in_place).
        """
        n = len(left_rows)
        out = np.empty(n, dtype=bool)
        starts, ends = _pair_runs(
            left_rows, np.arange(n) if right_rows is None else right_rows, _RUN_PAIRS
        )
        if not len(starts):
            self._equal_gathered(left, left_rows, right, right_rows, out)
            return out
        self._equal_in_place(left, left_rows, right, right_rows, starts, ends, out)
        edges = np.zeros(n + 1, dtype=np.int8)
        edges[starts] = 1
        edges[ends] -= 1
        rest = np.flatnonzero(np.cumsum(edges[:n]) == 0)
        if len(rest):  # scattered pairs (in order only by position): gather both sides
            part = np.empty(len(rest), dtype=bool)
            self._equal_gathered(
                left, left_rows[rest], right, rest if right_rows is None else right_rows[rest], part
            )
            out[rest] = part
        return out

    def _equal_gathered(
        self,
        left: np.ndarray,
        left_rows: np.ndarray,
        right: np.ndarray,
        right_rows: np.ndarray | None,
        out: np.ndarray,
    ) -> None:
        """_equal_rows into ``out``, every pair gathered through the scratch."""
        a, b, diff = self._scratch
        step = len(a)
        for start in range(0, len(left_rows), step):
            k = min(step, len(left_rows) - start)
            np.take(left, left_rows[start : start + k], axis=0, out=a[:k], mode="clip")
            if right_rows is None:
                other = right[start : start + k]
            else:
                other = b[:k]
                np.take(right, right_rows[start : start + k], axis=0, out=other, mode="clip")
            _rows_equal(a[:k], other, diff[:k], out[start : start + k])

    def _equal_in_place(
        self,
        left: np.ndarray,
        left_rows: np.ndarray,
        right: np.ndarray,
        right_rows: np.ndarray | None,
        starts: np.ndarray,
        ends: np.ndarray,
        out: np.ndarray,
    ) -> None:
        """_equal_rows of the runs [starts[i], ends[i]) of consecutive pairs, into ``out``.

        One memcmp per run (a single pass that writes nothing; nearly every
        run is equal), page by page only through a run that differs.
        """
        memcmp = MEMCMP
        if not (
            left.flags.c_contiguous
            and right.flags.c_contiguous
            and left.strides[0] == right.strides[0] == PAGE_SIZE
        ):
            memcmp = None
        left_at, right_at = left.ctypes.data, right.ctypes.data
        diff = self._scratch[2]
        step = len(diff)
        for lo, hi in zip(starts.tolist(), ends.tolist(), strict=True):
            first = int(left_rows[lo])
            other = lo if right_rows is None else int(right_rows[lo])
            if memcmp is not None and not memcmp(
                left_at + first * PAGE_SIZE, right_at + other * PAGE_SIZE, (hi - lo) * PAGE_SIZE
            ):
                out[lo:hi] = True
                continue
            for start in range(0, hi - lo, step):
                k = min(step, hi - lo - start)
                _rows_equal(
                    left[first + start : first + start + k],
                    right[other + start : other + start + k],
                    diff[:k],
                    out[lo + start : lo + start + k],
                )

    def _group(
        self, flat: memoryview, words: np.ndarray, rows: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Hash ``rows`` and group equal pages.

        Returns (keys, reps, inverse, counts, odd): per group its index key,
        representative row and size; per row its group; and the positions of
        rows whose hash matched a group but whose bytes did not (they are
        left out of every group and must be handled alone).
        """
        hashes = self._hash(flat, rows)
        uniq, first, inverse, counts = np.unique(
            hashes[:, 0], return_index=True, return_inverse=True, return_counts=True
        )
        reps = rows[first]
        rep_of = reps[inverse]
        members = np.flatnonzero(rows != rep_of)
        odd = members[:0]
        if len(members):
            differs = ~self._equal_rows(words, rows[members], words, rep_of[members])
            odd = members[differs]
            if len(odd):
                counts = counts - np.bincount(inverse[odd], minlength=len(counts))
        keys = (uniq >> np.uint64(32)).astype(np.uint32)
        return keys, reps, inverse, counts, odd

    def _match(
        self,
        index: FusionIndex,
        keys: np.ndarray,
        reps: np.ndarray,
        counts: np.ndarray,
        words: np.ndarray,
        own: np.ndarray | None = None,
    ) -> np.ndarray:
        """For each group, an indexed frame with equal content that can take
        the group's pages (0 where there is none). Mutates nothing but the
        index's saturated entries."""
        pool = self._pool
        found = np.zeros(len(keys), dtype=np.uint32)
        cand = index.lookup(keys)
        has = np.flatnonzero(cand)
        if not len(has):
            return found
        frames = cand[has]
        ok = self._frames.indexed.get(frames)
        ok &= self._frames.refs(frames) + counts[has] <= MAX_REFCOUNT
        if own is not None:
            ok &= frames != own[has]
        good = has[ok]
        equal = np.zeros(len(has), dtype=bool)
        # In frame order, not the groups' hash order: the pool side is read
        # in runs (a guest like one fused before has its frames in its order).
        order = np.argsort(frames[ok], kind="stable")
        same = np.empty(len(order), dtype=bool)
        same[order] = self._equal_rows(pool.words, frames[ok][order], words, reps[good][order])
        equal[ok] = same
        found[has[equal]] = frames[equal]
        for g in has[~equal].tolist():  # collisions, stale or saturated entries
            found[g] = self._find(
                index,
                int(keys[g]),
                words[reps[g]],
                int(counts[g]),
                exclude=int(own[g]) if own is not None else 0,
            )
        return found

    def _fuse_new(
        self, data: np.ndarray, words: np.ndarray, rows: np.ndarray, machine: _Machine
    ) -> np.ndarray:
        """Frames for new non-zero pages ``rows`` of ``data``, fused by content.

        Returns one frame per row, each already counting that row's page.
        """
        table = self._frames
        slot = machine.slot
        flat = data.data.cast("B")
        index = self._index(machine.domain)
        keys, reps, inverse, counts, odd = self._group(flat, words, rows)
        # Groups larger than a frame can take: the first MAX_REFCOUNT rows go
        # the normal way, the rest fill extra frames of their own.
        extra_rows, extra_slot, extra_groups = self._overflow(inverse, counts, odd)
        if len(extra_rows):
            counts = np.minimum(counts, MAX_REFCOUNT)
        found = self._match(index, keys, reps, counts, words)
        new = np.flatnonzero(found == 0)
        # New frames in guest-page order, not hash order: a later guest with
        # the same content then matches runs of frames, read sequentially.
        new = new[np.argsort(reps[new], kind="stable")]
        # Check the budget before mutating anything, so a refusal leaves no trace.
        fresh = table.allocate(len(new) + len(odd) + len(extra_groups))
        matched = np.flatnonzero(found)
        table.attach(slot, found[matched], counts[matched])
        if len(new):
            frames = fresh[: len(new)]
            self._copy_into(frames, data, reps[new])
            table.attach(slot, frames, counts[new])
            self._insert(index, keys[new], frames)
            found[new] = frames
        out = found[inverse]
        rest = fresh[len(new) :]
        if len(odd):  # a 64-bit hash collision inside the batch: keep them private
            lone = rest[: len(odd)]
            self._copy_into(lone, data, rows[odd])
            table.attach(slot, lone)
            out[odd] = lone
        if len(extra_groups):  # unindexed: they are (nearly) full already
            spill = rest[len(odd) :]
            self._copy_into(spill, data, reps[extra_groups])
            users = np.bincount(extra_slot, minlength=len(extra_groups))
            table.attach(slot, spill, users)
            out[extra_rows] = spill[extra_slot]
        return out

    @staticmethod
    def _overflow(
        inverse: np.ndarray, counts: np.ndarray, odd: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows of groups beyond MAX_REFCOUNT members.

        Returns (rows, slot of each row, group of each slot): every slot is
        one extra frame holding up to MAX_REFCOUNT rows of one group.
        """
        empty = np.zeros(0, dtype=np.int64)
        if not len(counts) or counts.max() <= MAX_REFCOUNT:
            return empty, empty, empty
        member = np.ones(len(inverse), dtype=bool)
        member[odd] = False
        idx = np.flatnonzero(member)
        order, sorted_groups, rank = _ranks(inverse[idx])
        over = rank >= MAX_REFCOUNT
        rows = idx[order][over]
        pairs = sorted_groups[over] * (len(inverse) + 1) + rank[over] // MAX_REFCOUNT
        uniq_pairs, slot = np.unique(pairs, return_inverse=True)
        return rows, slot, uniq_pairs // (len(inverse) + 1)

    def _copy_into(self, frames: np.ndarray, data: np.ndarray, rows: np.ndarray) -> None:
        """Copy pages ``rows`` of ``data`` into ``frames``, once, straight into the pool."""
        if not len(frames):
            return
        # No temporary the size of the copy: fresh memory for it each batch
        # would cost a page fault per 4 KiB, more than the copy itself. (That
        # is also why every take here says mode="clip": the default mode
        # buffers its whole output; the rows are in range by construction.)
        target = self._pool.frames
        ends = np.flatnonzero(np.diff(frames.astype(np.int64)) != 1) + 1
        if len(ends) <= len(frames) // 64:  # runs of frames (fresh, or chunks taken again)
            starts = [0, *ends.tolist()]
            for lo, hi in zip(starts, [*starts[1:], len(frames)], strict=True):
                first = int(frames[lo])
                np.take(data, rows[lo:hi], axis=0, out=target[first : first + hi - lo], mode="clip")
            return
        staging = self._scratch[0].view(np.uint8)  # scattered frames: through cache-sized scratch
        step = len(staging)
        for start in range(0, len(frames), step):
            k = min(step, len(frames) - start)
            np.take(data, rows[start : start + k], axis=0, out=staging[:k], mode="clip")
            target[frames[start : start + k]] = staging[:k]

    # -- frames leaving -----------------------------------------------------

    def _forget_frames(self, frames: np.ndarray, domain: str) -> None:
        """The frame table is about to free ``frames``: drop them from the index and hints."""
        table = self._frames
        indexed = frames[table.indexed.get(frames)]
        if domain in self._indexes:
            self._unindex(indexed, domain)
        else:  # the domain's index was dropped whole (its last machine stopped)
            table.indexed.clear(indexed)
        self._modules.forget_frames(domain, frames[table.hinted.get(frames)])

    def _unindex(self, frames: np.ndarray, domain: str) -> None:
        """Take frames out of their domain's index (before content changes or frees)."""
        if not len(frames):
            return
        hashes = self._hash(self._arena, frames)
        self._index(domain).remove((hashes[:, 0] >> np.uint64(32)).astype(np.uint32), frames)
        self._frames.indexed.clear(frames)

    def _unindex_one(self, frame: int, domain: str) -> None:
        """_unindex for one frame without numpy arrays (a write to a PRIVATE page)."""
        digest = mmh3.mmh3_x64_128_digest(self._arena[frame * PAGE_SIZE : (frame + 1) * PAGE_SIZE],
                                          self._seed)
        key = int.from_bytes(digest[:8], "little") >> 32  # hashes[:, 0] >> 32, as _unindex
        self._index(domain).remove_one(key, frame)
        self._frames.indexed.clear_one(frame)

    # -- guest access -------------------------------------------------------

    def read(self, machine_id: str, address: int, length: int) -> bytes:
        """Guest memory as the guest sees it.

        Raises:
            MachineNotRunningError, OutOfRangeError.
        """
        with self._lock.reading:
            machine = self._running(machine_id)
            lo = address % PAGE_SIZE
            if 0 < length <= PAGE_SIZE - lo and address >= 0:  # one page: no arrays
                page = machine.index_of(address)
                if page >= 0:
                    start = machine.map[page] * PAGE_SIZE + lo
                    return bytes(self._arena[start : start + length])
            if length == 0:
                machine.span(address, 0)
                return b""
            pages = machine.span(address, length)
            if len(pages) == 1:
                start = machine.map[int(pages[0])] * PAGE_SIZE + lo
                return bytes(self._arena[start : start + length])
            rows = self._pool.frames[machine.map[pages]]
            return rows.reshape(-1)[lo : lo + length].tobytes()

    def write(self, machine_id: str, address: int, data: bytes) -> int:
        """Write guest memory; returns how many SHARED pages were copied on write.

        Nothing changes if any byte of the span is unmapped.
        """
        with self._lock:
            machine = self._running(machine_id)
            lo = address % PAGE_SIZE
            if 0 < len(data) <= PAGE_SIZE - lo and address >= 0:
                # The common case, one page: no numpy on the way (copy on write p50).
                page = machine.index_of(address)
                if page >= 0:
                    pool = self._pool
                    if pool.used >= pool.max_frames:  # full: only a page needing no frame
                        frame = machine.map[page]
                        if frame == 0 or self._frames.refcount[frame] >= 2:
                            # A refusal must come before the write reaches a live source.
                            self._frames.require_room(1)
                    machine.writes += 1
                    if machine.live:
                        self._write_through(machine, address, data)
                    return self._write_page(machine, page, lo, data)
            pages = machine.span(address, len(data))
            if not data:
                return 0
            # Pages that may need a new frame (ZERO or SHARED): check the budget
            # first, so a refused write changes nothing.
            frames = machine.map[pages]
            self._frames.require_room(
                int(np.count_nonzero((frames == 0) | (self._frames.refcount[frames] >= 2)))
            )
            machine.writes += 1
            if machine.live:
                self._write_through(machine, address, data)
            return self._write_pages(machine, pages, address, memoryview(data))

    @staticmethod
    def _write_through(machine: _Machine, address: int, data: bytes) -> None:
        """Live sources are the guest's own memory: writes go there too."""
        with contextlib.suppress(NotImplementedError):
            machine.memory.write(address, bytes(data))

    def _write_pages(
        self, machine: _Machine, pages: np.ndarray, address: int, data: memoryview
    ) -> int:
        copied = 0
        offset = 0
        lo = address % PAGE_SIZE
        for page in pages.tolist():
            hi = min(PAGE_SIZE, lo + len(data) - offset)
            copied += self._write_page(machine, page, lo, data[offset : offset + hi - lo])
            offset += hi - lo
            lo = 0
        return copied

    def _write_page(self, machine: _Machine, page: int, lo: int, chunk: memoryview | bytes) -> int:
        """Apply a write inside one guest page; 1 if it broke sharing.

        The caller has checked that a frame this may need fits the budget.
        """
        table = self._frames
        arena = self._arena
        frame = machine.map[page]
        zeros = (chunk if isinstance(chunk, bytes) else bytes(chunk)).count(0) == len(chunk)
        if machine.stable is not None:
            machine.mark_volatile(page)
        if frame == 0:
            if zeros:
                return 0
            new = table.allocate_private(machine.slot)
            start = new * PAGE_SIZE
            arena[start : start + PAGE_SIZE] = _ZERO_PAGE
            arena[start + lo : start + lo + len(chunk)] = chunk
            machine.map[page] = new
            return 0
        start = frame * PAGE_SIZE
        if table.refcount[frame] == 1:
            if table.indexed.test(frame):
                self._unindex_one(frame, machine.domain)
            if table.hinted.test(frame):  # its content changes: no longer canonical
                self._modules.forget_frames(machine.domain, np.array([frame], dtype=np.uint32))
                table.hinted.clear_one(frame)
            arena[start + lo : start + lo + len(chunk)] = chunk
            if zeros and not self._pool.words[frame].any():
                self._to_zero(machine, page, frame)
            return 0
        # SHARED: the writer gets its own copy; the other users keep the frame.
        new = table.allocate_private(machine.slot)
        dest = new * PAGE_SIZE
        arena[dest : dest + PAGE_SIZE] = arena[start : start + PAGE_SIZE]
        arena[dest + lo : dest + lo + len(chunk)] = chunk
        machine.map[page] = new
        table.detach_one(machine.slot, frame)
        if zeros and not self._pool.words[new].any():
            self._to_zero(machine, page, new)
        return 1

    def _to_zero(self, machine: _Machine, page: int, frame: int) -> None:
        """A private page became all zeros: back to ZERO, frame freed."""
        machine.map[page] = 0
        self._frames.detach_one(machine.slot, frame)

    def page_info(self, machine_id: str, address: int) -> PageInfo:
        """State and share count of the page holding ``address``."""
        with self._lock.reading:
            machine = self._running(machine_id)
            if address < 0:
                raise InvalidArgumentError("address must not be negative", field="address")
            page = machine.index_of(address)
            if page < 0:
                return PageInfo(PageState.UNMAPPED, 0)
            frame = machine.map[page]
            if frame == 0:
                return PageInfo(PageState.ZERO, 0)
            users = self._frames.ref(frame)
            return PageInfo(PageState.SHARED if users >= 2 else PageState.PRIVATE, users)

    # -- the hint path (VirtualBox's shared modules) ---------------------------

    def page_sharing_enabled(self, machine_id: str) -> bool:
        """What a guest agent asks first: may this machine share module pages?"""
        with self._lock.reading:
            machine = self._running(machine_id)
            return machine.page_fusion and self._config.mode.hints

    def register_module(self, machine_id: str, module: GuestModule) -> None:
        """Record a module a guest agent reports as loaded.

        Raises:
            InvalidArgumentError: a VirtualBox limit is exceeded.
            OutOfRangeError: a region lies outside the machine's memory.
            AlreadyExistsError: the same module is registered at that base.
            FailedPreconditionError: another module uses that base (address
                clash), or page fusion is off for the machine.
        """
        module_key(module)
        with self._lock:
            machine = self._fusing(machine_id)
            pages = []
            for i, region in enumerate(module.regions):
                first = region.address // PAGE_SIZE * PAGE_SIZE
                count = region_pages(region.address, region.size)
                try:
                    pages.append(machine.span(first, count * PAGE_SIZE))
                except OutOfRangeError:
                    raise OutOfRangeError(
                        f"region {i} of module {module.module_name!r} "
                        f"({region.address:#x}+{region.size:#x}) lies outside the memory of "
                        f"machine {machine_id!r} (mapped: {machine.describe_ranges()})",
                        field=f"module.regions[{i}]",
                        reason="REGION_UNMAPPED",
                    ) from None
            self._modules.register(machine_id, machine.domain, module, pages)

    def unregister_module(self, machine_id: str, module: GuestModule) -> None:
        """Forget a module (matched by name, version, base and size).

        Its pages stay shared until written or freed, as in VirtualBox.
        """
        with self._lock:
            self._running(machine_id)
            self._modules.unregister(machine_id, module)

    def registered_modules(self, machine_id: str) -> list[GuestModule]:
        with self._lock.reading:
            self._running(machine_id)
            return [r.module for r in self._modules.registrations(machine_id)]

    def check_shared_modules(self, machine_id: str) -> tuple[int, int]:
        """Fuse the machine's registered module pages by position.

        For every page position of every registered module region: the first
        machine to offer a non-zero page there provides the canonical frame;
        a later machine's PRIVATE page at the same position is shared with
        it when the bytes are equal. Returns (pages checked, pages fused);
        pages checked counts the non-zero pages examined.
        """
        with self._lock:
            machine = self._fusing(machine_id)
            if not self._config.mode.hints:
                return 0, 0
            checked = fused = 0
            for reg in self._modules.registrations(machine_id):
                for canonical, pages in zip(reg.shared.canonical, reg.pages, strict=True):
                    c, f = self._check_region(machine, canonical, pages)
                    checked += c
                    fused += f
            return checked, fused

    def _fusing(self, machine_id: str) -> _Machine:
        machine = self._running(machine_id)
        if not machine.page_fusion:
            raise FailedPreconditionError(
                f"page fusion is off for machine {machine_id!r}; turn it on while the "
                "machine is powered off",
                reason="PAGE_FUSION_DISABLED",
            )
        return machine

    def _check_region(
        self, machine: _Machine, canonical: np.ndarray, pages: np.ndarray
    ) -> tuple[int, int]:
        table = self._frames
        frames = machine.map[pages]
        nonzero = frames != 0
        valid = (canonical != 0) & table.hinted.get(canonical)
        offer = nonzero & ~valid
        if offer.any():  # first at these positions: this machine's pages become canonical
            canonical[offer] = frames[offer]
            table.hinted.set(frames[offer])
        candidates = np.flatnonzero(
            valid & nonzero & (frames != canonical) & (table.refcount[frames] == 1)
        )
        checked = int(np.count_nonzero(nonzero))
        if not len(candidates):
            return checked, 0
        old = frames[candidates]
        target = canonical[candidates]
        words = self._pool.words
        equal = self._equal_rows(words, old, words, target)
        candidates = self._within_room(candidates[equal], target[equal])
        old, target = frames[candidates], canonical[candidates]
        machine.map[pages[candidates]] = target
        table.retarget(machine.slot, old, target)
        return checked, len(candidates)

    # -- scans --------------------------------------------------------------

    def scan(
        self, machine_ids: Sequence[str] | None = None, *, page_budget: int | None = None
    ) -> ScanResult:
        """Re-read live sources and fuse pages not yet fused.

        Changed pages of live sources are guest writes (copy on write). With
        ``page_budget`` the scan resumes where the last budgeted scan
        stopped and examines at most that many pages (the background scanner).

        A machine whose source fails (a segment that shrank or vanished) is
        skipped and remembered as failed (``source_error`` in its stats);
        the other machines are scanned all the same.

        Only a failure to read a source marks it failed; any other error
        (the pool's budget running out while copying on write) ends the scan
        and is raised, with what was done so far kept and consistent.

        Raises:
            MachineNotRunningError: a named machine is not running.
            SourceFailedError: a named machine's source failed (after the
                other named machines were scanned).
            ResourceExhaustedError: a changed page needed a frame the budget
                does not have.
        """
        # One scan at a time: a source reads into a buffer it reuses, so two
        # scans reading one machine at once could each apply the other's
        # bytes to their own pages (RunScan beside the background scanner).
        with self._scan_lock:
            return self._scan(machine_ids, page_budget)

    def _scan(self, machine_ids: Sequence[str] | None, page_budget: int | None) -> ScanResult:
        with self._lock:
            if machine_ids:
                targets = [self._running(mid) for mid in dict.fromkeys(machine_ids)]
            else:
                targets = [
                    self._machines[k] for k in sorted(self._machines) if self._machines[k].running
                ]
            cursor_id, cursor_page = self._scan_cursor if page_budget is not None else ("", 0)
        failed: list[str] = []
        try:
            wrapped, scanned, fused, copied = self._scan_machines(
                targets, page_budget, cursor_id, cursor_page, failed
            )
        finally:
            for machine in targets:
                if machine.live:
                    _idle(machine.memory)
        with self._lock:
            if wrapped:
                self._full_scans += 1
                self._scan_cursor = ("", 0)
        if machine_ids and failed:
            raise SourceFailedError(
                "the memory source of "
                + ", ".join(f"machine {m!r} ({self._source_error(m)})" for m in failed)
                + " failed; the machine keeps the memory it had; stop it to release it",
                field="names",
            )
        return ScanResult(
            pages_scanned=scanned,
            pages_fused=fused,
            pages_copied_on_write=copied,
            failed_machines=tuple(failed),
        )

    def _scan_machines(
        self,
        targets: list[_Machine],
        page_budget: int | None,
        cursor_id: str,
        cursor_page: int,
        failed: list[str],
    ) -> tuple[bool, int, int, int]:
        """The scan's walk; returns (wrapped, scanned, fused, copied)."""
        scanned = fused = copied = 0
        budget = page_budget if page_budget is not None else -1
        wrapped = True
        for machine in targets:
            if page_budget is not None and machine.machine_id < cursor_id:
                continue
            pos = cursor_page if machine.machine_id == cursor_id else 0
            while pos < machine.pages:
                if budget == 0:
                    wrapped = False
                    with self._lock:
                        self._scan_cursor = (machine.machine_id, pos)
                    break
                n = min(BATCH_PAGES, machine.pages - pos)
                if budget > 0:
                    n = min(n, budget)
                try:
                    done, f, c = self._scan_batch(machine, pos, n)
                except _SourceReadError as exc:  # keep the other machines going
                    with self._lock:
                        if self._machines.get(machine.machine_id) is machine and machine.running:
                            failed.append(machine.machine_id)
                            machine.source_error = str(exc.__cause__ or exc)
                    break
                if done == 0:  # the machine stopped under us
                    break
                pos += done
                scanned += done
                fused += f
                copied += c
                if budget > 0:
                    budget -= done
            if not wrapped:
                break
        return wrapped, scanned, fused, copied

    def _source_error(self, machine_id: str) -> str:
        with self._lock.reading:
            m = self._machines.get(machine_id)
            return (m.source_error or "") if m is not None else ""

    def _scan_batch(self, machine: _Machine, first: int, n: int) -> tuple[int, int, int]:
        """Scan n pages from flat page ``first``; returns (pages done, fused, copied).

        A live batch is read outside the lock. A guest write that lands
        between that read and applying it would be undone by the older bytes,
        so such a batch is read again (and its changes skipped if writes keep
        racing it; the next scan sees them).

        Raises:
            _SourceReadError: the live source could not be read.
        """
        fresh: np.ndarray | None = None
        address = 0
        if machine.live:
            address, left = self._address_of(machine, first)
            n = min(n, left)  # a read never crosses a range boundary
        for _ in range(_SCAN_READ_TRIES if machine.live else 1):
            with self._lock:
                writes = machine.writes
            if machine.live:
                try:
                    fresh = self._read_source(machine, address, n)
                except Exception as exc:
                    raise _SourceReadError(str(exc)) from exc
            with self._lock:
                if self._machines.get(machine.machine_id) is not machine or not machine.running:
                    return 0, 0, 0
                if machine.writes != writes:
                    fresh = None
                    continue
                copied = self._apply_changes(machine, first, fresh) if fresh is not None else 0
                return n, self._fuse_batch(machine, first, n), copied
        with self._lock:
            if self._machines.get(machine.machine_id) is not machine or not machine.running:
                return 0, 0, 0
            return n, self._fuse_batch(machine, first, n), 0

    def _fuse_batch(self, machine: _Machine, first: int, n: int) -> int:
        if machine.page_fusion and self._config.mode.content:
            return self._fuse_existing(machine, first, first + n)
        return 0

    def _address_of(self, machine: _Machine, page: int) -> tuple[int, int]:
        """Guest address of flat page ``page`` and the pages left in its range."""
        i = bisect.bisect_right(machine.offsets, page) - 1
        r = machine.ranges[i]
        within = page - machine.offsets[i]
        return r.address + within * PAGE_SIZE, r.pages - within

    def _apply_changes(self, machine: _Machine, first: int, fresh: np.ndarray) -> int:
        """Pages of a live source that differ from what we hold are guest writes."""
        assert machine.stable is not None
        n = len(fresh)
        frames = machine.map[first : first + n]
        changed = np.flatnonzero(~self._equal_rows(self._pool.words, frames, fresh.view(np.uint64)))
        stable = machine.stable[first : first + n]
        hist = machine.stable_hist
        hist -= np.bincount(stable, minlength=_STABLE_MAX + 1)
        np.minimum(stable.astype(np.int16) + 1, _STABLE_MAX, out=stable, casting="unsafe")
        hist += np.bincount(stable, minlength=_STABLE_MAX + 1)
        copied = 0
        for i in changed.tolist():  # _write_page also marks the page volatile again
            frame = int(frames[i])
            if frame == 0 or self._frames.refcount[frame] >= 2:
                self._frames.require_room(1)
            copied += self._write_page(machine, first + i, 0, fresh[i].data)
        return copied

    def _fuse_existing(self, machine: _Machine, lo: int, hi: int) -> int:
        """Fuse this machine's unindexed (and stable) pages in [lo, hi).

        Candidates are pages on frames the content index does not know:
        private pages, and pages the hint path shared by position. A page
        moves to an indexed frame with equal bytes when there is one; else
        the first frame of its group joins the index and the others of the
        group move to it. Only this machine's pages move (there is no
        reverse map); other users of a frame move when their machine is
        scanned. Returns the pages that moved.
        """
        table = self._frames
        words = self._pool.words
        frames = machine.map[lo:hi]
        # Full frames take no one and give no one away: they stay as they are.
        eligible = (frames != 0) & ~table.indexed.get(frames)
        eligible &= table.refs(frames) < MAX_REFCOUNT
        if machine.stable is not None:
            eligible &= machine.stable[lo:hi] >= self._config.stable_scans_before_merge
        pages = lo + np.flatnonzero(eligible)
        if not len(pages):
            return 0
        own = machine.map[pages]
        index = self._index(machine.domain)
        keys, reps, inverse, counts, odd = self._group(self._arena, words, own)
        # reps are frame ids here (rows of the arena).
        counts = np.minimum(counts, MAX_REFCOUNT)
        found = self._match(index, keys, reps, counts, words, own=reps)
        keep = np.flatnonzero(found == 0)
        if len(keep):  # no equal frame yet: the group's first frame becomes canonical
            found[keep] = reps[keep]
            self._insert(index, keys[keep], reps[keep])
        target = found[inverse]
        if len(odd):
            target[odd] = own[odd]
        moved = np.flatnonzero(target != own)
        if not len(moved):
            return 0
        moved = self._within_room(moved, target[moved])
        machine.map[pages[moved]] = target[moved]
        table.retarget(machine.slot, own[moved], target[moved])
        return len(moved)

    def _within_room(self, moves: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """The moves that fit: no target frame may pass MAX_REFCOUNT users.

        Moves past a frame's room stay where they are until a later scan.
        """
        order, sorted_targets, rank = _ranks(targets)
        room = MAX_REFCOUNT - self._frames.refs(sorted_targets)
        return np.sort(moves[order[rank < room]])

    # -- figures ------------------------------------------------------------

    def machine_stats(self, machine_id: str) -> MachineStats:
        with self._lock.reading:
            return self._machine_stats(self._running(machine_id))

    def _machine_stats(self, machine: _Machine) -> MachineStats:
        # O(1): the frame table keeps each machine's counts as they change.
        private = self._frames.private[machine.slot]
        shared = self._frames.shared[machine.slot]
        volatile = (
            machine.volatile_pages(self._config.stable_scans_before_merge)
            if machine.stable is not None
            else 0
        )
        return MachineStats(  # positional: the fields' order in types.py
            machine.machine_id,
            machine.ingested,
            machine.ingested - private - shared,
            private,
            shared,
            volatile,
            not machine.running,
            machine.source_error or "",
        )

    def stats(self) -> FusionStats:
        """Host counters and one entry per machine (running or starting), from one instant.

        Costs O(machines), whatever their memory.
        """
        with self._lock.reading:
            last = self._last_stats
            if last is not None and last[0] == self._lock.version:
                return last[1]  # nothing held the lock to change anything since
            # Machines still starting are included (flagged): their pages
            # already hold frames, and the host figures count them. One
            # pass over the machines: this is on GetFusionStats's path.
            machines = tuple(self._machine_stats(self._machines[k]) for k in sorted(self._machines))
            guest = zero = private = shared = volatile = 0
            metadata = self._pool.metadata_bytes + self._frames.nbytes + self._modules.nbytes
            for ms in machines:
                guest += ms.guest_pages
                zero += ms.zero_pages
                private += ms.private_pages
                shared += ms.shared_pages
                volatile += ms.volatile_pages
            for index in self._indexes.values():
                metadata += index.nbytes
            for m in self._machines.values():
                metadata += m.map.nbytes + (m.stable.nbytes if m.stable is not None else 0)
            frames_shared = self._frames.frames_shared
            host = HostStats(
                guest_pages=guest,
                zero_pages=zero,
                private_pages=private,
                shared_pages=shared,
                frames_used=self._frames.frames_used,
                frames_shared=frames_shared,
                pages_saved=shared - frames_shared,
                frames_free=self._pool.free_frames,
                volatile_pages=volatile,
                full_scans=self._full_scans,
                metadata_bytes=metadata,
                pool_bytes_reserved=self._pool.reserved_bytes,
            )
            stats = FusionStats(host=host, machines=machines)
            self._last_stats = (self._lock.version, stats)
            return stats

    # -- verification -------------------------------------------------------

    def verify(self, *, slice_frames: int = 2048) -> VerifyResult:
        """Recount everything from the page maps and compare (VerifyFusion).

        Holds the lock only to copy the bookkeeping (memcpy speed) and then
        for slices of ``slice_frames`` frames while their content hashes are
        checked against the index; guests keep running meanwhile.
        """
        with self._lock:
            snap = self._snapshot()
        problems = recount(snap)
        problems += self._verify_index_content(snap, slice_frames)
        pages = sum(len(m.map) for m in snap.machines)
        frames = int(np.count_nonzero(snap.refcount))
        return VerifyResult(
            consistent=not problems,
            pages_checked=pages,
            frames_checked=frames,
            problems=tuple(problems),
        )

    def _snapshot(self) -> Snapshot:
        table = self._frames
        size = len(table.refcount)

        def bits(b: np.ndarray) -> np.ndarray:
            return np.unpackbits(b, bitorder="little")[:size].astype(bool)

        chunk_used, chunk_held = self._pool.chunk_counts()
        return Snapshot(
            machines=[
                MachineCopy(
                    machine_id=m.machine_id,
                    slot=m.slot,
                    domain=m.domain,
                    page_fusion=m.page_fusion,
                    map=m.map[: m.ingested],
                    private=int(table.private[m.slot]),
                    shared=int(table.shared[m.slot]),
                    stable=m.stable.copy() if m.stable is not None else None,
                    stable_hist=m.stable_hist.copy(),
                )
                for m in self._machines.values()
            ],
            refcount=table.refcount.copy(),
            overflow=dict(table.overflow),
            owner=table.owner.copy(),
            indexed=bits(table.indexed.bits),
            hinted=bits(table.hinted.bits),
            frames_used=table.frames_used,
            frames_shared=table.frames_shared,
            high_water_mark=self._pool.high_water_mark,
            free_stack=self._pool.free_stack(),
            chunk_used=chunk_used,
            chunk_held=chunk_held,
            index_entries={d: i.live_entries() for d, i in self._indexes.items()},
            canonical=self._modules.canonical_frames(),
        )

    def _verify_index_content(self, snap: Snapshot, slice_frames: int) -> list[str]:
        """Each frame still INDEXED is indexed under the hash of what it holds now."""
        stale: list[int] = []
        total = 0
        for domain, (live, _pending) in snap.index_entries.items():
            frames = (live & np.uint64(0xFFFFFFFF)).astype(np.uint32)
            for start in range(0, len(frames), slice_frames):
                part = frames[start : start + slice_frames]
                with self._lock:
                    index = self._indexes.get(domain)
                    if index is None:
                        break
                    part = part[part < len(self._frames.refcount)]
                    part = part[self._frames.indexed.get(part)]
                    if not len(part):
                        continue
                    keys = (self._hash(self._arena, part)[:, 0] >> np.uint64(32)).astype(np.uint32)
                    wrong = part[~index.contains(keys, part)]
                total += len(wrong)
                stale.extend(int(f) for f in wrong[:5])
                time.sleep(_VERIFY_PAUSE)  # let waiting calls have the lock (and the GIL)
        if not total:
            return []
        shown = "; ".join(str(f) for f in stale[:5])
        return [f"INDEXED frames not indexed under the hash of their content: {total}: {shown}"]

    def close(self) -> None:
        """Stop every machine and give the pool back."""
        with self._lock:
            machines = list(self._machines.values())
            for m in machines:
                self._drop(m)
        for m in machines:
            m.memory.close()
