import ctypes

import numpy as np
import pytest

from pagefusion.server.engine.errors import ResourceExhaustedError
from pagefusion.server.engine.pool import CHUNK_FRAMES, RESERVE_FRAMES, FramePool


def test_frame_zero_is_never_handed_out():
    pool = FramePool(4 * CHUNK_FRAMES)
    frames = pool.alloc(3 * CHUNK_FRAMES)
    assert 0 not in frames.tolist()
    assert len(set(frames.tolist())) == len(frames)
    assert pool.used == 3 * CHUNK_FRAMES


def test_budget_is_enforced_without_side_effects():
    pool = FramePool(100)
    pool.alloc(90)
    with pytest.raises(ResourceExhaustedError, match="budget"):
        pool.alloc(11)
    assert pool.used == 90
    assert len(pool.alloc(10)) == 10


def test_freed_frames_are_reused_before_growing():
    pool = FramePool(10 * CHUNK_FRAMES)
    first = pool.alloc(100)
    pool.release(first[:50])
    again = pool.alloc(50)
    assert set(again.tolist()) == set(first[:50].tolist())


def test_fully_free_chunks_go_back_and_come_back():
    pool = FramePool(8 * CHUNK_FRAMES)
    frames = pool.alloc(4 * CHUNK_FRAMES)
    pool.frames[frames] = 7
    pool.release(frames)
    assert pool.used == 0
    # Every chunk emptied was handed back: the pool holds nothing.
    assert pool.free_frames == 0
    assert pool.held_frames == 0
    again = pool.alloc(CHUNK_FRAMES)
    assert len(again) == CHUNK_FRAMES
    # A chunk given back reads as zeros (MADV_DONTNEED on private memory).
    assert not pool.frames[again].any()


def test_partially_used_chunk_stays_held():
    pool = FramePool(8 * CHUNK_FRAMES)
    frames = pool.alloc(CHUNK_FRAMES)
    pool.release(frames[:10])
    assert pool.free_frames == 10
    assert pool.held_frames == CHUNK_FRAMES


def test_single_frame_fast_path_matches_bulk_accounting():
    pool = FramePool(4 * CHUNK_FRAMES)
    f = pool.alloc_one()
    assert f != 0 and pool.used == 1
    pool.release_one(f)
    assert pool.used == 0


def test_metadata_is_small():
    pool = FramePool(64 * CHUNK_FRAMES)
    pool.alloc(32 * CHUNK_FRAMES)
    # free stack (4, only when frames are free) and per-chunk counts
    assert pool.metadata_bytes / (32 * CHUNK_FRAMES) < 8


def test_a_chunk_taken_again_never_hands_out_a_frame_twice():
    # A chunk given back while the high-water mark sits inside it, then taken
    # again: its frames above the mark come from the mark only (issue 10,
    # sequence 1: one frame had two owners).
    pool = FramePool(8 * CHUNK_FRAMES)
    first = pool.alloc(1)
    pool.release(first)  # the chunk is empty: given back
    frames = pool.alloc(CHUNK_FRAMES)
    assert len(set(frames.tolist())) == CHUNK_FRAMES
    assert 0 not in frames.tolist()
    one = pool.alloc_one()
    assert one not in set(frames.tolist())
    assert pool.used == CHUNK_FRAMES + 1


def _resident_bytes(pool: FramePool) -> int:
    """Resident bytes of the mapping that holds the pool's arena (/proc/self/smaps)."""
    import re

    base = pool.frames.ctypes.data
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            span = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
            if span:
                inside = int(span.group(1), 16) <= base < int(span.group(2), 16)
            elif inside and line.startswith("Rss:"):
                return int(line.split()[1]) * 1024
    return 0


