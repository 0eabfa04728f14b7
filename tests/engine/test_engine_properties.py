"""Property tests: transparency and exact accounting under random operations.

A reference model keeps every machine's memory as plain bytes, as a machine
without page fusion would. After every step the engine must read back
exactly the model's bytes, its counters must match figures recomputed from
the model alone, and its own recount (verify) must find nothing.

Frames are reused across stops (machines of very different sizes come and
go in one pool), counts pass one byte (hundreds of equal pages), and live
sources change under the engine (a guest writing its own memory) until a
scan picks the change up.
"""

from __future__ import annotations

import contextlib
from collections import Counter

import hypothesis.strategies as st
import pytest
from engine_helpers import PAGE, FakeMemory
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pagefusion.adapters.base import GuestModule, ModuleRegion
from pagefusion.server.engine import (
    AlreadyExistsError,
    FailedPreconditionError,
    FusionConfig,
    FusionEngine,
    FusionMode,
    PageState,
)

# Few distinct page contents, so that duplicates (and zero pages) are common.
PATTERNS = [bytes(PAGE)] + [bytes([i]) * (PAGE - 1) + bytes([i * 3 % 256]) for i in range(1, 5)]
HIGH = 0xFFFC0000
NAMES = ["vm-a", "vm-b", "vm-c", "vm-d"]


def _model_settings(*, examples: int, steps: int) -> settings:
    return settings(
        max_examples=examples,
        stateful_step_count=steps,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )


class EngineModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        # Changed pages may fuse at the next scan (stable_scans_before_merge 0).
        self.engine = FusionEngine(
            max_pool_bytes=16 << 20,
            hash_seed=99,
            config=FusionConfig(stable_scans_before_merge=0),
        )
        self.mode = FusionMode.ALL
        # name -> (fusion, domain, {address: bytearray page})
        self.machines: dict[str, tuple[bool, str, dict[int, bytearray]]] = {}
        self.live: dict[str, FakeMemory] = {}  # live sources, changed by their guests

    # -- operations ----------------------------------------------------------

    @rule(
        name=st.sampled_from(NAMES),
        fusion=st.booleans(),
        domain=st.sampled_from(["default", "tenant-2"]),
        low=st.lists(st.integers(0, len(PATTERNS) - 1), min_size=1, max_size=12),
        high=st.lists(st.integers(0, len(PATTERNS) - 1), max_size=3),
    )
    def start(self, name, fusion, domain, low, high):
        if name in self.machines:
            return
        ranges = [(0, bytearray(b"".join(PATTERNS[i] for i in low)))]
        if high:
            ranges.append((HIGH, bytearray(b"".join(PATTERNS[i] for i in high))))
        self._start(name, ranges, fusion, domain, live=False)

    @rule(
        name=st.sampled_from(NAMES),
        fusion=st.booleans(),
        domain=st.sampled_from(["default", "tenant-2"]),
        pattern=st.integers(0, len(PATTERNS) - 1),
        pages=st.integers(1, 700),
        distinct=st.integers(0, 700),
        live=st.booleans(),
    )
    def start_large(self, name, fusion, domain, pattern, pages, distinct, live):
        """Many equal pages (counts past one byte), some made distinct (many frames)."""
        if name in self.machines:
            return
        data = bytearray(PATTERNS[pattern] * pages)
        for i in range(min(distinct, pages)):
            data[i * PAGE : i * PAGE + 4] = (i + 1).to_bytes(4, "little")
        self._start(name, [(0, data)], fusion, domain, live=live)

    def _start(self, name, ranges, fusion, domain, *, live):
        memory = FakeMemory(ranges, live=live)
        self.engine.start_machine(name, memory, page_fusion=fusion, fusion_domain=domain)
        pages = {}
        for base, data in ranges:
            for off in range(0, len(data), PAGE):
                pages[base + off] = bytearray(data[off : off + PAGE])
        self.machines[name] = (fusion, domain, pages)
        if live:
            self.live[name] = memory

    @precondition(lambda self: self.machines)
    @rule(data=st.data(), value=st.integers(1, (1 << 32) - 1))
    def write_every_page(self, data, value):
        """A distinct 4-byte value into each page: every page gets a private frame."""
        name = data.draw(st.sampled_from(sorted(self.machines)))
        pages = self.machines[name][2]
        for i, address in enumerate(sorted(pages)):
            payload = ((value + i) & 0xFFFFFFFF).to_bytes(4, "little")
            self.engine.write(name, address + 8, payload)
            pages[address][8:12] = payload

    @precondition(lambda self: self.live)
    @rule(data=st.data(), fill=st.sampled_from([0, 1, 2, 9]), count=st.integers(1, 40))
    def guest_writes_its_memory(self, data, fill, count):
        """The guest changes its source; the engine sees it at the next scan."""
        name = data.draw(st.sampled_from(sorted(self.live)))
        _base, block = self.live[name].blocks[0]
        first = data.draw(st.integers(0, max(0, len(block) // PAGE - 1)))
        for page in range(first, min(first + count, len(block) // PAGE)):
            block[page * PAGE : (page + 1) * PAGE] = bytes([fill]) * PAGE

    @precondition(lambda self: self.machines)
    @rule(data=st.data())
    def stop(self, data):
        name = data.draw(st.sampled_from(sorted(self.machines)))
        self.engine.stop_machine(name)
        del self.machines[name]
        self.live.pop(name, None)

    @precondition(lambda self: self.machines)
    @rule(
        data=st.data(),
        offset=st.integers(0, PAGE - 1),
        length=st.integers(1, 2 * PAGE),
        fill=st.sampled_from([0, 1, 2, 7]),
        zero_page=st.booleans(),
    )
    def write(self, data, offset, length, fill, zero_page):
        name = data.draw(st.sampled_from(sorted(self.machines)))
        pages = self.machines[name][2]
        address = data.draw(st.sampled_from(sorted(pages)))
        if zero_page:
            offset, length, fill = 0, PAGE, 0
        # Keep the write inside mapped memory.
        end = address + offset + length
        while (
            any(a not in pages for a in range(address, end, PAGE))
            or (end - 1) // PAGE * PAGE not in pages
        ):
            length = PAGE - offset
            end = address + offset + length
        payload = bytes([fill]) * length
        shared_before = [
            a
            for a in range(address, end, PAGE)
            if self.engine.page_info(name, a).state == PageState.SHARED
        ]
        copied = self.engine.write(name, address + offset, payload)
        # Copying one page may leave a sibling page the frame's sole user.
        assert (copied >= 1) == bool(shared_before)
        assert copied <= len(shared_before)
        flat = bytearray(
            b"".join(
                pages[a]
                for a in range(address, address + (end - address + PAGE - 1) // PAGE * PAGE, PAGE)
            )
        )
        flat[offset : offset + length] = payload
        for i, a in enumerate(range(address, address + len(flat), PAGE)):
            pages[a] = bytearray(flat[i * PAGE : (i + 1) * PAGE])

    @rule(mode=st.sampled_from([FusionMode.HINTS, FusionMode.CONTENT, FusionMode.ALL]))
    def set_mode(self, mode):
        self.mode = mode
        self.engine.set_config(FusionConfig(mode=mode, stable_scans_before_merge=0))

    @rule()
    def scan(self):
        self.engine.scan()
        for name, memory in self.live.items():  # what the guests wrote is seen now
            pages = self.machines[name][2]
            for base, block in memory.blocks:
                for off in range(0, len(block), PAGE):
                    pages[base + off] = bytearray(block[off : off + PAGE])
        if self.mode.content:
            self.assert_fully_fused()

    # -- checks ---------------------------------------------------------------

    def assert_fully_fused(self):
        """After a content scan, sharing is maximal and exactly predictable."""
        contents = Counter()
        unfused = 0
        for fusion, domain, pages in self.machines.values():
            for data in pages.values():
                if any(data):
                    if fusion:
                        contents[(domain, bytes(data))] += 1
                    else:
                        unfused += 1
        h = self.engine.stats().host
        assert h.frames_used == len(contents) + unfused
        assert h.frames_shared == sum(1 for n in contents.values() if n >= 2)
        for name, (fusion, domain, pages) in self.machines.items():
            for address, data in pages.items():
                info = self.engine.page_info(name, address)
                expected = contents[(domain, bytes(data))] if fusion and any(data) else 0
                if not any(data):
                    assert info.state == PageState.ZERO
                elif not fusion:
                    assert info.state == PageState.PRIVATE
                else:
                    assert info.share_count == expected

    @invariant()
    def recount_agrees(self):
        result = self.engine.verify(slice_frames=64)
        assert result.consistent, result.problems
        assert result.pages_checked == sum(len(p) for _, _, p in self.machines.values())
        assert result.frames_checked == self.engine.stats().host.frames_used

    @invariant()
    def transparent(self):
        for name, (_, _, pages) in self.machines.items():
            for address, data in pages.items():
                assert self.engine.read(name, address, PAGE) == data

    @invariant()
    def accounting_is_exact(self):
        stats = self.engine.stats()
        h = stats.host
        guest = sum(len(p) for _, _, p in self.machines.values())
        zero = sum(1 for _, _, p in self.machines.values() for d in p.values() if not any(d))
        assert h.guest_pages == guest
        assert h.zero_pages == zero
        assert h.guest_pages == h.frames_used + h.pages_saved + h.zero_pages
        assert h.shared_pages == sum(m.shared_pages for m in stats.machines)
        assert h.private_pages == sum(m.private_pages for m in stats.machines)
        per = {m.machine_id: m for m in stats.machines}
        assert set(per) == set(self.machines)
        for name, (fusion, _domain, pages) in self.machines.items():
            m = per[name]
            assert m.guest_pages == len(pages)
            assert m.zero_pages == sum(1 for d in pages.values() if not any(d))
            assert m.zero_pages + m.private_pages + m.shared_pages == m.guest_pages
            if not fusion:
                assert m.shared_pages == 0
        # Sharing never crosses domains: a frame's users all hold equal bytes
        # in one domain, so share counts are bounded by equal pages there.
        same = Counter()
        for fusion, domain, pages in self.machines.values():
            for d in pages.values():
                if fusion and any(d):
                    same[(domain, bytes(d))] += 1
        for name, (fusion, domain, pages) in self.machines.items():
            for address, d in pages.items():
                if fusion and any(d):
                    assert (
                        self.engine.page_info(name, address).share_count <= same[(domain, bytes(d))]
                    )

    def teardown(self):
        self.engine.close()


TestEngineModel = EngineModel.TestCase
TestEngineModel.settings = _model_settings(examples=150, steps=30)


class HintedEngineModel(EngineModel):
    """The same model, with guest agents registering modules and checking them."""

    @precondition(lambda self: self.machines)
    @rule(data=st.data(), first=st.integers(0, 8), pages=st.integers(1, 4), base=st.integers(1, 3))
    def register_and_check(self, data, first, pages, base):
        name = data.draw(st.sampled_from(sorted(self.machines)))
        fusion, _, mapped = self.machines[name]
        if any(a not in mapped for a in range(first * PAGE, (first + pages) * PAGE, PAGE)):
            return
        module = GuestModule(
            "kernel32.dll",
            "6.1",
            base << 20,
            pages * PAGE,
            "Windows7_64",
            (ModuleRegion(first * PAGE, pages * PAGE),),
        )
        if not fusion:
            with pytest.raises(FailedPreconditionError):
                self.engine.register_module(name, module)
            return
        with contextlib.suppress(AlreadyExistsError, FailedPreconditionError):
            self.engine.register_module(name, module)
        checked, fused = self.engine.check_shared_modules(name)
        assert fused <= checked


TestHintedEngineModel = HintedEngineModel.TestCase
TestHintedEngineModel.settings = _model_settings(examples=100, steps=30)


class CappedEngineModel(EngineModel):
    """The same model with a frame's user limit lowered from 65,535 to 5.

    Equal pages then fill several frames; the exact figures after a scan are
    no longer one frame per content, so only transparency, the accounting
    identity and the recount are checked.
    """

    def __init__(self) -> None:
        self._patch = pytest.MonkeyPatch()
        from pagefusion.server.engine import engine as engine_module
        from pagefusion.server.engine import frames as frames_module

        self._patch.setattr(engine_module, "MAX_REFCOUNT", 5)
        self._patch.setattr(frames_module, "MAX_REFCOUNT", 5)
        super().__init__()

    def assert_fully_fused(self):
        h = self.engine.stats().host
        for name, (_fusion, _domain, pages) in self.machines.items():
            for address in pages:
                assert self.engine.page_info(name, address).share_count <= 5
        assert h.guest_pages == h.frames_used + h.pages_saved + h.zero_pages

    def teardown(self):
        super().teardown()
        self._patch.undo()


TestCappedEngineModel = CappedEngineModel.TestCase
TestCappedEngineModel.settings = _model_settings(examples=60, steps=25)


class WideMapEngineModel(EngineModel):
    """The same model with page maps widening at frame id 6 instead of 2^24.

    Maps then widen in the middle of runs (a start, a copy on write, a
    scan's move), which a real host reaches only past 64 GiB of frames.
    """

    def __init__(self) -> None:
        self._patch = pytest.MonkeyPatch()
        from pagefusion.server.engine import pagemap

        self._patch.setattr(pagemap, "NARROW_LIMIT", 6)
        super().__init__()

    @invariant()
    def maps_holding_frame_6_or_more_are_wide(self):
        for m in self.engine._machines.values():
            held = m.map[: m.ingested]
            if len(held) and int(held.max()) >= 6:
                assert m.map.wide, m.machine_id

    def teardown(self):
        super().teardown()
        self._patch.undo()


TestWideMapEngineModel = WideMapEngineModel.TestCase
TestWideMapEngineModel.settings = _model_settings(examples=60, steps=25)
