"""`flotilla models status`'s requests line, from the controller's GetModelStatistics."""

from __future__ import annotations

from flotilla.api.v1 import controller_pb2
from flotilla.clients.models import format_requests, format_status
from flotilla.config import ModelSettings


def test_the_requests_line_says_what_the_batching_tier_answered() -> None:
    counted = controller_pb2.ModelRequestStatistics(
        name="m", arrivals_total=40, dispatched_total=40, queue_wait_s_total=0.2, batches_total=8,
        succeeded_total=38, success_s_total=1.9, failed_total=2, fail_s_total=0.1,
    )
    assert format_requests(counted) == (
        "40 answered (38 ok, 2 failed) in 8 batches (5.0 a batch); mean 50.0 ms in the batching tier, "
        "5.0 ms of it queued (since the controller started)"
    )
    assert format_requests(controller_pb2.ModelRequestStatistics(name="m")) == "none answered since the controller started"
    spec = ModelSettings.model_validate({"storage_uri": "s3://models/m", "labels": ["a"]})
    status = controller_pb2.ModelStatus(name="m", spec_json=spec.model_dump_json())
    assert "requests:   40 answered" in format_status(status, counted)
    assert "requests:" not in format_status(status)
