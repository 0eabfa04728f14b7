import contextlib
import threading
import time

import numpy as np
import pytest
from engine_helpers import PAGE, FakeMemory, page

from pagefusion.server.engine import (
    AlreadyExistsError,
    FusionConfig,
    FusionEngine,
    FusionMode,
    InvalidArgumentError,
    MachineNotRunningError,
    OutOfRangeError,
    PageState,
    ResourceExhaustedError,
    SourceFailedError,
)


def engine(**kw):
    kw.setdefault("max_pool_bytes", 64 << 20)
    kw.setdefault("hash_seed", 1234)
    return FusionEngine(**kw)


def image(*pages: bytes) -> bytearray:
    return bytearray(b"".join(pages))


def assert_identity(e: FusionEngine) -> None:
    h = e.stats().host
    assert h.guest_pages == h.frames_used + h.pages_saved + h.zero_pages
    assert h.shared_pages + h.private_pages + h.zero_pages == h.guest_pages


def test_zero_pages_take_no_frames():
    e = engine()
    e.start_machine("a", FakeMemory([(0, image(page(0), page(0), page(1)))]), page_fusion=False)
    h = e.stats().host
    assert (h.guest_pages, h.zero_pages, h.frames_used) == (3, 2, 1)
    assert e.page_info("a", 0).state == PageState.ZERO
    assert e.page_info("a", 2 * PAGE).state == PageState.PRIVATE


def test_fusion_across_machines_and_within_one():
    e = engine()
    mem = image(page(5), page(5), page(6, marker=1))
    e.start_machine("a", FakeMemory([(0, mem)]), page_fusion=True)
    e.start_machine("b", FakeMemory([(0, mem)]), page_fusion=True)
    h = e.stats().host
    assert h.frames_used == 2
    assert h.pages_saved == 4
    assert h.frames_shared == 2
    info = e.page_info("a", 0)
    assert info == info.__class__(PageState.SHARED, 4)
    per = {m.machine_id: m for m in e.stats().machines}
    assert per["a"].shared_pages == 3 and per["b"].shared_pages == 3
    assert_identity(e)


def test_fusion_off_shares_nothing_but_zero_elision_still_applies():
    e = engine()
    mem = image(page(5), page(5), page(0))
    e.start_machine("a", FakeMemory([(0, mem)]), page_fusion=False)
    e.start_machine("b", FakeMemory([(0, mem)]), page_fusion=True)
    h = e.stats().host
    assert h.frames_used == 3  # a: 2 private frames; b: 1 frame shared within b
    assert h.zero_pages == 2
    assert e.page_info("a", 0).state == PageState.PRIVATE


def test_domains_never_share_a_frame():
    e = engine()
    mem = image(page(9))
    e.start_machine("a", FakeMemory([(0, mem)]), page_fusion=True, fusion_domain="red")
    e.start_machine("b", FakeMemory([(0, mem)]), page_fusion=True, fusion_domain="blue")
    e.start_machine("c", FakeMemory([(0, mem)]), page_fusion=True, fusion_domain="red")
    assert e.stats().host.frames_used == 2
    assert e.page_info("b", 0).state == PageState.PRIVATE
    assert e.page_info("a", 0).share_count == 2


def test_hints_mode_shares_no_content_at_ingest():
    e = engine(config=FusionConfig(mode=FusionMode.HINTS))
    mem = image(page(5), page(5))
    e.start_machine("a", FakeMemory([(0, mem)]), page_fusion=True)
    assert e.stats().host.pages_saved == 0


def test_copy_on_write_keeps_other_users_intact():
    e = engine()
    mem = image(page(5), page(7))
    e.start_machine("a", FakeMemory([(0, mem)]), page_fusion=True)
    e.start_machine("b", FakeMemory([(0, mem)]), page_fusion=True)
    assert e.write("a", 100, b"xyz") == 1
    assert e.read("a", 99, 5) == b"\x05xyz\x05"
    assert e.read("b", 0, 2 * PAGE) == bytes(mem)
    assert e.page_info("a", 0).state == PageState.PRIVATE
    assert e.page_info("b", 0).state == PageState.PRIVATE  # sole user left
    # A second write to the now private page copies nothing.
    assert e.write("a", 0, b"q") == 0
    assert_identity(e)


