"""Placement: where a copy goes, what is evicted for it, which copy is removed first."""

from __future__ import annotations

import pytest

from flotilla.errors import Code, ResourceExhausted
from flotilla.services.controller.placement import (
    CopyInfo,
    Eviction,
    ModelUsage,
    NoCapacity,
    Placement,
    ReplicaInfo,
    can_ever_fit,
    choose_copy_to_remove,
    choose_replica,
    copies_of,
)

NOW_S = 1000.0
IDLE_AFTER_S = 10.0
R1, R2, R3 = "127.0.0.1:5001", "127.0.0.1:5002", "127.0.0.1:5003"


def replica(address: str, budget_mb: float, *copies: CopyInfo, healthy: bool = True) -> ReplicaInfo:
    return ReplicaInfo(address, budget_mb, {c.model: c for c in copies}, healthy=healthy)


def usage_of(*models: ModelUsage) -> dict[str, ModelUsage]:
    return {m.name: m for m in models}


def place(model: ModelUsage, replicas: list[ReplicaInfo], usage: dict[str, ModelUsage]) -> Placement:
    return choose_replica(model, replicas, usage, NOW_S, evict_idle_after_s=IDLE_AFTER_S)


NEW = ModelUsage("new", memory_mb=400)


def idle(name: str, memory_mb: float, idle_s: float | None, *, min_copies: int = 0, busy: bool = False) -> ModelUsage:
    """A model last used ``idle_s`` before NOW_S (None: never used)."""
    last_used_s = None if idle_s is None else NOW_S - idle_s
    return ModelUsage(name, memory_mb, min_copies=min_copies, last_used_s=last_used_s, busy=busy)


# --- memory accounting ---


def test_used_memory_counts_every_state() -> None:
    r = replica(
        R1,
        1024,
        CopyInfo("a", 100, "loading"),
        CopyInfo("b", 200, "ready"),
        CopyInfo("c", 300, "draining"),
    )
    assert r.used_mb == 600
    assert r.free_mb == 424


def test_copies_of_counts_loading_and_ready_by_default() -> None:
    replicas = [
        replica(R1, 1024, CopyInfo("a", 100, "loading")),
        replica(R2, 1024, CopyInfo("a", 100, "ready")),
        replica(R3, 1024, CopyInfo("a", 100, "draining")),
    ]
    assert copies_of("a", replicas) == [R1, R2]
    assert copies_of("a", replicas, states=("draining",)) == [R3]
    assert copies_of("b", replicas) == []


def test_can_ever_fit_looks_at_healthy_budgets_only() -> None:
    replicas = [replica(R1, 1024, CopyInfo("a", 1000)), replica(R2, 4096, healthy=False)]
    assert can_ever_fit(1024, replicas)  # the whole budget, whatever is loaded now
    assert not can_ever_fit(1025, replicas)
    assert not can_ever_fit(1, [])


# --- placing without eviction ---


def test_fits_on_the_replica_with_most_free_memory() -> None:
    replicas = [replica(R1, 1024, CopyInfo("a", 600)), replica(R2, 1024, CopyInfo("b", 324))]
    placement = place(NEW, replicas, usage_of(idle("a", 600, 0), idle("b", 324, 0)))
    assert placement == Placement(R2, (), placement.reason)
    assert placement.reason.startswith(f"{R2} has 700 MiB free of 1024")


def test_ties_go_to_fewer_copies_then_address() -> None:
    fewer = [
        replica(R1, 1024, CopyInfo("a", 100), CopyInfo("b", 100)),
        replica(R2, 1024, CopyInfo("c", 200)),
    ]
    assert place(NEW, fewer, {}).replica == R2
    same = [replica(R2, 1024), replica(R1, 1024)]
    assert place(NEW, same, {}).replica == R1


def test_copies_spread_over_replicas() -> None:
    model = ModelUsage("m", 300, max_copies=3)
    replicas = [replica(R1, 1024), replica(R2, 1024), replica(R3, 1024)]
    chosen = []
    for _ in range(3):
        address = place(model, replicas, usage_of(model)).replica
        next(r for r in replicas if r.address == address).copies["m"] = CopyInfo("m", 300, "loading")
        chosen.append(address)
    assert sorted(chosen) == [R1, R2, R3]


def test_replicas_holding_the_model_in_any_state_are_not_candidates() -> None:
    replicas = [
        replica(R1, 4096, CopyInfo("new", 400, "draining")),
        replica(R2, 4096, CopyInfo("new", 400, "loading")),
        replica(R3, 1024),
    ]
    assert place(NEW, replicas, {}).replica == R3


