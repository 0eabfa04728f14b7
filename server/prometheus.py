"""Prometheus ``/metrics`` (``--metrics-listen HOST:PORT``): the engine's figures and gRPC's.

The figures are those of ``metrics_catalog`` (shared with PerformanceService,
so names, help and values cannot drift), read from ``FusionEngine.stats()``
at scrape time by a custom collector on a registry of our own (never the global one), so a
scrape is one consistent instant and costs nothing between scrapes. Names
follow Prometheus conventions: a ``pagefusion_`` prefix, bytes as the unit,
``_total`` on counters, a ``machine`` label per running machine:

    pagefusion_host_frames_used_bytes    RAM/VMM/Used
    pagefusion_host_free_bytes           RAM/VMM/Free
    pagefusion_host_pages_saved_bytes    RAM/VMM/Shared
    pagefusion_host_zero_bytes           RAM/VMM/Zero
    pagefusion_host_profit_bytes         RAM/VMM/Profit
    pagefusion_machine_guest_bytes       Guest/RAM/Usage/Total (and _shared, _private, _zero)

so ``sum(pagefusion_machine_guest_bytes) == pagefusion_host_frames_used_bytes
+ pagefusion_host_pages_saved_bytes + pagefusion_host_zero_bytes`` within a
scrape. gRPC server metrics use the names of go-grpc-prometheus
(``grpc_server_started_total``, ``grpc_server_handled_total``,
``grpc_server_handling_seconds``), recorded by :class:`GrpcServerMetrics`,
an interceptor the server installs outermost so it sees the final status.
"""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc
import structlog
from google.protobuf import descriptor_pool
from grpc import aio
from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector

from pagefusion.server.engine.types import FusionStats
from pagefusion.server.metrics_catalog import CATALOG, NAMESPACE, running_machines

log = structlog.get_logger(__name__)

