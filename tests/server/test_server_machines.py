"""MachineService end to end: definitions, validation, lifecycle and states."""

from __future__ import annotations

import base64
import time

import grpc
import pytest
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2

from pagefusion.v1 import machine_pb2 as pb

Code = grpc.StatusCode
State = pb.Machine.State


def test_create_and_get_round_trip(api):
    created = api.create(
        "vm-1", display_name="Win 10", os_type="Windows10_64", memory_size_bytes=1 << 20,
        page_fusion_enabled=True,
    )
    assert created.name == "machines/vm-1"
    assert created.state == State.STATE_POWERED_OFF
    assert created.fusion_domain == "default"
    assert created.create_time.seconds > 0
    got = api.get("vm-1")
    assert got == created
    assert got.display_name == "Win 10"
    assert got.os_type == "Windows10_64"
    assert got.memory_size_bytes == 1 << 20
    assert got.page_fusion_enabled is True
    assert dict(got.memory_source.options) == {"size": "256KiB", "pattern": "mixed"}


@pytest.mark.parametrize("machine_id", ["", "Vm", "1vm", "vm_1", "vm.1", "a" * 64, "-vm"])
def test_create_rejects_invalid_ids(api, expect_failure, machine_id):
    request = pb.CreateMachineRequest(
        machine_id=machine_id, machine=pb.Machine(memory_source=pb.MemorySource(adapter="memory"))
    )
    failure = expect_failure(api.machines.CreateMachine, request, Code.INVALID_ARGUMENT)
    assert failure.field_violations() == ["machine_id"]
    assert failure.reason == "INVALID_ARGUMENT"


def test_create_accepts_longest_id(api):
    assert api.create("a" * 63).name == "machines/" + "a" * 63


def test_create_duplicate_is_already_exists(api, expect_failure):
    api.create("vm")
    request = pb.CreateMachineRequest(
        machine_id="vm", machine=pb.Machine(memory_source=pb.MemorySource(adapter="memory"))
    )
    failure = expect_failure(api.machines.CreateMachine, request, Code.ALREADY_EXISTS)
    assert failure.detail(error_details_pb2.ResourceInfo).resource_name == "machines/vm"


@pytest.mark.parametrize(
    ("source", "field"),
    [
        (pb.MemorySource(), "machine.memory_source.adapter"),
        (pb.MemorySource(adapter="no-such"), "machine.memory_source.adapter"),
        (pb.MemorySource(adapter="memory", options={"bogus": "1"}),
         "machine.memory_source.options[bogus]"),
    ],
)
def test_create_rejects_bad_memory_source(api, expect_failure, source, field):
    request = pb.CreateMachineRequest(machine_id="vm", machine=pb.Machine(memory_source=source))
    failure = expect_failure(api.machines.CreateMachine, request, Code.INVALID_ARGUMENT)
    assert failure.field_violations() == [field]


@pytest.mark.parametrize(
    ("machine", "field"),
    [
        (pb.Machine(memory_size_bytes=4097), "machine.memory_size_bytes"),
        (pb.Machine(fusion_domain="Bad Domain"), "machine.fusion_domain"),
        (pb.Machine(display_name="x" * 257), "machine.display_name"),
    ],
)
def test_create_rejects_bad_fields(api, expect_failure, machine, field):
    machine.memory_source.adapter = "memory"
    request = pb.CreateMachineRequest(machine_id="vm", machine=machine)
    failure = expect_failure(api.machines.CreateMachine, request, Code.INVALID_ARGUMENT)
    assert failure.field_violations() == [field]


def test_get_missing_is_not_found(api, expect_failure):
    failure = expect_failure(
        api.machines.GetMachine, pb.GetMachineRequest(name="machines/ghost"), Code.NOT_FOUND
    )
    info = failure.detail(error_details_pb2.ResourceInfo)
    assert info.resource_name == "machines/ghost"
    assert failure.reason == "NOT_FOUND"


@pytest.mark.parametrize("name", ["ghost", "vms/ghost", "machines/", "machines/Ghost"])
def test_get_malformed_name_is_invalid_argument(api, expect_failure, name):
    failure = expect_failure(
        api.machines.GetMachine, pb.GetMachineRequest(name=name), Code.INVALID_ARGUMENT
    )
    assert failure.field_violations() == ["name"]


def test_list_paginates_in_id_order(api):
    ids = [f"vm-{i}" for i in range(7)]
    for machine_id in reversed(ids):
        api.create(machine_id)
    seen, token, pages = [], "", 0
    while True:
        response = api.machines.ListMachines(pb.ListMachinesRequest(page_size=3, page_token=token))
        seen += [m.name for m in response.machines]
        pages += 1
        token = response.next_page_token
        if not token:
            break
    assert seen == [f"machines/{i}" for i in sorted(ids)]
    assert pages == 3


