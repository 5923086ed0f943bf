"""Where a model's next copy goes, and which copy goes when one is removed.

Pure decisions over a snapshot of the replicas: no I/O, no clock (time comes
in as ``now_s``, seconds on a monotonic clock). Memory is in MiB throughout;
a copy holds its memory in every state, ``loading`` and ``draining`` included.

Placing a copy (``choose_replica``):

1. Candidates are the healthy replicas that hold no copy of the model in any
   state.
2. If some candidates have ``free_mb >= memory_mb``, take the one with the
   most free memory (ties: fewer copies, then address): copies spread out
   and every replica keeps room.
3. Otherwise try eviction on each candidate. A copy is evictable when it is
   ``ready``, its model is known and not ``busy``, it has been idle at least
   ``evict_idle_after_s`` (never used counts as idle forever), and removing
   it leaves its model at least ``min_copies`` loading or ready copies over
   all replicas. Copies go least recently used first (never used first, ties
   by model name) until the candidate has room. Among candidates that can
   make room, prefer the fewest evictions, then the least recently used
   evicted copies, then the address.
4. When no candidate can make room, raise ``NoCapacity`` saying what was
   needed, the largest free memory and where, and why nothing more could be
   evicted.

Removing a copy (``choose_copy_to_remove``): among healthy replicas holding a
``ready`` copy, the one with the least free memory (ties: address), so
scaling down relieves the most pressured replica.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from flotilla.errors import ResourceExhausted

LOADING = "loading"
READY = "ready"
DRAINING = "draining"


@dataclass
class CopyInfo:
    """One copy of a model on one replica."""

    model: str
    memory_mb: float
    """Memory the copy holds on its replica, in MiB (measured or declared)."""
    state: str = READY
    """``loading``, ``ready`` or ``draining``; memory is held in every state."""


@dataclass
class ReplicaInfo:
    """One Triton replica: its memory budget and the copies it holds."""

    address: str
    budget_mb: float
    """Memory the controller may fill on this replica, in MiB."""
    copies: dict[str, CopyInfo] = field(default_factory=dict)
    """Model name -> its copy here."""
    healthy: bool = True

    @property
    def used_mb(self) -> float:
        """Memory held by every copy here, whatever its state (a draining copy still holds memory)."""
        return sum([copy.memory_mb for copy in self.copies.values()])

    @property
    def free_mb(self) -> float:
        """Budget left, in MiB (negative when copies outgrew the budget)."""
        return self.budget_mb - self.used_mb


@dataclass
class ModelUsage:
    """What placement needs to know about a deployed model."""

    name: str
    memory_mb: float
    """Memory one copy needs, in MiB."""
    min_copies: int = 1
    max_copies: int = 1
    last_used_s: float | None = None
    """Last time a request for it was seen (monotonic seconds); None = never."""
    busy: bool = False
    """Requests are queued or in flight right now."""


@dataclass(frozen=True)
class Eviction:
    """A copy to unload before a placement."""

    replica: str
    model: str
    reason: str


@dataclass(frozen=True)
class Placement:
    """Where to load a copy, and what to evict there first."""

    replica: str
    evictions: tuple[Eviction, ...]
    reason: str


class NoCapacity(ResourceExhausted):
    """No healthy replica has, or can make, room for another copy of the model."""


def copies_of(model: str, replicas: Sequence[ReplicaInfo], states: Sequence[str] = (LOADING, READY)) -> list[str]:
    """Addresses of the replicas (healthy or not) holding a copy of ``model`` in one of ``states``."""
    return [r.address for r in replicas if model in r.copies and r.copies[model].state in states]


def can_ever_fit(memory_mb: float, replicas: Sequence[ReplicaInfo]) -> bool:
    """Whether some healthy replica's whole budget could hold a copy of this size."""
    return any(r.healthy and r.budget_mb >= memory_mb for r in replicas)


def choose_copy_to_remove(model: str, replicas: Sequence[ReplicaInfo]) -> str:
    """Address of the replica whose ``ready`` copy of ``model`` should go: least free memory, then
    address, among replicas that are up (a copy on a replica that is down is not counted as capacity,
    and its unload would wait on the replica)."""
    holders = [r for r in replicas if r.healthy and model in r.copies and r.copies[model].state == READY]
    if not holders:
        raise ValueError(f"no replica holds a ready copy of {model!r}")
    return min(holders, key=lambda r: (r.free_mb, r.address)).address


