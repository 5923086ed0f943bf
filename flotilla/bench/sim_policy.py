"""The policies the fleet simulation compares, each as the real controller configured to follow it.

- ``flotilla``: every model deployed with ``min_copies`` 0 and up to
  ``max_copies`` copies; the autoscaler's defaults (queue wait over 100 ms
  for 5 s adds a copy, 60 s idle removes one, 300 s idle unloads the last),
  a cold start on a request with no copy, idle copies evicted least
  recently used first when a placement needs their memory.
- ``lru``: ModelMesh-style: one copy at most, loaded on a miss (a cold
  start), never unloaded for being idle, evicted least recently used first
  when a load needs its memory; no queue-time scaling (the autoscaler's
  thresholds set out of reach).
- ``everywhere``: every model on every replica (``min_copies`` =
  ``max_copies`` = replicas), when one replica's budget holds every model;
  otherwise it does not fit and is reported so, not simulated.
"""

from __future__ import annotations

from dataclasses import dataclass

from flotilla.config import AutoscaleSettings, ControllerSettings

NEVER_S = 1e12
"""A duration no simulation reaches: what turns a rule off."""
POLICIES = ("flotilla", "lru", "everywhere")


@dataclass(frozen=True)
class Policy:
    name: str
    settings: ControllerSettings
    min_copies: int
    max_copies: int


def policy(name: str, *, replicas: int, max_copies: int = 32) -> Policy:
    base = ControllerSettings(measure_memory=False, drain_s=0.5)
    if name == "flotilla":
        return Policy(name, base, 0, min(max_copies, replicas))
    if name == "lru":
        autoscale = AutoscaleSettings(
            queue_wait_high_ms=NEVER_S, scale_down_idle_s=NEVER_S, scale_to_zero_idle_s=NEVER_S
        )
        settings = base.model_copy(update={"autoscale": autoscale, "evict_idle_after_s": 0.0})
        return Policy(name, settings, 0, 1)
    if name == "everywhere":
        return Policy(name, base, replicas, replicas)
    raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}")


def ffd_bins(copies_mb: list[tuple[str, float]], budget_mb: float) -> int:
    """Replicas of ``budget_mb`` that first-fit decreasing needs for these copies (model, MiB),
    no two copies of one model on one replica: the packing bound placement is compared with."""
    bins: list[tuple[float, set[str]]] = []
    for model, memory_mb in sorted(copies_mb, key=lambda c: -c[1]):
        for i, (free, held) in enumerate(bins):
            if free >= memory_mb and model not in held:
                held.add(model)
                bins[i] = (free - memory_mb, held)
                break
        else:
            bins.append((budget_mb - memory_mb, {model}))
    return len(bins)
