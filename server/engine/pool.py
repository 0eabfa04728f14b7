"""The host frame pool: where the one copy of every distinct page lives.

One large anonymous mapping is reserved up front (MAP_NORESERVE: address
space only, no memory) and used from the bottom in 2 MiB chunks (advised as
transparent huge pages only on request: see FramePool). Frame ``f`` is the
4 KiB at ``f * PAGE_SIZE``. Frame 0 is the zero frame: never handed out,
never written, so a guest page mapped to 0 is a ZERO page backed by no
memory at all.

The pool knows only which frames are handed out; who uses a frame, its
count and its flags are the frame table's (frames.py). Free frames sit on a
stack; the stack is kept in descending order after large frees so that
allocation reuses low frames first and high chunks drain. A chunk whose
frames are all free is handed back to the operating system (MADV_DONTNEED),
so process RSS really falls when machines stop; its frames leave the stack
and the chunk waits on a list until it is needed again. Frames at or above
the high-water mark have never been handed out: they come from the mark,
never from the stack, even inside a chunk that was given back and taken
again (handing them out both ways would give one frame to two owners).
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import queue
import threading
from collections.abc import Callable

import numpy as np

from pagefusion.server.engine.errors import ResourceExhaustedError
from pagefusion.server.engine.types import PAGE_SIZE

CHUNK_FRAMES = 512  # 2 MiB: one transparent huge page
#: Fresh frames kept populated beyond the high-water mark, so copy on write
#: does not take a page fault per new frame (8 MiB of RSS). The helper thread
#: is asked for more with half of it left: at least 1,024 frames of lead, more
#: than a tight loop of writes uses before the thread gets the GIL (5 ms).
RESERVE_FRAMES = 4 * CHUNK_FRAMES
#: Users one frame may have (VirtualBox's shared-page refcount is 16-bit):
#: past it, a new frame starts for the same content.
MAX_REFCOUNT = 0xFFFF
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)


def _load_memcmp() -> Callable[[int, int, int], int] | None:
    """libc's memcmp(address, address, length), or None where it cannot be loaded.

    Through PyDLL, which keeps the GIL: one call compares one run of pages
    (microseconds), less than a hand-over of the GIL would cost.
    """
    try:
        memcmp = ctypes.PyDLL(None).memcmp
    except (OSError, AttributeError):
        return None
    memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    memcmp.restype = ctypes.c_int
    return memcmp  # type: ignore[no-any-return]


#: Byte comparison of two spans of memory (the engine's compares of page
#: runs), or None: the callers fall back to numpy.
MEMCMP = _load_memcmp()


class FrameBits:
    """One bit per frame (an eighth of a byte of metadata per frame)."""

    def __init__(self, frames: int) -> None:
        self.bits = np.zeros(-(-frames // 8), dtype=np.uint8)

    @property
    def nbytes(self) -> int:
        return int(self.bits.nbytes)

    def grow(self, frames: int) -> None:
        bits = np.zeros(-(-frames // 8), dtype=np.uint8)
        bits[: len(self.bits)] = self.bits
        self.bits = bits

    def get(self, frames: np.ndarray) -> np.ndarray:
        """A boolean per frame."""
        frames = frames.astype(np.int64, copy=False)
        return ((self.bits[frames >> 3] >> (frames & 7).astype(np.uint8)) & 1).astype(bool)

    def test(self, frame: int) -> bool:
        return bool(self.bits[frame >> 3] & (1 << (frame & 7)))

    def set(self, frames: np.ndarray) -> None:
        frames = frames.astype(np.int64, copy=False)
        np.bitwise_or.at(self.bits, frames >> 3, (1 << (frames & 7)).astype(np.uint8))

    def clear(self, frames: np.ndarray) -> None:
        frames = frames.astype(np.int64, copy=False)
        np.bitwise_and.at(self.bits, frames >> 3, ~(1 << (frames & 7)).astype(np.uint8))

    def clear_one(self, frame: int) -> None:
        self.bits[frame >> 3] &= ~np.uint8(1 << (frame & 7))


def host_memory_bytes() -> int:
    """Physical memory of this host."""
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


class FramePool:
    """4 KiB frames in one reserved arena, handed out and taken back.

    Not thread-safe: the engine calls it under its lock.

    Attributes:
        frames: the arena as a (frames, 4096) uint8 array (rows are frames).
        words: the same memory as (frames, 512) uint64, for fast compares.
        used: frames handed out and not released.
    """

    def __init__(self, max_frames: int, *, huge_pages: bool = False) -> None:
        """
        Args:
            max_frames: the budget, in frames.
            huge_pages: advise the arena as transparent huge pages. Off by
                default: measured on this project's 2-core VMs, a fresh
                process's first touch of huge pages cost about 1 s of
                system time per 256 MiB of frames (a first start 2 to 5
                times slower than the next), while 4 KiB pages made a first
                start as fast as a warm one. Either way a helper thread
                populates fresh frames ahead of need (ingest asks for what
                a start may use; copy on write finds RESERVE_FRAMES ready).
        """
        if max_frames < 1:
            raise ValueError("the pool needs room for at least one frame")
        self.max_frames = max_frames
        chunks = -(-(max_frames + 1) // CHUNK_FRAMES)
        self._reserved_frames = chunks * CHUNK_FRAMES
        chunk_bytes = CHUNK_FRAMES * PAGE_SIZE
        # One spare chunk so the arena can start on a 2 MiB boundary, where
        # the kernel can back it with huge pages.
        self._mm = mmap.mmap(
            -1,
            (self._reserved_frames + CHUNK_FRAMES) * PAGE_SIZE,
            flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE,
        )
        raw = np.frombuffer(self._mm, dtype=np.uint8)
        self._offset = -raw.ctypes.data % chunk_bytes
        if huge_pages:
            with contextlib.suppress(AttributeError, OSError):
                self._mm.madvise(mmap.MADV_HUGEPAGE)
        self.frames = raw[self._offset : self._offset + self._reserved_frames * PAGE_SIZE].reshape(
            -1, PAGE_SIZE
        )
        self._prefaulter = _Prefaulter.start(self.frames.ctypes.data)
        self._populated = 1  # frames below this are populated or handed out
        self.words = self.frames.view(np.uint64)
        self._capacity = CHUNK_FRAMES  # frames the per-frame arrays must cover
        self.used = 0
        self._hwm = 1  # frames below this have been handed out at least once
        self._free = np.zeros(CHUNK_FRAMES, dtype=np.uint32)
        self._nfree = 0
        # Per chunk: frames in use (at most 512) and whether the pool holds it;
        # grown with the frames.
        self._chunk_used = np.zeros(1, dtype=np.int16)
        self._chunk_held = np.zeros(1, dtype=bool)
        self._released: list[int] = []
        # Released chunks submitted for populating since the last trim (they
        # are taken again first); trim gives back those still not taken.
        self._warm: set[int] = set()

    # -- figures ------------------------------------------------------------

    @property
    def held_frames(self) -> int:
        """Frames the pool holds: in use, or free inside a chunk it has not given back."""
        return self.used + self._nfree

    @property
    def free_frames(self) -> int:
        """Frames the pool holds but no guest page uses (RAM/VMM/Free)."""
        return self._nfree

    @property
    def capacity(self) -> int:
        """Length per-frame arrays need: every frame handed out so far is below it."""
        return self._capacity

    @property
    def high_water_mark(self) -> int:
        """Frames below this have been handed out at least once."""
        return self._hwm

    def free_stack(self) -> np.ndarray:
        """A copy of the free frames (for a recount)."""
        return self._free[: self._nfree].copy()

    def chunk_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """Copies of frames in use per chunk and whether each chunk is held (for a recount)."""
        return self._chunk_used.copy(), self._chunk_held.copy()

    @property
    def reserved_bytes(self) -> int:
        return self._reserved_frames * PAGE_SIZE

    @property
    def metadata_bytes(self) -> int:
        return int(self._free.nbytes + self._chunk_used.nbytes + self._chunk_held.nbytes)

    @staticmethod
    def _chunk_of(frame: int) -> int:
        return frame // CHUNK_FRAMES

    # -- allocation ---------------------------------------------------------

    def alloc(self, n: int) -> np.ndarray:
        """Hand out ``n`` frames (content undefined) as uint32 ids.

        Raises:
            ResourceExhaustedError: the pool's budget would be exceeded.
        """
        if n <= 0:
            return np.zeros(0, dtype=np.uint32)
        self.check_room(n)
        parts: list[np.ndarray] = []
        need = n
        while need:
            if self._nfree:
                k = min(need, self._nfree)
                parts.append(self._free[self._nfree - k : self._nfree][::-1].copy())
                self._nfree -= k
                need -= k
            elif self._released:
                chunk = self._released.pop()
                self._chunk_held[chunk] = True
                # Only frames below the mark: those above it come from the mark.
                first = max(chunk * CHUNK_FRAMES, 1)
                end = min(chunk * CHUNK_FRAMES + CHUNK_FRAMES, self._hwm)
                self._push(np.arange(end - 1, first - 1, -1, dtype=np.uint32))
            else:
                k = need
                parts.append(np.arange(self._hwm, self._hwm + k, dtype=np.uint32))
                self._grow(self._hwm + k)
                self._chunk_held[
                    self._chunk_of(self._hwm) : self._chunk_of(self._hwm + k - 1) + 1
                ] = True
                self._hwm += k
                need = 0
        out = parts[0] if len(parts) == 1 else np.concatenate(parts)
        self._chunk_used += np.bincount(
            out // CHUNK_FRAMES, minlength=len(self._chunk_used)
        ).astype(np.int16)
        self.used += n
        return out

    def check_room(self, n: int) -> None:
        """Raise unless ``n`` more frames fit the budget (nothing changes either way).

        Raises:
            ResourceExhaustedError: the pool's budget would be exceeded.
        """
        if self.used + n > self.max_frames:
            raise ResourceExhaustedError(
                f"the frame pool needs {n} more frames but only "
                f"{self.max_frames - self.used} of its {self.max_frames} "
                f"({self.max_frames * PAGE_SIZE // (1 << 20)} MiB budget) are left",
            )

    def alloc_one(self) -> int:
        """Hand out one frame; the fast path of copy on write."""
        if self.used < self.max_frames:
            if self._nfree:
                self._nfree -= 1
                frame = int(self._free[self._nfree])
            elif not self._released and self._hwm < self._capacity:
                frame = self._hwm  # no numpy on the way: copy on write latency
                self._hwm += 1
                self._chunk_held[frame // CHUNK_FRAMES] = True
                if self._hwm + RESERVE_FRAMES // 2 > self._populated:
                    self.prefault(RESERVE_FRAMES)  # the next chunk, on the helper thread
            else:
                return int(self.alloc(1)[0])
            self._chunk_used[frame // CHUNK_FRAMES] += 1
            self.used += 1
            return frame
        return int(self.alloc(1)[0])

    def release(self, frames: np.ndarray) -> None:
        """Take back frames no guest page uses any more; drain empty chunks."""
        n = len(frames)
        if n == 0:
            return
        frames = frames.astype(np.uint32, copy=False)
        self._push(frames)
        counts = np.bincount(frames // CHUNK_FRAMES, minlength=len(self._chunk_used))
        self._chunk_used -= counts.astype(np.int16)
        self.used -= n
        touched = np.flatnonzero(counts)
        empty = touched[(self._chunk_used[touched] == 0) & self._chunk_held[touched]]
        if len(empty):
            self._drain(empty)
        if n > 4096:  # keep low frames on top of the stack: high chunks drain
            self._free[: self._nfree] = np.sort(self._free[: self._nfree])[::-1]

    def release_one(self, frame: int) -> None:
        self._push(np.array([frame], dtype=np.uint32))
        chunk = frame // CHUNK_FRAMES
        self._chunk_used[chunk] -= 1
        self.used -= 1
        if self._chunk_used[chunk] == 0:
            self._drain(np.array([chunk]))

    def _push(self, frames: np.ndarray) -> None:
        end = self._nfree + len(frames)
        if end > len(self._free):
            grown = np.zeros(max(end, 2 * len(self._free)), dtype=np.uint32)
            grown[: self._nfree] = self._free[: self._nfree]
            self._free = grown
        self._free[self._nfree : end] = frames
        self._nfree = end

    def _drain(self, chunks: np.ndarray) -> None:
        """Give fully free chunks back to the operating system."""
        for chunk in chunks.tolist():
            start = self._offset + chunk * CHUNK_FRAMES * PAGE_SIZE
            try:
                self._mm.madvise(mmap.MADV_DONTNEED, start, CHUNK_FRAMES * PAGE_SIZE)
            except OSError:  # pragma: no cover - the kernel refused; keep it held
                continue
            self._chunk_held[chunk] = False
            self._released.append(chunk)
        stack = self._free[: self._nfree]
        keep = self._chunk_held[stack // CHUNK_FRAMES]
        kept = stack[keep]
        self._nfree = len(kept)
        self._free[: self._nfree] = kept

    def _grow(self, hwm: int) -> None:
        if hwm <= self._capacity:
            return
        # Grow in steps of 1/8 (at least 8 chunks): metadata stays close to
        # what is used, and copies stay rare.
        step = max(self._capacity // 8, 8 * CHUNK_FRAMES)
        cap = min(-(-hwm // step) * step, self._reserved_frames)
        self._capacity = cap
        chunks = -(-cap // CHUNK_FRAMES)
        used = np.zeros(chunks, dtype=np.int16)
        used[: len(self._chunk_used)] = self._chunk_used
        held = np.zeros(chunks, dtype=bool)
        held[: len(self._chunk_held)] = self._chunk_held
        self._chunk_used, self._chunk_held = used, held

    # -- first touch ----------------------------------------------------------

    def prefault(self, frames: int) -> None:
        """Have the next ``frames`` frames alloc() hands out populated in the background.

        First touch of fresh anonymous memory costs the kernel more than
        hashing costs us; a helper thread asks for it ahead of time
        (MADV_POPULATE_WRITE, without the GIL) while ingest hashes, so the
        copy into new frames finds them resident. Frames come from the free
        stack (resident already), then from chunks given back (taken again
        in the order alloc takes them), then from the high-water mark, of
        which at most ``frames`` frames beyond the mark are populated and
        not yet used.
        """
        if self._prefaulter is None:
            return
        frames -= self._nfree
        runs: list[list[int]] = []
        for chunk in reversed(self._released):  # alloc pops from the end
            if frames <= 0:
                break
            frames -= CHUNK_FRAMES
            if chunk in self._warm:
                continue
            self._warm.add(chunk)
            if runs and runs[-1][0] == chunk + 1:
                runs[-1][0] = chunk
            else:
                runs.append([chunk, chunk + 1])
        self._submit_chunks(runs)
        if frames <= 0:
            return
        start = max(self._populated, self._hwm)
        end = min(self._hwm + frames, self._reserved_frames)
        start = start // CHUNK_FRAMES * CHUNK_FRAMES
        end = -(-end // CHUNK_FRAMES) * CHUNK_FRAMES
        if end - start >= CHUNK_FRAMES:
            self._prefaulter.submit(start * PAGE_SIZE, (end - start) * PAGE_SIZE)
            self._populated = end

    def _submit_chunks(self, runs: list[list[int]]) -> None:
        assert self._prefaulter is not None
        for first, end in runs:
            self._prefaulter.submit(
                first * CHUNK_FRAMES * PAGE_SIZE, (end - first) * CHUNK_FRAMES * PAGE_SIZE
            )

    def trim(self) -> None:
        """Give back frames populated ahead of need, but a small reserve.

        Called when an ingest ends and when a machine stops: what prefault()
        populated beyond the high-water mark, or in given-back chunks that
        were not taken after all, would otherwise stay resident. The chunks
        up to RESERVE_FRAMES past the mark stay, for copy on write.
        """
        if self._prefaulter is None:
            return
        if self._warm:
            self._prefaulter.wait()
            for chunk in self._warm:
                if not self._chunk_held[chunk]:
                    with contextlib.suppress(OSError):
                        self._mm.madvise(
                            mmap.MADV_DONTNEED,
                            self._offset + chunk * CHUNK_FRAMES * PAGE_SIZE,
                            CHUNK_FRAMES * PAGE_SIZE,
                        )
            self._warm.clear()
        keep = -(-(self._hwm + RESERVE_FRAMES) // CHUNK_FRAMES) * CHUNK_FRAMES
        if self._populated <= keep:
            return
        self._prefaulter.wait()
        start = keep
        if self._populated > start:
            with contextlib.suppress(OSError):
                self._mm.madvise(
                    mmap.MADV_DONTNEED,
                    self._offset + start * PAGE_SIZE,
                    (self._populated - start) * PAGE_SIZE,
                )
        self._populated = start

    def close(self) -> None:
        if self._prefaulter is not None:
            self._prefaulter.stop()
        del self.frames, self.words
        self._mm.close()


class _Prefaulter:
    """A daemon thread that populates arena spans with MADV_POPULATE_WRITE."""

    MADV_POPULATE_WRITE = 23  # Linux 5.14+

    def __init__(self, base: int, madvise: Callable[..., int]) -> None:
        self._base = base
        self._madvise = madvise
        self._queue: queue.Queue[tuple[int, int] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="pagefusion-prefault", daemon=True)
        self._thread.start()

    @classmethod
    def start(cls, base: int) -> _Prefaulter | None:
        """A prefaulter for the arena at ``base``, or None where the kernel lacks support."""
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            madvise = libc.madvise
            madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            madvise.restype = ctypes.c_int
            # Probe with an empty span: EINVAL means the advice is unknown.
            if madvise(base, 0, cls.MADV_POPULATE_WRITE) != 0:
                return None
        except (OSError, AttributeError):
            return None
        return cls(base, madvise)

    def submit(self, offset: int, length: int) -> None:
        self._queue.put((offset, length))

    def wait(self) -> None:
        """Until every span submitted so far is populated."""
        self._queue.join()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                offset, length = item
                # ctypes releases the GIL for the call: the kernel works on the
                # other core while ingest hashes. Failure (ENOMEM) is harmless:
                # the copy will fault the pages in itself.
                self._madvise(self._base + offset, length, self.MADV_POPULATE_WRITE)
            finally:
                self._queue.task_done()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)
