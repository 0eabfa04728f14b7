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
