"""A typed, synchronous Python client for the pagefusion gRPC API.

One method per RPC of the four services (``MachineService``,
``GuestMemoryService``, ``FusionService``, ``PerformanceService``), taking
plain Python values and returning the generated ``pagefusion.v1`` messages.
Machines may be named by id (``w10``) or resource name (``machines/w10``).
Every failed call raises :class:`~pagefusion.clients.errors.PageFusionError`;
every call carries an ``x-request-id`` metadata value the server logs.

Example::

    with PageFusionClient("127.0.0.1:50051") as client:
        client.create_machine("w10", os_type="Windows10_64",
                              memory_source="synthetic-windows:seed=1",
                              page_fusion_enabled=True)
        client.start_machine("w10")
        print(client.get_fusion_stats().host.pages_saved)
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import grpc
from google.protobuf import field_mask_pb2

from pagefusion.clients.errors import PageFusionError
from pagefusion.clients.resources import (
    machine_id_of,
    machine_name,
    parse_machine_name,
    parse_source,
)
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

__all__ = [
    "DEFAULT_TARGET",
    "MAX_TRANSFER_BYTES",
    "PageFusionClient",
    "PageFusionError",
    "bearer_metadata",
    "channel_credentials",
    "machine_name",
    "parse_machine_name",
]

DEFAULT_TARGET = "127.0.0.1:50051"
#: Largest ``length`` of one ReadGuestMemory call and ``data`` of one
#: WriteGuestMemory call; the client splits larger transfers.
MAX_TRANSFER_BYTES = 4 * 1024 * 1024
REQUEST_ID_KEY = "x-request-id"
AUTHORIZATION_KEY = "authorization"

_MESSAGE_LIMIT = MAX_TRANSFER_BYTES + 1024 * 1024
_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_receive_message_length", _MESSAGE_LIMIT),
    ("grpc.max_send_message_length", _MESSAGE_LIMIT),
)

_FUSION_MODES = {
    "hints": fusion_pb2.FUSION_MODE_HINTS,
    "content": fusion_pb2.FUSION_MODE_CONTENT,
    "all": fusion_pb2.FUSION_MODE_ALL,
}

T = TypeVar("T")

#: A PEM file: its path, or its contents as bytes.
PemSource = str | os.PathLike[str] | bytes


def _pem(what: str, source: PemSource | None) -> bytes | None:
    if source is None or isinstance(source, bytes):
        return source
    try:
        return Path(source).read_bytes()
    except OSError as exc:
        raise OSError(exc.errno, f"{what}: cannot read {source}: {exc.strerror or exc}") from None


def channel_credentials(
    tls_ca: PemSource | None = None,
    tls_cert: PemSource | None = None,
    tls_key: PemSource | None = None,
) -> grpc.ChannelCredentials:
    """TLS channel credentials from PEM files (paths) or PEM bytes.

    Args:
        tls_ca: CA certificates the server's certificate must chain to;
            None: the system's trusted roots.
        tls_cert, tls_key: a client certificate and its key, for servers
            that require them (mutual TLS); both or neither.

    Raises:
        ValueError: only one of ``tls_cert`` and ``tls_key``.
        OSError: a file cannot be read (the message names it).
    """
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("a client certificate needs both tls_cert and tls_key")
    return grpc.ssl_channel_credentials(
        root_certificates=_pem("TLS CA", tls_ca),
        private_key=_pem("TLS client key", tls_key),
        certificate_chain=_pem("TLS client certificate", tls_cert),
    )


def bearer_metadata(token: str) -> tuple[str, str]:
    """The ``authorization`` metadata pair that carries ``token``.

    Raises:
        ValueError: the token is empty or not printable ASCII without spaces.
    """
    token = token.strip()
    if not token or not all(0x21 <= ord(char) <= 0x7E for char in token):
        raise ValueError("a token must be non-empty printable ASCII without spaces")
    return (AUTHORIZATION_KEY, f"Bearer {token}")


class _Default:
    """Marks "use the client's default timeout" (None means no deadline)."""

    def __repr__(self) -> str:
        return "DEFAULT"


_DEFAULT: Any = _Default()
#: A call's deadline in seconds: a number, None for no deadline, or the default.
Timeout = float | _Default | None


def fusion_mode(value: int | str) -> int:
    """Turn ``hints``/``content``/``all`` or ``FUSION_MODE_*`` into the enum value."""
    if isinstance(value, int):
        return value
    lowered = value.strip().lower()
    if lowered in _FUSION_MODES:
        return _FUSION_MODES[lowered]
    try:
        return int(fusion_pb2.FusionMode.Value(value.strip().upper()))
    except ValueError:
        raise ValueError(f"unknown fusion mode {value!r}; expected hints, content or all") from None


def make_memory_source(
    value: machine_pb2.MemorySource | str | tuple[str, Mapping[str, str]],
) -> Any:
    """Build a ``MemorySource`` from a message, ``"ADAPTER[:k=v,...]"`` or (adapter, options)."""
    if isinstance(value, machine_pb2.MemorySource):
        return value
    if isinstance(value, str):
        adapter, options = parse_source(value)
    else:
        adapter, options = value[0], dict(value[1])
    return machine_pb2.MemorySource(adapter=adapter, options=options)


class PageFusionClient:
    """A connection to one pagefusion server.

    Args:
        target: ``HOST:PORT`` of the server (any gRPC target string).
        timeout: deadline in seconds of each call; None means no deadline.
        long_timeout: deadline of the calls that may take long
            (StartMachine, StopMachine, RunScan, CheckSharedModules);
            None means no deadline.
        metadata: extra metadata sent with every call.
        credentials: channel credentials for TLS; None for plaintext
            (unless a ``tls_*`` argument or ``tls`` asks for TLS).
        options: extra gRPC channel options.
        channel: an existing channel to use instead of opening one; the
            client then does not close it.
        token: a bearer token sent as ``authorization: Bearer <token>``
            with every call (servers started with ``--auth-token-file``).
        tls: True to use TLS with the system's trusted roots; implied by
            ``tls_ca``, ``tls_cert`` and ``tls_key``.
        tls_ca: CA certificates (PEM path or bytes) the server's certificate
            must chain to.
        tls_cert, tls_key: client certificate and key (PEM path or bytes),
            for servers started with ``--tls-client-ca``.
        tls_server_name: the name the server's certificate must carry when
            it differs from the target's host (e.g. connecting by address).

    Raises:
        ValueError: inconsistent arguments (e.g. ``tls_cert`` without
            ``tls_key``, TLS arguments together with ``credentials``).
        OSError: a TLS file cannot be read.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = 30.0,
        long_timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
        channel: grpc.Channel | None = None,
        token: str | None = None,
        tls: bool = False,
        tls_ca: PemSource | None = None,
        tls_cert: PemSource | None = None,
        tls_key: PemSource | None = None,
        tls_server_name: str | None = None,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.long_timeout = long_timeout
        self.metadata: tuple[tuple[str, str], ...] = tuple(metadata)
        if token is not None:
            self.metadata += (bearer_metadata(token),)
        wants_tls = tls or any(item is not None for item in (tls_ca, tls_cert, tls_key))
        if wants_tls:
            if credentials is not None:
                raise ValueError("pass either credentials or tls/tls_ca/tls_cert/tls_key")
            credentials = channel_credentials(tls_ca, tls_cert, tls_key)
        self._owns_channel = channel is None
        if channel is None:
            all_options = [*_CHANNEL_OPTIONS, *options]
            if tls_server_name:
                all_options.append(("grpc.ssl_target_name_override", tls_server_name))
            if credentials is None:
                channel = grpc.insecure_channel(target, options=all_options)
            else:
                channel = grpc.secure_channel(target, credentials, options=all_options)
        self.channel: grpc.Channel = channel
        self.machines = machine_pb2_grpc.MachineServiceStub(channel)
        self.guest_memory = guest_memory_pb2_grpc.GuestMemoryServiceStub(channel)
        self.fusion = fusion_pb2_grpc.FusionServiceStub(channel)
        self.performance = performance_pb2_grpc.PerformanceServiceStub(channel)

    # -- plumbing ---------------------------------------------------------

    def __enter__(self) -> PageFusionClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel (unless it was passed in)."""
        if self._owns_channel:
            self.channel.close()

    def __repr__(self) -> str:
        return f"PageFusionClient({self.target!r})"

    def _call(
        self,
        method: Callable[..., T],
        request: Any,
        timeout: Timeout = _DEFAULT,
        *,
        default: Timeout = _DEFAULT,
    ) -> T:
        if isinstance(timeout, _Default):
            timeout = self.timeout if isinstance(default, _Default) else default
        request_id = uuid.uuid4().hex
        metadata = (*self.metadata, (REQUEST_ID_KEY, request_id))
        try:
            return method(request, timeout=timeout, metadata=metadata)
        except grpc.RpcError as error:
            raise PageFusionError.from_rpc_error(error, request_id=request_id) from error

    def wait_for_ready(self, timeout: float = 10.0) -> None:
        """Block until the server's health service reports SERVING.

        Raises:
            PageFusionError: not SERVING within ``timeout`` seconds (the
                last error's code, or DEADLINE_EXCEEDED).
        """
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self.channel)
        deadline = time.monotonic() + timeout
        last: PageFusionError | None = None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                reply = self._call(
                    stub.Check, health_pb2.HealthCheckRequest(), timeout=min(remaining, 2.0)
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                last = PageFusionError(grpc.StatusCode.UNAVAILABLE, f"server health is {status}")
            except PageFusionError as error:
                last = error
            time.sleep(0.05)
        if last is not None:
            raise last
        raise PageFusionError(grpc.StatusCode.DEADLINE_EXCEEDED, "server not ready in time")

    # -- MachineService ---------------------------------------------------

    def create_machine(
        self,
        machine_id: str,
        *,
        display_name: str | None = None,
        memory_size_bytes: int | None = None,
        os_type: str | None = None,
        page_fusion_enabled: bool | None = None,
        fusion_domain: str | None = None,
        memory_source: Any = None,
        machine: machine_pb2.Machine | None = None,
        timeout: Timeout = _DEFAULT,
    ) -> machine_pb2.Machine:
        """Define a new machine, powered off.

        Args:
            machine_id: the id, last segment of ``machines/{machine_id}``.
            memory_source: a ``MemorySource``, ``"ADAPTER[:key=value,...]"``
                or ``(adapter, options)``.
            machine: a ``Machine`` to start from; the keyword values override it.
        """
        resource = _machine(
            machine,
            display_name=display_name,
            memory_size_bytes=memory_size_bytes,
            os_type=os_type,
            page_fusion_enabled=page_fusion_enabled,
            fusion_domain=fusion_domain,
            memory_source=memory_source,
        )
        request = machine_pb2.CreateMachineRequest(
            machine_id=machine_id_of(machine_id), machine=resource
        )
        return self._call(self.machines.CreateMachine, request, timeout)

    def get_machine(self, name: str, *, timeout: Timeout = _DEFAULT) -> machine_pb2.Machine:
        """Return one machine (by id or resource name)."""
        request = machine_pb2.GetMachineRequest(name=machine_name(name))
        return self._call(self.machines.GetMachine, request, timeout)

    def list_machines_page(
        self, page_size: int = 0, page_token: str = "", *, timeout: Timeout = _DEFAULT
    ) -> machine_pb2.ListMachinesResponse:
        """Return one page of machines and the token of the next."""
        request = machine_pb2.ListMachinesRequest(page_size=page_size, page_token=page_token)
        return self._call(self.machines.ListMachines, request, timeout)

    def list_machines(
        self, *, page_size: int = 0, timeout: Timeout = _DEFAULT
    ) -> Iterator[machine_pb2.Machine]:
        """Yield every machine, in id order, following page tokens."""
        token = ""
        while True:
            page = self.list_machines_page(page_size, token, timeout=timeout)
            yield from page.machines
            token = page.next_page_token
            if not token:
                return

    def update_machine(
        self,
        name: str,
        *,
        display_name: str | None = None,
        memory_size_bytes: int | None = None,
        os_type: str | None = None,
        page_fusion_enabled: bool | None = None,
        fusion_domain: str | None = None,
        memory_source: Any = None,
        timeout: Timeout = _DEFAULT,
    ) -> machine_pb2.Machine:
        """Change the given fields of a machine (the update mask names exactly those).

        Changing ``page_fusion_enabled`` or ``fusion_domain`` works only
        while the machine is powered off (FAILED_PRECONDITION otherwise).

        Raises:
            ValueError: no field given.
        """
        fields = {
            "display_name": display_name,
            "memory_size_bytes": memory_size_bytes,
            "os_type": os_type,
            "page_fusion_enabled": page_fusion_enabled,
            "fusion_domain": fusion_domain,
            "memory_source": memory_source,
        }
        paths = [path for path, value in fields.items() if value is not None]
        if not paths:
            raise ValueError("update_machine: give at least one field to change")
        resource = _machine(None, **fields)
        resource.name = machine_name(name)
        return self.update_machine_raw(resource, paths, timeout=timeout)

    def update_machine_raw(
        self,
        machine: machine_pb2.Machine,
        update_mask: Iterable[str],
        *,
        timeout: Timeout = _DEFAULT,
    ) -> machine_pb2.Machine:
        """UpdateMachine with an explicit machine message and mask paths."""
        request = machine_pb2.UpdateMachineRequest(
            machine=machine, update_mask=field_mask_pb2.FieldMask(paths=list(update_mask))
        )
        return self._call(self.machines.UpdateMachine, request, timeout)

    def delete_machine(self, name: str, *, timeout: Timeout = _DEFAULT) -> None:
        """Delete a powered-off machine's definition."""
        request = machine_pb2.DeleteMachineRequest(name=machine_name(name))
        self._call(self.machines.DeleteMachine, request, timeout)

    def start_machine(self, name: str, *, timeout: Timeout = _DEFAULT) -> machine_pb2.Machine:
        """Load and fuse a machine's memory; returns once it is running."""
        request = machine_pb2.StartMachineRequest(name=machine_name(name))
        return self._call(self.machines.StartMachine, request, timeout, default=self.long_timeout)

    def stop_machine(self, name: str, *, timeout: Timeout = _DEFAULT) -> machine_pb2.Machine:
        """Release a machine's pages; returns it powered off."""
        request = machine_pb2.StopMachineRequest(name=machine_name(name))
        return self._call(self.machines.StopMachine, request, timeout, default=self.long_timeout)

    # -- GuestMemoryService -----------------------------------------------

    def read_guest_memory(
        self, name: str, address: int, length: int, *, timeout: Timeout = _DEFAULT
    ) -> bytes:
        """Read ``length`` bytes of guest-physical memory (split into 4 MiB calls)."""
        machine = machine_name(name)
        chunks: list[bytes] = []
        offset = 0
        while offset < length or (length == 0 and not chunks):
            size = min(MAX_TRANSFER_BYTES, length - offset)
            request = guest_memory_pb2.ReadGuestMemoryRequest(
                name=machine, address=address + offset, length=size
            )
            chunks.append(self._call(self.guest_memory.ReadGuestMemory, request, timeout).data)
            offset += size
            if size == 0:
                break
        return b"".join(chunks)

    def write_guest_memory(
        self, name: str, address: int, data: bytes, *, timeout: Timeout = _DEFAULT
    ) -> int:
        """Write guest-physical memory; returns the pages copied on write."""
        machine = machine_name(name)
        copied = 0
        view = memoryview(data)
        offset = 0
        while True:
            piece = bytes(view[offset : offset + MAX_TRANSFER_BYTES])
            request = guest_memory_pb2.WriteGuestMemoryRequest(
                name=machine, address=address + offset, data=piece
            )
            reply = self._call(self.guest_memory.WriteGuestMemory, request, timeout)
            copied += reply.pages_copied_on_write
            offset += len(piece)
            if offset >= len(data):
                return copied

    def get_page_info(
        self, name: str, address: int, *, timeout: Timeout = _DEFAULT
    ) -> guest_memory_pb2.GetPageInfoResponse:
        """State and share count of the guest page holding ``address``."""
        request = guest_memory_pb2.GetPageInfoRequest(name=machine_name(name), address=address)
        return self._call(self.guest_memory.GetPageInfo, request, timeout)

    def list_guest_modules(
        self, name: str, *, timeout: Timeout = _DEFAULT
    ) -> list[guest_memory_pb2.SharedModule]:
        """The modules a guest agent would report for the machine."""
        request = guest_memory_pb2.ListGuestModulesRequest(name=machine_name(name))
        return list(self._call(self.guest_memory.ListGuestModules, request, timeout).modules)

    def register_shared_module(
        self,
        name: str,
        module: guest_memory_pb2.SharedModule,
        *,
        timeout: Timeout = _DEFAULT,
    ) -> None:
        """Register a shared-module hint for the machine."""
        request = guest_memory_pb2.RegisterSharedModuleRequest(
            name=machine_name(name), module=module
        )
        self._call(self.guest_memory.RegisterSharedModule, request, timeout)

    def unregister_shared_module(
        self,
        name: str,
        module: guest_memory_pb2.SharedModule,
        *,
        timeout: Timeout = _DEFAULT,
    ) -> None:
        """Unregister a shared-module hint (matched by name, version, base and size)."""
        request = guest_memory_pb2.UnregisterSharedModuleRequest(
            name=machine_name(name), module=module
        )
        self._call(self.guest_memory.UnregisterSharedModule, request, timeout)

    def check_shared_modules(
        self, name: str, *, timeout: Timeout = _DEFAULT
    ) -> guest_memory_pb2.CheckSharedModulesResponse:
        """Fuse the pages of the machine's registered modules."""
        request = guest_memory_pb2.CheckSharedModulesRequest(name=machine_name(name))
        return self._call(
            self.guest_memory.CheckSharedModules, request, timeout, default=self.long_timeout
        )

    def get_page_sharing_status(self, name: str, *, timeout: Timeout = _DEFAULT) -> bool:
        """Whether page fusion is enabled for the machine, as a guest agent asks."""
        request = guest_memory_pb2.GetPageSharingStatusRequest(name=machine_name(name))
        return bool(self._call(self.guest_memory.GetPageSharingStatus, request, timeout).enabled)

    # -- FusionService ----------------------------------------------------

    def get_fusion_config(self, *, timeout: Timeout = _DEFAULT) -> fusion_pb2.FusionConfig:
        """The server-wide fusion configuration."""
        return self._call(self.fusion.GetFusionConfig, fusion_pb2.GetFusionConfigRequest(), timeout)

    def update_fusion_config(
        self,
        *,
        mode: int | str | None = None,
        background_scan: bool | None = None,
        pages_per_second: int | None = None,
        stable_scans_before_merge: int | None = None,
        timeout: Timeout = _DEFAULT,
    ) -> fusion_pb2.FusionConfig:
        """Change the given fields of the fusion configuration.

        Args:
            mode: ``hints``, ``content``, ``all`` or a ``FusionMode`` value.

        Raises:
            ValueError: no field given, or an unknown mode name.
        """
        config = fusion_pb2.FusionConfig()
        paths: list[str] = []
        if mode is not None:
            config.mode = fusion_mode(mode)  # type: ignore[assignment]
            paths.append("mode")
        if background_scan is not None:
            config.background_scan = background_scan
            paths.append("background_scan")
        if pages_per_second is not None:
            config.pages_per_second = pages_per_second
            paths.append("pages_per_second")
        if stable_scans_before_merge is not None:
            config.stable_scans_before_merge = stable_scans_before_merge
            paths.append("stable_scans_before_merge")
        if not paths:
            raise ValueError("update_fusion_config: give at least one field to change")
        request = fusion_pb2.UpdateFusionConfigRequest(
            config=config, update_mask=field_mask_pb2.FieldMask(paths=paths)
        )
        return self._call(self.fusion.UpdateFusionConfig, request, timeout)

    def run_scan(
        self, names: Iterable[str] = (), *, timeout: Timeout = _DEFAULT
    ) -> fusion_pb2.RunScanResponse:
        """Re-read live sources of the named machines (all running ones when empty)."""
        request = fusion_pb2.RunScanRequest(names=[machine_name(n) for n in names])
        return self._call(self.fusion.RunScan, request, timeout, default=self.long_timeout)

    def verify_fusion(self, *, timeout: Timeout = _DEFAULT) -> fusion_pb2.VerifyFusionResponse:
        """An independent recount of the engine's sharing and accounting (like fsck).

        Returns:
            ``consistent``, ``pages_checked``, ``frames_checked`` and
            ``problems`` (one line per disagreement; empty when consistent).
        """
        return self._call(
            self.fusion.VerifyFusion, fusion_pb2.VerifyFusionRequest(), timeout,
            default=self.long_timeout,
        )

    def get_fusion_stats(self, *, timeout: Timeout = _DEFAULT) -> fusion_pb2.GetFusionStatsResponse:
        """Host-wide and per-machine page accounting."""
        return self._call(self.fusion.GetFusionStats, fusion_pb2.GetFusionStatsRequest(), timeout)

    # -- PerformanceService -----------------------------------------------

    def list_metrics(
        self,
        metric_names: Iterable[str] = (),
        objects: Iterable[str] = (),
        *,
        timeout: Timeout = _DEFAULT,
    ) -> list[performance_pb2.Metric]:
        """Describe the metrics matching the patterns (empty: all)."""
        request = performance_pb2.ListMetricsRequest(
            metric_names=list(metric_names), objects=_objects(objects)
        )
        return list(self._call(self.performance.ListMetrics, request, timeout).metrics)

    def setup_metrics(
        self,
        metric_names: Iterable[str] = (),
        objects: Iterable[str] = (),
        *,
        period_seconds: int = 1,
        sample_count: int = 1,
        timeout: Timeout = _DEFAULT,
    ) -> list[performance_pb2.Metric]:
        """Set period and buffer size of the matching metrics; returns those affected."""
        request = performance_pb2.SetupMetricsRequest(
            metric_names=list(metric_names),
            objects=_objects(objects),
            period_seconds=period_seconds,
            sample_count=sample_count,
        )
        return list(self._call(self.performance.SetupMetrics, request, timeout).metrics)

    def enable_metrics(
        self,
        metric_names: Iterable[str] = (),
        objects: Iterable[str] = (),
        *,
        timeout: Timeout = _DEFAULT,
    ) -> list[performance_pb2.Metric]:
        """Resume collection of the matching metrics; returns those affected."""
        request = performance_pb2.EnableMetricsRequest(
            metric_names=list(metric_names), objects=_objects(objects)
        )
        return list(self._call(self.performance.EnableMetrics, request, timeout).metrics)

    def disable_metrics(
        self,
        metric_names: Iterable[str] = (),
        objects: Iterable[str] = (),
        *,
        timeout: Timeout = _DEFAULT,
    ) -> list[performance_pb2.Metric]:
        """Pause collection of the matching metrics; returns those affected."""
        request = performance_pb2.DisableMetricsRequest(
            metric_names=list(metric_names), objects=_objects(objects)
        )
        return list(self._call(self.performance.DisableMetrics, request, timeout).metrics)

    def query_metrics(
        self,
        metric_names: Iterable[str] = (),
        objects: Iterable[str] = (),
        *,
        timeout: Timeout = _DEFAULT,
    ) -> performance_pb2.QueryMetricsResponse:
        """The buffered samples of the matching metrics (``:avg``/``:min``/``:max`` work)."""
        request = performance_pb2.QueryMetricsRequest(
            metric_names=list(metric_names), objects=_objects(objects)
        )
        return self._call(self.performance.QueryMetrics, request, timeout)

    def watch_metrics(
        self,
        metric_names: Iterable[str] = (),
        objects: Iterable[str] = (),
        *,
        timeout: float | None = None,
    ) -> Iterator[performance_pb2.QueryMetricsResponse]:
        """Yield a ``QueryMetricsResponse`` each sampling period until closed.

        Closing the generator (or leaving a ``for`` loop early) cancels the
        stream. ``timeout`` bounds the whole stream (default: no deadline).
        """
        request = performance_pb2.WatchMetricsRequest(
            metric_names=list(metric_names), objects=_objects(objects)
        )
        request_id = uuid.uuid4().hex
        metadata = (*self.metadata, (REQUEST_ID_KEY, request_id))
        call = self.performance.WatchMetrics(request, timeout=timeout, metadata=metadata)
        try:
            yield from call
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.CANCELLED:
                return
            raise PageFusionError.from_rpc_error(error, request_id=request_id) from error
        finally:
            call.cancel()


def _objects(objects: Iterable[str]) -> list[str]:
    """Metric objects are ``host`` or machine ids; accept resource names too."""
    return [machine_id_of(o) for o in objects]


def _machine(
    base: machine_pb2.Machine | None,
    *,
    display_name: str | None,
    memory_size_bytes: int | None,
    os_type: str | None,
    page_fusion_enabled: bool | None,
    fusion_domain: str | None,
    memory_source: Any,
) -> Any:
    resource = machine_pb2.Machine()
    if base is not None:
        resource.CopyFrom(base)
    if display_name is not None:
        resource.display_name = display_name
    if memory_size_bytes is not None:
        resource.memory_size_bytes = memory_size_bytes
    if os_type is not None:
        resource.os_type = os_type
    if page_fusion_enabled is not None:
        resource.page_fusion_enabled = page_fusion_enabled
    if fusion_domain is not None:
        resource.fusion_domain = fusion_domain
    if memory_source is not None:
        resource.memory_source.CopyFrom(make_memory_source(memory_source))
    return resource
