"""Compares of runs of pages in place, and frames handed out in guest-page order."""

import numpy as np
import pytest
from engine_helpers import PAGE, FakeMemory

import pagefusion.server.engine.engine as engine_module
from pagefusion.server.engine import FusionEngine, PageState


def distinct_pages(n: int, seed: int) -> bytearray:
    data = np.random.default_rng(seed).integers(1, 256, n * PAGE, dtype=np.uint8)
    return bytearray(data.tobytes())


def test_a_guest_like_one_before_is_compared_in_runs_and_every_byte_counts(monkeypatch):
    runs: list[int] = []
    find_runs = engine_module._pair_runs

    def recording(left, right, shortest):
        starts, ends = find_runs(left, right, shortest)
        runs.extend((ends - starts).tolist())
        return starts, ends

    monkeypatch.setattr(engine_module, "_pair_runs", recording)
    e = FusionEngine(max_pool_bytes=64 << 20, hash_seed=99)
    a = distinct_pages(700, 1)
    e.start_machine("a", FakeMemory([(0, a)]), page_fusion=True)
    b = bytearray(a)
    b[100 * PAGE + PAGE - 1] ^= 0x01  # the last byte of a page inside a run
    b[400 * PAGE] ^= 0x80  # the first byte of another
    # Pages 500..519 in reverse order: same contents, but no run on both sides.
    block = [bytes(a[p * PAGE : (p + 1) * PAGE]) for p in range(500, 520)]
    b[500 * PAGE : 520 * PAGE] = b"".join(reversed(block))
    runs.clear()
    e.start_machine("b", FakeMemory([(0, b)]), page_fusion=True)

    # A's frames were handed out in a's page order, so b met long runs.
    assert max(runs) >= 90
    for p in (100, 400):
        assert e.page_info("b", p * PAGE).state == PageState.PRIVATE
        assert e.page_info("a", p * PAGE).state == PageState.PRIVATE
    for p in (0, 99, 101, 399, 401, 505, 699):
        info = e.page_info("b", p * PAGE)
        assert (info.state, info.share_count) == (PageState.SHARED, 2)
    assert e.stats().host.frames_used == 702
    assert e.verify().consistent
    assert e.read("b", 100 * PAGE, PAGE) == bytes(b[100 * PAGE : 101 * PAGE])
    assert e.read("b", 500 * PAGE, PAGE) == bytes(a[519 * PAGE : 520 * PAGE])


@pytest.mark.parametrize("memcmp", [True, False], ids=["memcmp", "numpy-only"])
def test_equal_rows_in_runs_and_scattered_agree_with_a_plain_compare(monkeypatch, memcmp):
    if not memcmp:  # where libc's memcmp cannot be loaded
        monkeypatch.setattr(engine_module, "MEMCMP", None)
    else:
        assert engine_module.MEMCMP is not None
    e = FusionEngine(max_pool_bytes=16 << 20, hash_seed=5)
    rng = np.random.default_rng(11)
    left = rng.integers(0, 3, (2000, PAGE // 8)).astype(np.uint64)
    right = left.copy()
    right[rng.integers(0, 2000, 300), rng.integers(0, PAGE // 8, 300)] ^= np.uint64(1 << 63)
    for _ in range(40):
        left_rows, right_rows = [], []
        while sum(map(len, left_rows)) < 1500:
            n = int(rng.integers(1, 700)) if rng.random() < 0.5 else int(rng.integers(1, 9))
            lo = int(rng.integers(0, 2000 - n))
            ro = lo if rng.random() < 0.7 else int(rng.integers(0, 2000 - n))
            left_rows.append(np.arange(lo, lo + n))
            right_rows.append(np.arange(ro, ro + n))
        lr = np.concatenate(left_rows).astype(np.uint32)
        rr = np.concatenate(right_rows)
        want = (left[lr] == right[rr]).all(axis=1)
        assert e._equal_rows(left, lr, right, rr).tolist() == want.tolist()
        # Right in order (right_rows None): the same pairs, right gathered first.
        assert e._equal_rows(left, lr, right[rr]).tolist() == want.tolist()
