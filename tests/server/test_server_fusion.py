"""FusionService end to end: configuration, scans and accounting."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from google.protobuf import field_mask_pb2

from pagefusion.adapters.memory import InMemoryGuestMemory, register_image, unregister_image
from pagefusion.v1 import fusion_pb2 as pb
from pagefusion.v1 import machine_pb2

Code = grpc.StatusCode
PAGE = 4096


def _update(api, config, *paths):
    return api.fusion.UpdateFusionConfig(
        pb.UpdateFusionConfigRequest(
            config=config, update_mask=field_mask_pb2.FieldMask(paths=paths)
        )
    )


def test_default_config(api):
    config = api.fusion.GetFusionConfig(pb.GetFusionConfigRequest())
    assert config.mode == pb.FUSION_MODE_ALL
    assert config.pages_per_second > 0
    assert config.background_scan is False


def test_update_config_honours_mask(api):
    before = api.fusion.GetFusionConfig(pb.GetFusionConfigRequest())
    after = _update(api, pb.FusionConfig(mode=pb.FUSION_MODE_HINTS, pages_per_second=5), "mode")
    assert after.mode == pb.FUSION_MODE_HINTS
    assert after.pages_per_second == before.pages_per_second
    assert api.fusion.GetFusionConfig(pb.GetFusionConfigRequest()) == after


def test_update_config_empty_mask_sets_all(api):
    config = pb.FusionConfig(
        mode=pb.FUSION_MODE_CONTENT, background_scan=False, pages_per_second=123,
        stable_scans_before_merge=3,
    )
    assert _update(api, config) == config
    assert api.fusion.GetFusionConfig(pb.GetFusionConfigRequest()) == config


@pytest.mark.parametrize(
    ("config", "paths", "field"),
    [
        (pb.FusionConfig(mode=pb.FUSION_MODE_UNSPECIFIED), ["mode"], "config.mode"),
        (pb.FusionConfig(mode=17), ["mode"], "config.mode"),
        (pb.FusionConfig(pages_per_second=0), ["pages_per_second"], "config.pages_per_second"),
        (pb.FusionConfig(), [], "config.mode"),
        (pb.FusionConfig(), ["speed"], "update_mask"),
    ],
)
def test_update_config_rejects_invalid(api, expect_failure, config, paths, field):
    before = api.fusion.GetFusionConfig(pb.GetFusionConfigRequest())
    request = pb.UpdateFusionConfigRequest(
        config=config, update_mask=field_mask_pb2.FieldMask(paths=paths)
    )
    failure = expect_failure(api.fusion.UpdateFusionConfig, request, Code.INVALID_ARGUMENT)
    assert failure.field_violations() == [field]
    assert api.fusion.GetFusionConfig(pb.GetFusionConfigRequest()) == before


def test_config_and_machines_survive_restart(make_server, api_for):
    first = make_server()
    api = api_for(first)
    api.create("vm", page_fusion_enabled=True, display_name="keep me")
    api.start("vm")
    config = _update(api, pb.FusionConfig(mode=pb.FUSION_MODE_CONTENT), "mode")
    first.stop()
    second = api_for(make_server())
    assert second.fusion.GetFusionConfig(pb.GetFusionConfigRequest()) == config
    machine = second.get("vm")
    assert machine.display_name == "keep me"
    assert machine.page_fusion_enabled is True
    assert machine.state == machine_pb2.Machine.STATE_POWERED_OFF


@pytest.fixture
def twins():
    """Two identical 64-page images with 16 zero pages each; the first is live."""
    rng = np.random.default_rng(5)
    data = rng.integers(1, 256, 64 * PAGE, dtype=np.uint8)
    data[: 16 * PAGE] = 0
    live = InMemoryGuestMemory([(0, data)], live=True)
    register_image("twin-a", live)
    register_image("twin-b", InMemoryGuestMemory([(0, data)]))
    yield live
    unregister_image("twin-a")
    unregister_image("twin-b")


def _stats(api):
    return api.fusion.GetFusionStats(pb.GetFusionStatsRequest())


def test_stats_count_fusion_between_machines(api, twins):
    api.create("b", options={"image": "twin-b"}, page_fusion_enabled=True)
    api.create("a", options={"image": "twin-a"}, page_fusion_enabled=True)
    api.create("c", options={"image": "twin-b"}, page_fusion_enabled=True, fusion_domain="other")
    for machine_id in ("a", "b", "c"):
        api.start(machine_id)
    stats = _stats(api)
    host = stats.host
    assert [m.name for m in stats.machines] == ["machines/a", "machines/b", "machines/c"]
    assert host.guest_pages == 3 * 64
    assert host.zero_pages == 3 * 16
    assert host.pages_saved == 48  # a and b share; c is in another domain
    assert host.frames_used == 2 * 48
    assert host.guest_pages == host.frames_used + host.pages_saved + host.zero_pages
    a, b, c = stats.machines
    assert (a.shared_pages, b.shared_pages, c.shared_pages) == (48, 48, 0)
    assert c.private_pages == 48
    assert a.guest_pages == a.zero_pages + a.private_pages + a.shared_pages


def test_stats_without_page_fusion(api, twins):
    api.create("a", options={"image": "twin-a"})
    api.create("b", options={"image": "twin-b"})
    api.start("a")
    api.start("b")
    host = _stats(api).host
    assert host.pages_saved == 0
    assert host.zero_pages == 32  # zero pages are always elided


def test_stats_empty(api):
    stats = _stats(api)
    assert stats.host.guest_pages == 0 and list(stats.machines) == []


def test_scan_applies_source_changes(api, twins):
    api.create("a", options={"image": "twin-a"}, page_fusion_enabled=True)
    api.create("b", options={"image": "twin-b"}, page_fusion_enabled=True)
    api.start("a")
    api.start("b")
    twins.write(20 * PAGE, b"\xff" * 16)  # a guest write seen only through the live source
    result = api.fusion.RunScan(pb.RunScanRequest(names=["machines/a"]))
    assert result.pages_scanned >= 64
    assert result.pages_copied_on_write == 1
    assert _stats(api).host.pages_saved == 47
    everything = api.fusion.RunScan(pb.RunScanRequest())
    assert everything.pages_copied_on_write == 0


def test_scan_errors(api, expect_failure):
    api.create("off")
    failure = expect_failure(
        api.fusion.RunScan, pb.RunScanRequest(names=["machines/off"]), Code.FAILED_PRECONDITION
    )
    assert "machines/off" in failure.message
    expect_failure(api.fusion.RunScan, pb.RunScanRequest(names=["machines/ghost"]),
                   Code.NOT_FOUND)
    failure = expect_failure(
        api.fusion.RunScan, pb.RunScanRequest(names=["machines/off", "bad"]),
        Code.INVALID_ARGUMENT,
    )
    assert failure.field_violations() == ["names[1]"]
