"""Fixtures for the adapter tests.

- ``qemu_guest``: a real QEMU guest (SeaBIOS, RAM in /dev/shm) and its RAM
  file, from :mod:`qemu_support`; parametrize indirectly with its size
  (default 128 MiB). Skipped without qemu-system-x86_64.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from qemu_support import MiB, Qemu, guest


@pytest.fixture
def qemu_guest(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Qemu, Path]]:
    with guest(tmp_path, getattr(request, "param", 128 * MiB)) as running:
        yield running
