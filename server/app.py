"""Assembling the server: engine, registry, servicers, reflection and health.

:class:`PagefusionServer` is what ``pagefusion-server`` runs and what
in-process tests start on port 0.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pagefusion.adapters.base import Adapter
from pagefusion.adapters.registry import load_adapters
from pagefusion.server.auth import ConfigError, Security, load_tokens
from pagefusion.server.engine import FusionEngine
from pagefusion.server.fusion import FusionServicer
from pagefusion.server.guest_memory import MAX_TRANSFER_BYTES, GuestMemoryServicer
from pagefusion.server.interceptors import ServerInterceptor
from pagefusion.server.inventory import Inventory
from pagefusion.server.machines import MachineServicer
from pagefusion.server.performance import MetricsCollector, PerformanceServicer, Sampler
from pagefusion.server.prometheus import PrometheusExporter
from pagefusion.server.registry import Registry
from pagefusion.server.scanner import BackgroundScanner
from pagefusion.v1 import (
    fusion_pb2,
    fusion_pb2_grpc,
    guest_memory_pb2,
    guest_memory_pb2_grpc,
    machine_pb2,
    machine_pb2_grpc,
    performance_pb2,
    performance_pb2_grpc,
)

log = structlog.get_logger(__name__)


def _loop_name() -> str:
    """``uvloop`` or ``asyncio``: what runs this server's event loop (the serving line says)."""
    module = type(asyncio.get_running_loop()).__module__
    return module.split(".", 1)[0]


#: Messages may carry a full 4 MiB transfer plus the rest of the message.
MAX_MESSAGE_BYTES = MAX_TRANSFER_BYTES + (1 << 20)

SERVICE_NAMES = (
    machine_pb2.DESCRIPTOR.services_by_name["MachineService"].full_name,
    guest_memory_pb2.DESCRIPTOR.services_by_name["GuestMemoryService"].full_name,
    fusion_pb2.DESCRIPTOR.services_by_name["FusionService"].full_name,
    performance_pb2.DESCRIPTOR.services_by_name["PerformanceService"].full_name,
)


@dataclass(frozen=True)
class Settings:
    """What ``pagefusion-server``'s flags set."""

    listen: str = "127.0.0.1:50051"
    data_dir: Path = Path("data")
    allow_paths: tuple[Path, ...] = ()
    metrics_listen: str | None = None
    max_pool_bytes: int | None = None
    #: Back the frame pool with transparent huge pages (off: see FramePool).
    huge_pages: bool = False
    #: Seconds in-flight calls get to finish on shutdown.
    grace_seconds: float = 10.0
    #: TLS: certificate chain and key (both or neither), and the CA that
    #: client certificates must be signed by (mutual TLS).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    #: Bearer tokens, one per line; every RPC but health and reflection needs one.
    auth_token_file: Path | None = None
    #: Allow a non-loopback --listen without TLS or caller authentication.
    insecure: bool = False
    options: tuple[tuple[str, int], ...] = field(default_factory=tuple)


