"""FusionService: fusion configuration, scans and accounting, from the engine."""

from __future__ import annotations

import asyncio
import operator
from typing import cast

from google.protobuf import field_mask_pb2
from google.protobuf.message import Message
from grpc import aio

from pagefusion.server.engine import (
    FusionConfig,
    FusionEngine,
    FusionMode,
    FusionStats,
    HostStats,
    MachineStats,
)
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


def _host_proto(host: HostStats) -> pb.HostFusionStats:
    return pb.HostFusionStats(
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
    )


def _machine_proto(m: MachineStats) -> pb.MachineFusionStats:
    return pb.MachineFusionStats(
        name=machine_name(m.machine_id),
        guest_pages=m.guest_pages,
        zero_pages=m.zero_pages,
        private_pages=m.private_pages,
        shared_pages=m.shared_pages,
        volatile_pages=m.volatile_pages,
    )


_BY_ID = operator.attrgetter("machine_id")


def stats_to_proto(stats: FusionStats) -> pb.GetFusionStatsResponse:
    return pb.GetFusionStatsResponse(
        host=_host_proto(stats.host),
        machines=[_machine_proto(m) for m in sorted(stats.machines, key=_BY_ID)],
    )


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number: int, message: Message) -> bytes:
    """``message`` as a length-delimited field ``number`` of the enclosing message."""
    payload = message.SerializeToString()
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


_HOST_FIELD = pb.GetFusionStatsResponse.HOST_FIELD_NUMBER
_MACHINES_FIELD = pb.GetFusionStatsResponse.MACHINES_FIELD_NUMBER


class StatsResponses:
    """Builds GetFusionStatsResponse as :func:`stats_to_proto` does, cheaper per call.

    Building a message field by field costs microseconds per machine, at
    every call; parsing the encoded response costs a fraction of that. So
    each part (the host counters, one entry per machine) is encoded once
    and kept while its counts stay the same (the engine's stats are frozen,
    hashable values), and a response is parsed from the joined parts. Only
    the parts of the last response are kept.
    """

    def __init__(self) -> None:
        self._parts: dict[HostStats | MachineStats, bytes] = {}
        self._last: tuple[FusionStats, pb.GetFusionStatsResponse] | None = None

    def build(self, stats: FusionStats) -> pb.GetFusionStatsResponse:
        """The response for ``stats``: equal to ``stats_to_proto(stats)``.

        Stats equal to the last ones get the last response itself (grpc only
        serialises a response; nothing changes it afterwards).
        """
        last = self._last
        if last is not None and last[0] == stats:
            return last[1]
        response = self._build(stats)
        self._last = (stats, response)
        return response

    def _build(self, stats: FusionStats) -> pb.GetFusionStatsResponse:
        known = self._parts
        parts: dict[HostStats | MachineStats, bytes] = {}
        host = known.get(stats.host)
        if host is None:
            host = _field(_HOST_FIELD, _host_proto(stats.host))
        parts[stats.host] = host
        encoded = [host]
        for m in sorted(stats.machines, key=_BY_ID):
            entry = known.get(m)
            if entry is None:
                entry = _field(_MACHINES_FIELD, _machine_proto(m))
            parts[m] = entry
            encoded.append(entry)
        self._parts = parts
        return pb.GetFusionStatsResponse.FromString(b"".join(encoded))


class FusionServicer(fusion_pb2_grpc.FusionServiceServicer):
    """FusionService over the engine; the configuration is persisted in the registry."""

    def __init__(self, inventory: Inventory, engine: FusionEngine, registry: Registry) -> None:
        self._inventory = inventory
        self._engine = engine
        self._registry = registry
        self._config_lock = asyncio.Lock()
        self._stats = StatsResponses()

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
        return self._stats.build(await quick(self._engine, self._engine.stats))

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
