"""What each fleet generation changed, kept for the watchers' deltas (no grpc).

The controller publishes every change as a new generation naming what it
touched: models (or everything), shards, replicas, API keys (``Change``). A watcher
that holds generation g is sent what changed after g, merged (``since``),
not the whole fleet; one further behind than the log reaches, or behind a
change of everything, is sent the whole fleet again.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

CHANGE_LOG = 4096
"""Fleet generations whose changes are kept for watchers' deltas; a watcher further behind gets the whole fleet."""


@dataclass(frozen=True)
class Change:
    """What one fleet generation changed: model names (None: everything), shard and replica addresses,
    API key names."""

    generation: int
    models: frozenset[str] | None
    shards: frozenset[str]
    replicas: frozenset[str]
    keys: frozenset[str] = field(default_factory=frozenset)


class ChangeLog:
    """The last ``size`` generations' changes."""

    def __init__(self, size: int = CHANGE_LOG) -> None:
        self._changes: deque[Change] = deque(maxlen=size)

    def append(self, change: Change) -> None:
        self._changes.append(change)

    def since(self, generation: int, current: int) -> Change | None:
        """What changed after ``generation`` up to ``current`` (merged); None when that is everything or
        the log no longer reaches back to it (the watcher needs the whole fleet)."""
        if generation >= current:
            return Change(current, frozenset(), frozenset(), frozenset())
        if not self._changes or self._changes[0].generation > generation + 1:
            return None
        models: set[str] = set()
        shards: set[str] = set()
        replicas: set[str] = set()
        keys: set[str] = set()
        for change in reversed(self._changes):
            if change.generation <= generation:
                break
            if change.models is None:
                return None
            models |= change.models
            shards |= change.shards
            replicas |= change.replicas
            keys |= change.keys
        return Change(current, frozenset(models), frozenset(shards), frozenset(replicas), frozenset(keys))
