"""Every error stays small whatever the input (DESIGN.md, "Rules every error follows").

A real server subprocess is sent huge strings in every field a message can
echo; each call must fail with its proper code (not RESOURCE_EXHAUSTED from a
client that dropped an oversized status), quote at most 128 characters of the
input, and carry a google.rpc.Status of at most 1 KiB. The channel has
gRPC's default limits, as any client would.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from pagefusion.clients.testing import RunningServer, run_server
from pagefusion.server import errors
from pagefusion.v1 import (
    fusion_pb2,
    fusion_pb2_grpc,
    guest_memory_pb2,
    guest_memory_pb2_grpc,
    machine_pb2,
    machine_pb2_grpc,
    performance_pb2,
    performance_pb2_grpc,
)

Code = grpc.StatusCode
BIG = 100_000  # characters: a 100 kB input
STATUS_LIMIT = 1024

DETAILS = (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest,
           error_details_pb2.PreconditionFailure, error_details_pb2.ResourceInfo)


@dataclass
class Stubs:
    machines: machine_pb2_grpc.MachineServiceStub
    guest: guest_memory_pb2_grpc.GuestMemoryServiceStub
    fusion: fusion_pb2_grpc.FusionServiceStub
    perf: performance_pb2_grpc.PerformanceServiceStub


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    with run_server() as running:
        yield running


@pytest.fixture(scope="module")
def stubs(server: RunningServer) -> Iterator[Stubs]:
    channel = grpc.insecure_channel(server.address)  # default limits: 8 KiB metadata
    machines = machine_pb2_grpc.MachineServiceStub(channel)
    # One running machine for the calls that need one.
    machines.CreateMachine(machine_pb2.CreateMachineRequest(
        machine_id="live", machine=_machine("memory", {"size": "64KiB"})))
    machines.StartMachine(machine_pb2.StartMachineRequest(name="machines/live"))
    yield Stubs(machines, guest_memory_pb2_grpc.GuestMemoryServiceStub(channel),
                fusion_pb2_grpc.FusionServiceStub(channel),
                performance_pb2_grpc.PerformanceServiceStub(channel))
    channel.close()


def _machine(adapter: str, options: dict[str, str], **fields: Any) -> machine_pb2.Machine:
    return machine_pb2.Machine(
        memory_source=machine_pb2.MemorySource(adapter=adapter, options=options), **fields)


def _create(machine_id: str, adapter: str = "memory", options: dict[str, str] | None = None,
            **fields: Any) -> machine_pb2.CreateMachineRequest:
    return machine_pb2.CreateMachineRequest(
        machine_id=machine_id, machine=_machine(adapter, options or {"size": "64KiB"}, **fields))


def _module(name: str, version: str = "1.0") -> guest_memory_pb2.SharedModule:
    return guest_memory_pb2.SharedModule(
        module_name=name, version=version, base_address=0x10000, module_size=4096,
        regions=[guest_memory_pb2.SharedModuleRegion(address=0x10000, size=4096)])


def _texts(status: status_pb2.Status) -> list[str]:
    """The message and every string in the status's details."""
    texts = [status.message]

    def visit(msg: Message) -> None:
        for _fd, value in msg.ListFields():
            items = list(value.items()) if hasattr(value, "items") else None
            if items is not None:
                texts.extend(str(x) for pair in items for x in pair)
            elif isinstance(value, str):
                texts.append(value)
            elif isinstance(value, Message):
                visit(value)
            elif hasattr(value, "__iter__") and not isinstance(value, bytes):
                for item in value:
                    if isinstance(item, Message):
                        visit(item)
                    else:
                        texts.append(str(item))

    for packed in status.details:
        for cls in DETAILS:
            if packed.Is(cls.DESCRIPTOR):
                detail = cls()
                packed.Unpack(detail)
                visit(detail)
    return texts


