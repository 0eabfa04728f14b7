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

Messages quote user input through :func:`quote` (at most 128 characters),
and :func:`to_status` bounds whatever it is given once more (the message,
every string in every detail, the whole status), so no input can make a
status big enough for a client to drop it (gRPC's 8 KiB metadata limit).
"""

from __future__ import annotations

import contextvars
import re
from collections.abc import Iterable, MutableMapping, Sequence

import grpc
import structlog
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from pagefusion.adapters import base as adapters
from pagefusion.server.engine import errors as engine
from pagefusion.server.logs import log_safely
from pagefusion.server.registry import StorageFullError

DOMAIN = "pagefusion.dev"

#: The most characters of one user input a message quotes.
QUOTE_LIMIT = 128
#: The safety net's bounds, in UTF-8 bytes: the serialized google.rpc.Status
#: (message and details together), its message, and any one detail string.
MAX_STATUS_BYTES = 1024
MAX_MESSAGE_BYTES = 512
MAX_DETAIL_STRING_BYTES = 256
#: Repeated detail fields (e.g. BadRequest violations) keep this many entries.
MAX_REPEATED = 4
_ELLIPSIS = "..."

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


def quote(value: str, limit: int = QUOTE_LIMIT) -> str:
    """``value`` quoted for a message (as ``repr`` does), cut to ``limit`` characters.

    A longer value shows its first ``limit`` characters, then ``...`` and its
    length, e.g. ``'aaaa'... (5000 characters)``.
    """
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}{_ELLIPSIS} ({len(value)} characters)"


def clip(value: str, limit: int = QUOTE_LIMIT) -> str:
    """``value`` unquoted (for field paths such as ``options[key]``), cut to ``limit``."""
    return value if len(value) <= limit else value[:limit] + _ELLIPSIS


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
    return f"machine.memory_source.options[{clip(option)}]"


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
    if isinstance(exc, StorageFullError):
        log_safely(log, 30, "storage_full", data_dir=str(exc.data_dir), error=str(exc))
        return ApiError(
            grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), reason="STORAGE_FULL",
            details=[error_details_pb2.ResourceInfo(
                resource_type="pagefusion.dev/DataDir", resource_name=str(exc.data_dir),
                description="the server's data dir has no space left")],
        )
    log_safely(log, 40, "internal_error", exc_info=exc)
    return ApiError(grpc.StatusCode.INTERNAL, "internal error; see the server log",
                    reason="INTERNAL")


def to_status(exc: BaseException, request: Message | None = None) -> grpc.Status:
    """The ``grpc.Status`` (with google.rpc details) a call failing with ``exc`` ends with.

    Args:
        exc: what the call failed with.
        request: the call's request: any of its strings longer than
            :data:`QUOTE_LIMIT` that the error repeats are shortened as
            :func:`quote` and :func:`clip` would have (for raisers that
            quote input with plain ``repr``).

    The status is bounded whatever ``exc`` says: see :func:`bounded_status`.
    """
    err = to_api_error(exc)
    info = error_details_pb2.ErrorInfo(reason=err.reason, domain=DOMAIN)
    resource = current_resource.get()
    if resource:
        info.metadata["resource"] = resource
    code = getattr(code_pb2, err.code.name, code_pb2.INTERNAL)
    inputs = long_strings(request) if request is not None else []
    return rpc_status.to_status(bounded_status(code, err.message, (info, *err.details), inputs))


def long_strings(msg: Message, limit: int = QUOTE_LIMIT) -> list[str]:
    """Every string in ``msg`` (recursively, map keys too) longer than ``limit``, longest first."""
    found: set[str] = set()

    def visit(value: object) -> None:
        if isinstance(value, str):
            if len(value) > limit:
                found.add(value)
        elif isinstance(value, Message):
            for fd, field_value in value.ListFields():
                if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
                    for key, item in field_value.items():
                        visit(key)
                        visit(item)
                elif _repeated(fd):
                    for item in field_value:
                        visit(item)
                else:
                    visit(field_value)

    visit(msg)
    return sorted(found, key=len, reverse=True)


def bounded_status(
    code: int, message: str, details: Iterable[Message], inputs: Sequence[str] = ()
) -> status_pb2.Status:
    """A google.rpc.Status of at most :data:`MAX_STATUS_BYTES` serialized bytes.

    The safety net behind :func:`quote`: every occurrence of one of
    ``inputs`` (long strings the client sent) is shortened first, quoted
    ones as :func:`quote` does, bare ones as :func:`clip`. Then the message
    is cut to :data:`MAX_MESSAGE_BYTES`, every string in the details
    (descriptions, field paths, resource names, metadata keys and values)
    to :data:`MAX_DETAIL_STRING_BYTES` and repeated fields to
    :data:`MAX_REPEATED` entries; while the whole is still too big the
    limits halve. As a last resort only the first detail (the ErrorInfo,
    whose reason clients match on) is kept.
    """
    originals = list(details)
    message_limit, string_limit = MAX_MESSAGE_BYTES, MAX_DETAIL_STRING_BYTES
    while True:
        status = status_pb2.Status(code=code, message=_cut(message, message_limit, inputs))
        for detail in originals:
            copy = type(detail)()
            copy.CopyFrom(detail)
            _bound_strings(copy, string_limit, inputs)
            status.details.add().Pack(copy)
        if status.ByteSize() <= MAX_STATUS_BYTES:
            return status
        if string_limit <= 16:
            del status.details[1:]
            return status
        message_limit, string_limit = message_limit // 2, string_limit // 2


def _repeated(fd: FieldDescriptor) -> bool:
    # protobuf 5.28 added is_repeated; protobuf 7 dropped label.
    is_repeated = getattr(fd, "is_repeated", None)
    if is_repeated is not None:
        return bool(is_repeated)
    return bool(fd.label == FieldDescriptor.LABEL_REPEATED)  # type: ignore[attr-defined]


#: A ``repr``-quoted string of more than QUOTE_LIMIT characters.
_LONG_QUOTED = re.compile(
    rf"'((?:[^'\\]|\\.){{{QUOTE_LIMIT}}})(?:[^'\\]|\\.)+'"
    rf'|"((?:[^"\\]|\\.){{{QUOTE_LIMIT}}})(?:[^"\\]|\\.)+"'
)


def _cut(text: str, limit: int, inputs: Sequence[str] = ()) -> str:
    """``text`` with long input shortened, in at most ``limit`` UTF-8 bytes (``...`` if cut).

    ``inputs`` (the request's long strings) are replaced exactly; a long
    ``repr``-quoted run left over (input stored by an earlier call, such as
    an option value a start reads) keeps its first :data:`QUOTE_LIMIT`
    characters.
    """
    for value in inputs:
        if value in text:
            text = text.replace(repr(value), quote(value)).replace(value, clip(value))
    if len(text) > QUOTE_LIMIT:
        text = _LONG_QUOTED.sub(_shorten_quoted, text)
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return text
    return data[: max(limit - len(_ELLIPSIS), 0)].decode("utf-8", "ignore") + _ELLIPSIS


def _shorten_quoted(match: re.Match[str]) -> str:
    if match.group(1) is not None:
        return f"'{match.group(1)}'{_ELLIPSIS}"
    return f'"{match.group(2)}"{_ELLIPSIS}'


def _bound_strings(msg: Message, limit: int, inputs: Sequence[str]) -> None:
    """Cut every string in ``msg`` (recursively) to ``limit`` bytes, repeated fields to a few."""
    for fd, value in msg.ListFields():
        repeated = _repeated(fd)
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            _bound_map(value, fd.message_type.fields_by_name["value"], limit, inputs)
        elif fd.type == FieldDescriptor.TYPE_STRING:
            if repeated:
                value[:] = [_cut(v, limit, inputs) for v in value[:MAX_REPEATED]]
            else:
                setattr(msg, fd.name, _cut(value, limit, inputs))
        elif fd.type == FieldDescriptor.TYPE_MESSAGE:
            if repeated:
                del value[MAX_REPEATED:]
                for item in value:
                    _bound_strings(item, limit, inputs)
            else:
                _bound_strings(value, limit, inputs)


def _bound_map(
    entries: MutableMapping, value_fd: FieldDescriptor, limit: int, inputs: Sequence[str]
) -> None:
    keys = sorted(entries)
    for key in keys[MAX_REPEATED:]:
        del entries[key]
    for key in keys[:MAX_REPEATED]:
        value = entries[key]
        if value_fd.type == FieldDescriptor.TYPE_MESSAGE:
            _bound_strings(value, limit, inputs)
            continue
        new_key = _cut(key, limit, inputs) if isinstance(key, str) else key
        if value_fd.type == FieldDescriptor.TYPE_STRING:
            value = _cut(value, limit, inputs)
        if new_key != key:
            del entries[key]
        entries[new_key] = value
