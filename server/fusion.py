"""FusionService: fusion configuration, scans and accounting, from the engine."""

from __future__ import annotations

import asyncio
from typing import cast

from google.protobuf import field_mask_pb2
from grpc import aio

from pagefusion.server.engine import FusionConfig, FusionEngine, FusionMode, FusionStats
from pagefusion.server.engine_calls import quick
from pagefusion.server.errors import invalid_argument
from pagefusion.server.inventory import Inventory
from pagefusion.server.metrics_catalog import profit_bytes
from pagefusion.server.registry import Registry
from pagefusion.server.resources import machine_name, parse_machine_name
from pagefusion.v1 import fusion_pb2 as pb
from pagefusion.v1 import fusion_pb2_grpc

CONFIG_FIELDS = ("mode", "background_scan", "pages_per_second", "stable_scans_before_merge")


def config_to_proto(config: FusionConfig) -> pb.FusionConfig:
    return pb.FusionConfig(
        mode=cast(pb.FusionMode, int(config.mode)),
        background_scan=config.background_scan,
        pages_per_second=config.pages_per_second,
        stable_scans_before_merge=config.stable_scans_before_merge,
    )


def stats_to_proto(stats: FusionStats) -> pb.GetFusionStatsResponse:
    host = stats.host
    return pb.GetFusionStatsResponse(
        host=pb.HostFusionStats(
            guest_pages=host.guest_pages,
            zero_pages=host.zero_pages,
            private_pages=host.private_pages,
            shared_pages=host.shared_pages,
            frames_used=host.frames_used,
            frames_shared=host.frames_shared,
            pages_saved=host.pages_saved,
            volatile_pages=host.volatile_pages,
            full_scans=host.full_scans,
            metadata_bytes=host.metadata_bytes,
            frames_free=host.frames_free,
            profit_bytes=profit_bytes(host),
        ),
        machines=[
            pb.MachineFusionStats(
                name=machine_name(m.machine_id),
                guest_pages=m.guest_pages,
                zero_pages=m.zero_pages,
                private_pages=m.private_pages,
                shared_pages=m.shared_pages,
                volatile_pages=m.volatile_pages,
            )
            for m in sorted(stats.machines, key=lambda m: m.machine_id)
        ],
    )


class FusionServicer(fusion_pb2_grpc.FusionServiceServicer):
    """FusionService over the engine; the configuration is persisted in the registry."""

    def __init__(self, inventory: Inventory, engine: FusionEngine, registry: Registry) -> None:
        self._inventory = inventory
        self._engine = engine
        self._registry = registry
        self._config_lock = asyncio.Lock()

    async def GetFusionConfig(
        self, request: pb.GetFusionConfigRequest, context: aio.ServicerContext
    ) -> pb.FusionConfig:
        return config_to_proto(self._engine.config)

    async def UpdateFusionConfig(
        self, request: pb.UpdateFusionConfigRequest, context: aio.ServicerContext
    ) -> pb.FusionConfig:
        paths = _mask_paths(request.update_mask)
        async with self._config_lock:
            old = self._engine.config
            merged = config_to_proto(old)
            for path in paths:
                setattr(merged, path, getattr(request.config, path))
            _validate(merged)
            new = FusionConfig(
                mode=FusionMode(merged.mode),
                background_scan=merged.background_scan,
                pages_per_second=merged.pages_per_second,
                stable_scans_before_merge=merged.stable_scans_before_merge,
            )
            # The engine validates; the reply waits for the durable write, so a
            # config the client saw succeed survives a crash.
            applied = await asyncio.to_thread(self._engine.set_config, new)
            try:
                await asyncio.to_thread(self._registry.save_fusion_config, applied)
            except BaseException:
                await asyncio.to_thread(self._engine.set_config, old)
                raise
            return config_to_proto(applied)

    async def RunScan(
        self, request: pb.RunScanRequest, context: aio.ServicerContext
    ) -> pb.RunScanResponse:
        ids: list[str] | None = None
        if request.names:
            # Malformed names first (INVALID_ARGUMENT), then missing or stopped machines.
            ids = [parse_machine_name(n, f"names[{i}]") for i, n in enumerate(request.names)]
            for name, machine_id in zip(request.names, ids, strict=True):
                self._inventory.require_running(machine_id, name)
        result = await asyncio.to_thread(self._engine.scan, ids)
        return pb.RunScanResponse(
            pages_scanned=result.pages_scanned,
            pages_fused=result.pages_fused,
            pages_copied_on_write=result.pages_copied_on_write,
        )

    async def GetFusionStats(
        self, request: pb.GetFusionStatsRequest, context: aio.ServicerContext
    ) -> pb.GetFusionStatsResponse:
        return stats_to_proto(await quick(self._engine, self._engine.stats))

    async def VerifyFusion(
        self, request: pb.VerifyFusionRequest, context: aio.ServicerContext
    ) -> pb.VerifyFusionResponse:
        # Off the event loop: the recount copies the maps under the engine
        # lock, then works on the copy while other calls go on.
        result = await asyncio.to_thread(self._engine.verify)
        return pb.VerifyFusionResponse(
            consistent=result.consistent,
            pages_checked=result.pages_checked,
            frames_checked=result.frames_checked,
            problems=list(result.problems),
        )


def _mask_paths(mask: field_mask_pb2.FieldMask) -> list[str]:
    if not mask.paths or list(mask.paths) == ["*"]:
        return list(CONFIG_FIELDS)
    for path in mask.paths:
        if path not in CONFIG_FIELDS:
            raise invalid_argument(
                "update_mask", f"unknown field {path!r} (fields: {', '.join(CONFIG_FIELDS)})"
            )
    return list(mask.paths)


def _validate(config: pb.FusionConfig) -> None:
    if config.mode not in (int(m) for m in FusionMode if m is not FusionMode.UNSPECIFIED):
        raise invalid_argument(
            "config.mode", f"must be FUSION_MODE_HINTS, _CONTENT or _ALL, got {config.mode}"
        )
    if config.pages_per_second <= 0:
        raise invalid_argument("config.pages_per_second", "must be greater than 0")
