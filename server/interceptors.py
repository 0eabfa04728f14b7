"""The server interceptor: one log line per RPC, and errors mapped to statuses.

Every call gets a request id (the client's ``x-request-id`` metadata, or a
fresh one), bound into structlog's context so whatever the call logs carries
it. Exceptions escaping a servicer are turned into a status with google.rpc
details by :func:`pagefusion.server.errors.to_status`; this is the only
place that happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import structlog
from google.protobuf.message import Message
from grpc import aio

from pagefusion.server.errors import current_resource, to_status
from pagefusion.server.logs import FastLogger

log = FastLogger("pagefusion.server.rpc")

REQUEST_ID_KEY = "x-request-id"

# uuid.uuid4().hex without building a UUID or a system call per id: 122
# random bits with the version (4) and RFC 4122 variant bits set. The bits
# come from a generator seeded by os.urandom (again in a forked child), not
# from os.urandom itself: a request id correlates log lines, it guards nothing.
_UUID4_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))
_UUID4_SET = (0x4000 << 64) | (0x8000 << 48)
_ids = random.Random(os.urandom(32))
os.register_at_fork(after_in_child=lambda: _ids.seed(os.urandom(32)))
_random_bits = _ids.getrandbits


def new_request_id() -> str:
    """A fresh request id: a random UUID (version 4) as 32 hex digits, as ``uuid4().hex``."""
    return "%032x" % (_random_bits(128) & _UUID4_CLEAR | _UUID4_SET)


def _structlog_var(key: str) -> contextvars.ContextVar[Any]:
    """The context variable behind ``structlog.contextvars.bind_contextvars(key=...)``."""
    token = structlog.contextvars.bind_contextvars(**{key: Ellipsis})[key]
    token.var.reset(token)
    return token.var


#: What bind_contextvars(request_id=...) sets, without its per-call lookups.
_bound_request_id = _structlog_var("request_id")


def _request_id(metadata: Any) -> str:
    """The client's ``x-request-id`` in the call's ``metadata``, else a fresh id."""
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and value:
            return value[:128]
    return new_request_id()


def _cancelled(exc: BaseException) -> bool:
    return isinstance(exc, asyncio.CancelledError | GeneratorExit | KeyboardInterrupt | SystemExit)


@contextlib.asynccontextmanager
async def _guard(
    method: str, request_id: str, context: aio.ServicerContext, request: Any = None
) -> AsyncIterator[None]:
    """Run one RPC: bind its request id, map escaping errors, log one line."""
    start = time.perf_counter()
    code = grpc.StatusCode.OK
    current_resource.set(None)
    with structlog.contextvars.bound_contextvars(request_id=request_id):
        try:
            yield
            code = context.code() or grpc.StatusCode.OK
        except aio.AbortError:
            code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        except BaseException as exc:
            if _cancelled(exc):
                code = grpc.StatusCode.CANCELLED
                raise
            code, message, trailers = _status_for(exc, method, context, request)
            await context.abort(code, message, trailers)
        finally:
            _log_rpc(method, request_id, code, start)


def _status_for(
    exc: BaseException, method: str, context: aio.ServicerContext, request: Any
) -> tuple[grpc.StatusCode, str, Any]:
    """The code, message and trailing metadata a call failing with ``exc`` ends with."""
    if isinstance(exc, NotImplementedError) and context.code() == grpc.StatusCode.UNIMPLEMENTED:
        # The generated base class: a method this server does not serve.
        return grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented by this server", ()
    status = to_status(exc, request if isinstance(request, Message) else None)
    return status.code, status.details, status.trailing_metadata


def _log_rpc(method: str, request_id: str, code: Any, start: float) -> None:
    if not isinstance(code, grpc.StatusCode):  # context.code() may give an int
        code = grpc.StatusCode.UNKNOWN
    log.log(
        40 if code is grpc.StatusCode.INTERNAL else 20,
        "rpc",
        method=method,
        request_id=request_id,
        code=code.name,
        duration_ms=round((time.perf_counter() - start) * 1000, 3),
    )


#: The request id of the call this task serves, set where the call's handler
#: is chosen (grpc.aio runs the interceptors and the handler in one task).
_call_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("pagefusion_request_id")

#: Wrapped handlers kept (a guard: grpc's handlers are one per method, but a
#: refusing handler is made per call).
MAX_WRAPPED = 1024


def _this_call_request_id(context: aio.ServicerContext) -> str:
    request_id = _call_request_id.get(None)
    if request_id is None:  # a grpc that ran the handler in another task: read it again
        request_id = _request_id(context.invocation_metadata())
    return request_id


def _wrap(method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """``handler`` with the request id bound, errors mapped and one line logged per call."""
    if handler.unary_unary is not None:
        unary: Any = handler.unary_unary

        # The hot path, without the context manager _guard uses for
        # streams (a generator-based manager costs more than the call).
        async def unary_unary(request: Any, context: aio.ServicerContext) -> Any:
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            request_id = _this_call_request_id(context)
            current_resource.set(None)
            token = _bound_request_id.set(request_id)
            try:
                response = await unary(request, context)
                code = context.code() or grpc.StatusCode.OK
                return response
            except aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except BaseException as exc:
                if _cancelled(exc):
                    code = grpc.StatusCode.CANCELLED
                    raise
                code, message, trailers = _status_for(exc, method, context, request)
                await context.abort(code, message, trailers)
            finally:
                _bound_request_id.reset(token)
                _log_rpc(method, request_id, code, start)

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, handler.request_deserializer, handler.response_serializer
        )

    streaming: Any = handler.unary_stream or handler.stream_stream
    if streaming is None:  # client streaming: none of ours; pass through unlogged
        return handler
    factory = (grpc.unary_stream_rpc_method_handler if handler.unary_stream is not None
               else grpc.stream_stream_rpc_method_handler)

    if inspect.isasyncgenfunction(streaming):
        async def generator(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
            async with _guard(method, _this_call_request_id(context), context, request):
                async for response in streaming(request, context):
                    yield response

        return factory(generator, handler.request_deserializer, handler.response_serializer)

    async def writer(request: Any, context: aio.ServicerContext) -> None:
        async with _guard(method, _this_call_request_id(context), context, request):
            await streaming(request, context)

    return factory(writer, handler.request_deserializer, handler.response_serializer)


class ServerInterceptor(aio.ServerInterceptor):
    """Logs every RPC and maps escaping exceptions to rich statuses.

    The wrapped handler of each method is made once and kept (keyed by the
    method and the handler it wraps); the call's request id reaches it
    through a context variable.
    """

    def __init__(self) -> None:
        self._wrapped: dict[tuple[str, int], tuple[grpc.RpcMethodHandler,
                                                   grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        _call_request_id.set(_request_id(handler_call_details.invocation_metadata))
        key = (method, id(handler))
        entry = self._wrapped.get(key)
        if entry is None or entry[0] is not handler:
            if len(self._wrapped) >= MAX_WRAPPED:
                self._wrapped.clear()
            entry = self._wrapped[key] = (handler, _wrap(method, handler))
        return entry[1]
