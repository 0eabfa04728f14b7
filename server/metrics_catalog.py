"""Every figure the server exports from the engine's stats, in one table.

PerformanceService (VirtualBox's metric names, kB) and the Prometheus
``/metrics`` page (``pagefusion_*`` names, bytes) both read their figures
from :data:`CATALOG`, so a name, a help text or the way a value is computed
cannot differ between the two. An entry with a ``metric`` (VirtualBox) name
is served by both; one without is Prometheus-only (figures VirtualBox has no
metric for, such as the engine's metadata).

Each entry computes its value in its base unit (bytes, or a plain count)
from one ``FusionStats`` reading; PerformanceService reports bytes as kB
(1 kB = 1024 bytes, a whole number for every page-based figure) and
Prometheus reports them unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pagefusion.server.engine.types import PAGE_SIZE, FusionStats, HostStats, MachineStats

ObjectKind = Literal["host", "machine"]
Unit = Literal["bytes", "count"]
PrometheusType = Literal["gauge", "counter"]

#: Prefix of every Prometheus name of the catalog.
NAMESPACE = "pagefusion"
#: The unit PerformanceService reports byte figures in (VirtualBox's).
PERFORMANCE_UNIT = "kB"


def profit_bytes(host: HostStats) -> int:
    """What fusion really gives the host, KSM's ``general_profit``.

    ``(pages saved + zero pages) x 4096 - metadata bytes``, never below 0:
    pages saved and zero pages are guest pages no host frame backs, and the
    engine's bookkeeping (page maps, refcounts, index) is what that costs.
    """
    return max(0, (host.pages_saved + host.zero_pages) * PAGE_SIZE - host.metadata_bytes)


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    """One exported figure.

    Attributes:
        prometheus: the Prometheus name after ``pagefusion_`` (the exporter
            adds ``_total`` to counters, as prometheus_client does).
        kind: ``host`` (one value) or ``machine`` (one per running machine).
        description: the help text, shared by ListMetrics and ``# HELP``.
        read: the value from the engine's stats (host or one machine).
        unit: ``bytes`` or ``count``.
        metric: the VirtualBox metric name, or ``""`` for Prometheus-only figures.
        prometheus_type: ``gauge`` or ``counter``.
    """

    prometheus: str
    kind: ObjectKind
    description: str
    read: Callable[[HostStats | MachineStats], int]
    unit: Unit = "bytes"
    metric: str = ""
    prometheus_type: PrometheusType = "gauge"

    @property
    def prometheus_name(self) -> str:
        """The full Prometheus family name (``pagefusion_...``)."""
        return f"{NAMESPACE}_{self.prometheus}"

    @property
    def prometheus_help(self) -> str:
        """``# HELP`` text: the description plus the VirtualBox name it matches."""
        if not self.metric:
            return self.description
        return f"{self.description[:-1]} ({self.metric})."

    def performance_value(self, stats: HostStats | MachineStats) -> int:
        """The value PerformanceService records: bytes in kB, counts unchanged."""
        value = self.read(stats)
        return value // 1024 if self.unit == "bytes" else value


def _host(read: Callable[[HostStats], int]) -> Callable[[HostStats | MachineStats], int]:
    def value(stats: HostStats | MachineStats) -> int:
        if not isinstance(stats, HostStats):
            raise TypeError(f"a host metric read from {type(stats).__name__}")
        return read(stats)

    return value


def _machine(read: Callable[[MachineStats], int]) -> Callable[[HostStats | MachineStats], int]:
    def value(stats: HostStats | MachineStats) -> int:
        if not isinstance(stats, MachineStats):
            raise TypeError(f"a machine metric read from {type(stats).__name__}")
        return read(stats)

    return value


def _pages(read: Callable[[HostStats], int]) -> Callable[[HostStats | MachineStats], int]:
    return _host(lambda h: read(h) * PAGE_SIZE)


def _machine_pages(
    read: Callable[[MachineStats], int],
) -> Callable[[HostStats | MachineStats], int]:
    return _machine(lambda m: read(m) * PAGE_SIZE)


