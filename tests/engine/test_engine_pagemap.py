"""The page map against a plain uint32 array, through every kind of key and width."""

from __future__ import annotations

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given, settings

from pagefusion.server.engine import pagemap
from pagefusion.server.engine.pagemap import NARROW_LIMIT, PageMap, entry_bytes

PAGES = 64
frame_ids = st.one_of(
    st.integers(0, 0xFFFF), st.integers(0, NARROW_LIMIT - 1), st.integers(0, 0xFFFFFFFF)
)
keys = st.one_of(
    st.integers(0, PAGES - 1).map(lambda i: ("int", i)),
    st.tuples(st.integers(0, PAGES), st.integers(0, PAGES)).map(
        lambda t: ("slice", slice(min(t), max(t)))
    ),
    st.lists(st.integers(0, PAGES - 1), max_size=12, unique=True).map(
        lambda xs: ("array", np.array(xs, dtype=np.int64))
    ),
)


def _size(key: tuple[str, object]) -> int:
    kind, k = key
    if kind == "int":
        return 1
    if kind == "slice":
        assert isinstance(k, slice)
        return len(range(*k.indices(PAGES)))
    assert isinstance(k, np.ndarray)
    return len(k)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(keys, st.data()), max_size=25))
def test_a_page_map_reads_back_what_a_uint32_array_would(steps):
    model = np.zeros(PAGES, dtype=np.uint32)
    m = PageMap(PAGES)
    wrote_wide = False  # has any write carried an id of 2^24 or more?
    for (kind, key), data in steps:
        if kind == "int":
            value = data.draw(frame_ids)
            m[key] = value
            model[key] = value
            wrote_wide |= value >= NARROW_LIMIT
            assert m[key] == int(model[key]) and isinstance(m[key], int)
        else:
            n = _size((kind, key))
            values = np.array(data.draw(st.lists(frame_ids, min_size=n, max_size=n)),
                              dtype=np.uint32)
            m[key] = values
            model[key] = values
            wrote_wide |= bool((values >= NARROW_LIMIT).any())
            got = m[key]
            assert got.dtype == np.uint32
            assert np.array_equal(got, model[key])
        assert np.array_equal(m[:], model)
        assert m[np.arange(PAGES)].tolist() == model.tolist()
        # Narrow until an id of 2^24 or more is written; then wide for good.
        assert m.wide == wrote_wide
        assert m.nbytes == PAGES * (4 if wrote_wide else 3)


def test_a_page_map_widens_on_the_first_id_past_24_bits_and_keeps_every_entry():
    m = PageMap(4)
    m[np.arange(4)] = np.array([1, 0xFFFF, 0x10000, NARROW_LIMIT - 1], dtype=np.uint32)
    assert not m.wide and m.nbytes == 12
    m[2] = NARROW_LIMIT
    assert m.wide and m.nbytes == 16
    assert m[:].tolist() == [1, 0xFFFF, NARROW_LIMIT, NARROW_LIMIT - 1]
    m[np.array([0])] = np.array([0xFFFFFFFF], dtype=np.uint32)
    assert m[0] == 0xFFFFFFFF
    assert m[np.array([3, 0])].tolist() == [NARROW_LIMIT - 1, 0xFFFFFFFF]


def test_an_empty_array_write_leaves_the_map_narrow():
    m = PageMap(3)
    m[np.zeros(0, dtype=np.int64)] = np.zeros(0, dtype=np.uint32)
    assert not m.wide and len(m) == 3 and m[:].tolist() == [0, 0, 0]


@pytest.mark.parametrize(("frames", "width"), [(1, 3), (NARROW_LIMIT - 1, 3), (NARROW_LIMIT, 4)])
def test_entry_bytes_follows_the_width_rule(frames, width):
    assert entry_bytes(frames) == width


def test_the_limit_is_read_when_writing_so_tests_can_lower_it(monkeypatch):
    monkeypatch.setattr(pagemap, "NARROW_LIMIT", 8)
    m = PageMap(2)
    m[0] = 7
    assert not m.wide
    m[np.array([1])] = np.array([8], dtype=np.uint32)
    assert m.wide and m[:].tolist() == [7, 8]


def test_one_frame_id_written_to_a_slice_or_array_of_pages_fills_them_all():
    m = PageMap(5)
    m[1:3] = 0x12345
    m[np.array([4])] = np.uint32(0x10001)
    assert m[:].tolist() == [0, 0x12345, 0x12345, 0, 0x10001] and not m.wide
    m[0:1] = NARROW_LIMIT + 3
    assert m.wide and m[:].tolist() == [NARROW_LIMIT + 3, 0x12345, 0x12345, 0, 0x10001]
