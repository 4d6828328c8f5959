"""The one place where exceptions become gRPC statuses."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from quotagate.core.errors import InvalidRequest, NotFound, StoreUnavailable

log = logging.getLogger("quotagate.rpc")


class Unauthenticated(Exception):
    pass


class PermissionDenied(Exception):
    pass


_STATUS: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (StoreUnavailable, grpc.StatusCode.UNAVAILABLE),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
]

R = TypeVar("R")


def status_code_of(exc: BaseException) -> grpc.StatusCode | None:
    """The gRPC status of a known exception; None for anything else."""
    for kind, code in _STATUS:
        if isinstance(exc, kind):
            return code
    return None


def grpc_errors(
    method: Callable[..., Awaitable[R]],
) -> Callable[..., Awaitable[R]]:
    """Aborts the call with the status of a known exception; anything else is INTERNAL and logged."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> R:
        try:
            return await method(self, request, context)
        except Exception as exc:
            for kind, code in _STATUS:
                if isinstance(exc, kind):
                    await context.abort(code, str(exc))
            log.exception("unexpected error in %s", method.__qualname__)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the quotagate log")
            raise  # unreachable: abort raises

    return wrapper
