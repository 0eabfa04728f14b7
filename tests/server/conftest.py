"""Fixtures for the server's end-to-end tests.

The server runs in this process on its own event loop in a background
thread, listening on a free loopback port; tests talk to it over a real
socket with the synchronous generated stubs, as an outside client would.
A ``gate`` adapter lets a test hold a machine in STARTING or STOPPING.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2_grpc
from grpc_status import rpc_status

from pagefusion.adapters.base import (
    PAGE_SIZE,
    Adapter,
    AdapterContext,
    GuestMemory,
    MemoryRange,
    SourceError,
)
from pagefusion.adapters.registry import load_adapters
from pagefusion.server.app import PagefusionServer, Settings
from pagefusion.v1 import (
    fusion_pb2_grpc,
    guest_memory_pb2_grpc,
    machine_pb2,
    machine_pb2_grpc,
    performance_pb2_grpc,
)

T = TypeVar("T")
MAX_MESSAGE = 8 << 20
WAIT = 30.0  # seconds a test waits for a gate before giving up (a guard, not an assertion)


class Gate:
    """Blocks a ``gate`` source's read or close until released."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def hold(self) -> None:
        self.entered.set()
        if not self.release.wait(WAIT):
            raise SourceError("gate was never released")


def page_pattern(size: int) -> bytes:
    """Page n holds n+1 in its first 8 bytes (unique, non-zero pages)."""
    return b"".join(
        (n + 1).to_bytes(8, "little") + bytes(PAGE_SIZE - 8) for n in range(size // PAGE_SIZE)
    )


class GateMemory(GuestMemory):
    def __init__(self, size: int, gate: Gate, block: str, fail: bool, crash: bool) -> None:
        self._data = page_pattern(size)
        self._crash = crash
        self._gate = gate
        self._block = block
        self._fail = fail

    def ranges(self) -> Sequence[MemoryRange]:
        if self._crash:
            raise RuntimeError("an adapter bug the server did not expect")
        return (MemoryRange(0, len(self._data)),)

    def read(self, address: int, length: int) -> bytes:
        if self._block == "read":
            self._gate.hold()
        if self._fail:
            raise SourceError("the gate source failed on purpose")
        return self._data[address : address + length]

    def close(self) -> None:
        if self._block == "close":
            self._gate.hold()


class GateAdapter(Adapter):
    """A test adapter: ``size`` bytes of unique pages; ``block`` read|close; ``fail``; ``crash``."""

    name = "gate"
    options = {
        "size": "bytes",
        "block": "read or close",
        "fail": "true to fail reads",
        "crash": "true to raise an unexpected exception",
    }

    def __init__(self) -> None:
        self.gate = Gate()

    def open(self, options: Mapping[str, str], context: AdapterContext) -> GuestMemory:
        return GateMemory(
            int(options.get("size", "65536")), self.gate, options.get("block", ""),
            options.get("fail") == "true", options.get("crash") == "true",
        )


class ServerThread:
    """A PagefusionServer on an event loop in a background thread."""

    def __init__(self, settings: Settings, adapters: Mapping[str, Adapter]) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: PagefusionServer = self.call(self._create(settings, adapters))
        self.port = self.call(self.server.start())
        self.stopped = False

    @staticmethod
    async def _create(settings: Settings, adapters: Mapping[str, Adapter]) -> PagefusionServer:
        return PagefusionServer(settings, adapters)

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(WAIT * 2)

    def submit(self, coro: Coroutine[Any, Any, T]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self, grace: float = 0) -> None:
        if not self.stopped:
            self.stopped = True
            self.call(self.server.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT)


@dataclass
class Api:
    """Stubs of every service over one channel, plus small helpers."""

    channel: grpc.Channel
    machines: machine_pb2_grpc.MachineServiceStub = field(init=False)
    guest: guest_memory_pb2_grpc.GuestMemoryServiceStub = field(init=False)
    fusion: fusion_pb2_grpc.FusionServiceStub = field(init=False)
    perf: performance_pb2_grpc.PerformanceServiceStub = field(init=False)
    health: health_pb2_grpc.HealthStub = field(init=False)

    def __post_init__(self) -> None:
        self.machines = machine_pb2_grpc.MachineServiceStub(self.channel)
        self.guest = guest_memory_pb2_grpc.GuestMemoryServiceStub(self.channel)
        self.fusion = fusion_pb2_grpc.FusionServiceStub(self.channel)
        self.perf = performance_pb2_grpc.PerformanceServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def create(
        self, machine_id: str, adapter: str = "memory", options: Mapping[str, str] | None = None,
        **fields: Any,
    ) -> machine_pb2.Machine:
        if options is None and adapter == "memory":
            options = {"size": "256KiB", "pattern": "mixed"}
        machine = machine_pb2.Machine(
            memory_source=machine_pb2.MemorySource(adapter=adapter, options=options or {}),
            **fields,
        )
        return self.machines.CreateMachine(
            machine_pb2.CreateMachineRequest(machine_id=machine_id, machine=machine)
        )

    def start(self, machine_id: str) -> machine_pb2.Machine:
        return self.machines.StartMachine(
            machine_pb2.StartMachineRequest(name=f"machines/{machine_id}")
        )

    def stop(self, machine_id: str) -> machine_pb2.Machine:
        return self.machines.StopMachine(
            machine_pb2.StopMachineRequest(name=f"machines/{machine_id}")
        )

    def get(self, machine_id: str) -> machine_pb2.Machine:
        request = machine_pb2.GetMachineRequest(name=f"machines/{machine_id}")
        return self.machines.GetMachine(request)


@dataclass
class Failure:
    """A failed call: its code, message and unpacked google.rpc details."""

    code: grpc.StatusCode
    message: str
    details: dict[type, Message]

    def detail(self, cls: type[T]) -> T:
        assert cls in self.details, f"no {cls.__name__} in {list(self.details)}"
        return self.details[cls]  # type: ignore[return-value]

    @property
    def reason(self) -> str:
        info = self.detail(error_details_pb2.ErrorInfo)
        assert info.domain == "pagefusion.dev"
        return info.reason

    def field_violations(self) -> list[str]:
        return [v.field for v in self.detail(error_details_pb2.BadRequest).field_violations]


_DETAIL_TYPES = (
    error_details_pb2.ErrorInfo,
    error_details_pb2.BadRequest,
    error_details_pb2.PreconditionFailure,
    error_details_pb2.ResourceInfo,
)


def fails(call: Callable[..., Any], request: Message, code: grpc.StatusCode) -> Failure:
    """Make ``call(request)``, which must fail with ``code``; return what it carried."""
    with pytest.raises(grpc.RpcError) as info:
        result = call(request)
        if hasattr(result, "__iter__") and not isinstance(result, Message):
            list(result)  # a server stream fails when read
    err = info.value
    assert err.code() == code, f"{err.code()} {err.details()}"  # type: ignore[attr-defined]
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    details: dict[type, Message] = {}
    if status is not None:
        assert status.message == err.details()  # type: ignore[attr-defined]
        for packed in status.details:
            for cls in _DETAIL_TYPES:
                if packed.Is(cls.DESCRIPTOR):
                    msg = cls()
                    packed.Unpack(msg)
                    details[cls] = msg
    return Failure(code, err.details(), details)  # type: ignore[attr-defined]


@pytest.fixture
def gate_adapter() -> GateAdapter:
    return GateAdapter()


@pytest.fixture
def make_server(
    tmp_path: Path, gate_adapter: GateAdapter
) -> Iterator[Callable[..., ServerThread]]:
    started: list[ServerThread] = []

    def make(**overrides: Any) -> ServerThread:
        settings = Settings(
            **{
                "listen": "127.0.0.1:0",
                "data_dir": tmp_path / "data",
                "allow_paths": (tmp_path / "images",),
                **overrides,
            }
        )
        adapters = {**load_adapters(), "gate": gate_adapter}
        server = ServerThread(settings, adapters)
        started.append(server)
        return server

    yield make
    gate_adapter.gate.release.set()
    for server in started:
        server.stop()


def connect(port: int) -> grpc.Channel:
    return grpc.insecure_channel(
        f"127.0.0.1:{port}",
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
        ],
    )


@pytest.fixture
def server(make_server: Callable[..., ServerThread]) -> ServerThread:
    return make_server()


@pytest.fixture
def api(server: ServerThread) -> Iterator[Api]:
    channel = connect(server.port)
    yield Api(channel)
    channel.close()


@pytest.fixture
def api_for() -> Iterator[Callable[[ServerThread], Api]]:
    """``api_for(server) -> Api``: a client of another server the test made."""
    channels: list[grpc.Channel] = []

    def make(server: ServerThread) -> Api:
        channels.append(connect(server.port))
        return Api(channels[-1])

    yield make
    for channel in channels:
        channel.close()


@pytest.fixture
def expect_failure() -> Callable[[Callable[..., Any], Message, grpc.StatusCode], Failure]:
    """``expect_failure(stub.Rpc, request, code) -> Failure``."""
    return fails
