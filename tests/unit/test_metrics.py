"""``metrics.models_served``: a tier's counters exist at 0 from the moment it learns a model, and
go with the model."""

from __future__ import annotations

from prometheus_client import REGISTRY

from flotilla.common import metrics


def sample(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_a_routed_model_has_every_code_at_zero_until_it_is_unrouted() -> None:
    metrics.models_served("router", ["m1", "m2"])
    for code in ("OK", "UNAVAILABLE", "DEADLINE_EXCEEDED", "INTERNAL", "NOT_FOUND", "UNAUTHENTICATED"):
        assert sample("flotilla_grpc_requests_total", tier="router", method="Classify", model="m1", code=code) == 0
    assert sample("flotilla_admission_rejected_total", tier="router") is not None

    metrics.REQUESTS.labels("router", "Classify", "m2", "UNAVAILABLE").inc(9)
    metrics.REQUESTS.labels("router", "Classify", "m2", "ABORTED").inc()  # a code nobody made at 0
    metrics.models_served("router", ["m1"])
    assert sample("flotilla_grpc_requests_total", tier="router", method="Classify", model="m2", code="UNAVAILABLE") is None
    assert sample("flotilla_grpc_requests_total", tier="router", method="Classify", model="m2", code="ABORTED") is None
    assert sample("flotilla_grpc_requests_total", tier="router", method="Classify", model="m1", code="OK") == 0

    metrics.REQUESTS.labels("router", "Classify", "m1", "OK").inc(3)
    metrics.models_served("router", ["m1", "m3"])  # learning another model leaves the counted ones be
    assert sample("flotilla_grpc_requests_total", tier="router", method="Classify", model="m1", code="OK") == 3
    metrics.models_served("router", [])
    assert sample("flotilla_grpc_requests_total", tier="router", method="Classify", model="m1", code="OK") is None


def test_each_tier_makes_its_own_error_counters() -> None:
    metrics.models_served("batcher", ["b"])
    for reason in ("queue_full", "expired"):
        assert sample("flotilla_batcher_rejected_total", model="b", reason=reason) == 0
    assert sample("flotilla_grpc_requests_total", tier="batcher", method="Classify", model="b", code="UNAUTHENTICATED") is None

    metrics.models_served("preprocess", ["w"])
    assert sample("flotilla_grpc_requests_total", tier="preprocess", method="ProcessBatch", model="w", code="UNAVAILABLE") == 0
    for kind in ("not_found", "refused", "unreachable"):
        assert sample("flotilla_s3_errors_total", operation="get", kind=kind) is not None

    metrics.models_served("controller", ["c"])
    assert sample("flotilla_controller_events_total", model="c", kind="load_failed") == 0
    assert sample("flotilla_controller_cold_start_wait_seconds_count", model="c") == 0
    metrics.models_served("controller", [])
    assert sample("flotilla_controller_events_total", model="c", kind="load_failed") is None
    assert sample("flotilla_controller_cold_start_wait_seconds_count", model="c") is None
