"""Which batching shards hold which models' queues: the controller's book of shards.

Pure decisions, no I/O: time comes in as ``now_s`` (seconds, monotonic).

A shard is a batcher process that reports every heartbeat: its address,
whether it is a dedicated batcher (one model only), its process's CPU time
and its queues' cumulative counters. The book keeps, per model, the shards
holding its queue (``holders``) and, per shard, its assignment (the set of
models and a number that changes with it, which the shard compares with its
own to learn that it must re-read the list). Every decision costs the
shards' count or the change's size, never the fleet's.

Rules:

- A model gets one shard when it is added: a dedicated batcher of its own
  when one reports (``dedicated_batcher`` in its spec), else the shared
  shard with the least load: the requests/s it reported, then models held,
  then address.
  Dedicated batchers never hold another model; a dedicated model waits on
  a shared shard while no batcher of its own reports.
- A shard silent for ``heartbeat_timeout_s`` is dead: each model it held
  that has no other live holder moves to the least loaded live shard (at
  once, not at the next rebalance). With no live shard left the models stay
  where they were: a route to a dead batcher answers UNAVAILABLE, which is
  the truth, rather than NOT_FOUND.
- Rebalancing, at most one move per ``rebalance_interval_s``: a model whose
  rate per holder exceeds ``hot_model_rps`` gets one more shard (up to
  ``max_shards_per_model``); one under half of it on several shards gives
  one back; a shard using more than ``busy_cpu_cores`` keeps its busiest
  model and hands the next busiest single-shard one to the least busy shard
  when that one has room: moves make room around a hot model until it has
  a shard of its own (moving the hot one would only move the load).
- A restarted controller reads each model's holders back from its records
  (``presume``): those shards count as live for ``heartbeat_timeout_s``, so
  routes survive the restart while the shards report in again.

Every change returns the models whose holders changed: the controller
publishes those (routes follow) and saves their records.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from flotilla.common.request_totals import RequestTotals
from flotilla.config import ShardSettings
from flotilla.services.controller.statistics import FleetStatistics

CPU_SMOOTHING = 0.5
"""Weight of the newest reading in a shard's CPU and request-rate averages."""


@dataclass(frozen=True)
class QueueCounts:
    """Cumulative counters of one model's queue on one shard."""

    arrivals_total: int = 0
    dispatched_total: int = 0
    queue_wait_s_total: float = 0.0
    queue_depth: int = 0
    inflight_batches: int = 0
    last_arrival_s: float | None = None
    """The latest arrival, on the controller's clock (None: none yet, or not reported)."""


@dataclass
class ShardInfo:
    address: str
    dedicated_model: str = ""
    last_seen_s: float = 0.0
    models: set[str] = field(default_factory=set)
    assignment: int = 0
    """Changes whenever ``models`` changes (a replaced model is taken and given again); the shard re-reads then."""
    counters: dict[str, QueueCounts] = field(default_factory=dict)
    cpu_cores: float = 0.0
    requests_per_s: float = 0.0
    acked: int = 0
    """The assignment the shard last said it holds: it has a queue for every model given at or before it."""
    given: dict[str, int] = field(default_factory=dict)
    """Model -> the assignment that gave it here (0: known from a record, held already)."""
    updated: dict[str, int] = field(default_factory=dict)
    """Model -> the assignment that gave it here, presumed ones included (what a delta answer sends;
    ``given`` says 0 for those, which routes take as held)."""
    taken: dict[str, int] = field(default_factory=dict)
    """Model -> the assignment that took it away, until the shard acknowledges one at least as new."""
    first: int = 0
    """The assignment this controller first gave the shard: changes since an older one are not known."""
    _cpu_total_s: float | None = None
    _arrivals: int | None = None
    _at_s: float = 0.0

    @property
    def shared(self) -> bool:
        return not self.dedicated_model


