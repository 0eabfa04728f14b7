import numpy as np

import pagefusion.server.engine.index as ix
from pagefusion.server.engine.index import FusionIndex


def test_lookup_finds_inserted_entries_across_runs():
    index = FusionIndex()
    keys = np.arange(1000, dtype=np.uint32) * 7
    for start in range(0, 1000, 100):
        index.insert(keys[start : start + 100], np.arange(start, start + 100, dtype=np.uint32) + 1)
    found = index.lookup(keys)
    assert found.tolist() == list(range(1, 1001))
    assert index.lookup(np.array([3, 5], dtype=np.uint32)).tolist() == [0, 0]
    assert len(index) == 1000
    assert index.nbytes == 8 * 1000


def test_remove_takes_effect_on_flush():
    index = FusionIndex()
    index.insert(np.array([1, 1, 2], dtype=np.uint32), np.array([10, 11, 12], dtype=np.uint32))
    assert sorted(index.candidates(1)) == [10, 11]
    index.remove(np.array([1], dtype=np.uint32), np.array([10], dtype=np.uint32))
    index.flush()
    assert index.candidates(1) == [11]
    assert index.lookup(np.array([1, 2], dtype=np.uint32)).tolist() == [11, 12]


def test_removing_an_absent_entry_is_harmless():
    index = FusionIndex()
    index.insert(np.array([4], dtype=np.uint32), np.array([9], dtype=np.uint32))
    index.remove(np.array([4, 5], dtype=np.uint32), np.array([8, 9], dtype=np.uint32))
    index.flush()
    assert index.candidates(4) == [9]


def test_fenced_runs_answer_like_a_plain_search(monkeypatch):
    # Small fences so that a few thousand entries exercise them: blocks of 8,
    # runs from 64 entries, and merges that leave several runs behind.
    monkeypatch.setattr(ix, "FENCE", 8)
    monkeypatch.setattr(ix, "FENCED_RUN", 64)
    rng = np.random.default_rng(7)
    index = FusionIndex()
    held: dict[int, int] = {}
    frame = 1
    for batch in range(60):
        keys = np.unique(rng.integers(0, 1 << 14, 90).astype(np.uint32))
        keys = keys[[k not in held for k in keys.tolist()]]
        frames = np.arange(frame, frame + len(keys), dtype=np.uint32)
        frame += len(keys)
        index.insert(keys, frames)
        held.update(zip(keys.tolist(), frames.tolist(), strict=True))
        if batch % 9 == 4:  # removals rebuild the fences of the runs they change
            gone = np.array(sorted(held)[::5], dtype=np.uint32)
            index.remove(gone, np.array([held[k] for k in gone.tolist()], dtype=np.uint32))
            index.flush()
            for k in gone.tolist():
                del held[k]
        # Probes below, between and above every entry, found and not.
        probe = np.unique(np.concatenate([
            rng.integers(0, 1 << 14, 400).astype(np.uint32),
            np.array([0, (1 << 32) - 1], dtype=np.uint32),
            np.array(list(held)[:50], dtype=np.uint32),
        ]))
        assert index.lookup(probe).tolist() == [held.get(k, 0) for k in probe.tolist()]
        some = np.array(list(held)[-40:], dtype=np.uint32)
        frames_of = np.array([held[k] for k in some.tolist()], dtype=np.uint32)
        assert index.contains(some, frames_of).all()
        assert not index.contains(some, frames_of + 1).any()
    fenced = [f for f in index._fences if f is not None]
    assert fenced, "the test must reach a fenced run"
    assert index.nbytes == 8 * len(index) + sum(f.nbytes for f in fenced)


def test_lower_bound_through_a_fence_is_searchsorted_on_every_edge():
    rng = np.random.default_rng(3)
    for n in (1, 7, 127, 128, 129, 255, 256, 1000, 4096 + 5):
        run = np.sort(rng.integers(0, 1 << 40, n).astype(np.uint64) * np.uint64(3))
        run = np.sort(np.concatenate([run, run[: n // 4]]))  # repeated entries too
        fence = run[ix.FENCE - 1 :: ix.FENCE].copy()
        probe = np.sort(np.concatenate([
            run, run + np.uint64(1), run - np.uint64(1),
            np.array([0, (1 << 64) - 1], dtype=np.uint64),
            rng.integers(0, 1 << 42, 300).astype(np.uint64),
        ]))
        got = ix._lower_bound(run, fence, probe)
        assert got.tolist() == np.searchsorted(run, probe).tolist(), n