def _resident_pages(pool: FramePool, frames) -> int:
    """How many of ``frames`` are resident now (mincore)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    base = pool.frames.ctypes.data
    span = (int(frames.max()) + 1) * 4096
    vec = ctypes.create_string_buffer(span // 4096)
    assert libc.mincore(base, span, vec) == 0, ctypes.get_errno()
    flags = np.frombuffer(vec.raw, dtype=np.uint8)
    return int((flags[frames] & 1).sum())


def test_frames_populated_ahead_are_given_back_by_trim():
    pool = FramePool(64 * CHUNK_FRAMES)
    # Deltas: the kernel may merge this mapping with a neighbour in smaps.
    before = _resident_bytes(pool)
    if pool._prefaulter is None:  # kernels before 5.14: nothing is populated ahead
        pool.trim()
        assert _resident_bytes(pool) == before
        pool.close()
        return
    pool.prefault(8 * CHUNK_FRAMES)
    pool._prefaulter.wait()
    assert _resident_bytes(pool) - before >= 4 * CHUNK_FRAMES * 4096
    pool.trim()
    # What stays: the reserve for copy on write, the chunks up to RESERVE_FRAMES past the mark.
    assert _resident_bytes(pool) - before <= (RESERVE_FRAMES + CHUNK_FRAMES) * 4096
    pool.close()


def test_copy_on_write_frames_come_populated_from_the_reserve():
    pool = FramePool(64 * CHUNK_FRAMES)
    if pool._prefaulter is None:
        pool.close()
        return
    first = pool.alloc_one()  # the first fresh frame asks for the reserve
    pool._prefaulter.wait()
    assert first == 1
    assert pool._populated >= RESERVE_FRAMES  # the next frames are resident already
    for _ in range(2 * CHUNK_FRAMES):
        pool.alloc_one()
    pool._prefaulter.wait()
    assert pool._populated >= pool.high_water_mark + RESERVE_FRAMES // 2
    pool.close()


def test_chunks_given_back_are_populated_again_ahead_and_trimmed_if_not_taken():
    pool = FramePool(64 * CHUNK_FRAMES)
    if pool._prefaulter is None:
        pool.close()
        return
    frames = pool.alloc(16 * CHUNK_FRAMES)
    pool.frames[frames] = 7  # resident, then all given back
    pool.release(frames)
    pool.trim()
    base = _resident_bytes(pool)
    # A start that may need 8 chunks: the chunks alloc takes again come back resident.
    pool.prefault(8 * CHUNK_FRAMES)
    pool._prefaulter.wait()
    assert _resident_bytes(pool) - base >= 8 * CHUNK_FRAMES * 4096
    taken = pool.alloc(4 * CHUNK_FRAMES)
    assert _resident_pages(pool, taken) == len(taken)  # before anything wrote to them
    assert not pool.frames[taken].any()  # given back means zero-filled, populated or not
    pool.frames[taken] = 1
    pool.trim()  # the 4 populated chunks not taken go back; the 4 taken stay
    resident = _resident_bytes(pool) - base
    assert 4 * CHUNK_FRAMES * 4096 <= resident <= (4 * CHUNK_FRAMES + RESERVE_FRAMES) * 4096
    assert len(set(taken.tolist())) == len(taken)
    pool.close()


def test_buffers_pages_are_copied_through_start_on_page_boundaries():
    # A copy between a page-aligned and a malloc'd buffer ran at a quarter of the speed.
    from pagefusion.adapters.helpers import page_aligned, read_buffer
    from pagefusion.server.engine import FusionEngine

    engine = FusionEngine(max_pool_bytes=8 << 20)
    try:
        for scratch in engine._scratch[:2]:
            assert scratch.ctypes.data % 4096 == 0 and not scratch.any()
        assert engine._pool.frames.ctypes.data % 4096 == 0
    finally:
        engine.close()
    grid = page_aligned(3 * 5 * 8).view(np.uint64).reshape(3, 5)
    assert grid.shape == (3, 5) and grid.ctypes.data % 4096 == 0 and not grid.any()
    assert page_aligned(12345).ctypes.data % 4096 == 0
    assert read_buffer(1 << 20).ctypes.data % 4096 == 0
