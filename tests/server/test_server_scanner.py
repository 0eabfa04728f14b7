"""The background scanner: budgeted scans while FusionConfig.background_scan is on."""

from __future__ import annotations

import asyncio

import numpy as np

from pagefusion.adapters.memory import InMemoryGuestMemory
from pagefusion.server.engine import FusionConfig, FusionEngine, PageState
from pagefusion.server.scanner import BackgroundScanner

PAGE = 4096


class Vanishing(InMemoryGuestMemory):
    gone = False

    def read(self, address: int, length: int) -> memoryview:
        if self.gone:
            raise OSError("segment vanished")
        return super().read(address, length)


def _pages(*fills: int) -> np.ndarray:
    return np.concatenate([np.full(PAGE, f, dtype=np.uint8) for f in fills])


def test_scanner_keeps_to_its_budget_and_applies_live_changes():
    engine = FusionEngine(max_pool_bytes=64 << 20, hash_seed=1)
    live = InMemoryGuestMemory([(0, _pages(1, 2, 3, 4))], live=True, copy=False)
    engine.start_machine("vm", live, page_fusion=True)
    scanner = BackgroundScanner(engine, tick=0.5)
    assert asyncio.run(scanner.step()) == 0  # off by default
    engine.set_config(FusionConfig(background_scan=True, pages_per_second=2))
    live.write(3 * PAGE, b"\x09" * PAGE)  # the guest writes its last page
    scanned = [asyncio.run(scanner.step()) for _ in range(4)]
    assert scanned == [1, 1, 1, 1]  # 2 pages/s x 0.5 s per tick
    assert engine.read("vm", 3 * PAGE, 2) == b"\x09\x09"
    assert engine.stats().host.full_scans == 1
    engine.close()


def test_scanner_skips_a_failed_source_and_goes_on():
    engine = FusionEngine(max_pool_bytes=64 << 20, hash_seed=1)
    bad = Vanishing([(0, _pages(1, 2))], live=True)
    good = InMemoryGuestMemory([(0, _pages(5, 6))], live=True, copy=False)
    engine.start_machine("a-bad", bad, page_fusion=True)
    engine.start_machine("b-good", good, page_fusion=True)
    engine.set_config(FusionConfig(background_scan=True, pages_per_second=1000))
    bad.gone = True
    good.write(0, b"\x06" * PAGE)  # now equal to its second page: fuses on a scan
    scanner = BackgroundScanner(engine)
    asyncio.run(scanner.step())
    asyncio.run(scanner.step())
    stats = {m.machine_id: m for m in engine.stats().machines}
    assert "vanished" in stats["a-bad"].source_error
    assert engine.page_info("b-good", 0).state == PageState.SHARED
    engine.close()
