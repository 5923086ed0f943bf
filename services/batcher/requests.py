"""Classify requests for one model: parsed, checked and queued for a batch (no grpc here).

Bodies arrive as raw bytes, however they came (a unary call, a frame of the
router's relay stream), so that a malformed one is answered here with
INVALID_ARGUMENT: the router forwards bodies it never parses. A request
whose caller goes away leaves the queue at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from google.protobuf.message import DecodeError

from flotilla.api.v1 import inference_pb2, preprocess_pb2
from flotilla.common import tracing
from flotilla.common.clock import Clock
from flotilla.common.ids import check_image_uuid
from flotilla.common.wire import MODEL_HEADER
from flotilla.errors import InvalidArgument, MalformedRequest
from flotilla.services.batcher.queue import BatchQueue, Ticket


class ClassifyRequests:
    """Parses Classify requests and waits for their place in a batch."""

    def __init__(
        self,
        model: str,
        queue: BatchQueue[preprocess_pb2.BatchItem, inference_pb2.ClassifyResponse],
        clock: Clock,
        versions: Sequence[int] = (),
    ) -> None:
        self.model = model
        self.queue = queue
        self.clock = clock
        self.versions = list(versions)
        """Live versions; empty accepts any (the worker checks)."""

    def _parse(self, raw: bytes, header_model: str | None) -> inference_pb2.ClassifyRequest:
        """The request in ``raw``, checked against this batcher's model and its live versions
        (``header_model``: the model the call's header names, if any)."""
        try:
            request = inference_pb2.ClassifyRequest.FromString(raw)
        except DecodeError as exc:
            raise MalformedRequest(
                f"request body ({len(raw)} bytes) is not a valid {inference_pb2.ClassifyRequest.DESCRIPTOR.full_name}: {exc}"
            ) from exc
        for source, named in (("header " + MODEL_HEADER, header_model), ("model_name", request.model_name)):
            if named and named != self.model:
                raise InvalidArgument(f"{source} says {named!r} but the call is in the queue of {self.model!r}")
        check_image_uuid(request.image_uuid)
        if request.model_version and self.versions and request.model_version not in self.versions:
            raise InvalidArgument(
                f"model {self.model!r} has no version {request.model_version}; live versions: {self.versions} "
                "(0 or unset runs the default)"
            )
        return request

    def _enqueue(
        self, raw: bytes, header_model: str | None, timeout_s: float | None
    ) -> Ticket[preprocess_pb2.BatchItem, inference_pb2.ClassifyResponse]:
        """Parse and queue one Classify call (its span, if any, is the current one)."""
        request = self._parse(raw, header_model)
        item = preprocess_pb2.BatchItem(
            image_uuid=request.image_uuid, top_k=request.top_k, request_id=request.request_id,
            model_version=request.model_version, traceparent=tracing.current_traceparent(),
            all_scores=request.all_scores,
        )
        return self.queue.enqueue(
            item,
            deadline_s=None if timeout_s is None else self.clock.now() + timeout_s,
            priority=request.priority,
            timeout_us=request.timeout_us,
        )

    async def classify(
        self, raw: bytes, header_model: str | None, timeout_s: float | None
    ) -> inference_pb2.ClassifyResponse:
        """One Classify call's answer; cancelled, it leaves the queue at once."""
        ticket = self._enqueue(raw, header_model, timeout_s)
        try:
            return await ticket.future
        except asyncio.CancelledError:
            self.queue.withdraw(ticket)  # the caller went away: free its place now
            raise

    def start(
        self, raw: bytes, header_model: str | None, timeout_s: float | None
    ) -> asyncio.Future[inference_pb2.ClassifyResponse]:
        """One Classify call queued; cancelling the future withdraws it."""
        ticket = self._enqueue(raw, header_model, timeout_s)
        future = ticket.future
        future.add_done_callback(lambda f: self.queue.withdraw(ticket) if f.cancelled() else None)
        return future
