"""The controller's core: registry, placement, load/unload, cold starts, autoscaling.

No grpc here: replicas are ``ReplicaAgent``s (Triton through tritonclient in
production), the batching shards report through ``shard_heartbeat`` (their
queues' counters in, their models out; ``shards.ShardBook`` decides which
shard holds which model's queue), and the gRPC layer (``server.py``) maps
errors to statuses.

- Deploy validates the spec, the framework, the artifact (manifest and
  every version's file), the spec against every version's ONNX graph
  (filling in the input/output settings it leaves unset) and that some
  replica could ever hold the model, then places ``min_copies`` copies,
  each warmed up (and measured) before the record is committed. Any
  failure, a failed warm-up included, unloads what was loaded and
  registers nothing. The record becomes visible to the fleet (routes,
  batchers, pools) only once it is committed.
- Placement holds ``_placing`` while it chooses a replica and reserves the
  memory (a "loading" copy), so concurrent placements never overbook a
  replica; the slow parts (eviction drains, artifact fetch, Triton load)
  run outside it.
- A copy leaves the fleet (state "draining") before it is unloaded, so
  workers stop sending it batches; Triton finishes what it already queued.
- Cold start: ``ensure_loaded`` of a model with no ready copy starts one
  load and every concurrent caller awaits that same task.
- Every ``usage_poll_interval_s`` the counters the shards last reported feed
  the autoscaler; every ``autoscale.interval_s`` it decides per model; every
  decision is logged and kept as an event in the model's status.
- Every change is published as a new fleet generation naming what changed
  (``changes_since``), so watchers get deltas and the controller's own work
  per change (Ready conditions, gauges) is the change's size. Copies are
  indexed by model (``_holders``): reading a model's copies costs its copies,
  not the replicas.
- A replica that restarts comes back empty: copies it lost are dropped and
  the autoscaler's min-copies rule places them again.
- With ``deploy_configured_models`` the models of the configuration that
  the registry lacks are deployed at start, each retried every
  ``CONFIGURED_RETRY_S`` until it deploys (its artifact uploaded later, S3
  or a replica not up yet) or someone deploys it through the API.
  The registry wins over the configuration: a registered model is left as
  it is, with a warning when its spec differs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import Gauge

from flotilla.common import metrics
from flotilla.common.apikeys import KeyRecord
from flotilla.common.clock import Clock, MonotonicClock
from flotilla.common.ids import shorten
from flotilla.common.request_totals import RequestTotals
from flotilla.config import ControllerSettings, ModelSettings, deploy_json, spec_differences
from flotilla.errors import (
    AlreadyExists,
    FlotillaError,
    InvalidArgument,
    ModelLoadFailed,
    ModelNotFound,
    Unavailable,
    UnsupportedFramework,
)
from flotilla.services.controller.artifacts import ArtifactStore
from flotilla.services.controller.autoscale import Autoscaler, Decision
from flotilla.services.controller.changes import CHANGE_LOG, Change, ChangeLog
from flotilla.services.controller.graph import describe_spec, fit_spec
from flotilla.services.controller.keys import KeyRegistry
from flotilla.services.controller.placement import (
    CopyInfo,
    ModelUsage,
    NoCapacity,
    ReplicaInfo,
    can_ever_fit,
    choose_copy_to_remove,
    choose_replica,
)
from flotilla.services.controller.registry import (
    ARTIFACT_AVAILABLE,
    FRAMEWORK_SUPPORTED,
    LOADED,
    MEMORY_AVAILABLE,
    READY,
    SPEC_MATCHES_GRAPH,
    MemoryRecords,
    ModelRecord,
    RecordStore,
    check_model_name,
    parse_spec,
)
from flotilla.services.controller.shards import QueueCounts, ShardBook

log = logging.getLogger(__name__)

SUPPORTED_FRAMEWORKS = ("onnx",)
HEALTH_INTERVAL_S = 1.0
COLD_START_ATTEMPTS = 3
"""Loads one cold start tries when copies vanish under it (replicas dying) before answering UNAVAILABLE."""
COLD_START_POLL_S = 0.01
LOADED_READS_PER_ROUND = 200
"""Replicas whose loaded models one health round reads (all of them in a fleet this size or smaller)."""
CONFIGURED_RETRY_S = 10.0
"""How often a configured model that could not be deployed is tried again."""


GC_THRESHOLDS = (50_000, 20, 100)
"""The collector's thresholds in the controller process (CPython's are 700, 10, 10). A fleet of
thousands of models is millions of long-lived objects: at the defaults, a cold-start storm at 10 000
models x 1 000 replicas ran a full collection every few rounds and the decision round's p99 was
276 ms of CPU; with these, 71 ms (`flotilla bench --only fleet-sim`)."""


def settle_heap() -> None:
    """Tune the collector for a large, long-lived heap and move what exists now (the registry just
    read) out of its way (``gc.freeze``): call once the controller has started."""
    gc.set_threshold(*GC_THRESHOLDS)
    gc.freeze()


class ReplicaWentDown(Unavailable):
    """A load failed because its replica died or hung, not because of the model: retryable."""


class ReplicaAgent(Protocol):
    address: str
    budget_mb: float

    async def is_live(self) -> bool: ...

    async def loaded(self) -> dict[str, list[int]]: ...

    async def load(self, name: str, spec: ModelSettings, uri: str, manifest: dict[str, dict[str, object]]) -> None: ...

    async def unload(self, name: str, spec: ModelSettings) -> None: ...

    async def warm_up(self, name: str, spec: ModelSettings) -> None: ...

    def measure_memory_mb(self, name: str, spec: ModelSettings) -> float | None: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class ShardReply:
    """The answer to a shard's heartbeat: its assignment and, when that changed, what to apply: the models
    given or changed (with their specs) and those taken away, or with ``full`` every model it hosts."""

    assignment: int
    changed: bool
    models: list[tuple[str, ModelSettings]]
    interval_s: float
    removed: list[str] = field(default_factory=list)
    full: bool = False


class Controller:
    def __init__(
        self,
        settings: ControllerSettings,
        agents: Sequence[ReplicaAgent],
        artifacts: ArtifactStore,
        records: RecordStore,
        *,
        clock: Clock | None = None,
        configured: dict[str, ModelSettings] | None = None,
        change_log: int = CHANGE_LOG,
        keys: RecordStore | None = None,
    ) -> None:
        self.settings = settings
        self.configured = dict(configured or {})
        """Models of the configuration, deployed at start when the registry lacks them."""
        self.agents = {a.address: a for a in agents}
        self.replicas = {a.address: ReplicaInfo(a.address, a.budget_mb) for a in agents}
        self.artifacts = artifacts
        self.store = records
        self.clock = clock or MonotonicClock()
        self.shards = ShardBook(settings.shards)
        self.autoscaler = Autoscaler(settings.autoscale)
        self.records: dict[str, ModelRecord] = {}
        self.keys = KeyRegistry(keys if keys is not None else MemoryRecords())
        """API keys (services.controller.keys): in the fleet beside the models."""
        self._keys_lock = asyncio.Lock()
        self._dirty_keys: set[str] = set()
        self.generation = 0
        self._changed = asyncio.Condition()
        self._assigned = asyncio.Condition()
        """Notified when shards' assignments may have changed (their held heartbeats look again)."""
        self._placing = asyncio.Lock()
        self._cold: dict[str, asyncio.Task[None]] = {}
        self._scaling: dict[str, asyncio.Task[None]] = {}
        self._busy: dict[str, bool] = {}
        self._standins: dict[str, int] = {}
        """Model -> copies placed in for copies on replicas that are down (removed when those return)."""
        self._tasks: list[asyncio.Task[None]] = []
        self._series = metrics.OwnedSeries()
        """Each model's, replica's and shard's gauge series."""
        self._holders: dict[str, set[str]] = {}
        """Model -> replicas holding a copy of it in any state (the index of ``replica.copies``)."""
        self._changes = ChangeLog(change_log)
        self._dirty_models: set[str] = set()
        self._dirty_replicas: set[str] = set()
        self._all_dirty = True
        self._observed_last: set[str] = set()
        """Models observed in the last usage round."""
        self._wants_copies: set[str] = set()
        """Models whose min_copies is above 0 (decided every round, copies or not)."""
        self._rounds = 0
        """Replica checks so far (each reads ``loaded()`` of a slice of the replicas)."""
        self._arrivals_seen: dict[str, tuple[int, float]] = {}
        """Model -> (arrivals counter, when) at its last observation: its request rate for the shard book."""

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Read the registry back, adopt what the replicas already hold, start the loops."""
        now = self.clock.now()
        for data in await asyncio.to_thread(self.store.load_all):
            record = ModelRecord.from_json(data)
            self.records[record.name] = record
            if record.spec.min_copies > 0:
                self._wants_copies.add(record.name)
            # The shards that held its queue before the restart keep it while they report in again; a
            # record naming none gets a shard as soon as one reports.
            if record.batchers:
                self.shards.presume(record.name, record.batchers, now, dedicated=record.spec.dedicated_batcher)
            else:
                self.shards.add(record.name, now, dedicated=record.spec.dedicated_batcher)
        await asyncio.to_thread(self.keys.load)
        await self._adopt_loaded_copies()
        self._publish()
        self._tasks = [
            asyncio.create_task(self._loop(self.check_replicas_once, HEALTH_INTERVAL_S), name="replicas"),
            asyncio.create_task(self._loop(self.observe_usage_once, self.settings.usage_poll_interval_s), name="usage"),
            asyncio.create_task(self._loop(self.autoscale_once, self.settings.autoscale.interval_s), name="autoscale"),
            asyncio.create_task(self._loop(self.shards_once, self.settings.shards.heartbeat_interval_s), name="shards"),
        ]
        for name, spec in self.configured.items():
            if name in self.records:
                self._warn_if_configured_differently(name, spec)
            else:
                self._spawn(self._deploy_configured(name, spec), f"configured:{name}")
        log.info("controller: %d model(s) in the registry, %d replica(s)", len(self.records), len(self.agents))

    async def _deploy_configured(self, name: str, spec: ModelSettings) -> None:
        """Deploy a model of the configuration, trying again until it is registered; each new
        reason it cannot be yet is logged once."""
        last = ""
        while name not in self.records:
            try:
                await self.deploy(name, deploy_json(spec))
            except AlreadyExists:
                return  # deployed through the API meanwhile
            except FlotillaError as exc:
                if exc.message != last:
                    log.warning("controller: configured model %r not deployed yet (%s); trying again every %.0f s",
                                name, exc.message, CONFIGURED_RETRY_S)
                    last = exc.message
            except Exception:
                log.exception("controller: deploying configured model %r failed; trying again", name)
            else:
                log.info("controller: deployed configured model %r", name)
                return
            await self.clock.sleep(CONFIGURED_RETRY_S)

    def _warn_if_configured_differently(self, name: str, spec: ModelSettings) -> None:
        # What a deploy fills in (labels from the artifact, input and output from the graph) is no difference.
        differing = spec_differences(spec, self.records[name].spec.model_dump(mode="json"))
        if differing:
            log.warning("controller: model %r is registered with a spec that differs from the configuration's (%s); "
                        "the registered one is served: deploy it with --replace to change it", name,
                        ", ".join(differing))

    async def stop(self) -> None:
        for task in [*self._tasks, *self._cold.values(), *self._scaling.values()]:
            task.cancel()
        for task in [*self._tasks, *self._cold.values(), *self._scaling.values()]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for agent in self.agents.values():
            await agent.close()

    @property
    def running_tasks(self) -> list[str]:
        """The names of the background tasks still running (for observing state: ``configured:m``
        while the configured model ``m`` is still being deployed)."""
        return [t.get_name() for t in self._tasks if not t.done()]

    def _spawn(self, coro: Awaitable[None], name: str) -> None:
        """A background task the controller cancels when it stops."""
        self._tasks = [t for t in self._tasks if not t.done()]
        self._tasks.append(asyncio.ensure_future(coro))
        self._tasks[-1].set_name(name)

    async def _loop(self, step: Callable[[], Awaitable[None]], interval_s: float) -> None:
        while True:
            try:
                await step()
            except Exception:
                log.exception("controller: %s failed; retrying", step.__name__)
            await self.clock.sleep(interval_s)

    async def _adopt_loaded_copies(self) -> None:
        """After a restart: the copies the replicas still hold are this controller's copies."""
        by_backend = {r.spec.backend_model or r.name: r for r in self.records.values()}
        for address, agent in self.agents.items():
            replica = self.replicas[address]
            try:
                loaded = await agent.loaded()
            except Exception as exc:  # a replica still starting; the health loop retries
                log.warning("controller: cannot read the models on %s: %s", address, exc)
                replica.healthy = False
                continue
            for backend_name, versions in loaded.items():
                record = by_backend.get(backend_name)
                if record is None:
                    continue  # not ours (e.g. loaded by hand); left alone
                self._put_copy(address, CopyInfo(record.name, record.memory_mb, "ready"))
                record.set_condition(LOADED, True, "Adopted", f"versions {sorted(versions)} found loaded", address)
                log.info("controller: adopted %s on %s (versions %s)", record.name, address, sorted(versions))

    # -- the fleet -------------------------------------------------------------

    def _publish(self, *models: str, keys: Iterable[str] = ()) -> None:
        """A new fleet generation. With ``models`` or ``keys``: what changed is those models and API keys
        (and the replicas marked dirty and the shards the book touched since the last one); with neither:
        everything. Their Ready conditions and gauges follow, and watchers wake up."""
        self._dirty_keys.update(keys)
        if models:
            self._dirty_models.update(models)
        elif not self._dirty_keys:
            self._all_dirty = True
        shards = self.shards.take_touched()
        names = list(self.records) if self._all_dirty else [m for m in self._dirty_models if m in self.records]
        replicas = set(self.replicas) if self._all_dirty else set(self._dirty_replicas)
        for name in names:
            self._update_ready(self.records[name])
        self._export_gauges(names, replicas, every_model=self._all_dirty)
        for address in shards:
            shard = self.shards.shards.get(address)
            self._series.set(metrics.SHARD_MODELS, address, {(address,): float(len(shard.models))} if shard else {})
        self.generation += 1
        self._changes.append(Change(
            self.generation,
            None if self._all_dirty else frozenset(self._dirty_models),
            frozenset(shards),
            frozenset(replicas),
            frozenset(self._dirty_keys),
        ))
        self._all_dirty = False
        self._dirty_keys.clear()
        self._dirty_models.clear()
        self._dirty_replicas.clear()

        async def notify() -> None:
            async with self._changed:
                self._changed.notify_all()

        task = asyncio.get_running_loop().create_task(notify())
        task.add_done_callback(lambda t: None)

    def changes_since(self, generation: int) -> Change | None:
        """What changed after ``generation`` up to now (merged); None when the watcher needs the whole fleet."""
        return self._changes.since(generation, self.generation)

    def _export_gauges(self, models: Iterable[str], replicas: Iterable[str], *, every_model: bool = False) -> None:
        """Copies, placement, unplaceable models and replica memory as Prometheus gauges, for the models
        and replicas given (a model not committed loses its series)."""
        for name in models:
            record = self.records.get(name)
            live = record is not None and record.committed
            copies: dict[tuple[str, ...], float] = {}
            placed: dict[tuple[str, ...], float] = {}
            one: dict[Gauge, dict[tuple[str, ...], float]] = {
                metrics.MODEL_UNPLACEABLE: {}, metrics.MODEL_MIN_COPIES: {}, metrics.MODEL_QUEUE_WAIT_MS: {},
            }
            if record is not None and live:
                # A copy on a replica that is down is "unreachable", not "loading" or "ready": it serves nothing.
                down = set(self.unreachable_copies(name))
                for state in ("loading", "ready", "draining"):
                    copies[(name, state)] = float(len([a for a in self.copies(name, (state,)) if a not in down]))
                copies[(name, "unreachable")] = float(len(down))
                # Only where a ready copy is: a series per model and replica would be models x replicas.
                placed = {(name, address): 1.0 for address in self.ready_copies(name)}
                memory = record.conditions.get((MEMORY_AVAILABLE, ""))
                one[metrics.MODEL_UNPLACEABLE][(name,)] = float(memory is not None and memory.status == "False")
                one[metrics.MODEL_MIN_COPIES][(name,)] = float(record.spec.min_copies)
                # No dispatch in the last interval (idle) reads as no wait.
                one[metrics.MODEL_QUEUE_WAIT_MS][(name,)] = self.autoscaler.queue_wait_ms(name) or 0.0
            self._series.set(metrics.MODEL_COPIES, name, copies)
            self._series.set(metrics.MODEL_PLACED, name, placed)
            for gauge, values in one.items():
                self._series.set(gauge, name, values)
        for address in replicas:
            replica = self.replicas[address]
            self._series.set(metrics.REPLICA_MEMORY_USED, address, {(address,): replica.used_mb * metrics.MIB})
            self._series.set(metrics.REPLICA_MEMORY_BUDGET, address, {(address,): replica.budget_mb * metrics.MIB})
            self._series.set(metrics.REPLICA_HEALTHY, address, {(address,): float(replica.healthy)})
        if every_model:
            metrics.models_served("controller", [record.name for record in self.committed()])

    async def watch(self) -> AsyncIterator[int]:
        """Yields the generation now and after every change (callers read the state)."""
        seen = -1
        while True:
            async with self._changed:
                if self.generation == seen:
                    await self._changed.wait()
            seen = self.generation
            yield seen

    # -- API keys ----------------------------------------------------------------

    async def create_key(
        self, name: str, models: list[str], *, rate_per_s: float = 0.0, burst: int = 0, expires_unix_s: float = 0.0
    ) -> tuple[KeyRecord, str]:
        """A new API key, saved and sent to the routers: its record and the key itself (shown once)."""
        async with self._keys_lock:
            record, token = await asyncio.to_thread(
                self.keys.create, name, models, rate_per_s=rate_per_s, burst=burst, expires_unix_s=expires_unix_s,
                now_unix_s=time.time(),
            )
        self._publish(keys=[name])
        log.info("controller: API key %r created (models %s, %g requests/s)", name, ", ".join(record.models),
                 record.rate_per_s)
        return record, token

    async def revoke_key(self, name: str) -> None:
        """Remove a key: routers refuse it once the fleet generation that says so reaches them."""
        async with self._keys_lock:
            await asyncio.to_thread(self.keys.revoke, name)
        self._publish(keys=[name])
        log.info("controller: API key %r revoked", name)

    async def key_used(self, uses: dict[str, float]) -> None:
        """Routers' reports of when keys were last used (``keys list``); written now and then."""
        async with self._keys_lock:
            due = self.keys.used(uses)
            if due:
                await asyncio.to_thread(self.keys.save, due)

    # -- copies ------------------------------------------------------------------

    def _put_copy(self, address: str, copy: CopyInfo) -> None:
        self.replicas[address].copies[copy.model] = copy
        self._holders.setdefault(copy.model, set()).add(address)
        self._dirty_replicas.add(address)
        self._dirty_models.add(copy.model)

    def _drop_copy(self, address: str, name: str) -> None:
        if self.replicas[address].copies.pop(name, None) is None:
            return
        holders = self._holders.get(name)
        if holders is not None:
            holders.discard(address)
            if not holders:
                del self._holders[name]
        self._dirty_replicas.add(address)
        self._dirty_models.add(name)

    def copies(self, name: str, states: tuple[str, ...] = ("loading", "ready")) -> list[str]:
        """Replicas holding a copy of ``name`` in one of ``states``, whether they are up or down."""
        return sorted(a for a in self._holders.get(name, ()) if self.replicas[a].copies[name].state in states)

    def ready_copies(self, name: str) -> list[str]:
        """Replicas that serve ``name`` now: a ready copy on a replica that is up."""
        return [a for a in self.copies(name, ("ready",)) if self.replicas[a].healthy]

    def live_copies(self, name: str) -> list[str]:
        """Copies that count as capacity: loading or ready on a replica that is up. A copy on a
        replica that is down (hung, restarting) serves nothing until it returns, so it neither
        satisfies ``min_copies`` nor stops a cold start from loading a copy elsewhere."""
        return [a for a in self.copies(name) if self.replicas[a].healthy]

    def unreachable_copies(self, name: str) -> list[str]:
        """Copies, loading or ready, on replicas that are down."""
        return [a for a in self.copies(name) if not self.replicas[a].healthy]

    def committed(self) -> list[ModelRecord]:
        return [r for r in self.records.values() if r.committed]

    def record(self, name: str) -> ModelRecord:
        record = self.records.get(name)
        if record is None or not record.committed:
            served = ", ".join(sorted(r.name for r in self.committed())) or "none"
            shown = shorten(name, 70)
            raise ModelNotFound(f"model {shown!r} is not registered; registered models: {served}")
        return record

    def last_used_s(self, name: str) -> float | None:
        return self.autoscaler.last_used_s(name)

    def to_unix_s(self, monotonic_s: float) -> float:
        """A reading of this controller's clock as wall-clock seconds (for status messages)."""
        return time.time() - (self.clock.now() - monotonic_s)

    def queue_wait_ms(self, name: str) -> float | None:
        return self.autoscaler.queue_wait_ms(name)

    # -- registry operations ---------------------------------------------------

    async def deploy(self, name: str, spec_json: str, *, replace: bool = False) -> ModelRecord:
        check_model_name(name)
        spec = parse_spec(spec_json)
        existing = self.records.get(name)
        if existing is not None and not replace:
            raise AlreadyExists(f"model {name!r} is already registered; undeploy it first or deploy with --replace")
        if spec.framework not in SUPPORTED_FRAMEWORKS:
            raise UnsupportedFramework(
                f"framework {spec.framework!r} is not supported; supported: {', '.join(SUPPORTED_FRAMEWORKS)}"
            )
        if not spec.storage_uri:
            raise InvalidArgument(
                f"model {name!r} has no storage_uri; pass --storage-uri s3://bucket/prefix "
                "(upload the artifact with `flotilla models upload`)"
            )
        manifest = await asyncio.to_thread(self.artifacts.check, spec.storage_uri, spec.versions)
        if not spec.labels and spec.labels_file is None:
            labels = await asyncio.to_thread(self.artifacts.labels, spec.storage_uri, manifest)
            spec = spec.model_copy(update={"labels": labels})
        # The spec against each version's graph; what it leaves unset and the graph says is filled in.
        graphs = {v: await asyncio.to_thread(self.artifacts.graph, spec.storage_uri, v, manifest) for v in spec.versions}
        spec, fit = fit_spec(spec, graphs, spec.storage_uri)
        if not can_ever_fit(spec.memory_mb, list(self.replicas.values())):
            budgets = ", ".join(f"{r.address} {r.budget_mb:.0f} MiB" for r in self.replicas.values())
            raise NoCapacity(
                f"model {name!r} declares {spec.memory_mb:.0f} MiB but no replica's whole budget is that large "
                f"({budgets}); lower --memory or give replicas more (controller.replica_memory_mb)"
            )
        if existing is not None:
            await self.undeploy(name)
        record = ModelRecord(name, spec, manifest)
        if not spec.labels and spec.labels_file is None:
            unlabelled = f"no labels (none in the spec, no labels_file, no labels.txt at {spec.storage_uri}): "
            record.event("no_labels", unlabelled + "classes are shown as their numbers")
            log.warning("controller: model %r has %s", name, unlabelled + "classes are shown as their numbers")
        record.set_condition(
            FRAMEWORK_SUPPORTED, True, "Supported", f"{spec.framework} runs on the Python-backend ONNX wrapper"
        )
        record.set_condition(
            ARTIFACT_AVAILABLE,
            True,
            "Verified",
            f"{spec.storage_uri}: versions {spec.versions} listed in its manifest and stored",
        )
        record.set_condition(SPEC_MATCHES_GRAPH, True, "ReadFromGraph" if fit.inferred else "Checked", fit.message)
        if fit.inferred:
            record.event("spec_from_graph", f"{', '.join(fit.inferred)} read from model.onnx: {describe_spec(spec)}")
        self.records[name] = record
        # Its shard first: while the copies load the shard learns the model and says so, so the routes
        # name it as soon as the record commits.
        self.shards.add(name, self.clock.now(), dedicated=spec.dedicated_batcher)
        self._wake_shards()
        try:
            for _ in range(spec.min_copies):
                address = await self._add_copy(name, "deploy: min_copies")
                await self._measure(name, address, deploying=True)  # a copy that cannot run a batch fails the deploy
        except BaseException:
            self.records.pop(name, None)
            self.shards.remove(name)
            self._wake_shards()
            for address in self.copies(name, ("loading", "ready", "draining")):
                self._drop_copy(address, name)
                await self.agents[address].unload(name, spec)
            raise
        record.set_condition(
            MEMORY_AVAILABLE, True, "Placed", f"{len(self.copies(name))} copy(ies) placed within replica budgets"
        )
        record.committed = True
        if spec.min_copies > 0:
            self._wants_copies.add(name)
        record.event(
            "deployed",
            f"registered with {len(self.copies(name))} copy(ies); min {spec.min_copies}, max {spec.max_copies}",
        )
        # Idle from now until a shard reports its queue (shards report only counters that change).
        self.autoscaler.observe(name, self.clock.now(), arrivals_total=0, dispatched_total=0, queue_wait_s_total=0.0,
                                queue_depth=0)
        self._follow_shards(name, "deployed")
        self._update_ready(record)
        await self._save(record)
        metrics.models_changed("controller", added=[name])
        self._publish(name)
        log.info("controller: deployed %s (%s)", name, spec.storage_uri)
        return record

    async def undeploy(self, name: str) -> None:
        record = self.records.get(name) or self.record(name)  # record() raises NOT_FOUND
        record.committed = False  # routes and batchers go first
        self.shards.remove(name)
        self._publish(name)
        self._wake_shards()
        for task in (self._cold.pop(name, None), self._scaling.pop(name, None)):
            if task is not None:
                task.cancel()
        await asyncio.gather(*(self._remove_copy(name, a, "undeployed") for a in self.copies(name)))
        self.records.pop(name, None)
        self._wants_copies.discard(name)
        self._standins.pop(name, None)
        self.autoscaler.forget(name)
        self._arrivals_seen.pop(name, None)
        await asyncio.to_thread(self.store.delete, name)
        metrics.models_changed("controller", removed=[name])
        self._publish(name)
        log.info("controller: undeployed %s", name)

    # -- batching shards ---------------------------------------------------------

    def shard_heartbeat(
        self,
        address: str,
        *,
        dedicated_model: str = "",
        counters: dict[str, QueueCounts] | None = None,
        cpu_seconds_total: float | None = None,
        assignment: int = 0,
        started: bool = False,
        requests: dict[str, RequestTotals] | None = None,
    ) -> ShardReply:
        """A shard reports (``ShardBook.heartbeat``); the reply lists its models and their specs when its
        assignment differs from the one it holds."""
        known = address in self.shards.shards
        moved = self.shards.heartbeat(
            address, self.clock.now(), dedicated_model=dedicated_model, counters=counters,
            cpu_seconds_total=cpu_seconds_total, started=started, assignment=assignment, requests=requests,
        )
        if not known:
            log.info("controller: batching shard %s reports%s", address,
                     f" (dedicated to {dedicated_model})" if dedicated_model else "")
        for name in moved:
            self._follow_shards(name, f"its own batcher at {address} reports")
        if moved or not known:
            self._publish(*moved)
            self._wake_shards()
        return self._shard_reply(address, assignment)

    def _shard_reply(self, address: str, held: int) -> ShardReply:
        shard = self.shards.shards.get(address)
        if shard is None:  # dropped while its call waited: it reports again and is known anew
            return ShardReply(held, False, [], 0.0)
        interval_s = self.settings.shards.heartbeat_interval_s
        if shard.assignment == held:
            return ShardReply(held, False, [], interval_s)
        full, given, removed = self.shards.changes(address, held)
        models = [(m, self.records[m].spec) for m in given if m in self.records]
        return ShardReply(shard.assignment, True, models, interval_s, removed, full)

    async def shard_wait(self, address: str, held: int) -> ShardReply:
        """The heartbeat's answer, held until the shard's assignment differs from ``held`` or for one
        heartbeat interval (then the shard calls again at once): a model given to a shard reaches it in
        milliseconds, and its next call acknowledges it (only then do routes name the shard)."""
        deadline = self.clock.now() + self.settings.shards.heartbeat_interval_s

        def differs() -> bool:
            shard = self.shards.shards.get(address)
            return shard is None or shard.assignment != held

        async with self._assigned:
            while not differs() and self.clock.now() < deadline:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._assigned.wait(), max(deadline - self.clock.now(), 0.0))
        return dataclasses.replace(self._shard_reply(address, held), interval_s=0.0)

    def _wake_shards(self) -> None:
        """Assignments may have changed: the shards' held heartbeats look again."""

        async def notify() -> None:
            async with self._assigned:
                self._assigned.notify_all()

        task = asyncio.get_running_loop().create_task(notify())
        task.add_done_callback(lambda t: None)

    def _follow_shards(self, name: str, why: str) -> None:
        """The record's batchers become the shards holding its queue now (routes follow the publish)."""
        record = self.records.get(name)
        holders = self.shards.holders.get(name, [])
        if record is None or record.batchers == holders:
            return
        record.batchers = list(holders)
        self._dirty_models.add(name)
        record.event("batchers", f"queued on {', '.join(holders) or 'no batcher yet'} ({why})")
        self._spawn(self._save(record), f"save:{name}")

    async def shards_once(self) -> None:
        """Dead shards' models move; at most one move for load per rebalance interval."""
        now = self.clock.now()
        gone = [a for a in self.shards.shards if now - self.shards.shards[a].last_seen_s >= self.settings.shards.heartbeat_timeout_s]
        moved = self.shards.expire(now)
        for address in gone:
            if address not in self.shards.shards:
                log.warning("controller: batching shard %s is silent; its models move to the shards still reporting",
                            address)
        for name in moved:
            self._follow_shards(name, "a shard stopped reporting" if gone else "a shard reports")
        balanced, why = self.shards.rebalance(now)
        for name in balanced:
            log.info("controller: %s", why)
            self._follow_shards(name, why)
        if moved or balanced or gone:
            self._publish(*moved, *balanced)
            self._wake_shards()

    async def ensure_loaded(self, name: str) -> ModelRecord:
        """Return once ``name`` has a ready copy; concurrent callers share one load."""
        record = self.record(name)
        if self.ready_copies(name):
            return record
        # A request waits for this model: it is in use, whatever the shards' counters say yet (they arrive
        # with the next heartbeat), so the autoscaler does not take away the copy being loaded for it.
        self.autoscaler.touch(name, self.clock.now())
        task = self._cold.get(name)
        if task is None:
            down = self.unreachable_copies(name)
            why = f"its copies are on replicas that are down ({', '.join(down)})" if down else "no copy loaded"
            record.event("cold_start", f"a request arrived and {why}; loading one")
            task = asyncio.create_task(self._cold_start(name), name=f"cold:{name}")
            self._cold[name] = task
        await asyncio.shield(task)
        return record

    async def _cold_start(self, name: str) -> None:
        """Load a copy of ``name`` and wait until one is ready.

        A copy that vanishes while it is awaited (its replica died or restarted empty, a load cut
        short by the replica going down) is a transient state, not the caller's problem: another
        load starts, up to ``COLD_START_ATTEMPTS`` of them. Only a load the backend refused for the
        model itself fails the waiters with its reason; running out of attempts is UNAVAILABLE
        (retryable)."""
        started = self.clock.now()
        attempts = 0
        try:
            while not self.ready_copies(name):
                if name not in self.records or not self.records[name].committed:
                    raise ModelNotFound(f"model {name!r} was undeployed while a request waited for a copy")
                if self.live_copies(name):  # a copy loading on a live replica is waited for
                    await self.clock.sleep(COLD_START_POLL_S)
                    continue
                if attempts >= COLD_START_ATTEMPTS:
                    raise Unavailable(
                        f"model {name!r} has no ready copy: {attempts} load(s) for this request ended without "
                        "one (replicas down or restarting); retry shortly"
                    )
                attempts += 1
                try:
                    await self._add_copy(name, "cold start", standin=bool(self.unreachable_copies(name)))
                except ReplicaWentDown as exc:
                    log.warning("controller: cold start of %s: %s; trying again", name, exc.message)
            metrics.COLD_START_SECONDS.labels(name).observe(self.clock.now() - started)
        finally:
            self._cold.pop(name, None)

    # -- copies ----------------------------------------------------------------

    def _usage(self) -> _UsageView:
        return _UsageView(self)

    async def _is_live(self, address: str) -> bool:
        """Ask the replica now (the health loop may not have looked since it went down)."""
        try:
            return await self.agents[address].is_live()
        except Exception:
            return False

    async def _add_copy(self, name: str, reason: str, *, standin: bool = False) -> str:
        """Place and load one copy of ``name``; returns its replica. A ``standin`` copy replaces one
        on a replica that is down and is removed again when that replica returns with its copy."""
        record = self.records[name]
        async with self._placing:
            usage = self._usage()
            try:
                placement = choose_replica(
                    usage[name],
                    list(self.replicas.values()),
                    usage,
                    self.clock.now(),
                    evict_idle_after_s=self.settings.evict_idle_after_s,
                )
            except NoCapacity as exc:
                record.set_condition(MEMORY_AVAILABLE, False, "NoReplicaFits", exc.message)
                record.event("placement_failed", f"{reason}: {exc.message}")
                log.warning("controller: cannot place %s (%s): %s", name, reason, exc.message)
                raise
            for eviction in placement.evictions:
                self.replicas[eviction.replica].copies[eviction.model].state = "draining"
                self._dirty_models.add(eviction.model)
            self._put_copy(placement.replica, CopyInfo(name, record.memory_mb, "loading"))
        address = placement.replica
        for eviction in placement.evictions:
            victim = self.records.get(eviction.model)
            if victim is not None:
                victim.event("evicted", f"from {eviction.replica} to make room for {name}: {eviction.reason}")
            log.info(
                "controller: evicting %s from %s for %s: %s", eviction.model, eviction.replica, name, eviction.reason
            )
        if placement.evictions:
            self._publish(name)
            await asyncio.gather(*(self._unload(e.model, e.replica) for e in placement.evictions))
        record.event("loading", f"{reason}: loading on {address} ({placement.reason})")
        log.info("controller: loading %s on %s (%s; %s)", name, address, reason, placement.reason)
        started = self.clock.now()
        try:
            await asyncio.wait_for(
                self.agents[address].load(name, record.spec, record.spec.storage_uri, record.manifest),
                self.settings.load_timeout_s,
            )
        except BaseException as exc:
            self._drop_copy(address, name)
            message = exc.message if isinstance(exc, FlotillaError) else f"{type(exc).__name__}: {exc}"
            if isinstance(exc, asyncio.TimeoutError):
                message = f"load did not finish within {self.settings.load_timeout_s:.0f} s"
                # Triton may still finish it: ask it to unload, so no copy we do not count stays there.
                self._spawn(self.agents[address].unload(name, record.spec), f"unload-timed-out:{name}")
            # A replica that died or hung during the load says nothing about the model: that failure is
            # transient (UNAVAILABLE), and the next placement picks another replica.
            went_down = not isinstance(exc, asyncio.CancelledError) and not await self._is_live(address)
            if went_down:
                message = f"Triton replica {address} went down during the load ({message})"
                if self.replicas[address].healthy:  # placements avoid it until the health loop sees it back
                    self._set_health(address, False)
                    log.warning("controller: replica %s is down (its copies leave the pools)", address)
            record.set_condition(LOADED, False, "ReplicaDown" if went_down else "LoadFailed", message, address)
            record.event("load_failed", f"on {address}: {message}")
            self._publish(name)
            log.warning("controller: loading %s on %s failed: %s", name, address, message)
            if went_down:
                raise ReplicaWentDown(f"model {name!r} could not be loaded: {message}; retry shortly") from exc
            if isinstance(exc, FlotillaError | asyncio.CancelledError):
                raise
            raise ModelLoadFailed(f"model {name!r} could not be loaded on {address}: {message}") from exc
        if standin:
            self._standins[name] = self._standins.get(name, 0) + 1
        copy = self.replicas[address].copies.get(name)
        if copy is not None:
            copy.state = "ready"
        load_s = self.clock.now() - started
        metrics.LOAD_SECONDS.labels(name).observe(load_s)
        record.set_condition(
            LOADED, True, "Loaded", f"versions {record.spec.versions} loaded in {load_s:.2f} s", address
        )
        record.event("loaded", f"on {address} in {load_s:.2f} s ({reason})")
        self._publish(name)
        # Warmed up (and measured, with measure_memory) in the background: a cold start does not wait.
        self._spawn(self._measure(name, address), f"warm-up:{name}")
        return address

    async def _measure(self, name: str, address: str, *, deploying: bool = False) -> None:
        """Warm the copy on ``address`` up (one batch of zeros at the model's batch size per version),
        then measure what it holds (``measure_memory``).

        A deploy calls this for each of its copies before it commits the record: a failed warm-up
        fails the deploy with Triton's reason (ModelLoadFailed, FAILED_PRECONDITION) and nothing stays
        loaded. A copy placed later (min-copies rule, autoscaler, cold start) is warmed up in the
        background, spawned by ``_add_copy`` after the load (inline, every cold start would wait for
        it too); a failure there counts as a failed load: the copy leaves the fleet and is unloaded,
        with a Loaded False ``WarmUpFailed`` condition and an event giving the reason.
        """
        record = self.records.get(name)
        if record is None or (not deploying and not record.committed):
            return  # gone, or a deploy's own copy: the deploy warms it up itself
        agent = self.agents[address]
        batch = record.spec.batching.max_batch_size
        started = self.clock.now()
        try:
            await asyncio.wait_for(agent.warm_up(name, record.spec), self.settings.load_timeout_s)
        except Exception as exc:
            if isinstance(exc, TimeoutError):
                reason = f"it did not finish within {self.settings.load_timeout_s:.0f} s"
            else:
                reason = exc.message if isinstance(exc, FlotillaError) else str(exc) or type(exc).__name__
            message = f"a batch of {batch} for {describe_spec(record.spec)} failed on {address}: {reason}"
            record.event("warm_up_failed", message)
            log.warning("controller: warm-up of %s: %s", name, message)
            if deploying:
                raise ModelLoadFailed(
                    f"model {name!r} loaded but failed its warm-up: {message}; the model must run a batch of "
                    f"{batch} of this input (check the spec's input against the model, or lower "
                    "batching.max_batch_size)"
                ) from exc
            copy = self.replicas[address].copies.get(name)
            if self.records.get(name) is record and copy is not None and copy.state == "ready":
                await self._remove_copy(name, address, f"warm-up failed: {reason}")
                record.set_condition(LOADED, False, "WarmUpFailed", message, address)
                self._publish(name)
            return
        record.event("warmed_up", f"on {address}: a batch of {batch} per version ran in {self.clock.now() - started:.2f} s")
        if not self.settings.measure_memory:
            return
        measured = await asyncio.to_thread(agent.measure_memory_mb, name, record.spec)
        if measured is None or name not in self.records:
            return
        record.measured_memory_mb = max(measured, record.measured_memory_mb or 0.0)
        for holder in self._holders.get(name, ()):
            self.replicas[holder].copies[name].memory_mb = record.memory_mb
            self._dirty_replicas.add(holder)
        record.event(
            "measured",
            f"{measured:.0f} MiB on {address} after a warm-up at batch "
            f"{record.spec.batching.max_batch_size} (declared {record.spec.memory_mb:.0f} MiB)",
        )
        await self._save(record)
        self._publish(name)

    async def _remove_copy(self, name: str, address: str, reason: str) -> None:
        replica = self.replicas[address]
        copy = replica.copies.get(name)
        if copy is None:
            return
        copy.state = "draining"
        self._publish(name)
        record = self.records.get(name)
        if record is not None:
            record.event("unloading", f"from {address}: {reason}")
        log.info("controller: unloading %s from %s: %s", name, address, reason)
        await self._unload(name, address)
        if record is not None:
            record.drop_condition(LOADED, address)
            self._publish(name)

    async def _unload(self, name: str, address: str) -> None:
        """Drain (the copy is already out of the fleet), then unload and free its memory."""
        await self.clock.sleep(self.settings.drain_s)
        record = self.records.get(name)
        spec = record.spec if record is not None else None
        if spec is not None:
            await self.agents[address].unload(name, spec)
        self._drop_copy(address, name)
        if record is not None:
            record.drop_condition(LOADED, address)
        self._publish(name)

    def _update_ready(self, record: ModelRecord) -> None:
        name = record.name
        ready = self.ready_copies(name)
        down = self.unreachable_copies(name)
        loading = [a for a in self.live_copies(name) if a not in ready]
        if ready:
            record.set_condition(READY, True, "CopiesReady", f"{len(ready)} ready copy(ies): {', '.join(ready)}")
        elif loading:
            record.set_condition(READY, False, "Loading", f"a copy is loading on {', '.join(loading)}")
        elif down:
            record.set_condition(
                READY, False, "ReplicaDown",
                f"its only copies are on replicas that are down ({', '.join(down)}); "
                "a replacement is placed on a replica that is up",
            )
        elif record.spec.min_copies == 0:
            record.set_condition(READY, True, "ScaledToZero", "no copy loaded; the next request loads one")
        else:
            record.set_condition(READY, False, "NoCopy", f"no copy loaded; {record.spec.min_copies} wanted")

    async def _save(self, record: ModelRecord) -> None:
        if record.committed:
            await asyncio.to_thread(self.store.save, record.name, record.to_json())

    # -- background loops ------------------------------------------------------

    def _set_health(self, address: str, healthy: bool) -> None:
        """A replica's health flips: it and every model with a copy there change."""
        replica = self.replicas[address]
        replica.healthy = healthy
        self._dirty_replicas.add(address)
        self._dirty_models.update(replica.copies)

    async def check_replicas_once(self) -> None:
        """Health of each replica (asked all at once); copies a restarted replica lost leave the fleet.
        What each replica holds is read from at most ``LOADED_READS_PER_ROUND`` replicas a round (each
        in turn), and at once from one whose health changed: a large fleet is not asked its whole
        repository every second."""
        changed: set[str] = set()
        flipped = False
        addresses = list(self.agents)
        lives = await asyncio.gather(*(self._is_live(a) for a in addresses))
        slices = max(1, math.ceil(len(addresses) / LOADED_READS_PER_ROUND))
        turn = self._rounds % slices
        self._rounds += 1
        up = [a for i, (a, healthy) in enumerate(zip(addresses, lives, strict=True))
              if healthy and (i % slices == turn or not self.replicas[a].healthy)]
        for address, healthy in zip(addresses, lives, strict=True):
            budget_mb = self.agents[address].budget_mb  # memory_kind gpu: at most the GPUs' total once read
            if healthy and budget_mb != self.replicas[address].budget_mb:
                self.replicas[address].budget_mb = budget_mb
                self._dirty_replicas.add(address)
                flipped = True
            if healthy != self.replicas[address].healthy:
                log.warning("controller: replica %s is %s", address, "back" if healthy else "down (its copies leave the pools)")
                self._set_health(address, healthy)
                flipped = True
        held = await asyncio.gather(*(self.agents[a].loaded() for a in up), return_exceptions=True)
        for address, loaded in zip(up, held, strict=True):
            if isinstance(loaded, BaseException):
                continue
            replica = self.replicas[address]
            for name, copy in list(replica.copies.items()):
                record = self.records.get(name)
                backend = (record.spec.backend_model or name) if record else name
                if copy.state == "ready" and backend not in loaded:
                    self._drop_copy(address, name)
                    changed.add(name)
                    if self._standins.get(name):  # the copy stood in for is gone: the stand-in stays
                        self._standins[name] -= 1
                    if record is not None:
                        record.set_condition(
                            LOADED, False, "Lost", "the replica no longer holds it (restarted?)", address
                        )
                        record.event("lost", f"{address} no longer holds it (restarted?)")
                    log.warning("controller: %s lost its copy of %s", address, name)
        if changed or flipped:
            self._publish(*changed)

    async def observe_usage_once(self) -> None:
        """Feed the autoscaler the counters the shards reported since the last round (and, once more,
        those of the round before: an interval with nothing new reads as quiet)."""
        reported = self.shards.take_reported()
        for name in reported | self._observed_last:
            record = self.records.get(name)
            if record is not None and record.committed:
                await self._observe(record)
        self._observed_last = reported
        for name in reported:  # of a model's gauges, only its queue wait follows its counters
            if name in self.records and self.records[name].committed:
                metrics.MODEL_QUEUE_WAIT_MS.labels(name).set(self.autoscaler.queue_wait_ms(name) or 0.0)

    async def _observe(self, record: ModelRecord) -> None:
        """Feed the autoscaler ``record``'s queue counters (summed over its shards) as of now, and the
        shard book its request rate."""
        name = record.name
        counters = self.shards.counters(name)
        if counters is None:
            return
        now = self.clock.now()
        self._busy[name] = counters.queue_depth > 0 or counters.inflight_batches > 0
        self.autoscaler.observe(
            name,
            now,
            arrivals_total=counters.arrivals_total,
            dispatched_total=counters.dispatched_total,
            queue_wait_s_total=counters.queue_wait_s_total,
            queue_depth=counters.queue_depth,
            last_arrival_s=counters.last_arrival_s,
        )
        before = self._arrivals_seen.get(name)
        self._arrivals_seen[name] = (counters.arrivals_total, now)
        if before is not None and now > before[1]:
            rate = max(counters.arrivals_total - before[0], 0) / (now - before[1])
            if rate > 0:
                self.shards.rates[name] = rate
            else:
                self.shards.rates.pop(name, None)

    def _decide(self, record: ModelRecord) -> Decision:
        # Copies on replicas that are down are not capacity: below min_copies without them, the
        # min-copies rule places a stand-in on a replica that is up at once. One pass over its copies
        # (this runs for every model with copies, every round).
        name = record.name
        live = 0
        loading = False
        down: list[str] = []
        for address in self._holders.get(name, ()):
            replica = self.replicas[address]
            state = replica.copies[name].state
            if state == "draining":
                continue
            if not replica.healthy:
                down.append(address)
                continue
            live += 1
            loading = loading or state == "loading"
        decision = self.autoscaler.decide(
            name,
            self.clock.now(),
            copies=live,
            min_copies=record.spec.min_copies,
            max_copies=record.spec.max_copies,
            loading=loading,
        )
        if decision.action == "add" and down:
            down.sort()
            return Decision(decision.action, f"{decision.reason} (copies on replicas that are down: {', '.join(down)})")
        return decision

    def _standin_surplus(self, record: ModelRecord) -> Decision | None:
        """A stand-in copy to remove: the replicas it stood in for are back with their copies."""
        name = record.name
        if not self._standins.get(name) or self.unreachable_copies(name):
            return None
        ready = self.copies(name, ("ready",))
        floor = max(record.spec.min_copies, 1)
        if len(ready) <= floor or len(ready) < len(self.copies(name)):
            if len(ready) <= floor:
                self._standins[name] = 0  # nothing extra left (scaled down meanwhile)
            return None
        self._standins[name] -= 1
        return Decision("remove", f"the replica a stand-in copy replaced is back with its copy: {len(ready)} copies, "
                                  f"removing the extra one")

    def _deciding(self) -> list[ModelRecord]:
        """The models a decision round looks at: those with copies, and those whose min_copies wants
        some. A model scaled to zero has nothing to decide until a request's cold start loads a copy,
        so a fleet of mostly idle models costs its active part, not its size."""
        names = self._holders.keys() | self._wants_copies
        return [r for r in (self.records.get(n) for n in sorted(names)) if r is not None and r.committed]

    async def autoscale_once(self) -> None:
        for record in self._deciding():
            name = record.name
            if name in self._scaling or name in self._cold:
                continue
            surplus = self._standin_surplus(record)
            if surplus is not None:
                log.info("controller: %s %s: %s", surplus.action, name, surplus.reason)
                record.event("scale_remove", surplus.reason)
                self._scaling[name] = asyncio.create_task(self._scale(name, surplus.action, surplus.reason))
                continue
            decision = self._decide(record)
            if decision.action in ("remove", "zero"):
                # Taking capacity away is decided on counters read now, not up to a poll interval
                # old: a request that reached the batcher since the last poll keeps its copy.
                await self._observe(record)
                if name in self._scaling or name in self._cold:
                    continue
                decision = self._decide(record)
            if decision.action == "none":
                continue
            self.autoscaler.acted(name, self.clock.now(), decision.action)
            log.info("controller: autoscaler %s %s: %s", decision.action, name, decision.reason)
            record.event(f"scale_{decision.action}", decision.reason)
            standin = decision.action == "add" and bool(self.unreachable_copies(name))
            self._scaling[name] = asyncio.create_task(
                self._scale(name, decision.action, decision.reason, standin=standin)
            )

    async def _scale(self, name: str, action: str, reason: str, *, standin: bool = False) -> None:
        try:
            if action == "add":
                with contextlib.suppress(NoCapacity):
                    await self._add_copy(name, f"autoscaler: {reason}", standin=standin)
            elif action == "remove":
                replica = choose_copy_to_remove(name, list(self.replicas.values()))
                await self._remove_copy(name, replica, f"autoscaler: {reason}")
            elif action == "zero":
                self._standins.pop(name, None)
                await asyncio.gather(
                    *(self._remove_copy(name, a, f"scale to zero: {reason}") for a in self.copies(name, ("ready",)))
                )
        except FlotillaError as exc:
            log.warning("controller: scaling %s (%s) failed: %s", name, action, exc.message)
        except ValueError as exc:
            log.warning("controller: scaling %s (%s) skipped: %s", name, action, exc)
        finally:
            self._scaling.pop(name, None)
            record = self.records.get(name)
            if record is not None:
                await self._save(record)


class _UsageView(Mapping[str, ModelUsage]):
    """What placement reads of each model, built when read: a placement looks at the models on the
    replicas it considers, not at the whole registry."""

    def __init__(self, controller: Controller) -> None:
        self._controller = controller

    def __getitem__(self, name: str) -> ModelUsage:
        record = self._controller.records[name]
        return ModelUsage(
            name,
            record.memory_mb,
            record.spec.min_copies,
            record.spec.max_copies,
            self._controller.autoscaler.last_used_s(name),
            self._controller._busy.get(name, False),
        )

    def __iter__(self) -> Iterator[str]:
        return iter(self._controller.records)

    def __len__(self) -> int:
        return len(self._controller.records)
