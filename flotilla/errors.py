"""Flotilla's one error hierarchy.

Every error a caller can act on is a ``FlotillaError`` carrying its canonical
status ``Code``. The core of each service raises these; the gRPC layer turns
them into statuses in one place (``flotilla.common.status``). Anything else
that escapes becomes INTERNAL with a generic message and a logged traceback.

    FlotillaError                       INTERNAL
    ├── InvalidArgument                 INVALID_ARGUMENT
    │   ├── InvalidImageUuid
    │   ├── InvalidImage                (not a JPEG, truncated, undecodable)
    │   ├── ImageTooLarge               (bytes or pixels over the limit)
    │   └── MalformedRequest            (body is not the expected message)
    ├── NotFound                        NOT_FOUND
    │   ├── ModelNotFound
    │   └── ImageNotFound
    ├── AlreadyExists                   ALREADY_EXISTS
    ├── FailedPrecondition              FAILED_PRECONDITION
    │   ├── UnsupportedFramework
    │   ├── ArtifactUnavailable         (missing or unreadable in S3, bad checksum, not an ONNX model)
    │   ├── SpecMismatch                (the spec does not match model.onnx; services.controller.graph)
    │   └── ModelLoadFailed             (the backend refused to load it, or a copy failed its warm-up)
    ├── Unauthenticated                 UNAUTHENTICATED
    ├── PermissionDenied                PERMISSION_DENIED (a valid key, not allowed this)
    ├── ResourceExhausted               RESOURCE_EXHAUSTED
    │   ├── QuotaExceeded               (an API key over its rate; carries retry_after_s)
    │   ├── QueueFull
    │   └── NoCapacity                  (no replica has the memory; services.controller.placement)
    ├── DeadlineExceeded                DEADLINE_EXCEEDED
    ├── Unavailable                     UNAVAILABLE
    │   ├── StoreUnavailable
    │   ├── BackendUnavailable
    │   │   └── ReplicaInTransition     (the replica no longer holds the model; retried elsewhere)
    │   └── NoHealthyEndpoint
    └── BackendError                    INTERNAL (the backend failed the batch)

The core modules import no grpc, so ``Code`` mirrors the canonical gRPC
status codes by number (google.rpc.Code).

**Origin.** An error may name the part of the mesh that failed
(``origin``, e.g. ``"preprocess worker 127.0.0.1:5001"``, ``"object store
127.0.0.1:8333"``) when it arose below the service that answers with it. It
travels with the status between tiers (``flotilla.common.wire.ORIGIN_HEADER`` in the trailing
metadata of a unary call, ``AnswerFrame.origin`` on the relay,
``ItemError.origin`` in a worker's batch reply). An endpoint pool tells by
it an endpoint's own failure (no origin: connection refused or reset, a
timeout, a malformed answer, the endpoint shutting down), which counts
towards ejecting that endpoint and is retried on another, from a failure it
relays from below (an origin), which does neither: the tier below already
spread the call over its own replicas.
"""

from __future__ import annotations

import enum


class Code(enum.IntEnum):
    """Canonical status codes, numbered as in google.rpc.Code."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class FlotillaError(Exception):
    """Base of every error a caller gets with a specific status and message."""

    code: Code = Code.INTERNAL

    def __init__(self, message: str, *, origin: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.origin = origin
        """The part of the mesh that failed when it is below the service answering; "" for its own."""

    def from_below(self, origin: str) -> FlotillaError:
        """Mark this error as arising in ``origin`` unless it already names where it arose; returns it."""
        if not self.origin:
            self.origin = origin
        return self


class InvalidArgument(FlotillaError):
    code = Code.INVALID_ARGUMENT


class InvalidImageUuid(InvalidArgument):
    """The image uuid is empty, too long or not a canonical UUID."""


class InvalidImage(InvalidArgument):
    """The stored object is not a decodable JPEG."""


class ImageTooLarge(InvalidArgument):
    """The stored object or its decoded pixel count exceeds a configured limit."""


class MalformedRequest(InvalidArgument):
    """The request body is not a valid message of the expected type."""


class NotFound(FlotillaError):
    code = Code.NOT_FOUND


class ModelNotFound(NotFound):
    """No model of that name is served."""


class ImageNotFound(NotFound):
    """No object is stored under the image's key."""