def _fails(call: Callable[[Any], Any], request: Message, code: grpc.StatusCode,
           fill: str) -> status_pb2.Status:
    with pytest.raises(grpc.RpcError) as info:
        call(request)
    err: Any = info.value
    assert err.code() == code, f"{err.code()}: {err.details()[:300]}"
    status = rpc_status.from_call(err)
    assert status is not None, "the status details were dropped"
    assert status.ByteSize() <= STATUS_LIMIT, f"{status.ByteSize()} bytes: {status.message[:300]}"
    assert status.message == err.details()
    info_detail = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info_detail) and info_detail.domain == "pagefusion.dev"
    assert info_detail.reason
    for text in _texts(status):
        assert fill * (errors.QUOTE_LIMIT + 1) not in text, text[:300]
    return status


# (what, call, request, code, the character the huge input repeats)
CASES: list[tuple[str, str, Callable[[], Message], grpc.StatusCode, str]] = [
    ("5,000-char machine id", "machines.CreateMachine", lambda: _create("a" * 5000),
     Code.INVALID_ARGUMENT, "a"),
    ("100 kB machine id", "machines.CreateMachine", lambda: _create("a" + "b" * BIG),
     Code.INVALID_ARGUMENT, "b"),
    ("100 kB adapter name", "machines.CreateMachine", lambda: _create("m1", adapter="q" * BIG),
     Code.INVALID_ARGUMENT, "q"),
    ("100 kB option key", "machines.CreateMachine",
     lambda: _create("m2", options={"k" * BIG: "v"}), Code.INVALID_ARGUMENT, "k"),
    ("1,000 huge option keys", "machines.CreateMachine",
     lambda: _create("m3", options={f"{i:04d}" + "k" * 1000: "v" * 1000 for i in range(1000)}),
     Code.INVALID_ARGUMENT, "k"),
    ("100 kB fusion domain", "machines.CreateMachine",
     lambda: _create("m4", fusion_domain="d" * BIG), Code.INVALID_ARGUMENT, "d"),
    ("multi-byte characters", "machines.CreateMachine",
     lambda: _create("\U0001f600" * 5000), Code.INVALID_ARGUMENT, "\U0001f600"),
    ("100 kB machine name", "machines.GetMachine",
     lambda: machine_pb2.GetMachineRequest(name="machines/" + "n" * BIG),
     Code.INVALID_ARGUMENT, "n"),
    ("100 kB name without the collection", "machines.GetMachine",
     lambda: machine_pb2.GetMachineRequest(name="n" * BIG), Code.INVALID_ARGUMENT, "n"),
    ("100 kB page token", "machines.ListMachines",
     lambda: machine_pb2.ListMachinesRequest(page_token="t" * BIG), Code.INVALID_ARGUMENT, "t"),
    ("100 kB update mask path", "machines.UpdateMachine",
     lambda: machine_pb2.UpdateMachineRequest(
         machine=machine_pb2.Machine(name="machines/live"),
         update_mask=field_mask_pb2.FieldMask(paths=["p" * BIG])),
     Code.INVALID_ARGUMENT, "p"),
    ("100 kB module name (register)", "guest.RegisterSharedModule",
     lambda: guest_memory_pb2.RegisterSharedModuleRequest(
         name="machines/live", module=_module("r" * BIG)), Code.INVALID_ARGUMENT, "r"),
    ("100 kB module name (unregister)", "guest.UnregisterSharedModule",
     lambda: guest_memory_pb2.UnregisterSharedModuleRequest(
         name="machines/live", module=_module("u" * BIG, "w" * BIG)), Code.NOT_FOUND, "u"),
    ("100 kB fusion config mask path", "fusion.UpdateFusionConfig",
     lambda: fusion_pb2.UpdateFusionConfigRequest(
         config=fusion_pb2.FusionConfig(), update_mask=field_mask_pb2.FieldMask(paths=["f" * BIG])),
     Code.INVALID_ARGUMENT, "f"),
    ("100 kB scan names", "fusion.RunScan",
     lambda: fusion_pb2.RunScanRequest(names=["machines/" + "s" * BIG] * 20),
     Code.INVALID_ARGUMENT, "s"),
    ("100 kB metric name", "perf.ListMetrics",
     lambda: performance_pb2.ListMetricsRequest(metric_names=["x:y:" + "z" * BIG]),
     Code.INVALID_ARGUMENT, "z"),
    ("100 kB metric object", "perf.ListMetrics",
     lambda: performance_pb2.ListMetricsRequest(objects=["O" * BIG]), Code.INVALID_ARGUMENT, "O"),
]


