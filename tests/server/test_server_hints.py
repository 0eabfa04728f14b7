"""The hint path over gRPC: VirtualBox's shared modules on synthetic Windows guests."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import field_mask_pb2

from pagefusion.v1 import fusion_pb2
from pagefusion.v1 import guest_memory_pb2 as pb

Code = grpc.StatusCode
MiB = 1 << 20


def _modules(api, name):
    return list(api.guest.ListGuestModules(pb.ListGuestModulesRequest(name=name)).modules)


def _register(api, name, module):
    api.guest.RegisterSharedModule(pb.RegisterSharedModuleRequest(name=name, module=module))


def _check(api, name):
    return api.guest.CheckSharedModules(pb.CheckSharedModulesRequest(name=name))


def _set_mode(api, mode):
    api.fusion.UpdateFusionConfig(
        fusion_pb2.UpdateFusionConfigRequest(
            config=fusion_pb2.FusionConfig(mode=mode),
            update_mask=field_mask_pb2.FieldMask(paths=["mode"]),
        )
    )


@pytest.fixture
def guests(api):
    """Two Windows 10 guests (different seeds: different ASLR bases), hints only."""
    _set_mode(api, fusion_pb2.FUSION_MODE_HINTS)
    for i, machine_id in enumerate(["win-a", "win-b"]):
        api.create(
            machine_id,
            adapter="synthetic-windows",
            options={"profile": "Windows10_64", "seed": str(10 + i)},
            memory_size_bytes=256 * MiB,
            page_fusion_enabled=True,
        )
        api.start(machine_id)
    return ["machines/win-a", "machines/win-b"]


def test_agent_cycle_fuses_module_pages_by_position(api, guests):
    a, b = guests
    assert api.guest.GetPageSharingStatus(pb.GetPageSharingStatusRequest(name=a)).enabled
    mods_a, mods_b = _modules(api, a), _modules(api, b)
    assert mods_a and len(mods_a) == len(mods_b)
    assert {m.module_name for m in mods_a} >= {"ntoskrnl.exe", "ntdll.dll"}
    # ASLR: the same modules load at different bases in the two guests.
    assert {m.base_address for m in mods_a} != {m.base_address for m in mods_b}
    stats = api.fusion.GetFusionStats(fusion_pb2.GetFusionStatsRequest())
    assert stats.host.pages_saved == 0  # hints mode: nothing fused at ingest
    for m in mods_a:
        _register(api, a, m)
    for m in mods_b:
        _register(api, b, m)
    first = _check(api, a)
    assert first.pages_checked > 0 and first.pages_fused == 0  # a provides the canonical pages
    second = _check(api, b)
    # Fixup pages differ between the guests and stay private.
    assert 0 < second.pages_fused < second.pages_checked
    stats = api.fusion.GetFusionStats(fusion_pb2.GetFusionStatsRequest())
    assert stats.host.pages_saved == second.pages_fused
    assert _check(api, b).pages_fused == 0  # nothing left to fuse


def test_register_errors_have_precise_codes(api, guests, expect_failure):
    a, _ = guests
    module = _modules(api, a)[0]
    _register(api, a, module)
    request = pb.RegisterSharedModuleRequest(name=a, module=module)
    failure = expect_failure(api.guest.RegisterSharedModule, request, Code.ALREADY_EXISTS)
    assert failure.reason == "MODULE_ALREADY_REGISTERED"
    clash = pb.SharedModule()
    clash.CopyFrom(module)
    clash.module_name = "other.dll"
    failure = expect_failure(
        api.guest.RegisterSharedModule,
        pb.RegisterSharedModuleRequest(name=a, module=clash),
        Code.FAILED_PRECONDITION,
    )
    assert failure.reason == "MODULE_ADDRESS_CLASH"
    for change, field in [
        (lambda m: setattr(m, "module_name", "x" * 128), "module.module_name"),
        (lambda m: setattr(m, "version", "v" * 16), "module.version"),
        (lambda m: setattr(m, "module_size", (1 << 30) + 1), "module.module_size"),
        (lambda m: m.regions.extend([m.regions[0]] * 33), "module.regions"),
    ]:
        bad = pb.SharedModule()
        bad.CopyFrom(module)
        bad.base_address += 0x10000000
        change(bad)
        failure = expect_failure(
            api.guest.RegisterSharedModule,
            pb.RegisterSharedModuleRequest(name=a, module=bad),
            Code.INVALID_ARGUMENT,
        )
        assert failure.field_violations() == [field]
    outside = pb.SharedModule()
    outside.CopyFrom(module)
    outside.base_address += 0x20000000
    outside.regions[0].address = 1 << 40
    failure = expect_failure(
        api.guest.RegisterSharedModule,
        pb.RegisterSharedModuleRequest(name=a, module=outside),
        Code.OUT_OF_RANGE,
    )
    unknown = pb.SharedModule()
    unknown.CopyFrom(module)
    unknown.base_address += 0x30000000
    expect_failure(
        api.guest.UnregisterSharedModule,
        pb.UnregisterSharedModuleRequest(name=a, module=unknown),
        Code.NOT_FOUND,
    )
    api.guest.UnregisterSharedModule(pb.UnregisterSharedModuleRequest(name=a, module=module))
    _register(api, a, module)  # registrable again once gone


def test_page_fusion_off_and_stopped_machines(api, expect_failure):
    api.create(
        "plain",
        adapter="synthetic-windows",
        options={"profile": "WindowsXP", "seed": "1"},
        memory_size_bytes=64 * MiB,
        page_fusion_enabled=False,
    )
    api.start("plain")
    name = "machines/plain"
    assert not api.guest.GetPageSharingStatus(pb.GetPageSharingStatusRequest(name=name)).enabled
    module = _modules(api, name)[0]
    failure = expect_failure(
        api.guest.RegisterSharedModule,
        pb.RegisterSharedModuleRequest(name=name, module=module),
        Code.FAILED_PRECONDITION,
    )
    assert failure.reason == "PAGE_FUSION_DISABLED"
    expect_failure(
        api.guest.CheckSharedModules,
        pb.CheckSharedModulesRequest(name=name),
        Code.FAILED_PRECONDITION,
    )
    api.stop("plain")
    expect_failure(
        api.guest.ListGuestModules, pb.ListGuestModulesRequest(name=name), Code.FAILED_PRECONDITION
    )
    expect_failure(
        api.guest.CheckSharedModules,
        pb.CheckSharedModulesRequest(name="machines/nope"),
        Code.NOT_FOUND,
    )
