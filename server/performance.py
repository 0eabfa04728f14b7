"""PerformanceService: VirtualBox's performance collector (metrics in kB).

Served in a later issue; every RPC answers UNIMPLEMENTED until then.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from grpc import aio
from pagefusion.server.errors import unimplemented
from pagefusion.v1 import performance_pb2 as pb
from pagefusion.v1 import performance_pb2_grpc

_LATER = "the performance collector is not served yet"


class PerformanceServicer(performance_pb2_grpc.PerformanceServiceServicer):
    """PerformanceService; a placeholder until the collector lands."""

    async def ListMetrics(
        self, request: pb.ListMetricsRequest, context: aio.ServicerContext
    ) -> pb.ListMetricsResponse:
        raise unimplemented("ListMetrics", _LATER)

    async def SetupMetrics(
        self, request: pb.SetupMetricsRequest, context: aio.ServicerContext
    ) -> pb.SetupMetricsResponse:
        raise unimplemented("SetupMetrics", _LATER)

    async def EnableMetrics(
        self, request: pb.EnableMetricsRequest, context: aio.ServicerContext
    ) -> pb.EnableMetricsResponse:
        raise unimplemented("EnableMetrics", _LATER)

    async def DisableMetrics(
        self, request: pb.DisableMetricsRequest, context: aio.ServicerContext
    ) -> pb.DisableMetricsResponse:
        raise unimplemented("DisableMetrics", _LATER)

    async def QueryMetrics(
        self, request: pb.QueryMetricsRequest, context: aio.ServicerContext
    ) -> pb.QueryMetricsResponse:
        raise unimplemented("QueryMetrics", _LATER)

    async def WatchMetrics(
        self, request: pb.WatchMetricsRequest, context: aio.ServicerContext
    ) -> AsyncIterator[pb.QueryMetricsResponse]:
        raise unimplemented("WatchMetrics", _LATER)
        yield  # an async generator, like the real stream will be
