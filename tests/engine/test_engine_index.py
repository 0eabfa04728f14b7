import numpy as np

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


def test_an_index_of_many_runs_answers_like_a_dict_through_inserts_and_removals():
    # Batches of about 90 entries: merges leave several runs behind.
    rng = np.random.default_rng(7)
    index = FusionIndex()
    held: dict[int, int] = {}
    frame = 1
    most_runs = 0
    for batch in range(60):
        keys = np.unique(rng.integers(0, 1 << 14, 90).astype(np.uint32))
        keys = keys[[k not in held for k in keys.tolist()]]
        frames = np.arange(frame, frame + len(keys), dtype=np.uint32)
        frame += len(keys)
        index.insert(keys, frames)
        most_runs = max(most_runs, len(index._runs))
        held.update(zip(keys.tolist(), frames.tolist(), strict=True))
        if batch % 9 == 4:  # removals shorten the runs they hit
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
    assert most_runs >= 2, "the test must reach several runs"
    assert index.nbytes == 8 * len(index)
