"""Fixtures for the client, CLI and harness tests.

- ``server``: one real pagefusion server subprocess per test module, started
  with the harness under test (:func:`pagefusion.clients.testing.run_server`).
- ``client``: a PageFusionClient connected to it; ``machine_id``: a fresh id
  per test so tests sharing a server do not collide.
- ``cli``: runs the installed ``pagefusion`` command against ``server``.
- ``fake``: an in-process gRPC server with scripted PerformanceService and
  GuestMemoryService servicers, for exact output shapes and the guest agent
  independent of the real implementations.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from clients_support import Cli, Fake, start_fake

from pagefusion.clients.client import PageFusionClient
from pagefusion.clients.testing import RunningServer, run_server


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    with run_server() as running:
        yield running


@pytest.fixture
def client(server: RunningServer) -> Iterator[PageFusionClient]:
    with server.client() as connected:
        yield connected


@pytest.fixture
def machine_id() -> str:
    return "t-" + uuid.uuid4().hex[:10]


@pytest.fixture
def cli(server: RunningServer) -> Cli:
    return Cli(server.address)


@pytest.fixture
def fake() -> Iterator[Fake]:
    with start_fake() as running:
        yield running
