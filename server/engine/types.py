"""Plain value types the engine takes and returns (no gRPC, no numpy)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

PAGE_SIZE = 4096
PAGE_SHIFT = 12


class PageState(enum.IntEnum):
    """State of one guest page; values match pagefusion.v1.PageState."""

    UNSPECIFIED = 0
    UNMAPPED = 1
    ZERO = 2
    PRIVATE = 3
    SHARED = 4


class FusionMode(enum.IntEnum):
    """Which paths may share non-zero pages; values match pagefusion.v1.FusionMode."""

    UNSPECIFIED = 0
    HINTS = 1  # VirtualBox: only hinted module pages
    CONTENT = 2  # every page, by content, at ingest and in scans
    ALL = 3  # both (default)

    @property
    def content(self) -> bool:
        return self in (FusionMode.CONTENT, FusionMode.ALL)

    @property
    def hints(self) -> bool:
        return self in (FusionMode.HINTS, FusionMode.ALL)


@dataclass(slots=True)
class FusionConfig:
    """Engine-wide fusion settings (FusionService.GetFusionConfig)."""

    mode: FusionMode = FusionMode.ALL
    background_scan: bool = False
    pages_per_second: int = 20000
    stable_scans_before_merge: int = 1


@dataclass(frozen=True, slots=True)
class PageInfo:
    state: PageState
    share_count: int


@dataclass(frozen=True, slots=True)
class MachineStats:
    """Page counts of one machine; guest_pages = zero + private + shared."""

    machine_id: str
    guest_pages: int
    zero_pages: int
    private_pages: int
    shared_pages: int
    volatile_pages: int = 0
    starting: bool = False  # still being ingested: counts cover the pages so far
    source_error: str = ""  # why the last scan could not read the source, if it could not


@dataclass(frozen=True, slots=True)
class HostStats:
    """Host-wide counters, read under the engine lock.

    Identity: guest_pages == frames_used + pages_saved + zero_pages.
    """

    guest_pages: int
    zero_pages: int
    private_pages: int
    shared_pages: int
    frames_used: int
    frames_shared: int
    pages_saved: int
    frames_free: int  # frames the pool holds (resident chunks) but does not use
    volatile_pages: int
    full_scans: int
    metadata_bytes: int
    pool_bytes_reserved: int = 0


@dataclass(frozen=True, slots=True)
class FusionStats:
    host: HostStats
    machines: tuple[MachineStats, ...] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class ScanResult:
    pages_scanned: int = 0
    pages_fused: int = 0
    pages_copied_on_write: int = 0
    failed_machines: tuple[str, ...] = ()  # machines whose source could not be read
