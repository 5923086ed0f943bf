"""The one place where Flotilla errors and gRPC statuses meet.

Servers turn exceptions into statuses here (``rpc_errors``); clients of other
Flotilla tiers turn the statuses they receive back into errors here
(``error_from_rpc``). Unknown exceptions become INTERNAL with a generic
message; the traceback goes to the log, never to the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import grpc

from flotilla.errors import (
    Code,
    DeadlineExceeded,
    FlotillaError,
    Unavailable,
    error_from_code,
)

log = logging.getLogger(__name__)


def to_grpc_code(code: Code) -> grpc.StatusCode:
    return grpc.StatusCode[code.name]


def from_grpc_code(code: grpc.StatusCode) -> Code:
    return Code[code.name]


@contextlib.asynccontextmanager
async def rpc_errors(context: grpc.aio.ServicerContext, service: str) -> AsyncIterator[None]:
    """Abort the call with the status an escaping exception maps to.

    ``service`` names the tier in the generic INTERNAL message so that an
    operator knows which log to read. A call that its deadline or its caller
    has already ended gets no status (there is nobody to send it to).
    """
    try:
        yield
        return
    except FlotillaError as exc:
        code, details = to_grpc_code(exc.code), exc.message
    except grpc.aio.AioRpcError as exc:  # an upstream tier's status, passed through
        code, details = exc.code(), exc.details() or exc.code().name
    except Exception:
        log.exception("%s: unhandled error", service)
        code, details = grpc.StatusCode.INTERNAL, f"internal error in the {service}; see its log"
    if _call_is_over(context):
        raise asyncio.CancelledError()
    await context.abort(code, details)


def _call_is_over(context: grpc.aio.ServicerContext) -> bool:
    """True when the caller or the deadline has ended the call.

    At the instant the deadline passes, done() can still be False while gRPC
    already refuses a status, so the remaining time is checked as well.
    """
    remaining_s = context.time_remaining()
    return context.done() or (remaining_s is not None and remaining_s <= 0)


def error_from_rpc(exc: grpc.aio.AioRpcError, upstream: str) -> FlotillaError:
    """Translate a failed call to another tier into a Flotilla error.

    Transport failures keep their meaning (UNAVAILABLE stays retryable,
    DEADLINE_EXCEEDED stays a deadline); other statuses pass through with
    the upstream's own message.
    """
    code = exc.code()
    details = exc.details() or code.name
    if code == grpc.StatusCode.UNAVAILABLE:
        return Unavailable(f"{upstream} is unavailable: {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"deadline exceeded waiting for {upstream}: {details}")
    return error_from_code(from_grpc_code(code), details)