def test_loading_and_draining_copies_take_memory() -> None:
    replicas = [
        replica(R1, 1024, CopyInfo("a", 700, "loading")),
        replica(R2, 1024, CopyInfo("b", 700, "draining")),
        replica(R3, 1024, CopyInfo("c", 500, "ready")),
    ]
    assert place(NEW, replicas, {}).replica == R3


def test_unhealthy_replicas_are_skipped() -> None:
    replicas = [replica(R1, 4096, healthy=False), replica(R2, 1024, CopyInfo("a", 100))]
    assert place(NEW, replicas, {}).replica == R2


def test_no_healthy_replica_is_no_capacity() -> None:
    with pytest.raises(NoCapacity, match="no healthy replica"):
        place(NEW, [replica(R1, 4096, healthy=False)], {})


def test_every_replica_already_holding_the_model_is_no_capacity() -> None:
    with pytest.raises(NoCapacity, match="already holds a copy of 'new'"):
        place(NEW, [replica(R1, 4096, CopyInfo("new", 400))], {})


# --- eviction ---


def test_evicts_least_recently_used_first_until_there_is_room() -> None:
    r = replica(R1, 1000, CopyInfo("recent", 300), CopyInfo("old", 300), CopyInfo("never", 300))
    usage = usage_of(idle("recent", 300, 20), idle("old", 300, 60), idle("never", 300, None))
    placement = place(ModelUsage("new", 600), [r], usage)
    assert [e.model for e in placement.evictions] == ["never", "old"]
    assert placement.evictions[0] == Eviction(R1, "never", "never used (least recently used)")
    assert placement.evictions[1] == Eviction(R1, "old", "idle for 60.0 s (least recently used)")
    assert placement.reason == f"{R1} has 700 MiB free of 1000 after evicting never, old, needs 600"


def test_never_used_ties_break_by_model_name() -> None:
    r = replica(R1, 600, CopyInfo("b", 300), CopyInfo("a", 300))
    placement = place(NEW, [r], usage_of(idle("a", 300, None), idle("b", 300, None)))
    assert [e.model for e in placement.evictions] == ["a", "b"]


def test_recently_used_copies_are_not_evicted() -> None:
    r = replica(R1, 600, CopyInfo("fresh", 300), CopyInfo("stale", 300))
    placement = place(ModelUsage("new", 300), [r], usage_of(idle("fresh", 300, 9.9), idle("stale", 300, 10.0)))
    assert [e.model for e in placement.evictions] == ["stale"]


def test_busy_copies_are_not_evicted() -> None:
    r = replica(R1, 600, CopyInfo("busy", 300), CopyInfo("quiet", 300))
    usage = usage_of(idle("busy", 300, None, busy=True), idle("quiet", 300, 100))
    assert [e.model for e in place(ModelUsage("new", 300), [r], usage).evictions] == ["quiet"]


def test_only_ready_copies_of_known_models_are_evicted() -> None:
    r = replica(
        R1,
        1200,
        CopyInfo("loading", 300, "loading"),
        CopyInfo("draining", 300, "draining"),
        CopyInfo("unknown", 300),
        CopyInfo("ready", 300),
    )
    usage = usage_of(idle("loading", 300, None), idle("draining", 300, None), idle("ready", 300, 100))
    assert [e.model for e in place(ModelUsage("new", 300), [r], usage).evictions] == ["ready"]


def test_min_copies_are_respected_over_all_replicas() -> None:
    pinned = idle("pinned", 500, None, min_copies=2)
    spare = idle("spare", 500, None, min_copies=1)
    replicas = [
        replica(R1, 1000, CopyInfo("pinned", 500), CopyInfo("spare", 500)),
        replica(R2, 1000, CopyInfo("pinned", 500), CopyInfo("spare", 500, "loading")),
    ]
    usage = usage_of(pinned, spare)
    placement = place(ModelUsage("new", 500), replicas, usage)
    # pinned has exactly 2 copies; spare has 2 (one loading) and may lose the ready one on R1.
    assert placement.replica == R1
    assert [e.model for e in placement.evictions] == ["spare"]


