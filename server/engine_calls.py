"""Calling the engine from the event loop.

Most engine calls a client makes (a page read, a page's state, the stats)
take microseconds under the engine lock; a hop to a worker thread costs
more than the call. :func:`quick` runs such a call on the loop when the
engine is free and hops to a thread only when a start or a scan holds the
engine, so the loop never waits on the lock. Long calls (start, stop,
scans, recounts) always go to a thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from pagefusion.server.engine import FusionEngine
from pagefusion.server.engine.engine import BUSY

T = TypeVar("T")


async def quick(engine: FusionEngine, fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` (an engine method), inline when the engine is free."""
    result = engine.run_if_free(fn, *args)
    if result is BUSY:
        return await asyncio.to_thread(fn, *args)
    return result  # type: ignore[return-value]