class AlreadyExists(FlotillaError):
    code = Code.ALREADY_EXISTS


class FailedPrecondition(FlotillaError):
    """The request is valid but the system is not in a state to carry it out."""

    code = Code.FAILED_PRECONDITION


class UnsupportedFramework(FailedPrecondition):
    """No backend here runs artifacts of that framework."""


class ArtifactUnavailable(FailedPrecondition):
    """The model's artifact is missing, unreadable or fails its checksum."""


class ModelLoadFailed(FailedPrecondition):
    """The inference backend refused to load the model."""


class Unauthenticated(FlotillaError):
    code = Code.UNAUTHENTICATED


class PermissionDenied(FlotillaError):
    """The caller is known but may not do this (an API key outside its models, a non-admin key)."""

    code = Code.PERMISSION_DENIED


class ResourceExhausted(FlotillaError):
    code = Code.RESOURCE_EXHAUSTED

    retry_after_s: float | None = None
    """When set, how long the caller should wait before trying again: the gRPC layer sends it as
    ``retry-after-ms`` trailing metadata (``flotilla.common.wire.RETRY_AFTER_HEADER``), the HTTP
    front door as a ``Retry-After`` header."""


class QuotaExceeded(ResourceExhausted):
    """An API key used its request rate; ``retry_after_s`` says when its next request is allowed."""

    def __init__(self, message: str, *, retry_after_s: float, origin: str = "") -> None:
        super().__init__(message, origin=origin)
        self.retry_after_s = retry_after_s


class QueueFull(ResourceExhausted):
    """The model's batching queue is at its configured size."""


class DeadlineExceeded(FlotillaError):
    code = Code.DEADLINE_EXCEEDED


class Unavailable(FlotillaError):
    """A dependency cannot be reached right now; retrying later may succeed."""

    code = Code.UNAVAILABLE


class StoreUnavailable(Unavailable):
    """The object store did not answer."""


class BackendUnavailable(Unavailable):
    """An inference backend did not answer."""


class ReplicaInTransition(BackendUnavailable):
    """A replica answered NOT_FOUND for a model it was placed with (being unloaded or moved)."""


class NoHealthyEndpoint(Unavailable):
    """Every endpoint of a pool is down or ejected."""


class Unimplemented(FlotillaError):
    """The method is not served by this service."""

    code = Code.UNIMPLEMENTED


class BackendError(FlotillaError):
    """The inference backend answered with an error for the whole batch."""


# The most general error class of each code, for errors rebuilt from a status.
_CLASS_OF_CODE: dict[Code, type[FlotillaError]] = {
    Code.INVALID_ARGUMENT: InvalidArgument,
    Code.NOT_FOUND: NotFound,
    Code.ALREADY_EXISTS: AlreadyExists,
    Code.FAILED_PRECONDITION: FailedPrecondition,
    Code.UNAUTHENTICATED: Unauthenticated,
    Code.PERMISSION_DENIED: PermissionDenied,
    Code.RESOURCE_EXHAUSTED: ResourceExhausted,
    Code.DEADLINE_EXCEEDED: DeadlineExceeded,
    Code.UNAVAILABLE: Unavailable,
    Code.UNIMPLEMENTED: Unimplemented,
    Code.INTERNAL: FlotillaError,
}


def error_from_code(code: int, message: str, origin: str = "") -> FlotillaError:
    """Rebuild an error received as (status code, message[, origin]) from another service,
    as the class of that code (so ``except Unavailable`` still catches it)."""
    try:
        status = Code(code)
    except ValueError:
        status = Code.UNKNOWN
    cls = _CLASS_OF_CODE.get(status)
    if cls is not None:
        return cls(message, origin=origin)
    error = FlotillaError(message, origin=origin)
    error.code = status
    return error
