"""What every client relies on: reflection, health, logging, errors, shutdown."""

from __future__ import annotations

import grpc
import pytest
import structlog
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from pagefusion.v1 import machine_pb2

Code = grpc.StatusCode
SERVICES = {
    "pagefusion.v1.MachineService",
    "pagefusion.v1.GuestMemoryService",
    "pagefusion.v1.FusionService",
    "pagefusion.v1.PerformanceService",
}


def test_reflection_lists_and_describes_services(api):
    database = ProtoReflectionDescriptorDatabase(api.channel)
    services = set(database.get_services())
    assert services >= SERVICES
    assert "grpc.health.v1.Health" in services
    pool = descriptor_pool.DescriptorPool(database)
    machines = pool.FindServiceByName("pagefusion.v1.MachineService")
    assert {m.name for m in machines.methods} == {
        "CreateMachine", "GetMachine", "ListMachines", "UpdateMachine", "DeleteMachine",
        "StartMachine", "StopMachine",
    }
    machine = pool.FindMessageTypeByName("pagefusion.v1.Machine")
    assert {f.name for f in machine.fields} >= {
        "name", "display_name", "memory_size_bytes", "os_type", "page_fusion_enabled",
        "fusion_domain", "memory_source", "state", "create_time",
    }
    page_state = pool.FindEnumTypeByName("pagefusion.v1.PageState")
    assert [v.name for v in page_state.values] == [
        "PAGE_STATE_UNSPECIFIED", "PAGE_STATE_UNMAPPED", "PAGE_STATE_ZERO",
        "PAGE_STATE_PRIVATE", "PAGE_STATE_SHARED",
    ]


@pytest.mark.parametrize("service", ["", *sorted(SERVICES)])
def test_health_is_serving(api, service):
    response = api.health.Check(health_pb2.HealthCheckRequest(service=service))
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_one_log_line_per_rpc_with_request_id(api):
    with structlog.testing.capture_logs() as logs:
        with pytest.raises(grpc.RpcError):
            api.machines.GetMachine(
                machine_pb2.GetMachineRequest(name="machines/ghost"),
                metadata=[("x-request-id", "r-7")],
            )
        api.machines.ListMachines(machine_pb2.ListMachinesRequest())
    rpcs = [e for e in logs if e["event"] == "rpc"]
    assert [(e["method"], e["code"]) for e in rpcs] == [
        ("/pagefusion.v1.MachineService/GetMachine", "NOT_FOUND"),
        ("/pagefusion.v1.MachineService/ListMachines", "OK"),
    ]
    assert rpcs[0]["request_id"] == "r-7"
    assert rpcs[1]["request_id"] and rpcs[1]["request_id"] != "r-7"  # minted
    assert all(e["duration_ms"] >= 0 for e in rpcs)


def test_unexpected_errors_are_internal_without_traceback(api, expect_failure):
    api.create("vm", adapter="gate", options={"crash": "true"})
    with structlog.testing.capture_logs() as logs:
        failure = expect_failure(
            api.machines.StartMachine, machine_pb2.StartMachineRequest(name="machines/vm"),
            Code.INTERNAL,
        )
    assert "Traceback" not in failure.message
    assert "adapter bug" not in failure.message
    assert failure.reason == "INTERNAL"
    assert any(e["event"] == "internal_error" for e in logs)  # the traceback goes to the log
    assert api.get("vm").state == machine_pb2.Machine.STATE_POWERED_OFF


def test_graceful_shutdown(make_server, api_for, gate_adapter, expect_failure):
    server = make_server()
    api = api_for(server)
    api.create("vm", adapter="gate", options={"block": "read"})
    in_flight = api.machines.StartMachine.future(
        machine_pb2.StartMachineRequest(name="machines/vm")
    )
    assert gate_adapter.gate.entered.wait(30)
    watch = api.health.Watch(health_pb2.HealthCheckRequest(service=""))
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    stopping = server.submit(server.server.stop(30))
    assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
    watch.cancel()  # an open stream would hold the shutdown for the whole grace period
    gate_adapter.gate.release.set()
    assert in_flight.result(30).state == machine_pb2.Machine.STATE_RUNNING  # allowed to finish
    stopping.result(30)
    server.stopped = True
    expect_failure(api.machines.ListMachines, machine_pb2.ListMachinesRequest(), Code.UNAVAILABLE)


def test_second_server_on_same_data_dir_is_refused(make_server, tmp_path):
    make_server()
    with pytest.raises(OSError, match="in use by another pagefusion-server"):
        make_server(data_dir=tmp_path / "data")


def test_a_method_the_server_does_not_serve_is_unimplemented(
    make_server, api_for, expect_failure, monkeypatch
):
    # The generated base class answers for a servicer method that is missing.
    from pagefusion.server.fusion import FusionServicer
    from pagefusion.v1 import fusion_pb2

    monkeypatch.delattr(FusionServicer, "VerifyFusion")
    api = api_for(make_server())
    failure = expect_failure(
        api.fusion.VerifyFusion, fusion_pb2.VerifyFusionRequest(), Code.UNIMPLEMENTED
    )
    assert "VerifyFusion" in failure.message
