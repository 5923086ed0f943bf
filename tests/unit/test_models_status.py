"""`flotilla models status`'s requests line, from the controller's GetModelStatistics."""

from __future__ import annotations

from flotilla.api.v1 import controller_pb2
from flotilla.clients.models import format_batch_sizes, format_requests, format_status
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


def test_the_batches_line_names_the_most_frequent_sizes_with_their_mean_time() -> None:
    sizes = [controller_pb2.BatchSizeCounters(size=s, batches_total=n, compute_s_total=n * ms / 1000)
             for s, n, ms in ((1, 3, 10.0), (8, 120, 35.0), (3, 2, 12.0), (2, 1, 11), (4, 1, 20), (5, 1, 21), (6, 1, 22))]
    counted = controller_pb2.ModelRequestStatistics(name="m", batch_sizes=sizes)
    assert format_batch_sizes(counted) == (
        "size x batches (mean time): 8 x 120 (35.0 ms), 1 x 3 (10.0 ms), 3 x 2 (12.0 ms), 6 x 1 (22.0 ms), "
        "5 x 1 (21.0 ms), 4 x 1 (20.0 ms), and 1 more sizes"
    )
    assert format_batch_sizes(controller_pb2.ModelRequestStatistics(name="m")) == "none ran since the controller started"