def test_list_default_page_size_is_50(api):
    for i in range(51):
        api.create(f"vm-{i:02d}")
    first = api.machines.ListMachines(pb.ListMachinesRequest())
    assert len(first.machines) == 50
    assert first.next_page_token
    rest = api.machines.ListMachines(pb.ListMachinesRequest(page_token=first.next_page_token))
    assert [m.name for m in rest.machines] == ["machines/vm-50"]
    assert rest.next_page_token == ""


def test_list_empty(api):
    response = api.machines.ListMachines(pb.ListMachinesRequest())
    assert list(response.machines) == [] and response.next_page_token == ""


@pytest.mark.parametrize(
    "token", ["%%%", base64.urlsafe_b64encode(b"Not An Id").decode(), "bm90LWEtdG9rZW4-"]
)
def test_list_invalid_page_token(api, expect_failure, token):
    failure = expect_failure(
        api.machines.ListMachines, pb.ListMachinesRequest(page_token=token), Code.INVALID_ARGUMENT
    )
    assert failure.field_violations() == ["page_token"]


def test_list_negative_page_size(api, expect_failure):
    failure = expect_failure(
        api.machines.ListMachines, pb.ListMachinesRequest(page_size=-1), Code.INVALID_ARGUMENT
    )
    assert failure.field_violations() == ["page_size"]


def _update(api, machine, *paths):
    return api.machines.UpdateMachine(
        pb.UpdateMachineRequest(machine=machine, update_mask=field_mask_pb2.FieldMask(paths=paths))
    )


def test_update_honours_mask(api):
    api.create("vm", display_name="old", os_type="Linux_64")
    patch = pb.Machine(name="machines/vm", display_name="new", os_type="Windows7_64")
    updated = _update(api, patch, "display_name")
    assert updated.display_name == "new"
    assert updated.os_type == "Linux_64"  # not in the mask
    assert updated.memory_source.adapter == "memory"
    assert api.get("vm") == updated


def test_update_empty_mask_replaces_mutable_fields(api):
    created = api.create("vm", display_name="old", page_fusion_enabled=True)
    patch = pb.Machine(
        name="machines/vm", display_name="new",
        memory_source=pb.MemorySource(adapter="memory", options={"size": "64KiB"}),
    )
    updated = _update(api, patch)
    assert updated.display_name == "new"
    assert updated.page_fusion_enabled is False
    assert updated.fusion_domain == "default"
    assert dict(updated.memory_source.options) == {"size": "64KiB"}
    assert updated.create_time == created.create_time  # output only


def test_update_ignores_output_only_paths(api):
    created = api.create("vm")
    patch = pb.Machine(name="machines/vm", state=State.STATE_RUNNING, display_name="x")
    updated = _update(api, patch, "state", "create_time", "display_name")
    assert updated.state == State.STATE_POWERED_OFF
    assert updated.create_time == created.create_time
    assert updated.display_name == "x"


def test_update_unknown_path(api, expect_failure):
    api.create("vm")
    request = pb.UpdateMachineRequest(
        machine=pb.Machine(name="machines/vm"),
        update_mask=field_mask_pb2.FieldMask(paths=["cpu_count"]),
    )
    failure = expect_failure(api.machines.UpdateMachine, request, Code.INVALID_ARGUMENT)
    assert failure.field_violations() == ["update_mask"]


def test_update_missing_machine(api, expect_failure):
    request = pb.UpdateMachineRequest(
        machine=pb.Machine(name="machines/ghost", display_name="x"),
        update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
    )
    expect_failure(api.machines.UpdateMachine, request, Code.NOT_FOUND)


def test_update_validates_result(api, expect_failure):
    api.create("vm")
    request = pb.UpdateMachineRequest(
        machine=pb.Machine(name="machines/vm", memory_source=pb.MemorySource(adapter="nope")),
        update_mask=field_mask_pb2.FieldMask(paths=["memory_source"]),
    )
    failure = expect_failure(api.machines.UpdateMachine, request, Code.INVALID_ARGUMENT)
    assert failure.field_violations() == ["machine.memory_source.adapter"]
    assert api.get("vm").memory_source.adapter == "memory"