#: Latency buckets of go-grpc-prometheus, in seconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class FusionCollector(Collector):
    """Page-fusion figures, read from one ``stats()`` call per scrape."""

    def __init__(self, stats: Callable[[], FusionStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        for entry in CATALOG:
            family: GaugeMetricFamily | CounterMetricFamily
            family_type = (
                CounterMetricFamily if entry.prometheus_type == "counter" else GaugeMetricFamily
            )
            if entry.kind == "host":
                family = family_type(
                    entry.prometheus_name, entry.prometheus_help, value=entry.read(stats.host)
                )
            else:
                family = family_type(
                    entry.prometheus_name, entry.prometheus_help, labels=["machine"]
                )
                for m in stats.machines:
                    family.add_metric([m.machine_id], entry.read(m))
            yield family
        yield GaugeMetricFamily(f"{NAMESPACE}_machines_running", "Running machines.",
                                value=running_machines(stats))


def _code(context: aio.ServicerContext, default: grpc.StatusCode) -> grpc.StatusCode:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):  # some grpc versions hand back the integer value
        for candidate in grpc.StatusCode:
            if candidate.value[0] == code:
                return candidate
    return default


class GrpcServerMetrics(aio.ServerInterceptor):
    """Counts started and handled calls by method and code, and times them."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["grpc_type", "grpc_service", "grpc_method"]
        self.started = Counter("grpc_server_started", "RPCs started on the server.",
                               labels, registry=registry)
        self.handled = Counter("grpc_server_handled",
                               "RPCs completed on the server, whatever their status.",
                               [*labels, "grpc_code"], registry=registry)
        self.handling = Histogram("grpc_server_handling_seconds",
                                  "Time from the start of an RPC to its status.",
                                  labels, buckets=LATENCY_BUCKETS, registry=registry)
        self.msg_sent = Counter("grpc_server_msg_sent",
                                "Messages the server sent on streaming RPCs.",
                                labels, registry=registry)

    def initialize(self, methods: Iterable[tuple[str, str, str]]) -> None:
        """Export zeros for (type, service, method) triples before their first call."""
        for triple in methods:
            self.started.labels(*triple)
            self.handled.labels(*triple, grpc.StatusCode.OK.name)
            self.handling.labels(*triple)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        service, _, method = handler_call_details.method.lstrip("/").rpartition("/")
        metrics = self

        class _Call:
            def __init__(self, kind: str) -> None:
                self.labels = (kind, service, method)
                self.start = time.perf_counter()
                metrics.started.labels(*self.labels).inc()

            def done(self, code: grpc.StatusCode) -> None:
                metrics.handled.labels(*self.labels, code.name).inc()
                metrics.handling.labels(*self.labels).observe(time.perf_counter() - self.start)

        def outcome(exc: BaseException, context: aio.ServicerContext) -> grpc.StatusCode:
            if isinstance(exc, asyncio.CancelledError | GeneratorExit):
                return grpc.StatusCode.CANCELLED
            return _code(context, grpc.StatusCode.UNKNOWN)

        if handler.unary_unary is not None:
            unary: Any = handler.unary_unary

            async def unary_unary(request: Any, context: aio.ServicerContext) -> Any:
                call = _Call("unary")
                try:
                    response = await unary(request, context)
                except BaseException as exc:
                    call.done(outcome(exc, context))
                    raise
                call.done(_code(context, grpc.StatusCode.OK))
                return response

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, handler.request_deserializer, handler.response_serializer
            )

        if handler.unary_stream is not None:
            stream: Any = handler.unary_stream

            async def unary_stream(
                request: Any, context: aio.ServicerContext
            ) -> AsyncIterator[Any]:
                call = _Call("server_stream")
                try:
                    result = stream(request, context)
                    if hasattr(result, "__aiter__"):
                        async for response in result:
                            metrics.msg_sent.labels(*call.labels).inc()
                            yield response
                    else:  # a handler that writes with context.write()
                        await result
                except BaseException as exc:
                    call.done(outcome(exc, context))
                    raise
                call.done(_code(context, grpc.StatusCode.OK))

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, handler.request_deserializer, handler.response_serializer
            )
        return handler  # client and bidi streaming: none of ours


def service_methods(services: Iterable[str]) -> list[tuple[str, str, str]]:
    """(grpc_type, grpc_service, grpc_method) of every method of the named services."""
    pool = descriptor_pool.Default()
    out = []
    for name in services:
        for m in pool.FindServiceByName(name).methods:
            if m.client_streaming:
                continue
            out.append(("server_stream" if m.server_streaming else "unary", name, m.name))
    return out


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9100``; empty host: loopback) as (host, port).

    Raises:
        OSError: EINVAL, the address is malformed.
    """
    host, colon, port = text.strip().rpartition(":")
    if not colon or not port.isdigit() or int(port) > 65535:
        raise OSError(errno.EINVAL, f"--metrics-listen: expected HOST:PORT, got {text!r}")
    host = host.removeprefix("[").removesuffix("]") or "127.0.0.1"
    return host, int(port)


class PrometheusExporter:
    """The ``/metrics`` HTTP endpoint, its registry and the gRPC interceptor.

    Args:
        stats: reads the engine's figures (``FusionEngine.stats``), called per scrape.
        listen: ``HOST:PORT``; port 0 picks a free one (see :attr:`port` after start).
    """

    def __init__(self, stats: Callable[[], FusionStats], listen: str) -> None:
        self.listen = listen
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(FusionCollector(stats))
        ProcessCollector(namespace=NAMESPACE, registry=self.registry)
        self.interceptor = GrpcServerMetrics(self.registry)
        self.port = 0
        self._server: WSGIServer | None = None
        self._thread: Any = None

    def start(self, services: Iterable[str] = ()) -> int:
        """Serve ``/metrics`` from a daemon thread; returns the bound port.

        Args:
            services: full names of gRPC services whose methods are exported
                with zero counts before their first call.
        """
        host, port = parse_listen(self.listen)
        self.interceptor.initialize(service_methods(services))
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        self.port = int(self._server.server_port)
        log.info("metrics_serving", listen=self.listen, port=self.port)
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(5)
            self._server = None
