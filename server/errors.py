"""The one place errors become gRPC statuses.

Servicers raise :class:`ApiError` for what they check themselves (ids,
field masks, states) and let engine errors
(:mod:`pagefusion.server.engine.errors`) and adapter errors
(:mod:`pagefusion.adapters.base`) escape. :func:`to_status` turns any of
them into a ``grpc.Status`` carrying google.rpc details (``ErrorInfo``
always, plus ``BadRequest``, ``PreconditionFailure`` or ``ResourceInfo``
where they say more), and the server interceptor aborts the call with it.
Anything else is a bug: it becomes ``INTERNAL`` with a plain message while
the traceback goes to the log, never to the client.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterable

import grpc
import structlog
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from pagefusion.adapters import base as adapters
from pagefusion.server.engine import errors as engine

DOMAIN = "pagefusion.dev"

log = structlog.get_logger(__name__)

#: The machine resource name the current RPC is about, set by servicers once
#: they have parsed it, so engine errors (which know only ids) can name it.
current_resource: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "current_resource", default=None
)


class ApiError(Exception):
    """An error the server itself raises, already shaped as a gRPC status.

    Build it with the helpers below rather than directly.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str,
        details: Iterable[Message] = (),
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason
        self.details = tuple(details)


def invalid_argument(field: str, description: str, *, reason: str = "INVALID_ARGUMENT") -> ApiError:
    """INVALID_ARGUMENT with a BadRequest field violation naming ``field``."""
    violation = error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
    return ApiError(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"{field}: {description}",
        reason=reason,
        details=[error_details_pb2.BadRequest(field_violations=[violation])],
    )


def not_found(resource_type: str, name: str) -> ApiError:
    return ApiError(
        grpc.StatusCode.NOT_FOUND,
        f"{name} not found",
        reason="NOT_FOUND",
        details=[error_details_pb2.ResourceInfo(resource_type=resource_type, resource_name=name,
                                                description=f"{name} does not exist")],
    )


def already_exists(resource_type: str, name: str) -> ApiError:
    return ApiError(
        grpc.StatusCode.ALREADY_EXISTS,
        f"{name} already exists",
        reason="ALREADY_EXISTS",
        details=[error_details_pb2.ResourceInfo(resource_type=resource_type, resource_name=name,
                                                description=f"{name} already exists")],
    )


def failed_precondition(
    subject: str, description: str, *, type: str = "STATE", reason: str = "FAILED_PRECONDITION"
) -> ApiError:
    """FAILED_PRECONDITION with a PreconditionFailure violation about ``subject``."""
    violation = error_details_pb2.PreconditionFailure.Violation(
        type=type, subject=subject, description=description
    )
    return ApiError(
        grpc.StatusCode.FAILED_PRECONDITION,
        f"{subject}: {description}",
        reason=reason,
        details=[error_details_pb2.PreconditionFailure(violations=[violation])],
    )


def unimplemented(method: str, why: str) -> ApiError:
    return ApiError(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented yet: {why}",
                    reason="NOT_IMPLEMENTED")


def option_field(option: str | None) -> str:
    """The request field an adapter option lives in."""
    if option is None:
        return "machine.memory_source"
    if option == "adapter":
        return "machine.memory_source.adapter"
    return f"machine.memory_source.options[{option}]"


def _from_engine(exc: engine.EngineError) -> ApiError:
    code = getattr(grpc.StatusCode, exc.code, grpc.StatusCode.INTERNAL)
    subject = current_resource.get()
    details: list[Message] = []
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE) and exc.field:
        details.append(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=exc.field, description=exc.message)
        ]))
    elif code is grpc.StatusCode.FAILED_PRECONDITION:
        state_errors = (engine.MachineNotRunningError, engine.AlreadyExistsError)
        details.append(error_details_pb2.PreconditionFailure(violations=[
            error_details_pb2.PreconditionFailure.Violation(
                type="STATE" if isinstance(exc, state_errors) else "SOURCE",
                subject=subject or "", description=exc.message)
        ]))
    elif code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS) and subject:
        details.append(error_details_pb2.ResourceInfo(
            resource_type="pagefusion.dev/Machine", resource_name=subject, description=exc.message))
    message = f"{subject}: {exc.message}" if subject and subject not in exc.message else exc.message
    return ApiError(code, message, reason=exc.reason, details=details)


def _from_adapter(exc: adapters.AdapterError) -> ApiError:
    message = str(exc)
    subject = current_resource.get() or ""
    if isinstance(exc, adapters.InvalidOptionError | adapters.InvalidSourceError):
        invalid_option = isinstance(exc, adapters.InvalidOptionError)
        reason = "INVALID_OPTION" if invalid_option else "INVALID_SOURCE"
        return invalid_argument(option_field(exc.option), message, reason=reason)
    if isinstance(exc, adapters.SourceNotFoundError):
        return ApiError(grpc.StatusCode.NOT_FOUND, message, reason="SOURCE_NOT_FOUND", details=[
            error_details_pb2.ResourceInfo(resource_type="pagefusion.dev/MemorySource",
                                           resource_name=subject, description=message)])
    if isinstance(exc, adapters.SourcePermissionError):
        return ApiError(grpc.StatusCode.PERMISSION_DENIED, message, reason="PATH_NOT_ALLOWED",
                        details=[error_details_pb2.ResourceInfo(
                            resource_type="pagefusion.dev/MemorySource",
                            resource_name=subject, description=message)])
    return failed_precondition(subject, message, type="SOURCE", reason="SOURCE_FAILED")


def to_api_error(exc: BaseException) -> ApiError:
    """Map any exception to an :class:`ApiError`; unknown ones become INTERNAL."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, engine.EngineError):
        return _from_engine(exc)
    if isinstance(exc, adapters.AdapterError):
        return _from_adapter(exc)
    log.error("internal_error", exc_info=exc)
    return ApiError(grpc.StatusCode.INTERNAL, "internal error; see the server log",
                    reason="INTERNAL")


def to_status(exc: BaseException) -> grpc.Status:
    """The ``grpc.Status`` (with google.rpc details) a call failing with ``exc`` ends with."""
    err = to_api_error(exc)
    info = error_details_pb2.ErrorInfo(reason=err.reason, domain=DOMAIN)
    resource = current_resource.get()
    if resource:
        info.metadata["resource"] = resource
    packed = []
    for detail in (info, *err.details):
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)
        packed.append(any_detail)
    status = status_pb2.Status(
        code=getattr(code_pb2, err.code.name, code_pb2.INTERNAL), message=err.message,
        details=packed,
    )
    return rpc_status.to_status(status)