def test_write_spanning_pages_and_zeroing_a_page():
    e = engine()
    mem = image(page(1), page(2), page(0))
    e.start_machine("a", FakeMemory([(0, mem)]), page_fusion=True)
    data = bytes(range(256)) * 20
    e.write("a", PAGE - 10, data)
    mem[PAGE - 10 : PAGE - 10 + len(data)] = data
    assert e.read("a", 0, 3 * PAGE) == bytes(mem)
    e.write("a", 0, bytes(PAGE))
    assert e.page_info("a", 0).state == PageState.ZERO
    assert_identity(e)


def test_write_of_zeros_to_shared_page_returns_it_to_zero():
    e = engine()
    mem = image(page(3))
    e.start_machine("a", FakeMemory([(0, mem)]), page_fusion=True)
    e.start_machine("b", FakeMemory([(0, mem)]), page_fusion=True)
    e.write("a", 0, bytes(PAGE))
    assert e.page_info("a", 0).state == PageState.ZERO
    assert e.page_info("b", 0) == e.page_info("b", 0).__class__(PageState.PRIVATE, 1)
    assert e.read("b", 0, PAGE) == page(3)
    assert_identity(e)


def test_sparse_ranges_and_high_addresses():
    e = engine()
    low = image(page(1), page(2))
    high = image(page(1))
    e.start_machine("a", FakeMemory([(0, low), (0xFFFC0000, high)]), page_fusion=True)
    assert e.read("a", 0xFFFC0000, 4) == b"\x01" * 4
    assert e.page_info("a", 0x5000).state == PageState.UNMAPPED
    assert e.page_info("a", 0xFFFC0000).state == PageState.SHARED
    with pytest.raises(OutOfRangeError, match="0x2000"):
        e.read("a", PAGE, 2 * PAGE)
    with pytest.raises(OutOfRangeError):
        e.write("a", 0xFFFC0000 + PAGE - 1, b"ab")
    # The refused write changed nothing.
    assert e.read("a", 0xFFFC0000, PAGE) == page(1)


def test_misuse_raises_precise_errors():
    e = engine()
    with pytest.raises(MachineNotRunningError, match="'nope'"):
        e.read("nope", 0, 1)
    e.start_machine("a", FakeMemory([(0, image(page(1)))]), page_fusion=True)
    with pytest.raises(AlreadyExistsError):
        e.start_machine("a", FakeMemory([(0, image(page(1)))]), page_fusion=True)
    with pytest.raises(InvalidArgumentError):
        e.set_config(FusionConfig(pages_per_second=0))
    with pytest.raises(InvalidArgumentError):
        e.start_machine("bad", FakeMemory([(0x10, image(page(1)))]), page_fusion=True)


def test_budget_exhaustion_rolls_the_start_back():
    e = engine(max_pool_bytes=8 * PAGE)
    e.start_machine(
        "a", FakeMemory([(0, image(*[page(1, i + 1) for i in range(4)]))]), page_fusion=True
    )
    before = e.stats().host
    mem = FakeMemory([(0, image(*[page(2, i + 1) for i in range(6)]))])
    with pytest.raises(ResourceExhaustedError):
        e.start_machine("b", mem, page_fusion=True)
    assert mem.closed == 1
    assert not e.is_running("b")
    assert e.stats().host == before
    assert e.read("a", 0, 4 * PAGE) == image(*[page(1, i + 1) for i in range(4)])


def test_stop_releases_frames_and_closes_the_source():
    e = engine()
    mem = FakeMemory([(0, image(page(1), page(2)))])
    e.start_machine("a", mem, page_fusion=True)
    e.start_machine("b", FakeMemory([(0, image(page(1), page(3)))]), page_fusion=True)
    e.stop_machine("a")
    assert mem.closed == 1
    h = e.stats().host
    assert (h.guest_pages, h.frames_used, h.pages_saved) == (2, 2, 0)
    assert e.page_info("b", 0).state == PageState.PRIVATE
    # The freed content is gone from the index: a new machine fuses with b only.
    e.start_machine("c", FakeMemory([(0, image(page(2), page(3)))]), page_fusion=True)
    assert e.page_info("c", 0).state == PageState.PRIVATE
    assert e.page_info("c", PAGE).share_count == 2
    assert_identity(e)