def test_a_draining_copy_does_not_count_towards_min_copies() -> None:
    replicas = [
        replica(R1, 500, CopyInfo("a", 500)),
        replica(R2, 0, CopyInfo("a", 0, "draining")),
    ]
    with pytest.raises(NoCapacity, match="a is at min_copies 1"):
        place(ModelUsage("new", 500), replicas, usage_of(idle("a", 500, None, min_copies=1)))


def test_a_min_copies_zero_model_may_lose_its_last_copy() -> None:
    r = replica(R1, 500, CopyInfo("a", 500))
    placement = place(ModelUsage("new", 500), [r], usage_of(idle("a", 500, 100, min_copies=0)))
    assert [e.model for e in placement.evictions] == ["a"]


def test_prefers_the_replica_needing_fewest_evictions() -> None:
    replicas = [
        replica(R1, 600, CopyInfo("a", 200), CopyInfo("b", 200), CopyInfo("c", 200)),
        replica(R2, 600, CopyInfo("d", 600)),
    ]
    usage = usage_of(idle("a", 200, None), idle("b", 200, None), idle("c", 200, None), idle("d", 600, 30))
    placement = place(ModelUsage("new", 400), replicas, usage)
    assert placement.replica == R2
    assert [e.model for e in placement.evictions] == ["d"]


def test_then_the_replica_whose_evicted_copies_were_used_least_recently() -> None:
    replicas = [replica(R1, 500, CopyInfo("a", 500)), replica(R2, 500, CopyInfo("b", 500))]
    usage = usage_of(idle("a", 500, 20), idle("b", 500, 50))
    assert place(ModelUsage("new", 500), replicas, usage).replica == R2
    usage = usage_of(idle("a", 500, 50), idle("b", 500, 50))
    assert place(ModelUsage("new", 500), replicas, usage).replica == R1


def test_a_replica_with_room_wins_over_eviction() -> None:
    replicas = [replica(R1, 500, CopyInfo("a", 500)), replica(R2, 500, CopyInfo("b", 100))]
    placement = place(ModelUsage("new", 400), replicas, usage_of(idle("a", 500, None), idle("b", 100, 0)))
    assert placement == Placement(R2, (), placement.reason)


def test_no_capacity_says_what_was_needed_where_memory_is_and_why_nothing_goes() -> None:
    replicas = [
        replica(R1, 1000, CopyInfo("busy", 600), CopyInfo("fresh", 200)),
        replica(R2, 1000, CopyInfo("pinned", 700)),
        replica(R3, 8000, healthy=False),
    ]
    usage = usage_of(
        idle("busy", 600, None, busy=True),
        idle("fresh", 200, 2.5),
        idle("pinned", 700, None, min_copies=1),
    )
    with pytest.raises(NoCapacity) as info:
        place(ModelUsage("new", 500), replicas, usage)
    message = info.value.message
    assert info.value.code == Code.RESOURCE_EXHAUSTED
    assert isinstance(info.value, ResourceExhausted)
    assert "'new'" in message and "needs 500 MiB" in message
    assert f"largest free memory is 300 MiB on {R2}" in message
    assert "busy is busy" in message
    assert "fresh was used 2.5 s ago (evictable after 10.0 s idle)" in message
    assert "pinned is at min_copies 1" in message
    assert R3 not in message


def test_no_capacity_when_even_evicting_everything_is_not_enough() -> None:
    r = replica(R1, 1000, CopyInfo("a", 300))
    with pytest.raises(
        NoCapacity, match=f"{R1}: at most 1000 MiB free of 1000, as no other copy is held there"
    ) as info:
        place(ModelUsage("huge", 1500), [r], usage_of(idle("a", 300, None)))
    assert "more than the largest budget" in info.value.message


# --- removing a copy ---


def test_remove_relieves_the_replica_with_least_free_memory() -> None:
    replicas = [
        replica(R1, 1000, CopyInfo("m", 300)),
        replica(R2, 1000, CopyInfo("m", 300), CopyInfo("x", 500)),
        replica(R3, 1000, CopyInfo("m", 300, "loading"), CopyInfo("y", 600)),
    ]
    assert choose_copy_to_remove("m", replicas) == R2


def test_remove_ties_break_by_address_and_need_a_ready_copy() -> None:
    replicas = [replica(R2, 1000, CopyInfo("m", 300)), replica(R1, 1000, CopyInfo("m", 300))]
    assert choose_copy_to_remove("m", replicas) == R1
    with pytest.raises(ValueError, match="no replica holds a ready copy of 'm'"):
        choose_copy_to_remove("m", [replica(R1, 1000, CopyInfo("m", 300, "draining"))])
