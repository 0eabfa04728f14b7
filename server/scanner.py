"""The background scanner: KSM's ksmd, with a pages-per-second budget.

While ``FusionConfig.background_scan`` is on, every tick re-reads a slice of
the running machines' memory (live sources) and fuses what is not fused yet,
``pages_per_second x tick`` pages at a time, resuming where the last slice
stopped. It never runs on the request path, and a source that fails is
logged once per failure and skipped; the other machines keep being scanned.
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from pagefusion.server.engine import EngineError, FusionEngine

log = structlog.get_logger(__name__)

TICK_SECONDS = 0.5


class BackgroundScanner:
    """Runs budgeted engine scans while the fusion config asks for them."""

    def __init__(self, engine: FusionEngine, tick: float = TICK_SECONDS) -> None:
        self._engine = engine
        self._tick = tick
        self._task: asyncio.Task[None] | None = None
        self._reported: dict[str, str] = {}
        self._refused = ""  # the last engine refusal logged (each cause once)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="pagefusion-background-scan")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def step(self) -> int:
        """One tick's worth of scanning; returns the pages scanned (0 when off)."""
        config = self._engine.config
        if not config.background_scan or not self._engine.running_machines():
            return 0
        budget = max(1, int(config.pages_per_second * self._tick))
        result = await asyncio.to_thread(self._engine.scan, page_budget=budget)
        if result.failed_machines:
            failed = set(result.failed_machines)
            for machine in self._engine.stats().machines:
                error = machine.source_error
                if machine.machine_id in failed and self._reported.get(machine.machine_id) != error:
                    self._reported[machine.machine_id] = error
                    log.warning("source_failed", machine=machine.machine_id, error=error)
        return result.pages_scanned

    async def _run(self) -> None:
        while True:
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except EngineError as exc:  # e.g. the pool's budget: say so, once per cause
                if self._refused != exc.message:
                    self._refused = exc.message
                    log.warning("background_scan_refused", code=exc.code, error=exc.message)
            except Exception:  # never let one bad tick stop the scanner
                log.exception("background_scan_failed")
            else:
                self._refused = ""
            await asyncio.sleep(self._tick)