def test_written_page_leaves_the_index():
    e = engine()
    e.start_machine("a", FakeMemory([(0, image(page(4)))]), page_fusion=True)
    e.write("a", 0, b"\x09")
    e.start_machine("b", FakeMemory([(0, image(page(4)))]), page_fusion=True)
    assert e.page_info("b", 0).state == PageState.PRIVATE
    assert e.read("a", 0, 2) == b"\x09\x04"


def test_scan_fuses_after_mode_change_and_live_changes_are_cow():
    e = engine(config=FusionConfig(mode=FusionMode.HINTS, stable_scans_before_merge=1))
    src = FakeMemory([(0, image(page(1), page(2)))], live=True)
    e.start_machine("a", src, page_fusion=True)
    e.start_machine("b", FakeMemory([(0, image(page(1), page(2)))]), page_fusion=True)
    assert e.stats().host.pages_saved == 0
    e.set_config(FusionConfig(mode=FusionMode.ALL, stable_scans_before_merge=1))
    result = e.scan()
    assert result.pages_fused == 2
    assert e.stats().host.pages_saved == 2
    # The live guest writes its first page: a copy on write, then volatile.
    src.blocks[0][1][0:3] = b"abc"
    result = e.scan(["a"])
    assert result.pages_copied_on_write == 1
    assert e.read("a", 0, 4) == b"abc\x01"
    assert e.read("b", 0, 4) == b"\x01" * 4
    stats = e.machine_stats("a")
    assert stats.volatile_pages == 1
    assert e.stats().host.full_scans == 2
    assert_identity(e)


def test_volatile_page_waits_for_stable_scans():
    e = engine(config=FusionConfig(stable_scans_before_merge=2))
    src = FakeMemory([(0, image(page(1)))], live=True)
    e.start_machine("a", src, page_fusion=True)
    e.start_machine("b", FakeMemory([(0, image(page(8)))]), page_fusion=True)
    src.blocks[0][1][:] = page(8)
    e.scan(["a"])  # changed: volatile
    assert e.page_info("a", 0).state == PageState.PRIVATE
    e.scan(["a"])  # stable once
    assert e.page_info("a", 0).state == PageState.PRIVATE
    e.scan(["a"])  # stable twice: fused
    assert e.page_info("a", 0).state == PageState.SHARED


def test_budgeted_scans_resume_where_they_stopped():
    e = engine(config=FusionConfig(mode=FusionMode.HINTS))
    e.start_machine("a", FakeMemory([(0, image(*[page(1)] * 10))]), page_fusion=True)
    e.set_config(FusionConfig(mode=FusionMode.CONTENT))
    total = 0
    for _ in range(4):
        total += e.scan(page_budget=3).pages_scanned
    assert total == 10  # the fourth call finished the pass after one page
    assert e.stats().host.full_scans == 1
    assert e.scan(page_budget=3).pages_scanned == 3  # the next pass begins again
    assert e.stats().host.pages_saved == 9


def test_progress_is_reported():
    e = engine()
    seen = []
    e.start_machine(
        "a",
        FakeMemory([(0, image(page(1)) * 3)]),
        page_fusion=True,
        progress=lambda d, t: seen.append((d, t)),
    )
    assert seen[-1] == (3, 3)


def test_metadata_per_guest_page_is_small():
    e = engine(max_pool_bytes=256 << 20)
    rng = np.random.default_rng(3)
    pages = rng.integers(0, 256, size=(4096, PAGE), dtype=np.uint8)
    pages[::2] = 0
    e.start_machine("a", FakeMemory([(0, bytearray(pages.tobytes()))]), page_fusion=True)
    e.start_machine("b", FakeMemory([(0, bytearray(pages.tobytes()))]), page_fusion=True)
    h = e.stats().host
    assert h.metadata_bytes / h.guest_pages <= 8


