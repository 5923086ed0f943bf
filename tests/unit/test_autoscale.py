"""Autoscaler: queue-wait scale-up, idle scale-down, scale to zero, cooldown, batcher restarts."""

from __future__ import annotations

import pytest

from flotilla.config import AutoscaleSettings
from flotilla.services.controller.autoscale import Autoscaler, Decision

SETTINGS = AutoscaleSettings(
    interval_s=1.0,
    queue_wait_high_ms=100.0,
    scale_up_window_s=5.0,
    scale_down_idle_s=60.0,
    scale_to_zero_idle_s=300.0,
    cooldown_s=10.0,
)
M = "resnet50"


class Batcher:
    """A model's batcher counters, moved by hand and reported to the autoscaler."""

    def __init__(self, scaler: Autoscaler, model: str = M) -> None:
        self.scaler = scaler
        self.model = model
        self.arrivals_total = 0
        self.dispatched_total = 0
        self.queue_wait_s_total = 0.0

    def tick(self, now_s: float, *, requests: int = 0, wait_ms: float = 0.0, queued: int = 0) -> None:
        """``requests`` arrive and leave the queue after ``wait_ms`` each; ``queued`` are left waiting."""
        self.arrivals_total += requests + queued
        self.dispatched_total += requests
        self.queue_wait_s_total += requests * wait_ms / 1000.0
        self.report(now_s, queued)

    def report(self, now_s: float, queued: int = 0) -> None:
        self.scaler.observe(
            self.model,
            now_s,
            arrivals_total=self.arrivals_total,
            dispatched_total=self.dispatched_total,
            queue_wait_s_total=self.queue_wait_s_total,
            queue_depth=queued,
        )


def decide(
    scaler: Autoscaler, now_s: float, copies: int = 1, min_copies: int = 1, max_copies: int = 3, loading: bool = False
) -> Decision:
    """Decide, then act on the decision as the controller does."""
    decision = scaler.decide(M, now_s, copies=copies, min_copies=min_copies, max_copies=max_copies, loading=loading)
    scaler.acted(M, now_s, decision.action)
    return decision


def setup() -> tuple[Autoscaler, Batcher]:
    scaler = Autoscaler(SETTINGS)
    batcher = Batcher(scaler)
    batcher.report(0.0)  # baseline
    return scaler, batcher


# --- scale up on queue wait ---


def test_sustained_high_wait_adds_after_the_window_and_not_before() -> None:
    scaler, batcher = setup()
    for t in range(1, 6):
        batcher.tick(float(t), requests=10, wait_ms=230)
        assert decide(scaler, float(t)).action == "none"
    assert scaler.queue_wait_ms(M) == pytest.approx(230)
    assert "of the 5.0 s window" in decide(scaler, 5.0).reason
    batcher.tick(6.0, requests=10, wait_ms=230)
    assert decide(scaler, 6.0) == Decision("add", "queue wait 230 ms > 100 ms for 5.0 s (window 5.0 s)")


def test_a_dip_to_the_threshold_resets_the_window() -> None:
    scaler, batcher = setup()
    for t in range(1, 5):
        batcher.tick(float(t), requests=10, wait_ms=230)
    batcher.tick(5.0, requests=10, wait_ms=100)  # at the threshold is not above it
    assert decide(scaler, 5.0).action == "none"
    for t in range(6, 11):
        batcher.tick(float(t), requests=10, wait_ms=230)
        assert decide(scaler, float(t)).action == "none"
    batcher.tick(11.0, requests=10, wait_ms=230)
    assert decide(scaler, 11.0).action == "add"


def test_queued_requests_with_no_dispatch_count_as_high() -> None:
    scaler, batcher = setup()
    for t in range(1, 6):
        batcher.tick(float(t), queued=4)
    assert scaler.queue_wait_ms(M) is None
    batcher.tick(6.0, queued=4)
    decision = decide(scaler, 6.0)
    assert decision.action == "add"
    assert "requests queued with none dispatched" in decision.reason


def test_no_dispatch_and_an_empty_queue_resets() -> None:
    scaler, batcher = setup()
    for t in range(1, 5):
        batcher.tick(float(t), requests=10, wait_ms=500)
    batcher.tick(5.0)  # nothing arrived, nothing queued
    batcher.tick(6.0, requests=10, wait_ms=500)
    assert decide(scaler, 6.0).action == "none"
    batcher.tick(11.0, requests=10, wait_ms=500)
    assert decide(scaler, 11.0).action == "add"


def test_cooldown_follows_every_scaling_decision() -> None:
    scaler, batcher = setup()
    for t in range(1, 7):
        batcher.tick(float(t), requests=10, wait_ms=230)
    assert decide(scaler, 6.0, copies=1).action == "add"
    for t in range(7, 16):
        batcher.tick(float(t), requests=10, wait_ms=230)
        decision = decide(scaler, float(t), copies=2)
        assert decision.action == "none"
        assert "cooldown" in decision.reason
    assert decide(scaler, 15.5, copies=2).reason == "in cooldown after the last add: 0.5 s left"
    batcher.tick(16.0, requests=10, wait_ms=230)
    assert decide(scaler, 16.0, copies=2).action == "add"


def test_at_max_copies_high_wait_adds_nothing_and_says_so() -> None:
    scaler, batcher = setup()
    for t in range(1, 7):
        batcher.tick(float(t), requests=10, wait_ms=230)
    decision = decide(scaler, 6.0, copies=3, max_copies=3)
    assert decision.action == "none"
    assert "queue wait 230 ms > 100 ms" in decision.reason
    assert "already at max_copies 3" in decision.reason