class PagefusionServer:
    """The pagefusion gRPC server, with its engine and registry.

    Args:
        settings: flags.
        adapters: adapters by name; default: every installed adapter.

    Raises:
        ConfigError: the TLS and auth settings are inconsistent or their
            files unusable (checked before anything is opened).
    """

    def __init__(self, settings: Settings, adapters: Mapping[str, Adapter] | None = None) -> None:
        self.settings = settings
        self.security = Security.load(
            listen=settings.listen, tls_cert=settings.tls_cert, tls_key=settings.tls_key,
            tls_client_ca=settings.tls_client_ca, auth_token_file=settings.auth_token_file,
            insecure=settings.insecure, metrics_listen=settings.metrics_listen,
        )
        self.registry = Registry(settings.data_dir)
        self.engine = FusionEngine(
            max_pool_bytes=settings.max_pool_bytes,
            config=self.registry.load_fusion_config(),
            huge_pages=settings.huge_pages,
        )
        self.adapters = dict(load_adapters() if adapters is None else adapters)
        self.inventory = Inventory(self.registry)
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self.port = 0
        allowed = tuple(p.resolve() for p in settings.allow_paths)
        self.metrics = MetricsCollector.for_engine(
            self.engine, known=lambda machine_id: machine_id in self.inventory.ids()
        )
        self.sampler = Sampler(self.metrics)
        self.scanner = BackgroundScanner(self.engine)
        self.prometheus = (
            PrometheusExporter(self.engine.stats, settings.metrics_listen)
            if settings.metrics_listen else None
        )
        # gRPC server metrics outermost, so they see the status the call ends with;
        # the token check innermost, so the per-RPC log line records its refusals.
        interceptors: list[aio.ServerInterceptor] = [ServerInterceptor()]
        self._auth = self.security.interceptor()
        if self._auth is not None:
            interceptors.append(self._auth)
        if self.prometheus is not None:
            interceptors.insert(0, self.prometheus.interceptor)
        self._server = aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                *settings.options,
            ],
        )
        self._machines = MachineServicer(self.inventory, self.engine, self.adapters, allowed)
        machine_pb2_grpc.add_MachineServiceServicer_to_server(self._machines, self._server)
        guest_memory_pb2_grpc.add_GuestMemoryServiceServicer_to_server(
            GuestMemoryServicer(self.inventory, self.engine), self._server
        )
        fusion_pb2_grpc.add_FusionServiceServicer_to_server(
            FusionServicer(self.inventory, self.engine, self.registry), self._server
        )
        performance_pb2_grpc.add_PerformanceServiceServicer_to_server(
            PerformanceServicer(self.metrics), self._server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
        )

    async def start(self) -> int:
        """Bind, start serving and report SERVING; returns the bound port."""
        credentials = self.security.credentials
        try:
            if credentials is None:
                self.port = self._server.add_insecure_port(self.settings.listen)
            else:
                self.port = self._server.add_secure_port(self.settings.listen, credentials)
        except RuntimeError as exc:  # grpc reports bind failures this way
            raise OSError(f"cannot listen on {self.settings.listen}: {exc}") from None
        if self.port == 0:
            raise OSError(f"cannot listen on {self.settings.listen}")
        await self._server.start()
        self.sampler.start()
        self.scanner.start()
        self._start_metrics()
        for service in ("", *SERVICE_NAMES):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "serving", listen=self.settings.listen, port=self.port,
            data_dir=str(self.settings.data_dir), adapters=sorted(self.adapters),
            machines=len(self.inventory.ids()), event_loop=_loop_name(),
            **self.security.describe(),
        )
        return self.port

    def reload_tokens(self) -> None:
        """Re-read ``--auth-token-file`` (SIGHUP); on any problem keep the tokens in force."""
        path = self.settings.auth_token_file
        if self._auth is None or path is None:
            log.info("tokens_not_reloaded", reason="no --auth-token-file")
            return
        try:
            digests = load_tokens(path)
        except ConfigError as exc:
            log.error("tokens_not_reloaded", error=str(exc), hint="the previous tokens stay valid")
            return
        self._auth.replace_tokens(digests)
        log.info("tokens_reloaded", path=str(path), tokens=len(digests))

    def _start_metrics(self) -> None:
        """Hook for the Prometheus ``/metrics`` endpoint (``--metrics-listen``)."""
        if self.prometheus is not None:
            self.prometheus.start(SERVICE_NAMES)

    async def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, refuse new calls, let in-flight ones finish, release memory."""
        await self.health.enter_graceful_shutdown()
        self.metrics.close()  # ends WatchMetrics streams cleanly
        await self._server.stop(self.settings.grace_seconds if grace is None else grace)
        await self._machines.drain()
        await self.scanner.stop()
        await self.sampler.stop()
        if self.prometheus is not None:
            self.prometheus.stop()
        for machine_id in self.engine.running_machines():
            await asyncio.to_thread(self.engine.stop_machine, machine_id)
        self.engine.close()
        self.registry.close()
        log.info("stopped")

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()