class ShardBook:
    """The shards, their models, and the decisions that move models between them."""

    def __init__(self, settings: ShardSettings) -> None:
        self.settings = settings
        self.shards: dict[str, ShardInfo] = {}
        self.holders: dict[str, list[str]] = {}
        """Model -> the shards holding its queue, in the order they got it."""
        self.leaving: dict[str, set[str]] = {}
        """Model -> shards that served it and were taken off it while no other holder serves it yet:
        routes keep naming them until one does (a call then gets UNAVAILABLE, retryable, or lands in
        the queue the shard keeps for move_grace_s, never NOT_FOUND)."""
        self.dedicated: set[str] = set()
        """Models whose spec asks for batchers of their own."""
        self.rates: dict[str, float] = {}
        """Model -> requests/s over all its shards (set by the controller from its autoscaler)."""
        self.touched: set[str] = set()
        """Shards whose models changed, or that came or went, since ``take_touched`` (the fleet shows them)."""
        self.reported: set[str] = set()
        """Models whose counters shards reported since ``take_reported``."""
        self._numbers = itertools.count(int(time.time() * 1000))
        """Assignment numbers: from the wall clock in ms, so a restarted controller's are above any a shard
        holds from its predecessor, and a shard's old number never acknowledges a new model."""
        self._last_rebalance_s: float | None = None
        self.statistics = FleetStatistics()
        """Each model's request totals over every shard process that held its queue."""

    # -- reading --------------------------------------------------------------

    def live(self, now_s: float) -> list[ShardInfo]:
        return [s for s in self.shards.values() if now_s - s.last_seen_s < self.settings.heartbeat_timeout_s]

    def serving(self, model: str) -> list[str]:
        """The shards that hold ``model``'s queue and have said so (acknowledged the assignment that gave
        it): the ones routes may name. A shard given a model has no queue for it until its next heartbeat."""
        out = []
        for address in self.holders.get(model, []):
            shard = self.shards.get(address)
            if shard is not None and shard.acked >= shard.given.get(model, 0):
                out.append(address)
        if out:
            self.leaving.pop(model, None)
            return out
        return sorted(self.leaving.get(model, ()))

    def counters(self, model: str) -> QueueCounts | None:
        """``model``'s counters summed over the shards that report a queue of it; None when none does."""
        found = [s.counters[model] for s in self.shards.values() if model in s.counters]
        if not found:
            return None
        return QueueCounts(
            arrivals_total=sum(c.arrivals_total for c in found),
            dispatched_total=sum(c.dispatched_total for c in found),
            queue_wait_s_total=sum(c.queue_wait_s_total for c in found),
            queue_depth=sum(c.queue_depth for c in found),
            inflight_batches=sum(c.inflight_batches for c in found),
            last_arrival_s=max((c.last_arrival_s for c in found if c.last_arrival_s is not None), default=None),
        )

    def changes(self, address: str, held: int) -> tuple[bool, list[str], list[str]]:
        """What a shard holding assignment ``held`` must apply: (full, models to give or update, models
        to take away). Full (every model it hosts) when it holds none yet or one older than this
        controller's first for it; else the changes since ``held``: the change's size, not the shard's."""
        shard = self.shards[address]
        if held == 0 or held < shard.first:
            return True, sorted(shard.models), []
        models = sorted(m for m, at in shard.updated.items() if at > held)
        removed = sorted(m for m, at in shard.taken.items() if at > held)
        return False, models, removed

    def take_touched(self) -> set[str]:
        touched, self.touched = self.touched, set()
        return touched

    def take_reported(self) -> set[str]:
        """The models reported since the last call (the controller observes those)."""
        reported, self.reported = self.reported, set()
        return reported

    @staticmethod
    def _load(shard: ShardInfo) -> tuple[float, int, str]:
        """Least loaded first: the requests/s it reported, then models held, then address (O(1) a shard)."""
        return (round(shard.requests_per_s, 1), len(shard.models), shard.address)

    # -- changes --------------------------------------------------------------

    def _give(self, model: str, shard: ShardInfo, *, held: bool = False) -> None:
        self.touched.add(shard.address)
        shard.models.add(model)
        shard.assignment = next(self._numbers)
        shard.given[model] = 0 if held else shard.assignment
        shard.updated[model] = shard.assignment
        shard.taken.pop(model, None)
        holders = self.holders.setdefault(model, [])
        if shard.address not in holders:
            holders.append(shard.address)

    def _take(self, model: str, shard: ShardInfo) -> None:
        self.touched.add(shard.address)
        if shard.acked >= shard.given.get(model, shard.acked + 1):
            self.leaving.setdefault(model, set()).add(shard.address)
        shard.models.discard(model)
        shard.given.pop(model, None)
        shard.updated.pop(model, None)
        shard.assignment = next(self._numbers)
        shard.taken[model] = shard.assignment
        shard.counters.pop(model, None)
        holders = self.holders.get(model)
        if holders and shard.address in holders:
            holders.remove(shard.address)

    def _targets(self, model: str, now_s: float) -> list[ShardInfo]:
        """Live shards ``model`` may be given: its own dedicated batchers if it has any live, else shared ones."""
        live = self.live(now_s)
        own = [s for s in live if s.dedicated_model == model]
        if own:
            return own
        return [s for s in live if s.shared]

    def add(self, model: str, now_s: float, *, dedicated: bool = False) -> bool:
        """Give a new model its shard(s); True when it got any."""
        if dedicated:
            self.dedicated.add(model)
        else:
            self.dedicated.discard(model)
        if self.holders.get(model):
            return False
        targets = self._targets(model, now_s)
        if not targets:
            self.holders.setdefault(model, [])
            return False
        own = [s for s in targets if s.dedicated_model == model]
        for shard in own or [min(targets, key=self._load)]:
            self._give(model, shard)
        return True

    def remove(self, model: str) -> None:
        for address in self.holders.pop(model, []):
            shard = self.shards.get(address)
            if shard is not None:
                self._take(model, shard)
        self.leaving.pop(model, None)
        self.dedicated.discard(model)
        self.rates.pop(model, None)
        self.statistics.forget(model)

    def presume(self, model: str, addresses: Iterable[str], now_s: float, *, dedicated: bool = False) -> None:
        """After a restart: ``model``'s queue is on ``addresses`` as the record says, until they report."""
        if dedicated:
            self.dedicated.add(model)
        for address in addresses:
            shard = self.shards.get(address)
            if shard is None:
                shard = self.shards[address] = ShardInfo(address, last_seen_s=now_s)
                shard.first = next(self._numbers)
            self._give(model, shard, held=True)

    def heartbeat(
        self,
        address: str,
        now_s: float,
        *,
        dedicated_model: str = "",
        counters: dict[str, QueueCounts] | None = None,
        cpu_seconds_total: float | None = None,
        started: bool = False,
        assignment: int = 0,
        requests: dict[str, RequestTotals] | None = None,
    ) -> set[str]:
        """A shard reported (``requests``: the request totals of its queues in ``counters``, for the fleet's
        statistics); returns the models whose holders or serving shards changed (a new dedicated
        batcher takes its model; the shard acknowledged models given to it; a shard that comes back
        after it was declared dead holds nothing until given)."""
        changed: set[str] = set()
        shard = self.shards.get(address)
        if shard is None:
            shard = self.shards[address] = ShardInfo(address, dedicated_model=dedicated_model)
            shard.assignment = shard.first = next(self._numbers)
            self.touched.add(address)
        if shard.dedicated_model != dedicated_model:  # a presumed shard turns out dedicated (or not)
            shard.dedicated_model = dedicated_model
            for model in [m for m in shard.models if dedicated_model and m != dedicated_model]:
                self._take(model, shard)
                changed.add(model)
        if started:  # a restarted process: its counters start again from zero
            shard.counters.clear()
            shard._cpu_total_s = shard._arrivals = None
            self.statistics.restarted(address)
        shard.counters.update(counters or {})
        self.statistics.report(address, requests or {}, {model: c.last_arrival_s for model, c in (counters or {}).items()})
        self.reported.update(counters or {})
        self._measure(shard, now_s, cpu_seconds_total)
        shard.last_seen_s = now_s
        for model in [m for m, at in shard.taken.items() if at <= assignment]:
            del shard.taken[model]  # it knows
        if assignment > shard.acked:
            # Models given after what it held before, up to what it holds now, are served there now. A
            # restarted shard (assignment 0) stays named for what it had: its calls for a model it has not
            # got back yet wait for its next heartbeat's answer, which brings it in milliseconds.
            changed |= {m for m, at in shard.given.items() if shard.acked < at <= assignment}
            shard.acked = assignment
        if dedicated_model and dedicated_model in self.holders and dedicated_model not in shard.models:
            # A batcher of the model's own: it moves there from the shared shards.
            for other in [self.shards[a] for a in list(self.holders[dedicated_model]) if a in self.shards]:
                if other.shared:
                    self._take(dedicated_model, other)
            self._give(dedicated_model, shard)
            changed.add(dedicated_model)
        return changed

    def _measure(self, shard: ShardInfo, now_s: float, cpu_seconds_total: float | None) -> None:
        arrivals = sum(c.arrivals_total for c in shard.counters.values())
        if shard._cpu_total_s is not None and cpu_seconds_total is not None and now_s > shard._at_s:
            elapsed = now_s - shard._at_s
            cores = max(cpu_seconds_total - shard._cpu_total_s, 0.0) / elapsed
            rps = max(arrivals - (shard._arrivals or 0), 0) / elapsed
            shard.cpu_cores += CPU_SMOOTHING * (cores - shard.cpu_cores)
            shard.requests_per_s += CPU_SMOOTHING * (rps - shard.requests_per_s)
        if cpu_seconds_total is not None:
            shard._cpu_total_s, shard._arrivals, shard._at_s = cpu_seconds_total, arrivals, now_s

    def expire(self, now_s: float) -> set[str]:
        """Move the models of shards silent for ``heartbeat_timeout_s``; returns the models moved."""
        changed: set[str] = set()
        dead = [s for s in self.shards.values() if now_s - s.last_seen_s >= self.settings.heartbeat_timeout_s]
        for shard in dead:
            for model in sorted(shard.models):
                survivors = [a for a in self.holders.get(model, []) if a != shard.address and a not in
                             {d.address for d in dead}]
                if survivors:
                    self._take(model, shard)
                    changed.add(model)
                    continue
                targets = self._targets(model, now_s)
                if not targets:
                    continue  # nowhere to go: it stays, and calls answer UNAVAILABLE until a shard reports
                self._take(model, shard)
                self._give(model, min(targets, key=self._load))
                changed.add(model)
            if not shard.models:
                del self.shards[shard.address]
                self.touched.add(shard.address)
                self.statistics.gone(shard.address)
        # A model added while no shard was live gets one as soon as one is.
        for model in [m for m, h in self.holders.items() if not h]:
            if self.add(model, now_s, dedicated=model in self.dedicated):
                changed.add(model)
        return changed

    def rebalance(self, now_s: float) -> tuple[set[str], str]:
        """Looks at most every ``rebalance_interval_s`` and moves at most one model; returns the models moved and why."""
        if self._last_rebalance_s is not None and now_s - self._last_rebalance_s < self.settings.rebalance_interval_s:
            return set(), ""
        self._last_rebalance_s = now_s
        live = [s for s in self.live(now_s) if s.shared]
        if not live:
            return set(), ""
        return self._spread_hot(live) or self._shrink_cooled(live) or self._relieve_busy(live) or (set(), "")

    def _spread_hot(self, live: list[ShardInfo]) -> tuple[set[str], str] | None:
        hot = self.settings.hot_model_rps
        for model, rate in sorted(self.rates.items(), key=lambda kv: -kv[1]):
            holders = self.holders.get(model, [])
            if model in self.dedicated or not holders or rate / len(holders) <= hot:
                continue
            if len(holders) >= self.settings.max_shards_per_model:
                continue
            free = [s for s in live if model not in s.models]
            if not free:
                continue
            target = min(free, key=self._load)
            self._give(model, target)
            return {model}, (f"{model} takes {rate:.0f} requests/s over {len(holders)} shard(s), above "
                             f"controller.shards.hot_model_rps {hot:.0f} each: its queue also on {target.address}")
        return None

    def _shrink_cooled(self, live: list[ShardInfo]) -> tuple[set[str], str] | None:
        hot = self.settings.hot_model_rps
        for model, holders in self.holders.items():
            if len(holders) <= 1 or model in self.dedicated:
                continue
            rate = self.rates.get(model, 0.0)
            if rate / (len(holders) - 1) >= hot / 2:
                continue
            shard = max((self.shards[a] for a in holders if a in self.shards), key=self._load)
            self._take(model, shard)
            return {model}, (f"{model} takes {rate:.0f} requests/s, under half of hot_model_rps on "
                             f"{len(holders)} shards: its queue leaves {shard.address}")
        return None

    def _relieve_busy(self, live: list[ShardInfo]) -> tuple[set[str], str] | None:
        busy = self.settings.busy_cpu_cores
        hottest = max(live, key=lambda s: s.cpu_cores)
        coolest = min(live, key=lambda s: s.cpu_cores)
        if hottest is coolest or hottest.cpu_cores <= busy or coolest.cpu_cores >= busy / 2:
            return None
        if len(hottest.models) < 2:
            return None  # a shard of its own already: more shards for it is the hot-model rule's
        stays = max(hottest.models, key=lambda m: (self.rates.get(m, 0.0), m))
        movable = [m for m in hottest.models
                   if m != stays and len(self.holders.get(m, ())) == 1 and self.rates.get(m, 0.0) > 0]
        if not movable:
            return None
        model = max(movable, key=lambda m: (self.rates.get(m, 0.0), m))
        self._take(model, hottest)
        self._give(model, coolest)
        return {model}, (f"shard {hottest.address} uses {hottest.cpu_cores:.2f} cores, above "
                         f"controller.shards.busy_cpu_cores {busy:.2f}: {model} moves to {coolest.address} "
                         f"({coolest.cpu_cores:.2f} cores), making room for {stays}")
