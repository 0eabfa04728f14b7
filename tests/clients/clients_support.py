"""Helpers of the client, CLI and harness tests (fixtures are in conftest.py).

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

import contextlib
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from pagefusion.v1 import (
    guest_memory_pb2,
    guest_memory_pb2_grpc,
    performance_pb2,
    performance_pb2_grpc,
)

CLI_TIMEOUT = 60.0


def pagefusion_command() -> str:
    """The installed console script (next to this interpreter, else on PATH)."""
    beside = Path(sys.executable).parent / "pagefusion"
    if beside.exists():
        return str(beside)
    found = shutil.which("pagefusion")
    if found is None:
        pytest.fail("the `pagefusion` command is not installed (pip install .)")
    return found


@dataclass
class Cli:
    """Runs ``pagefusion ARGS`` as a subprocess against one server."""

    address: str
    command: str = field(default_factory=pagefusion_command)

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env["PAGEFUSION_SERVER"] = self.address
        env.update(extra)
        return env

    def __call__(
        self, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.command, *args],
            capture_output=True,
            text=True,
            env=env if env is not None else self.env(),
            timeout=CLI_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )

    def ok(self, *args: str) -> str:
        """Run, assert exit 0 and an empty stderr, return stdout."""
        result = self(*args)
        assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
        assert result.stderr == "", result.stderr
        return result.stdout

    def fails(self, *args: str, code: int = 1) -> str:
        """Run, assert exit ``code`` and exactly one stderr line; return that line."""
        result = self(*args)
        assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
        lines = result.stderr.splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith("pagefusion: error: "), lines[0]
        assert "Traceback" not in result.stderr
        return lines[0]

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [self.command, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env(),
            stdin=subprocess.DEVNULL,
        )


def memory_source(size_mb: int = 4, pattern: str = "mixed", seed: int = 0) -> str:
    """A generated in-memory source of the built-in ``memory`` adapter."""
    return f"memory:size={size_mb * 1024 * 1024},pattern={pattern},seed={seed}"


# -- a scripted server for exact shapes -----------------------------------------


def metric(obj: str, name: str, **kw: Any) -> performance_pb2.Metric:
    defaults: dict[str, Any] = {
        "unit": "kB",
        "minimum": 0,
        "maximum": 2**31 - 1,
        "period_seconds": 1,
        "sample_count": 1,
        "description": "description of " + name,
    }
    defaults.update(kw)
    return performance_pb2.Metric(object=obj, metric=name, **defaults)


class FakePerformance(performance_pb2_grpc.PerformanceServiceServicer):
    """Answers with fixed data and records every request."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, Any]] = []
        self.metrics = [
            metric("host", "RAM/VMM/Used"),
            metric("host", "RAM/VMM/Shared"),
            metric("w10", "Guest/RAM/Usage/Shared"),
        ]
        self.data = performance_pb2.QueryMetricsResponse(
            data=[
                performance_pb2.MetricData(
                    object="host",
                    metric="RAM/VMM/Used",
                    unit="kB",
                    scale=1,
                    values=[524288, 524292],
                ),
                performance_pb2.MetricData(
                    object="w10", metric="Guest/CPU/Load/User", unit="%", scale=1000, values=[12345]
                ),
            ]
        )

    def ListMetrics(self, request: Any, context: Any) -> Any:
        self.requests.append(("ListMetrics", request))
        return performance_pb2.ListMetricsResponse(metrics=self.metrics)

    def SetupMetrics(self, request: Any, context: Any) -> Any:
        self.requests.append(("SetupMetrics", request))
        return performance_pb2.SetupMetricsResponse(metrics=self.metrics[:2])

    def EnableMetrics(self, request: Any, context: Any) -> Any:
        self.requests.append(("EnableMetrics", request))
        return performance_pb2.EnableMetricsResponse(metrics=self.metrics[:1])

    def DisableMetrics(self, request: Any, context: Any) -> Any:
        self.requests.append(("DisableMetrics", request))
        return performance_pb2.DisableMetricsResponse(metrics=[])

    def QueryMetrics(self, request: Any, context: Any) -> Any:
        self.requests.append(("QueryMetrics", request))
        return self.data

    def WatchMetrics(self, request: Any, context: Any) -> Iterator[Any]:
        self.requests.append(("WatchMetrics", request))
        while context.is_active():
            yield self.data
            threading.Event().wait(0.05)


class FakeGuestMemory(guest_memory_pb2_grpc.GuestMemoryServiceServicer):
    """A guest whose module list the test changes between agent cycles."""

    def __init__(self) -> None:
        self.enabled = True
        self.modules: list[guest_memory_pb2.SharedModule] = []
        self.registered: dict[tuple[str, str, int, int], Any] = {}
        self.calls: list[str] = []
        self.refuse: set[str] = set()

    @staticmethod
    def key(module: Any) -> tuple[str, str, int, int]:
        return (module.module_name, module.version, module.base_address, module.module_size)

    def GetPageSharingStatus(self, request: Any, context: Any) -> Any:
        self.calls.append("GetPageSharingStatus " + request.name)
        return guest_memory_pb2.GetPageSharingStatusResponse(enabled=self.enabled)

    def ListGuestModules(self, request: Any, context: Any) -> Any:
        self.calls.append("ListGuestModules " + request.name)
        return guest_memory_pb2.ListGuestModulesResponse(modules=self.modules)

    def RegisterSharedModule(self, request: Any, context: Any) -> Any:
        self.calls.append("RegisterSharedModule " + request.module.module_name)
        if request.module.module_name in self.refuse:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "module refused")
        key = self.key(request.module)
        if key in self.registered:
            context.abort(grpc.StatusCode.ALREADY_EXISTS, "already registered")
        self.registered[key] = request.module
        return guest_memory_pb2.RegisterSharedModuleResponse()

    def UnregisterSharedModule(self, request: Any, context: Any) -> Any:
        self.calls.append("UnregisterSharedModule " + request.module.module_name)
        if self.registered.pop(self.key(request.module), None) is None:
            context.abort(grpc.StatusCode.NOT_FOUND, "not registered")
        return guest_memory_pb2.UnregisterSharedModuleResponse()

    def CheckSharedModules(self, request: Any, context: Any) -> Any:
        self.calls.append("CheckSharedModules " + request.name)
        pages = sum(m.module_size // 4096 for m in self.registered.values())
        return guest_memory_pb2.CheckSharedModulesResponse(
            pages_checked=pages, pages_fused=pages // 2
        )


def module(name: str, base: int, size: int = 0x4000) -> guest_memory_pb2.SharedModule:
    return guest_memory_pb2.SharedModule(
        module_name=name,
        version="10.0.1",
        base_address=base,
        module_size=size,
        guest_os="Windows10_64",
        regions=[guest_memory_pb2.SharedModuleRegion(address=base, size=size)],
    )


@dataclass
class Fake:
    address: str
    performance: FakePerformance
    guest_memory: FakeGuestMemory

    def cli(self) -> Cli:
        return Cli(self.address)


@contextlib.contextmanager
def start_fake() -> Iterator[Fake]:
    """Serve the scripted servicers on a free loopback port."""
    performance = FakePerformance()
    guest_memory = FakeGuestMemory()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    performance_pb2_grpc.add_PerformanceServiceServicer_to_server(performance, grpc_server)
    guest_memory_pb2_grpc.add_GuestMemoryServiceServicer_to_server(guest_memory, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    try:
        yield Fake(f"127.0.0.1:{port}", performance, guest_memory)
    finally:
        grpc_server.stop(grace=None)


def lines(text: str) -> Sequence[str]:
    return text.splitlines()
