"""Fixtures for the metrics tests (helpers live in metrics_helpers.py)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from metrics_helpers import FakeClock, ServerThread, guest_memory

from pagefusion.server.app import Settings
from pagefusion.server.engine import FusionEngine
from pagefusion.server.performance import MetricsCollector


@pytest.fixture
def engine() -> Iterator[FusionEngine]:
    e = FusionEngine(max_pool_bytes=64 << 20, hash_seed=7)
    yield e
    e.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def collector(engine: FusionEngine, clock: FakeClock) -> MetricsCollector:
    return MetricsCollector.for_engine(engine, clock=clock)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerThread]:
    srv = ServerThread(
        Settings(listen="127.0.0.1:0", data_dir=tmp_path / "data", metrics_listen="127.0.0.1:0")
    )
    yield srv
    srv.stop()


@pytest.fixture
def memory() -> Any:
    """``memory(zero=, shared=, unique=, seed=)``: an in-memory guest of those pages."""
    return guest_memory
