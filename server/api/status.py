"""Domain error kinds -> gRPC status codes: the only place StatusCode meets the domain."""

from __future__ import annotations

from typing import NoReturn

import grpc

from server.errors import ErrorKind, ServingError

STATUS: dict[ErrorKind, grpc.StatusCode] = {
    ErrorKind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.CANCELLED: grpc.StatusCode.CANCELLED,
    ErrorKind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorKind.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}


# Client-supplied names end up in messages; gRPC refuses trailing metadata past its limit (8 KiB
# by default) and the client would see RESOURCE_EXHAUSTED instead of the real status.
MAX_DETAILS = 1024


def details(message: str) -> str:
    if len(message) <= MAX_DETAILS:
        return message
    return message[: MAX_DETAILS - 16] + " ... (truncated)"


async def abort(context: grpc.aio.ServicerContext, exc: ServingError) -> NoReturn:
    """End the call with the error's status and its (bounded) message."""
    await context.abort(STATUS[exc.kind], details(exc.message))
    raise AssertionError("unreachable: abort raises")  # pragma: no cover
