"""Machine.load_progress: what another caller sees while a machine starts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from google.protobuf import field_mask_pb2

from pagefusion.adapters.base import PAGE_SIZE, AdapterContext, GuestMemory, MemoryRange
from pagefusion.v1 import machine_pb2 as pb

State = pb.Machine.State
HIGH = 1 << 20  # the second range's address


class Halfway:
    """Where sources of the ``gate`` adapter wait: at the second range (HIGH) or at 0."""

    def __init__(self, gate: Any) -> None:  # conftest's Gate
        self.gate = gate
        self.block_at = HIGH


class HalfwayMemory(GuestMemory):
    """Two ranges of 4 distinct pages; the read at ``block_at`` waits at the gate.

    The engine reads (and reports progress) range by range, so while the gate
    holds at the second range, the first half has been read and reported:
    progress is exactly 1/2.
    """

    def __init__(self, halfway: Halfway) -> None:
        self._halfway = halfway

    def ranges(self) -> Sequence[MemoryRange]:
        return (MemoryRange(0, 4 * PAGE_SIZE), MemoryRange(HIGH, 4 * PAGE_SIZE))

    def read(self, address: int, length: int) -> bytes:
        if address == self._halfway.block_at:
            self._halfway.gate.hold()
        first = address // PAGE_SIZE
        return b"".join(
            (first + n + 1).to_bytes(8, "little") + bytes(PAGE_SIZE - 8)
            for n in range(length // PAGE_SIZE)
        )


@pytest.fixture
def halfway(gate_adapter, monkeypatch):
    """The server's ``gate`` adapter, opening :class:`HalfwayMemory` instead."""
    state = Halfway(gate_adapter.gate)

    def open_halfway(options: Mapping[str, str], context: AdapterContext) -> GuestMemory:
        return HalfwayMemory(state)

    monkeypatch.setattr(gate_adapter, "open", open_halfway)
    return state


def test_another_caller_sees_load_progress_during_a_start(server, api, api_for, halfway):
    api.create("vm", adapter="gate", options={})
    assert api.get("vm").load_progress == 0.0  # powered off
    future = api.machines.StartMachine.future(pb.StartMachineRequest(name="machines/vm"))
    assert halfway.gate.entered.wait(30)
    other = api_for(server)  # a second channel, as `pagefusion startvm`'s poller is
    seen = other.get("vm")
    assert seen.state == State.STATE_STARTING
    assert 0 < seen.load_progress < 1
    assert seen.load_progress == 0.5  # the first of two equal ranges is in
    listed = other.machines.ListMachines(pb.ListMachinesRequest()).machines
    assert [(m.name, m.load_progress) for m in listed] == [("machines/vm", 0.5)]
    halfway.gate.release.set()
    started = future.result(30)
    assert (started.state, started.load_progress) == (State.STATE_RUNNING, 1.0)
    assert other.get("vm").load_progress == 1.0
    stopped = api.stop("vm")
    assert (stopped.state, stopped.load_progress) == (State.STATE_POWERED_OFF, 0.0)


def test_a_new_start_begins_at_zero(api, halfway):
    """Progress left from an earlier start never shows at the next one's beginning."""
    api.create("vm", adapter="gate", options={})
    gate = halfway.gate
    future = api.machines.StartMachine.future(pb.StartMachineRequest(name="machines/vm"))
    assert gate.entered.wait(30)
    assert api.get("vm").load_progress == 0.5
    gate.release.set()
    assert future.result(30).load_progress == 1.0
    api.stop("vm")
    gate.release.clear()
    gate.entered.clear()
    halfway.block_at = 0  # this time the very first read waits
    future = api.machines.StartMachine.future(pb.StartMachineRequest(name="machines/vm"))
    assert gate.entered.wait(30)
    machine = api.get("vm")
    assert (machine.state, machine.load_progress) == (State.STATE_STARTING, 0.0)
    gate.release.set()
    assert future.result(30).load_progress == 1.0


def test_load_progress_is_output_only(api):
    created = api.machines.CreateMachine(
        pb.CreateMachineRequest(
            machine_id="vm",
            machine=pb.Machine(
                load_progress=0.7,
                memory_source=pb.MemorySource(adapter="memory", options={"size": "64KiB"}),
            ),
        )
    )
    assert created.load_progress == 0.0
    updated = api.machines.UpdateMachine(
        pb.UpdateMachineRequest(
            machine=pb.Machine(name="machines/vm", load_progress=0.3, display_name="x"),
            update_mask=field_mask_pb2.FieldMask(paths=["load_progress", "display_name"]),
        )
    )
    assert (updated.display_name, updated.load_progress) == ("x", 0.0)
    assert api.start("vm").load_progress == 1.0