def test_a_load_under_way_decides_nothing() -> None:
    scaler, batcher = setup()
    for t in range(1, 7):
        batcher.tick(float(t), requests=10, wait_ms=230)
    assert decide(scaler, 6.0, copies=0, loading=True).action == "none"


def test_below_min_copies_adds_at_once_even_in_cooldown() -> None:
    scaler, _ = setup()
    first = decide(scaler, 1.0, copies=0, min_copies=2)
    assert first == Decision("add", "0 copies is below min_copies 2")
    assert decide(scaler, 2.0, copies=1, min_copies=2).action == "add"
    assert "cooldown" in decide(scaler, 3.0, copies=2, min_copies=2).reason


# --- scale down and to zero ---


def test_idle_removes_copies_down_to_min_copies() -> None:
    scaler, batcher = setup()
    batcher.tick(10.0, requests=1)
    assert decide(scaler, 69.9, copies=3, min_copies=2).action == "none"
    decision = decide(scaler, 70.0, copies=3, min_copies=2)
    assert decision == Decision("remove", "no request for 60.0 s; 3 copies, scaling down after 60.0 s idle")
    assert decide(scaler, 100.0, copies=2, min_copies=2).action == "none"


def test_idle_never_removes_the_last_copy() -> None:
    scaler, batcher = setup()
    batcher.tick(10.0, requests=1)
    assert decide(scaler, 70.0, copies=2, min_copies=0).action == "remove"
    assert decide(scaler, 200.0, copies=1, min_copies=0).action == "none"
    assert decide(scaler, 200.0, copies=1, min_copies=1).action == "none"


def test_scale_to_zero_after_its_idle_time() -> None:
    scaler, batcher = setup()
    batcher.tick(100.0, requests=1)
    assert decide(scaler, 399.9, copies=1, min_copies=0).action == "none"
    decision = decide(scaler, 400.0, copies=2, min_copies=0)
    assert decision == Decision("zero", "no request for 300.0 s; unloading every copy after 300.0 s idle")
    assert decide(scaler, 500.0, copies=0, min_copies=0).action == "none"


def test_scale_to_zero_counts_from_the_first_observation_when_never_used() -> None:
    scaler = Autoscaler(SETTINGS)
    Batcher(scaler).report(50.0)
    assert decide(scaler, 349.9, copies=1, min_copies=0).action == "none"
    decision = decide(scaler, 350.0, copies=1, min_copies=0)
    assert decision.action == "zero"
    assert "since it was first observed" in decision.reason


def test_min_copies_above_zero_never_scales_to_zero() -> None:
    scaler, _ = setup()
    assert decide(scaler, 10_000.0, copies=1, min_copies=1).action == "none"


def test_an_unobserved_model_is_not_idle() -> None:
    scaler = Autoscaler(SETTINGS)
    assert decide(scaler, 10_000.0, copies=2, min_copies=0).action == "none"


# --- usage tracking ---


def test_last_used_moves_on_arrivals_or_a_queue() -> None:
    scaler, batcher = setup()
    assert scaler.last_used_s(M) is None
    batcher.tick(5.0, requests=3, wait_ms=1)
    assert scaler.last_used_s(M) == 5.0
    batcher.tick(6.0)
    assert scaler.last_used_s(M) == 5.0
    batcher.report(7.0, queued=2)  # still queued, nothing new arrived
    assert scaler.last_used_s(M) == 7.0
    assert scaler.last_used_s("other") is None


def test_queue_wait_is_the_mean_of_the_last_interval() -> None:
    scaler, batcher = setup()
    assert scaler.queue_wait_ms(M) is None
    batcher.tick(1.0, requests=4, wait_ms=50)
    batcher.tick(2.0, requests=1, wait_ms=300)
    assert scaler.queue_wait_ms(M) == pytest.approx(300)
    batcher.tick(3.0)
    assert scaler.queue_wait_ms(M) is None


def test_batcher_restart_starts_again_without_a_spike() -> None:
    scaler, batcher = setup()
    batcher.tick(1.0, requests=1000, wait_ms=10)
    # The batcher restarts: its counters start again from zero and are already a little way in.
    batcher.arrivals_total, batcher.dispatched_total, batcher.queue_wait_s_total = 5, 5, 10.0
    batcher.report(2.0)
    assert scaler.queue_wait_ms(M) is None
    assert scaler.last_used_s(M) == 1.0
    for t in range(3, 10):
        batcher.tick(float(t), requests=10, wait_ms=20)
        assert decide(scaler, float(t)).action == "none"
    assert scaler.queue_wait_ms(M) == pytest.approx(20)


def test_forget_drops_usage_and_cooldown() -> None:
    scaler, batcher = setup()
    batcher.tick(1.0, requests=1)
    assert decide(scaler, 2.0, copies=0).action == "add"
    scaler.forget(M)
    assert scaler.last_used_s(M) is None
    assert decide(scaler, 3.0, copies=0).action == "add"
    assert decide(scaler, 4.0, copies=1, max_copies=1).reason == "in cooldown after the last add: 9.0 s left"


def test_deciding_has_no_side_effects_only_acting_starts_the_cooldown() -> None:
    scaler = Autoscaler(SETTINGS)
    Batcher(scaler).report(0.0)
    idle_s = SETTINGS.scale_down_idle_s + 1

    def ask(now_s: float) -> Decision:
        return scaler.decide(M, now_s, copies=2, min_copies=1, max_copies=3, loading=False)

    assert ask(idle_s).action == "remove"
    assert ask(idle_s + 0.1).action == "remove", "asking twice is still the same answer"
    scaler.acted(M, idle_s + 0.1, "remove")
    assert "cooldown after the last remove" in ask(idle_s + 0.2).reason
