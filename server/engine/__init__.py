"""The fusion engine: host frame pool, guest page maps, fusion index, copy on write.

See engine.py for the overview a newcomer should read first.
"""

from pagefusion.server.engine.engine import FusionEngine
from pagefusion.server.engine.errors import (
    AlreadyExistsError,
    EngineError,
    FailedPreconditionError,
    InvalidArgumentError,
    MachineNotRunningError,
    NotFoundError,
    OutOfRangeError,
    PermissionDeniedError,
    ResourceExhaustedError,
    SourceFailedError,
)
from pagefusion.server.engine.types import (
    PAGE_SIZE,
    FusionConfig,
    FusionMode,
    FusionStats,
    HostStats,
    MachineStats,
    PageInfo,
    PageState,
    ScanResult,
)

__all__ = [
    "PAGE_SIZE",
    "AlreadyExistsError",
    "EngineError",
    "FailedPreconditionError",
    "FusionConfig",
    "FusionEngine",
    "FusionMode",
    "FusionStats",
    "HostStats",
    "InvalidArgumentError",
    "MachineNotRunningError",
    "MachineStats",
    "NotFoundError",
    "OutOfRangeError",
    "PageInfo",
    "PageState",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "ScanResult",
    "SourceFailedError",
]
