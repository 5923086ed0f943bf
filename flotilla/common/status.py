"""Where Flotilla errors and gRPC statuses meet.

Servers turn escaping exceptions into statuses in one place, the
interceptor chain (``flotilla.common.interceptors.Observe``); clients of
other Flotilla tiers turn the statuses they receive back into errors here
(``error_from_rpc``).
"""

from __future__ import annotations

import grpc

from flotilla.common.wire import ORIGIN_HEADER, RETRY_AFTER_HEADER
from flotilla.errors import Code, DeadlineExceeded, FlotillaError, ResourceExhausted, Unavailable, error_from_code


def from_grpc_code(code: grpc.StatusCode) -> Code:
    return Code[code.name]


def origin_in(exc: grpc.aio.AioRpcError | grpc.Call) -> str:
    """The origin a failed call's trailing metadata names ("" when the called tier failed itself)."""
    return next((str(v) for k, v in exc.trailing_metadata() or () if k == ORIGIN_HEADER), "")


def error_from_rpc(exc: grpc.aio.AioRpcError | grpc.Call, upstream: str) -> FlotillaError:
    """Translate a failed call to another tier into a Flotilla error (an aio call's AioRpcError, or
    a blocking call's RpcError, which is also its ``grpc.Call``).

    A status the upstream relays from below it (its trailing metadata names
    the ``origin``) passes through as it came, origin kept. Otherwise
    transport failures keep their meaning (UNAVAILABLE stays retryable,
    DEADLINE_EXCEEDED stays a deadline); other statuses pass through with
    the upstream's own message.
    """
    code = exc.code()
    details = exc.details() or code.name
    origin = origin_in(exc)
    if origin:
        return error_from_code(from_grpc_code(code).value, details, origin)
    if code == grpc.StatusCode.UNAVAILABLE:
        return Unavailable(f"{upstream} is unavailable: {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"deadline exceeded waiting for {upstream}: {details}")
    error = error_from_code(from_grpc_code(code), details)
    if isinstance(error, ResourceExhausted):  # a key over its rate says when to retry
        retry_after_ms = next((str(v) for k, v in exc.trailing_metadata() or () if k == RETRY_AFTER_HEADER), "")
        if retry_after_ms.isdigit():
            error.retry_after_s = int(retry_after_ms) / 1000
    return error