def test_concurrent_writers_and_stats_readers_see_whole_operations():
    e = engine()
    mem = image(*[page(i % 7 + 1) for i in range(64)])
    e.start_machine("a", FakeMemory([(0, mem)]), page_fusion=True)
    e.start_machine("b", FakeMemory([(0, mem)]), page_fusion=True)
    errors = []

    def writer(name: str) -> None:
        for i in range(300):
            e.write(name, (i * 97 % 64) * PAGE + i % 50, bytes([i % 256]) * 9)

    def reader() -> None:
        for _ in range(300):
            h = e.stats().host
            if h.guest_pages != h.frames_used + h.pages_saved + h.zero_pages:
                errors.append(h)

    threads = [threading.Thread(target=writer, args=(n,)) for n in "ab"] + [
        threading.Thread(target=reader)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert_identity(e)
    assert e.verify().consistent


def test_threads_starting_stopping_writing_scanning_and_verifying_agree():
    # Machines of different sizes come and go while others write, scan and
    # recount; every recount (run while the others go on) must agree.
    e = engine()
    bodies = [image(*[page(i % 5 + 1, marker=i % (3 + k)) for i in range(40 + 90 * k)])
              for k in range(3)]
    errors: list[object] = []

    def cycler(k: int) -> None:
        for r in range(12):
            name = f"m{k}"
            live = r % 2 == 1
            e.start_machine(name, FakeMemory([(0, bodies[k])], live=live), page_fusion=k != 1)
            for i in range(20):
                with contextlib.suppress(MachineNotRunningError):
                    e.write(name, (i * 7 % 40) * PAGE, bytes([i % 3]) * (PAGE if i % 4 else 5))
            e.stop_machine(name)

    def scanner() -> None:
        for _ in range(40):
            with contextlib.suppress(MachineNotRunningError):
                e.scan()

    def verifier() -> None:
        for _ in range(25):
            result = e.verify(slice_frames=16)
            if not result.consistent:
                errors.append(result.problems)

    threads = [threading.Thread(target=cycler, args=(k,)) for k in range(3)]
    threads += [threading.Thread(target=scanner), threading.Thread(target=verifier)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    result = e.verify()
    assert result.consistent, result.problems
    h = e.stats().host
    assert (h.guest_pages, h.frames_used, h.pages_saved) == (0, 0, 0)


def test_stopping_a_large_machine_counts_instead_of_sorting(monkeypatch):
    from pagefusion.server.engine import frames as frames_module

    monkeypatch.setattr(frames_module, "BINCOUNT_ABOVE", 4)
    e = engine()
    mem = image(*[page(i % 3 + 1) for i in range(12)], page(0))
    e.start_machine("a", FakeMemory([(0, mem)]), page_fusion=True)
    e.start_machine("b", FakeMemory([(0, mem)]), page_fusion=True)
    e.stop_machine("a")
    h = e.stats().host
    assert (h.guest_pages, h.zero_pages, h.frames_used, h.pages_saved) == (13, 1, 3, 9)
    assert e.read("b", 0, len(mem)) == bytes(mem)


def test_counts_past_one_byte_stay_exact():
    e = engine()
    e.start_machine("a", FakeMemory([(0, image(*[page(0xAB)] * 600))]), page_fusion=True)
    e.start_machine("b", FakeMemory([(0, image(*[page(0xAB)] * 600))]), page_fusion=True)
    h = e.stats().host
    assert (h.frames_used, h.pages_saved, h.frames_shared) == (1, 1199, 1)
    assert e.page_info("a", 0).share_count == 1200
    assert e.write("a", 0, b"\x01") == 1
    assert e.page_info("b", 0).share_count == 1199
    e.stop_machine("a")
    assert e.page_info("b", 0).share_count == 600
    assert_identity(e)


def test_a_frame_takes_at_most_max_users_at_ingest(monkeypatch):
    from pagefusion.server.engine import engine as engine_module

    monkeypatch.setattr(engine_module, "MAX_REFCOUNT", 255)
    e = engine()
    e.start_machine("a", FakeMemory([(0, image(*[page(0xAB)] * 600))]), page_fusion=True)
    h = e.stats().host
    assert h.frames_used == 3  # 255 + 255 + 90
    assert h.pages_saved == 597
    assert max(e.page_info("a", i * PAGE).share_count for i in range(600)) == 255
    e.start_machine("b", FakeMemory([(0, image(*[page(0xAB)] * 600))]), page_fusion=True)
    h = e.stats().host
    assert h.frames_used <= 6
    assert_identity(e)
    assert e.read("b", 0, 600 * PAGE) == page(0xAB) * 600
    e.stop_machine("a")
    assert_identity(e)


def test_scans_fill_frames_up_to_the_limit_and_converge(monkeypatch):
    from pagefusion.server.engine import engine as engine_module

    monkeypatch.setattr(engine_module, "MAX_REFCOUNT", 255)
    e = engine(config=FusionConfig(mode=FusionMode.HINTS))
    e.start_machine("a", FakeMemory([(0, image(*[page(0xCD)] * 600))]), page_fusion=True)
    e.set_config(FusionConfig(mode=FusionMode.CONTENT))
    fused = [e.scan().pages_fused for _ in range(4)]
    assert fused == [254, 254, 89, 0]
    assert e.stats().host.frames_used == 3
    assert_identity(e)
    assert e.read("a", 0, 600 * PAGE) == page(0xCD) * 600


class VanishingMemory(FakeMemory):
    """A live source whose reads fail once ``gone`` is set (a segment removed)."""

    gone = False

    def read(self, address: int, length: int) -> bytes:
        if self.gone:
            raise OSError("segment vanished")
        return super().read(address, length)


def test_a_failing_live_source_is_skipped_and_reported():
    e = engine()
    bad = VanishingMemory([(0, image(page(1), page(2)))], live=True)
    good = FakeMemory([(0, image(page(1), page(3)))], live=True)
    e.start_machine("bad", bad, page_fusion=True)
    e.start_machine("good", good, page_fusion=True)
    bad.gone = True
    good.blocks[0][1][PAGE : PAGE + 1] = b"\x07"
    result = e.scan()
    assert result.failed_machines == ("bad",)
    assert result.pages_copied_on_write == 0 and e.read("good", PAGE, 1) == b"\x07"
    stats = {m.machine_id: m for m in e.stats().machines}
    assert "vanished" in stats["bad"].source_error
    assert e.read("bad", 0, 2) == b"\x01\x01"  # what it had stays readable
    with pytest.raises(SourceFailedError, match="'bad'"):
        e.scan(["bad", "good"])
    e.stop_machine("bad")
    assert_identity(e)


def test_stats_include_machines_still_starting():
    e = engine()
    seen = []

    def progress(done: int, total: int) -> None:
        stats = e.stats()
        seen.append([(m.machine_id, m.starting, m.guest_pages) for m in stats.machines])
        h = stats.host
        assert h.guest_pages == sum(m.guest_pages for m in stats.machines)

    e.start_machine("a", FakeMemory([(0, image(page(1)) * 3)]), page_fusion=True, progress=progress)
    assert seen[-1] == [("a", True, 3)]
    assert [m.starting for m in e.stats().machines] == [False]


def test_a_write_the_budget_cannot_take_changes_nothing():
    e = engine(max_pool_bytes=4 * PAGE)
    mem = image(page(1), page(1), page(1), page(0), page(0))
    e.start_machine("a", FakeMemory([(0, mem)]), page_fusion=True)
    assert e.stats().host.frames_used == 1
    with pytest.raises(ResourceExhaustedError):
        e.write("a", 0, b"\x07" * (5 * PAGE))  # would need 5 frames, 3 are left
    assert e.read("a", 0, 5 * PAGE) == bytes(mem)
    assert_identity(e)


def test_owner_records_widen_past_255_machines():
    # Owners take one byte per frame until a 256th machine runs at once.
    e = engine()
    body = image(page(5), page(6, marker=1))
    for i in range(257):
        e.start_machine(f"m{i}", FakeMemory([(0, body)]), page_fusion=i % 2 == 0)
    assert e._frames.owner.dtype == np.uint16
    for i in range(0, 257, 3):
        e.stop_machine(f"m{i}")
    result = e.verify()
    assert result.consistent, result.problems
    assert_identity(e)


def test_a_refused_one_page_write_never_reaches_a_live_source():
    # Issue 10, item 5: the one-page path wrote through before the budget check.
    e = engine(max_pool_bytes=2 * PAGE)
    mem = FakeMemory([(0, image(page(1), page(2), page(0)))], live=True)
    e.start_machine("a", mem, page_fusion=True)
    with pytest.raises(ResourceExhaustedError):
        e.write("a", 2 * PAGE, b"\x07")  # the ZERO page needs a frame there is no room for
    assert mem.blocks[0][1][2 * PAGE] == 0  # the guest's memory is untouched
    assert e.read("a", 2 * PAGE, 1) == b"\x00"
    assert e.verify().consistent


def test_a_scan_out_of_budget_raises_and_marks_no_source_failed():
    # Issue 10, item 5: RESOURCE_EXHAUSTED in a scan is not a failed source.
    e = engine(max_pool_bytes=2 * PAGE)
    mem = FakeMemory([(0, image(page(1), page(1), page(0)))], live=True)
    e.start_machine("a", mem, page_fusion=True)
    mem.blocks[0][1][2 * PAGE : 3 * PAGE] = page(3)  # the guest writes its ZERO page
    mem.blocks[0][1][0:PAGE] = page(4)  # and one of its shared pages
    with pytest.raises(ResourceExhaustedError):
        e.scan(["a"])
    m = e.machine_stats("a")
    assert m.source_error == ""
    assert e.verify().consistent
    assert_identity(e)


class RacingMemory(FakeMemory):
    """A live source whose read races a guest write made through the engine."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.race = None

    def read(self, address, length):
        data = super().read(address, length)  # the bytes before the write below
        if self.race is not None:
            race, self.race = self.race, None
            race()
        return data


def test_a_scan_read_that_raced_a_write_never_undoes_it():
    e = engine()
    mem = RacingMemory([(0, image(page(1), page(2)))], live=True)
    e.start_machine("a", mem, page_fusion=True)
    mem.race = lambda: e.write("a", 0, b"\x09" * PAGE)  # written through to the source
    e.scan(["a"])
    assert e.read("a", 0, PAGE) == b"\x09" * PAGE
    assert bytes(mem.blocks[0][1][:PAGE]) == b"\x09" * PAGE
    assert e.verify().consistent


def test_huge_pages_are_an_option_with_the_same_figures():
    mem = image(*[page(i % 5 + 1) for i in range(600)], page(0))
    figures = []
    for huge in (False, True):
        e = engine(huge_pages=huge)
        e.start_machine("a", FakeMemory([(0, mem)]), page_fusion=True)
        h = e.stats().host
        figures.append((h.frames_used, h.pages_saved, h.zero_pages))
        assert e.read("a", 0, len(mem)) == bytes(mem)
        assert e.verify().consistent
        e.close()
    assert figures[0] == figures[1] == (5, 595, 1)


def test_config_and_running_machines_answer_while_a_batch_holds_the_engine():
    # The background scanner and the metrics sampler ask these from the event
    # loop; a start holds the engine's lock for a whole batch.
    e = engine()
    e.start_machine("a", FakeMemory([(0, image(page(1)))]), page_fusion=True)
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with e._lock:
            held.set()
            release.wait()

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait()
    answers: list[object] = []
    asker = threading.Thread(
        target=lambda: answers.extend([e.config, e.running_machines(), e.is_running("a")])
    )
    asker.start()
    asker.join(timeout=30)
    finished = not asker.is_alive()
    release.set()
    holder.join()
    asker.join()
    assert finished, "config/running_machines waited for the engine's lock"
    assert answers[1:] == [["a"], True]
    e.stop_machine("a")
    assert e.running_machines() == [] and not e.is_running("a")


def test_the_last_machine_of_a_domain_stops_without_hashing_its_frames(monkeypatch):
    e = engine()
    e.start_machine("a", FakeMemory([(0, image(page(1), page(2), page(2)))]), page_fusion=True)
    e.start_machine(
        "b", FakeMemory([(0, image(page(1)))]), page_fusion=True, fusion_domain="other"
    )
    hashed: list[int] = []
    real = FusionEngine._hash
    monkeypatch.setattr(
        FusionEngine, "_hash", lambda self, flat, rows: hashed.append(len(rows)) or real(
            self, flat, rows)
    )
    e.stop_machine("a")  # its domain's index goes whole
    assert hashed == []
    assert e.verify().consistent
    # The domain comes back empty: a new machine there fuses only with itself.
    e.start_machine("c", FakeMemory([(0, image(page(2), page(2)))]), page_fusion=True)
    assert e.page_info("c", 0).share_count == 2
    assert e.verify().consistent
    assert_identity(e)


class _OneBufferLiveMemory(FakeMemory):
    """A live source that reads into one buffer it reuses, like the shm adapter,
    and is slow to do it: concurrent reads of it overwrite each other's bytes."""

    def __init__(self, ranges) -> None:
        super().__init__(ranges, live=True)
        self._buffer = bytearray()
        self.slow = False
        self.reading = threading.Event()

    def read(self, address: int, length: int) -> memoryview:
        data = super().read(address, length)
        if len(self._buffer) < length:
            self._buffer = bytearray(length)
        self._buffer[:length] = data
        if self.slow:  # a scan: give the other scan time to read over us
            self.reading.set()
            time.sleep(0.2)
        return memoryview(self._buffer)[:length]


def test_concurrent_scans_of_a_live_source_never_mix_their_reads():
    from pagefusion.server.engine.engine import BATCH_PAGES

    pages = 2 * BATCH_PAGES  # two batches: the two scans read different ones
    mem = _OneBufferLiveMemory([(0, image(*(page(1 + i % 200, marker=i) for i in range(pages))))])
    e = engine(max_pool_bytes=256 << 20)
    e.start_machine("a", mem, page_fusion=True)
    for i in range(pages):  # the guest writes every page behind the engine's back
        mem.write(i * PAGE, page(7, marker=i + 1000))
    mem.slow = True
    first = threading.Thread(target=e.scan, kwargs={"page_budget": BATCH_PAGES})
    first.start()
    mem.reading.wait()  # the first scan is reading batch 0; the second starts at batch 1
    e._scan_cursor = ("a", BATCH_PAGES)
    second = threading.Thread(target=e.scan, kwargs={"page_budget": BATCH_PAGES})
    second.start()
    first.join()
    second.join()
    mem.slow = False
    # The two scans covered a batch each; a third would repair a wrong read.
    for i in range(0, pages, 97):
        assert e.read("a", i * PAGE, PAGE) == page(7, marker=i + 1000), f"page {i}"
    assert e.verify().consistent


def test_stats_are_kept_until_something_holds_the_engine_to_change_it():
    from pagefusion.adapters.base import GuestModule, ModuleRegion

    e = engine()
    mem = FakeMemory([(0, image(page(1), page(2), page(0)))], live=True)
    e.start_machine("a", mem, page_fusion=True)
    first = e.stats()
    # Reads leave them be.
    e.read("a", 0, 8)
    e.page_info("a", PAGE)
    e.machine_stats("a")
    assert e.stats() is first
    changes = [
        lambda: e.write("a", 2 * PAGE, b"\x05"),  # a zero page becomes private
        lambda: e.start_machine("b", FakeMemory([(0, image(page(1)))]), page_fusion=True),
        lambda: mem.write(0, page(9)) or e.scan(),  # the guest wrote behind the engine
        lambda: e.set_config(FusionConfig(stable_scans_before_merge=3)),
        lambda: e.register_module(
            "a",
            GuestModule("m.dll", "1", 0, PAGE, "Windows10_64", (ModuleRegion(0, PAGE),)),
        ),
        lambda: e.stop_machine("b"),
    ]
    before = first
    for change in changes:
        change()
        after = e.stats()
        assert after is not before
        e._last_stats = None  # a recount from scratch must agree with what was kept
        assert e.stats() == after
        before = e.stats()
    assert_identity(e)