#: Every figure, in the order PerformanceService lists them (DESIGN.md, "Metrics").
CATALOG: tuple[CatalogEntry, ...] = (
    CatalogEntry("host_frames_used_bytes", "host",
                 "Host memory backing guest pages: distinct frames in use.",
                 _pages(lambda h: h.frames_used), metric="RAM/VMM/Used"),
    CatalogEntry("host_free_bytes", "host",
                 "Memory the frame pool holds but no guest page uses.",
                 _pages(lambda h: h.frames_free), metric="RAM/VMM/Free"),
    CatalogEntry("host_pages_saved_bytes", "host",
                 "Memory page fusion saves: extra references to shared frames "
                 "(pages saved, KSM's pages_sharing).",
                 _pages(lambda h: h.pages_saved), metric="RAM/VMM/Shared"),
    CatalogEntry("host_zero_bytes", "host",
                 "Zero pages of running machines, backed by no host memory.",
                 _pages(lambda h: h.zero_pages), metric="RAM/VMM/Zero"),
    CatalogEntry("host_profit_bytes", "host",
                 "What fusion really gives the host: pages saved plus zero pages, "
                 "minus the engine's metadata (KSM's general_profit; never below 0).",
                 _host(profit_bytes), metric="RAM/VMM/Profit"),
    CatalogEntry("machine_guest_bytes", "machine",
                 "Mapped guest memory of the machine.",
                 _machine_pages(lambda m: m.guest_pages), metric="Guest/RAM/Usage/Total"),
    CatalogEntry("machine_shared_bytes", "machine",
                 "Guest memory in pages that share a host frame.",
                 _machine_pages(lambda m: m.shared_pages), metric="Guest/RAM/Usage/Shared"),
    CatalogEntry("machine_private_bytes", "machine",
                 "Guest memory in pages with a host frame of their own.",
                 _machine_pages(lambda m: m.private_pages), metric="Guest/RAM/Usage/Private"),
    CatalogEntry("machine_zero_bytes", "machine",
                 "Guest memory in zero pages, backed by no host memory.",
                 _machine_pages(lambda m: m.zero_pages), metric="Guest/RAM/Usage/Zero"),
    # Prometheus only: figures VirtualBox's collector has no metric for.
    CatalogEntry("machine_volatile_bytes", "machine",
                 "A machine's memory changed too recently to fuse.",
                 _machine_pages(lambda m: m.volatile_pages)),
    CatalogEntry("host_guest_bytes", "host",
                 "Mapped guest memory of all machines (= used + saved + zero).",
                 _pages(lambda h: h.guest_pages)),
    CatalogEntry("host_private_bytes", "host",
                 "Guest memory in pages with a frame of their own.",
                 _pages(lambda h: h.private_pages)),
    CatalogEntry("host_shared_bytes", "host",
                 "Guest memory in pages that share a frame.",
                 _pages(lambda h: h.shared_pages)),
    CatalogEntry("host_frames_shared_bytes", "host",
                 "Frames used by two or more guest pages (KSM's pages_shared).",
                 _pages(lambda h: h.frames_shared)),
    CatalogEntry("host_volatile_bytes", "host",
                 "Guest memory changed too recently to fuse (KSM's volatile rule).",
                 _pages(lambda h: h.volatile_pages)),
    CatalogEntry("metadata_bytes", "host",
                 "Engine bookkeeping: page maps, refcounts, fusion index.",
                 _host(lambda h: h.metadata_bytes)),
    CatalogEntry("pool_reserved_bytes", "host",
                 "Address space reserved for the frame pool (its budget).",
                 _host(lambda h: h.pool_bytes_reserved)),
    CatalogEntry("full_scans", "host",
                 "Scans that covered every running machine.",
                 _host(lambda h: h.full_scans), unit="count", prometheus_type="counter"),
)

#: The entries PerformanceService serves, by VirtualBox name.
PERFORMANCE_METRICS: dict[str, CatalogEntry] = {e.metric: e for e in CATALOG if e.metric}


def running_machines(stats: FusionStats) -> int:
    """Machines fully started (``pagefusion_machines_running``; not a per-object figure)."""
    return sum(1 for m in stats.machines if not m.starting)
