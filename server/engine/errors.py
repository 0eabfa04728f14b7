"""The engine's errors: one hierarchy rooted at :class:`EngineError`.

Each class names the gRPC status code the server maps it to (as a plain
string, so the engine stays free of gRPC imports). ``field`` names the
request field or option at fault, when there is one; ``reason`` is a short
UPPER_SNAKE machine-readable cause for google.rpc.ErrorInfo.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base of every error the engine raises on purpose."""

    code = "INTERNAL"
    reason = "ENGINE_ERROR"

    def __init__(
        self, message: str, *, field: str | None = None, reason: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        if reason is not None:
            self.reason = reason


class InvalidArgumentError(EngineError):
    code = "INVALID_ARGUMENT"
    reason = "INVALID_ARGUMENT"


class NotFoundError(EngineError):
    code = "NOT_FOUND"
    reason = "NOT_FOUND"


class MachineNotRunningError(EngineError):
    """The machine is not running in the engine (FAILED_PRECONDITION)."""

    code = "FAILED_PRECONDITION"
    reason = "MACHINE_NOT_RUNNING"


class AlreadyExistsError(EngineError):
    code = "ALREADY_EXISTS"
    reason = "ALREADY_EXISTS"


class FailedPreconditionError(EngineError):
    code = "FAILED_PRECONDITION"
    reason = "FAILED_PRECONDITION"


class OutOfRangeError(EngineError):
    """An address outside the machine's mapped guest-physical ranges."""

    code = "OUT_OF_RANGE"
    reason = "ADDRESS_UNMAPPED"


class ResourceExhaustedError(EngineError):
    """The frame pool's budget (--max-pool-bytes) would be exceeded."""

    code = "RESOURCE_EXHAUSTED"
    reason = "POOL_BUDGET_EXHAUSTED"


class PermissionDeniedError(EngineError):
    code = "PERMISSION_DENIED"
    reason = "PERMISSION_DENIED"


class SourceFailedError(EngineError):
    """The machine's memory source failed while being read (FAILED_PRECONDITION)."""

    code = "FAILED_PRECONDITION"
    reason = "SOURCE_FAILED"