@pytest.mark.parametrize(
    ("field", "value"), [("page_fusion_enabled", True), ("fusion_domain", "other")]
)
def test_update_fusion_fields_only_while_powered_off(api, expect_failure, field, value):
    api.create("vm")
    api.start("vm")
    patch = pb.Machine(name="machines/vm", **{field: value})
    request = pb.UpdateMachineRequest(
        machine=patch, update_mask=field_mask_pb2.FieldMask(paths=[field])
    )
    failure = expect_failure(api.machines.UpdateMachine, request, Code.FAILED_PRECONDITION)
    (violation,) = failure.detail(error_details_pb2.PreconditionFailure).violations
    assert violation.type == "STATE"
    assert violation.subject == "machines/vm"
    assert field in violation.description
    # Other fields may change while running; powered off, the fusion ones may too.
    assert _update(api, pb.Machine(name="machines/vm", display_name="d"), "display_name")
    api.stop("vm")
    assert getattr(_update(api, patch, field), field) == value


def test_delete_only_while_powered_off(api, expect_failure):
    api.create("vm")
    api.start("vm")
    failure = expect_failure(
        api.machines.DeleteMachine, pb.DeleteMachineRequest(name="machines/vm"),
        Code.FAILED_PRECONDITION,
    )
    assert failure.detail(error_details_pb2.PreconditionFailure).violations[0].subject == (
        "machines/vm"
    )
    api.stop("vm")
    api.machines.DeleteMachine(pb.DeleteMachineRequest(name="machines/vm"))
    expect_failure(api.machines.GetMachine, pb.GetMachineRequest(name="machines/vm"),
                   Code.NOT_FOUND)
    api.create("vm")  # the id is free again


def test_delete_missing(api, expect_failure):
    expect_failure(
        api.machines.DeleteMachine, pb.DeleteMachineRequest(name="machines/ghost"), Code.NOT_FOUND
    )


def test_start_and_stop(api):
    api.create("vm", page_fusion_enabled=True)
    started = api.start("vm")
    assert started.state == State.STATE_RUNNING
    assert api.get("vm").state == State.STATE_RUNNING
    stopped = api.stop("vm")
    assert stopped.state == State.STATE_POWERED_OFF
    assert api.start("vm").state == State.STATE_RUNNING  # restartable


def test_start_twice_and_stop_twice_fail(api, expect_failure):
    api.create("vm")
    api.start("vm")
    failure = expect_failure(
        api.machines.StartMachine, pb.StartMachineRequest(name="machines/vm"),
        Code.FAILED_PRECONDITION,
    )
    assert "STATE_RUNNING" in failure.message
    api.stop("vm")
    failure = expect_failure(
        api.machines.StopMachine, pb.StopMachineRequest(name="machines/vm"),
        Code.FAILED_PRECONDITION,
    )
    assert failure.detail(error_details_pb2.PreconditionFailure).violations[0].type == "STATE"


def test_start_stop_missing(api, expect_failure):
    expect_failure(api.machines.StartMachine, pb.StartMachineRequest(name="machines/ghost"),
                   Code.NOT_FOUND)
    expect_failure(api.machines.StopMachine, pb.StopMachineRequest(name="machines/ghost"),
                   Code.NOT_FOUND)


def test_starting_is_visible_while_loading(api, gate_adapter, expect_failure):
    api.create("vm", adapter="gate", options={"block": "read"})
    future = api.machines.StartMachine.future(pb.StartMachineRequest(name="machines/vm"))
    assert gate_adapter.gate.entered.wait(30)
    assert api.get("vm").state == State.STATE_STARTING
    expect_failure(api.machines.DeleteMachine, pb.DeleteMachineRequest(name="machines/vm"),
                   Code.FAILED_PRECONDITION)
    expect_failure(api.machines.StartMachine, pb.StartMachineRequest(name="machines/vm"),
                   Code.FAILED_PRECONDITION)
    gate_adapter.gate.release.set()
    assert future.result(30).state == State.STATE_RUNNING
    assert api.get("vm").state == State.STATE_RUNNING


def test_stopping_is_visible_while_releasing(api, gate_adapter):
    api.create("vm", adapter="gate", options={"block": "close"})
    api.start("vm")
    future = api.machines.StopMachine.future(pb.StopMachineRequest(name="machines/vm"))
    assert gate_adapter.gate.entered.wait(30)
    assert api.get("vm").state == State.STATE_STOPPING
    gate_adapter.gate.release.set()
    assert future.result(30).state == State.STATE_POWERED_OFF


def test_failed_start_leaves_machine_powered_off(api, expect_failure):
    api.create("vm", adapter="gate", options={"fail": "true"})
    failure = expect_failure(
        api.machines.StartMachine, pb.StartMachineRequest(name="machines/vm"),
        Code.FAILED_PRECONDITION,
    )
    assert "failed on purpose" in failure.message
    assert failure.detail(error_details_pb2.PreconditionFailure).violations[0].subject == (
        "machines/vm"
    )
    assert api.get("vm").state == State.STATE_POWERED_OFF


