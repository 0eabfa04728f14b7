"""The one exception type the client raises: :class:`PageFusionError`.

Every failed RPC becomes a ``PageFusionError`` carrying the gRPC status
code, the server's message and the google.rpc error details the server
attached (``ErrorInfo``, ``BadRequest``, ``PreconditionFailure``, ...),
already unpacked into their message types.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2

_DETAIL_TYPES: tuple[type[Message], ...] = (
    error_details_pb2.ErrorInfo,
    error_details_pb2.RetryInfo,
    error_details_pb2.DebugInfo,
    error_details_pb2.QuotaFailure,
    error_details_pb2.PreconditionFailure,
    error_details_pb2.BadRequest,
    error_details_pb2.RequestInfo,
    error_details_pb2.ResourceInfo,
    error_details_pb2.Help,
    error_details_pb2.LocalizedMessage,
)

M = TypeVar("M", bound=Message)


class PageFusionError(Exception):
    """A pagefusion RPC failed.

    Attributes:
        code: the gRPC status code.
        message: the server's message (or the transport's, for UNAVAILABLE).
        details: google.rpc error details, unpacked where the type is known
            (otherwise left as ``google.protobuf.Any``).
        request_id: the ``x-request-id`` the client sent with the call.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        details: Sequence[Message] = (),
        *,
        request_id: str | None = None,
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.details: list[Message] = list(details)
        self.request_id = request_id

    def detail(self, kind: type[M]) -> M | None:
        """Return the first detail of type ``kind`` (e.g. ``PreconditionFailure``), or None."""
        for item in self.details:
            if isinstance(item, kind):
                return item
        return None

    @property
    def error_info(self) -> error_details_pb2.ErrorInfo | None:
        return self.detail(error_details_pb2.ErrorInfo)

    @property
    def reason(self) -> str | None:
        """``ErrorInfo.reason`` when the server sent one (e.g. ``MACHINE_NOT_RUNNING``)."""
        info = self.error_info
        return info.reason if info is not None and info.reason else None

    @classmethod
    def from_rpc_error(
        cls, error: grpc.RpcError, *, request_id: str | None = None
    ) -> PageFusionError:
        """Build from a failed call, parsing ``grpc-status-details-bin`` when present."""
        code = _call_attr(error, "code", grpc.StatusCode.UNKNOWN)
        message = _call_attr(error, "details", "") or ""
        details: list[Message] = []
        try:
            from grpc_status import rpc_status

            status = rpc_status.from_call(error)  # type: ignore[arg-type]
        except (ValueError, AttributeError, TypeError):
            # ValueError: the status in the trailers disagrees with the call's;
            # keep the call's code and message and drop the details.
            status = None
        if status is not None:
            message = status.message or message
            details = [unpack_detail(item) for item in status.details]
        return cls(code, message, details, request_id=request_id)


def unpack_detail(item: any_pb2.Any) -> Message:
    """Unpack a google.rpc detail into its message type when the type is known."""
    for kind in _DETAIL_TYPES:
        if item.TypeName() == kind.DESCRIPTOR.full_name:
            message = kind()
            item.Unpack(message)
            return message
    return item


def _call_attr(error: grpc.RpcError, attr: str, default: Any) -> Any:
    method = getattr(error, attr, None)
    if not callable(method):
        return default
    try:
        value = method()
    except Exception:  # a half-built call object; fall back to the default
        return default
    return default if value is None else value