@pytest.mark.parametrize(("call", "make_request", "code", "fill"),
                         [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_huge_input_gives_a_small_error(
    stubs: Stubs, call: str, make_request: Callable[[], Message], code: grpc.StatusCode, fill: str
) -> None:
    service, method = call.split(".")
    _fails(getattr(getattr(stubs, service), method), make_request(), code, fill)


def test_the_message_quotes_the_input_start_and_says_its_length(stubs: Stubs) -> None:
    status = _fails(stubs.machines.CreateMachine, _create("m5", adapter="Q" * BIG),
                    Code.INVALID_ARGUMENT, "Q")
    assert f"'{'Q' * errors.QUOTE_LIMIT}'... ({BIG} characters)" in status.message
    assert "known adapters: " in status.message  # what follows the quote survives


def test_huge_option_key_is_clipped_in_the_field_path(stubs: Stubs) -> None:
    status = _fails(stubs.machines.CreateMachine, _create("m6", options={"K" * BIG: "v"}),
                    Code.INVALID_ARGUMENT, "K")
    bad = error_details_pb2.BadRequest()
    assert any(d.Unpack(bad) for d in status.details)
    assert bad.field_violations[0].field == (
        f"machine.memory_source.options[{'K' * errors.QUOTE_LIMIT}...]")


@pytest.mark.parametrize(("adapter", "options", "code"), [
    ("memory", {"size": "Z" * BIG}, Code.INVALID_ARGUMENT),
    ("file", {"path": "/" + "Z" * BIG}, Code.PERMISSION_DENIED),
], ids=["memory size", "file path"])
def test_huge_option_value_fails_the_start_small(
    stubs: Stubs, adapter: str, options: dict[str, str], code: grpc.StatusCode
) -> None:
    machine_id = f"value-{adapter}"
    stubs.machines.CreateMachine(_create(machine_id, adapter=adapter, options=options))
    _fails(stubs.machines.StartMachine,
           machine_pb2.StartMachineRequest(name=f"machines/{machine_id}"), code, "Z")
    name = f"machines/{machine_id}"
    machine = stubs.machines.GetMachine(machine_pb2.GetMachineRequest(name=name))
    assert machine.state == machine_pb2.Machine.STATE_POWERED_OFF


def test_server_keeps_serving_after_huge_inputs(stubs: Stubs) -> None:
    listed = stubs.machines.ListMachines(machine_pb2.ListMachinesRequest())
    assert "machines/live" in [m.name for m in listed.machines]


# The safety net on its own: details no servicer builds today.

def test_safety_net_bounds_every_detail_field() -> None:
    huge = "h" * BIG
    details = [
        error_details_pb2.ErrorInfo(reason="R", domain=errors.DOMAIN,
                                    metadata={f"{i}{huge}": huge for i in range(50)}),
        error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=huge, description=huge)] * 500),
        error_details_pb2.ResourceInfo(resource_type=huge, resource_name=huge, owner=huge,
                                       description=huge),
        error_details_pb2.PreconditionFailure(violations=[
            error_details_pb2.PreconditionFailure.Violation(type=huge, subject=huge,
                                                            description=huge)]),
    ]
    status = errors.bounded_status(3, huge, details)
    assert status.ByteSize() <= errors.MAX_STATUS_BYTES
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info) and info.reason == "R"
    assert status.message.startswith("hhh") and status.message.endswith("...")


def test_safety_net_keeps_small_statuses_unchanged() -> None:
    info = error_details_pb2.ErrorInfo(reason="NOT_FOUND", domain=errors.DOMAIN,
                                       metadata={"resource": "machines/w10"})
    status = errors.bounded_status(5, "machines/w10 not found", [info])
    unpacked = error_details_pb2.ErrorInfo()
    assert status.message == "machines/w10 not found"
    assert status.details[0].Unpack(unpacked) and unpacked == info


def test_quote() -> None:
    assert errors.quote("abc") == "'abc'"
    assert errors.quote("x" * 129) == f"'{'x' * 128}'... (129 characters)"
    assert errors.clip("y" * 200) == "y" * 128 + "..."
