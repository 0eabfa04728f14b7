"""An outside client that knows nothing but server reflection, as grpcurl does.

Messages are built from descriptors fetched over the wire (in a pool of
their own, not the generated code) and calls go by method path.
"""

from __future__ import annotations

from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def _caller(channel, pool, service: str, method: str):
    descriptor = pool.FindServiceByName(service).FindMethodByName(method)
    request_class = message_factory.GetMessageClass(descriptor.input_type)
    response_class = message_factory.GetMessageClass(descriptor.output_type)
    stub = channel.unary_unary(
        f"/{service}/{method}",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=response_class.FromString,
    )

    def call(body: dict):
        request = json_format.ParseDict(body, request_class())
        return json_format.MessageToDict(stub(request), preserving_proto_field_name=True)

    return call


def test_a_reflection_only_client_drives_the_whole_story(api):
    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(api.channel))
    machines = "pagefusion.v1.MachineService"
    for machine_id, seed in [("win-a", "1"), ("win-b", "2")]:
        created = _caller(api.channel, pool, machines, "CreateMachine")(
            {
                "machine_id": machine_id,
                "machine": {
                    "memory_size_bytes": str(64 << 20),
                    "os_type": "Windows10_64",
                    "page_fusion_enabled": True,
                    "memory_source": {"adapter": "synthetic-windows", "options": {"seed": seed}},
                },
            }
        )
        assert created["state"] == "STATE_POWERED_OFF"
        started = _caller(api.channel, pool, machines, "StartMachine")(
            {"name": f"machines/{machine_id}"}
        )
        assert started["state"] == "STATE_RUNNING"
    stats = _caller(api.channel, pool, "pagefusion.v1.FusionService", "GetFusionStats")({})
    host = {k: int(v) for k, v in stats["host"].items()}
    assert host["guest_pages"] == 2 * (64 << 20) // 4096
    assert host["guest_pages"] == host["frames_used"] + host["pages_saved"] + host["zero_pages"]
    assert host["pages_saved"] > 0
    page = _caller(api.channel, pool, "pagefusion.v1.GuestMemoryService", "GetPageInfo")(
        {"name": "machines/win-a", "address": "0"}
    )
    assert page["state"].startswith("PAGE_STATE_")
    listed = _caller(api.channel, pool, machines, "ListMachines")({"page_size": 1})
    assert len(listed["machines"]) == 1 and listed["next_page_token"]
