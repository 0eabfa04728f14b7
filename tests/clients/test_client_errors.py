"""PageFusionError: code, message and unpacked google.rpc details."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from pagefusion.clients.errors import PageFusionError


class FakeCall(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str, trailers: Any = ()) -> None:
        self._code, self._details, self._trailers = code, details, tuple(trailers)

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> Any:
        return self._trailers


def packed(message: Any) -> any_pb2.Any:
    item = any_pb2.Any()
    item.Pack(message)
    return item


def test_details_are_unpacked() -> None:
    violation = error_details_pb2.PreconditionFailure(
        violations=[error_details_pb2.PreconditionFailure.Violation(type="STATE", subject="x")]
    )
    info = error_details_pb2.ErrorInfo(reason="MACHINE_NOT_POWERED_OFF", domain="pagefusion.dev")
    status = status_pb2.Status(
        code=code_pb2.FAILED_PRECONDITION,
        message="machines/x is running",
        details=[packed(info), packed(violation)],
    )
    call = FakeCall(
        grpc.StatusCode.FAILED_PRECONDITION,
        "machines/x is running",
        [("grpc-status-details-bin", status.SerializeToString())],
    )
    error = PageFusionError.from_rpc_error(call, request_id="abc")
    assert error.code is grpc.StatusCode.FAILED_PRECONDITION
    assert error.message == "machines/x is running"
    assert str(error) == "FAILED_PRECONDITION: machines/x is running"
    assert error.reason == "MACHINE_NOT_POWERED_OFF"
    assert error.detail(error_details_pb2.PreconditionFailure) == violation
    assert error.detail(error_details_pb2.BadRequest) is None
    assert error.request_id == "abc"


def test_plain_status_without_details() -> None:
    error = PageFusionError.from_rpc_error(
        FakeCall(grpc.StatusCode.UNAVAILABLE, "connection refused")
    )
    assert error.code is grpc.StatusCode.UNAVAILABLE
    assert error.message == "connection refused"
    assert error.details == []
    assert error.reason is None


def test_inconsistent_details_keep_the_call_status() -> None:
    status = status_pb2.Status(code=code_pb2.NOT_FOUND, message="something else")
    call = FakeCall(
        grpc.StatusCode.INTERNAL, "boom", [("grpc-status-details-bin", status.SerializeToString())]
    )
    error = PageFusionError.from_rpc_error(call)
    assert (error.code, error.message, error.details) == (grpc.StatusCode.INTERNAL, "boom", [])


def test_unknown_detail_types_stay_packed() -> None:
    unknown = any_pb2.Any(type_url="type.googleapis.com/example.Unknown", value=b"")
    status = status_pb2.Status(code=code_pb2.INTERNAL, message="m", details=[unknown])
    call = FakeCall(
        grpc.StatusCode.INTERNAL, "m", [("grpc-status-details-bin", status.SerializeToString())]
    )
    assert PageFusionError.from_rpc_error(call).details == [unknown]
