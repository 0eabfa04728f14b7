"""Helpers of the metrics tests: small guest memory, a fake clock, a server in a thread.

Collector tests drive sampling by hand (``sample_now``/``tick`` with a fake
clock), so nothing here sleeps and nothing asserts how long a thing took.
Server tests run a real PagefusionServer on a loopback port (Prometheus on
another), on its own event loop in a background thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import grpc
import numpy as np

from pagefusion.adapters.memory import InMemoryGuestMemory
from pagefusion.server.app import PagefusionServer, Settings
from pagefusion.v1 import (
    fusion_pb2_grpc,
    machine_pb2,
    machine_pb2_grpc,
    performance_pb2_grpc,
)

T = TypeVar("T")
PAGE = 4096
WAIT = 30.0  # a guard against hangs, never an assertion


class FakeClock:
    """Monotonic seconds that move only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def guest_memory(
    zero: int = 0, shared: int = 0, unique: int = 0, seed: int = 1
) -> InMemoryGuestMemory:
    """``zero`` zero pages, ``shared`` copies of one common page, ``unique`` distinct pages."""
    pages = np.zeros((zero + shared + unique, PAGE), dtype=np.uint8)
    pages[zero : zero + shared] = 0x5A  # the same content in every machine
    for i in range(unique):
        row = pages[zero + shared + i]
        row[:8] = np.frombuffer((seed << 32 | i + 1).to_bytes(8, "little"), dtype=np.uint8)
        row[8] = 0xEE
    return InMemoryGuestMemory.from_bytes(pages.reshape(-1))


class ServerThread:
    """A PagefusionServer on an event loop in a background thread."""

    def __init__(self, settings: Settings) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: PagefusionServer = self.call(self._create(settings))
        self.port = self.call(self.server.start())
        self.stopped = False
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.perf = performance_pb2_grpc.PerformanceServiceStub(self.channel)
        self.machines = machine_pb2_grpc.MachineServiceStub(self.channel)
        self.fusion = fusion_pb2_grpc.FusionServiceStub(self.channel)

    @staticmethod
    async def _create(settings: Settings) -> PagefusionServer:
        return PagefusionServer(settings)

    @property
    def metrics_port(self) -> int:
        assert self.server.prometheus is not None
        return self.server.prometheus.port

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(WAIT)

    def pause_sampler(self) -> None:
        """Stop the server's own sampler, so only the test's sample_now() records."""
        self.call(self.server.sampler.stop())

    def start_machine(self, machine_id: str, size: str = "256KiB", pattern: str = "mixed",
                      seed: int = 0, fusion: bool = True) -> None:
        machine = machine_pb2.Machine(
            page_fusion_enabled=fusion,
            memory_source=machine_pb2.MemorySource(
                adapter="memory", options={"size": size, "pattern": pattern, "seed": str(seed)}
            ),
        )
        self.machines.CreateMachine(
            machine_pb2.CreateMachineRequest(machine_id=machine_id, machine=machine)
        )
        self.machines.StartMachine(machine_pb2.StartMachineRequest(name=f"machines/{machine_id}"))

    def stop_machine(self, machine_id: str) -> None:
        self.machines.StopMachine(machine_pb2.StopMachineRequest(name=f"machines/{machine_id}"))

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.channel.close()
            self.call(self.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT)
