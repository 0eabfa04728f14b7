"""The servicer checks a source at CreateMachine and opens it at StartMachine
through the adapter gateway: one set of checks and messages for both."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from pagefusion.testing import write_lime
from pagefusion.v1 import machine_pb2 as pb

Code = grpc.StatusCode
State = pb.Machine.State


@pytest.mark.parametrize(("adapter", "options", "field", "says"), [
    ("", {}, "machine.memory_source.adapter", "required"),
    ("nope", {}, "machine.memory_source.adapter", "unknown adapter 'nope' (known adapters: "),
    ("memory", {"colour": "red"}, "machine.memory_source.options[colour]", "has no option"),
    ("file", {}, "machine.memory_source.options[path]", "option 'path' is required"),
    ("file", {"path": "rel/img"}, "machine.memory_source.options[path]", "absolute path"),
    ("file", {"path": "/x", "below_4g": "lots"}, "machine.memory_source.options[below_4g]",
     "below_4g"),
])
def test_create_checks_the_source(api, expect_failure, adapter, options, field, says) -> None:  # type: ignore[no-untyped-def]
    machine = pb.Machine(memory_source=pb.MemorySource(adapter=adapter, options=options))
    failure = expect_failure(api.machines.CreateMachine,
                             pb.CreateMachineRequest(machine_id="vm", machine=machine),
                             Code.INVALID_ARGUMENT)
    assert failure.field_violations() == [field]
    assert says in failure.message
    assert failure.reason == "INVALID_OPTION"


def test_update_checks_the_source_too(api, expect_failure) -> None:  # type: ignore[no-untyped-def]
    api.create("vm")
    machine = pb.Machine(name="machines/vm", memory_source=pb.MemorySource(adapter="file"))
    failure = expect_failure(api.machines.UpdateMachine,
                             pb.UpdateMachineRequest(machine=machine), Code.INVALID_ARGUMENT)
    assert failure.field_violations() == ["machine.memory_source.options[path]"]


def test_start_opens_through_the_gateway(api, expect_failure, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    allow = tmp_path / "images"  # the server fixture's --allow-path
    allow.mkdir(exist_ok=True)
    bad = write_lime(allow / "overlap.lime", ranges=[(0, b"x" * 8192), (4096, b"y" * 8192)])
    api.create("vm", adapter="file", options={"path": str(bad)})
    failure = expect_failure(api.machines.StartMachine, pb.StartMachineRequest(name="machines/vm"),
                             Code.INVALID_ARGUMENT)
    assert "overlap" in failure.message
    assert failure.reason == "INVALID_SOURCE"
    assert api.get("vm").state == State.STATE_POWERED_OFF