def test_start_with_bad_option_value_names_the_option(api, expect_failure):
    api.create("vm", options={"size": "lots"})
    failure = expect_failure(
        api.machines.StartMachine, pb.StartMachineRequest(name="machines/vm"),
        Code.INVALID_ARGUMENT,
    )
    assert failure.field_violations() == ["machine.memory_source.options[size]"]
    assert failure.reason == "INVALID_OPTION"
    assert api.get("vm").state == State.STATE_POWERED_OFF


def test_start_file_outside_allow_path_is_permission_denied(api, expect_failure, tmp_path):
    image = tmp_path / "elsewhere.raw"
    image.write_bytes(bytes(8192))
    api.create("vm", adapter="file", options={"path": str(image)})
    failure = expect_failure(
        api.machines.StartMachine, pb.StartMachineRequest(name="machines/vm"),
        Code.PERMISSION_DENIED,
    )
    assert failure.reason == "PATH_NOT_ALLOWED"
    assert api.get("vm").state == State.STATE_POWERED_OFF


def test_start_missing_file_is_not_found(api, expect_failure, tmp_path):
    (tmp_path / "images").mkdir()
    api.create("vm", adapter="file", options={"path": str(tmp_path / "images" / "none.raw")})
    failure = expect_failure(
        api.machines.StartMachine, pb.StartMachineRequest(name="machines/vm"), Code.NOT_FOUND
    )
    assert failure.reason == "SOURCE_NOT_FOUND"


def test_start_file_under_allow_path(api, tmp_path):
    (tmp_path / "images").mkdir()
    image = tmp_path / "images" / "vm.raw"
    image.write_bytes(bytes(4096) + b"\x01" * 4096)
    api.create("vm", adapter="file", options={"path": str(image)})
    assert api.start("vm").state == State.STATE_RUNNING


def test_pool_budget_is_resource_exhausted(make_server, api_for, expect_failure):
    api = api_for(make_server(max_pool_bytes=64 * 4096))
    api.create("vm", options={"size": "4MiB", "pattern": "random"})
    failure = expect_failure(
        api.machines.StartMachine, pb.StartMachineRequest(name="machines/vm"),
        Code.RESOURCE_EXHAUSTED,
    )
    assert failure.reason == "POOL_BUDGET_EXHAUSTED"
    assert api.get("vm").state == State.STATE_POWERED_OFF


def test_list_page_size_is_capped_at_1000(api):
    for i in range(1001):
        api.create(f"vm-{i:04d}")
    page = api.machines.ListMachines(pb.ListMachinesRequest(page_size=5000))
    assert len(page.machines) == 1000
    rest = api.machines.ListMachines(
        pb.ListMachinesRequest(page_size=5000, page_token=page.next_page_token)
    )
    assert [m.name for m in rest.machines] == ["machines/vm-1000"]


def test_start_finishes_when_the_caller_gives_up(api, gate_adapter):
    api.create("vm", adapter="gate", options={"block": "read"})
    future = api.machines.StartMachine.future(pb.StartMachineRequest(name="machines/vm"))
    assert gate_adapter.gate.entered.wait(30)
    future.cancel()
    gate_adapter.gate.release.set()
    deadline = time.monotonic() + 30
    while api.get("vm").state == State.STATE_STARTING and time.monotonic() < deadline:
        time.sleep(0.01)  # waiting for the server to finish, not asserting on time
    assert api.get("vm").state == State.STATE_RUNNING
    assert api.stop("vm").state == State.STATE_POWERED_OFF


def test_create_refuses_the_reserved_id_host(api, expect_failure):
    from pagefusion.v1 import machine_pb2

    failure = expect_failure(
        api.machines.CreateMachine,
        machine_pb2.CreateMachineRequest(machine_id="host", machine=machine_pb2.Machine()),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert failure.field_violations() == ["machine_id"]


def test_long_starts_log_their_progress_by_quarters():
    from structlog.testing import capture_logs

    from pagefusion.server.machines import _progress_logger

    total = (1 << 30) // 4096
    progress = _progress_logger("big")
    with capture_logs() as logs:
        for done in range(0, total + 1, total // 16):
            progress(done, total)
    loading = [e for e in logs if e["event"] == "machine_loading"]
    assert [e["pages_done"] * 4 // total for e in loading] == [1, 2, 3]
    small = _progress_logger("small")
    with capture_logs() as logs:
        small(10, 20)
    assert logs == []