def choose_replica(
    model: ModelUsage,
    replicas: Sequence[ReplicaInfo],
    usage: Mapping[str, ModelUsage],
    now_s: float,
    *,
    evict_idle_after_s: float,
) -> Placement:
    """Where the next copy of ``model`` goes (see the module docstring); NoCapacity when nowhere."""
    need = model.memory_mb
    candidates = [r for r in replicas if r.healthy and model.name not in r.copies]
    if not candidates:
        raise NoCapacity(_no_candidate_message(model, replicas))

    # Each candidate's free memory once (it sums its copies): one pass over the copies, not one per comparison.
    free = {r.address: r.free_mb for r in candidates}
    fitting = [r for r in candidates if free[r.address] >= need]
    if fitting:
        best = min(fitting, key=lambda r: (-free[r.address], len(r.copies), r.address))
        return Placement(
            best.address,
            (),
            f"{best.address} has {free[best.address]:.0f} MiB free of {best.budget_mb:.0f}, needs {need:.0f}",
        )

    live_copies = _live_copies(replicas)
    plans: list[tuple[tuple[int, tuple[float, ...], str], ReplicaInfo, list[CopyInfo]]] = []
    blocked: list[str] = []
    for replica in candidates:
        plan = _eviction_plan(replica, need, usage, live_copies, now_s, evict_idle_after_s)
        if plan.victims is None:
            blocked.append(plan.why_short(replica))
            continue
        # Compare the evicted copies' last uses, newest first: the older they are, the better.
        recency = tuple(sorted((_last_used_key(usage[c.model]) for c in plan.victims), reverse=True))
        plans.append(((len(plan.victims), recency, replica.address), replica, plan.victims))

    if not plans:
        largest = max(candidates, key=lambda r: (r.free_mb, r.address))
        too_big = ""
        if not can_ever_fit(need, candidates):
            biggest = max(r.budget_mb for r in candidates)
            too_big = f" (more than the largest budget of a replica without it, {biggest:.0f} MiB)"
        raise NoCapacity(
            f"no replica can take a copy of {model.name!r}: it needs {need:.0f} MiB{too_big} and the largest free "
            f"memory is {largest.free_mb:.0f} MiB on {largest.address}; evicting cannot make room: "
            f"{'; '.join(blocked)}. Undeploy a model, lower another model's min_copies or add replica memory"
        )

    _, replica, victims = min(plans, key=lambda entry: entry[0])
    evictions = tuple(
        Eviction(replica.address, c.model, f"{_idle_text(usage[c.model], now_s)} (least recently used)")
        for c in victims
    )
    freed = sum(c.memory_mb for c in victims)
    names = ", ".join(c.model for c in victims)
    return Placement(
        replica.address,
        evictions,
        f"{replica.address} has {replica.free_mb + freed:.0f} MiB free of {replica.budget_mb:.0f} "
        f"after evicting {names}, needs {need:.0f}",
    )


@dataclass
class _EvictionPlan:
    victims: list[CopyInfo] | None
    """Copies to evict, least recently used first; None when even all evictable copies make too little room."""
    best_free_mb: float
    """Free memory after evicting every evictable copy."""
    blockers: list[str]
    """Why each other copy must stay."""

    def why_short(self, replica: ReplicaInfo) -> str:
        why = ", ".join(self.blockers) if self.blockers else "no other copy is held there"
        return f"{replica.address}: at most {self.best_free_mb:.0f} MiB free of {replica.budget_mb:.0f}, as {why}"


def _eviction_plan(
    replica: ReplicaInfo,
    need_mb: float,
    usage: Mapping[str, ModelUsage],
    live_copies: Mapping[str, int],
    now_s: float,
    evict_idle_after_s: float,
) -> _EvictionPlan:
    """Evict least recently used copies until ``need_mb`` fits on ``replica``."""
    evictable: list[CopyInfo] = []
    blockers: list[str] = []
    for copy in replica.copies.values():
        blocker = _why_not_evictable(copy, usage, live_copies, now_s, evict_idle_after_s)
        if blocker is None:
            evictable.append(copy)
        else:
            blockers.append(blocker)
    evictable.sort(key=lambda c: (_last_used_key(usage[c.model]), c.model))
    best_free = replica.free_mb + sum(c.memory_mb for c in evictable)
    if best_free < need_mb:
        return _EvictionPlan(None, best_free, blockers)

    free = replica.free_mb
    victims: list[CopyInfo] = []
    for copy in evictable:
        if free >= need_mb:
            break
        victims.append(copy)
        free += copy.memory_mb
    return _EvictionPlan(victims, best_free, blockers)


def _why_not_evictable(
    copy: CopyInfo,
    usage: Mapping[str, ModelUsage],
    live_copies: Mapping[str, int],
    now_s: float,
    evict_idle_after_s: float,
) -> str | None:
    """Why this copy must stay, as a phrase; None when it may be evicted."""
    if copy.state != READY:
        return f"{copy.model} is {copy.state}"
    model = usage.get(copy.model)
    if model is None:
        return f"{copy.model} is not a known model"
    if model.busy:
        return f"{copy.model} is busy"
    if model.last_used_s is not None and now_s - model.last_used_s < evict_idle_after_s:
        return (
            f"{copy.model} was used {now_s - model.last_used_s:.1f} s ago "
            f"(evictable after {evict_idle_after_s:.1f} s idle)"
        )
    if live_copies.get(copy.model, 0) - 1 < model.min_copies:
        return f"{copy.model} is at min_copies {model.min_copies}"
    return None


def _live_copies(replicas: Sequence[ReplicaInfo]) -> dict[str, int]:
    """Model -> replicas (healthy or not) holding a loading or ready copy of it: ``copies_of`` for
    every model at once, in one pass over the copies (not one pass over the replicas per model)."""
    counts: dict[str, int] = {}
    for replica in replicas:
        for name, copy in replica.copies.items():
            if copy.state in (LOADING, READY):
                counts[name] = counts.get(name, 0) + 1
    return counts


def _no_candidate_message(model: ModelUsage, replicas: Sequence[ReplicaInfo]) -> str:
    healthy = [r for r in replicas if r.healthy]
    if not healthy:
        return f"no healthy replica to place {model.name!r} on ({len(replicas)} replicas, none healthy)"
    return (
        f"every healthy replica ({len(healthy)}) already holds a copy of {model.name!r}; "
        "add replicas or lower its max_copies"
    )


def _last_used_key(model: ModelUsage) -> float:
    """Sort key for recency: never used sorts as the oldest."""
    return -math.inf if model.last_used_s is None else model.last_used_s


def _idle_text(model: ModelUsage, now_s: float) -> str:
    if model.last_used_s is None:
        return "never used"
    return f"idle for {now_s - model.last_used_s:.1f} s"
