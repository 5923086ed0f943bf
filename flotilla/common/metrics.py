"""Every Prometheus metric Flotilla exports, in one place (prometheus-client).

Names follow Prometheus conventions: a ``flotilla_`` prefix, base units in
the name (``_seconds``, ``_bytes``), ``_total`` on counters. Label sets are
bounded: tiers, methods, models, status codes, replica and endpoint
addresses, a handful of enumerated kinds - never a uuid, request id or key.

Each service process serves the default registry on its own HTTP port
(``serve_metrics``); metrics a process does not use simply have no samples
there. The dashboard (``observability/grafana/flotilla.json``), the alert
rules (``observability/prometheus/alerts.yml``) and ``flotilla top`` read
these names; a test checks every expression returns data on a real stack.

Histogram buckets: latencies from 1 ms to 60 s; batch sizes in powers of two.

A counter's series must exist before its first event: Prometheus takes a
series' first sample as its baseline, so one born at 9 (nine UNAVAILABLE in
a burst) reads as no increase to ``rate``, ``increase``, the rules and the
dashboard. ``models_served`` creates, at 0, every counter a tier may count
for a model (each status code its request path can answer, rejections, S3
errors, controller events) when the tier learns the model, and removes them
when the model goes, so label sets follow the models.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics, start_http_server

from flotilla.errors import Code

# No *_created series: they double every counter's scrape size for no use here.
disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus-client leaves this function unannotated

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

# -- every gRPC server (the interceptor chain) ----------------------------------------

REQUESTS = Counter(
    "flotilla_grpc_requests", "gRPC calls served, by tier, method, model and status code.",
    ["tier", "method", "model", "code"],
)
REQUEST_SECONDS = Histogram(
    "flotilla_grpc_request_duration_seconds", "Time to answer a gRPC call, by tier, method and model.",
    ["tier", "method", "model"], buckets=LATENCY_BUCKETS_S,
)
ADMISSION_REJECTED = Counter(
    "flotilla_admission_rejected", "Calls refused at once because a tier was at its concurrent-call limit.",
    ["tier"],
)

# -- the batching tier -----------------------------------------------------------------

QUEUE_DEPTH = Gauge("flotilla_batcher_queue_depth", "Requests waiting in a model's batching queue.", ["model"])
INFLIGHT_BATCHES = Gauge("flotilla_batcher_inflight_batches", "Batches dispatched and not yet answered.", ["model"])
QUEUE_WAIT_SECONDS = Histogram(
    "flotilla_batcher_queue_wait_seconds",
    "Arrival-to-dispatch time of requests that left the queue in a batch (the autoscaler's signal).",
    ["model"], buckets=LATENCY_BUCKETS_S,
)
BATCH_SIZE = Histogram("flotilla_batcher_batch_size", "Requests per formed batch.", ["model"], buckets=BATCH_BUCKETS)
BATCHES = Counter("flotilla_batcher_batches", "Batches dispatched (executions of the batching tier).", ["model"])
BATCH_ITEMS = Counter("flotilla_batcher_batch_items", "Requests dispatched in batches; mean batch = items / batches.", ["model"])
QUEUE_REJECTED = Counter(
    "flotilla_batcher_rejected", "Requests that left the queue without a batch, by reason (queue_full, expired).",
    ["model", "reason"],
)

# -- preprocess workers and the backend hop ------------------------------------------

PREPROCESS_SECONDS = Histogram(
    "flotilla_preprocess_stage_duration_seconds",
    "Per image: fetch (S3 GET), decode (JPEG to pixels at size), and per batch: tensor (stacking, normalising).",
    ["model", "stage"], buckets=LATENCY_BUCKETS_S,
)
PREPROCESS_DECODE_BUSY_SECONDS = Counter(
    "flotilla_preprocess_decode_busy_seconds",
    "Wall time the worker's decode threads spent decoding, summed over threads: its rate over"
    " flotilla_preprocess_decode_threads is the worker's busy fraction (what to scale workers on).",
)
PREPROCESS_DECODE_THREADS = Gauge("flotilla_preprocess_decode_threads", "Threads the worker decodes images on.")
PREPROCESS_DECODE_CPU_SECONDS = Counter(
    "flotilla_preprocess_decode_cpu_seconds",
    "CPU time of the worker's decode threads decoding and resizing images (their thread CPU time):"
    " what the worker's process CPU is beyond decode is the rest.",
    ["model"],
)
BACKEND_SECONDS = Histogram(
    "flotilla_backend_request_duration_seconds", "One batch's inference call, by model and Triton replica.",
    ["model", "replica"], buckets=LATENCY_BUCKETS_S,
)
BACKEND_BATCHES = Counter(
    "flotilla_backend_batches",
    "Batches Triton answered, by model, replica and how the tensor travelled: shm (system shared memory,"
    " a replica on the worker's host) or inline (in the request).",
    ["model", "replica", "transfer"],
)
SHARED_MEMORY_BYTES = Gauge(
    "flotilla_preprocess_shared_memory_bytes", "Shared memory a worker holds for batches to Triton on its host."
)
S3_ERRORS = Counter("flotilla_s3_errors", "Object store calls that failed, by operation and kind.", ["operation", "kind"])

# -- endpoint pools (every hop that spreads calls over replicas) ----------------------

ENDPOINT_ADMITTED = Gauge(
    "flotilla_pool_endpoint_admitted", "1 when the pool may choose this endpoint, 0 while it is ejected.",
    ["pool", "endpoint"],
)
EJECTIONS = Counter("flotilla_pool_ejections", "Times an endpoint was ejected from a pool.", ["pool", "endpoint"])

# -- the controller ---------------------------------------------------------------------

CONTROLLER_EVENTS = Counter(
    "flotilla_controller_events",
    "Controller actions and decisions by kind (loaded, unloaded, load_failed, evicted, cold_start, "
    "scale_add, scale_remove, scale_zero, placement_failed, lost).",
    ["model", "kind"],
)
LOAD_SECONDS = Histogram(
    "flotilla_controller_load_duration_seconds", "Artifact fetch plus Triton load of one copy.", ["model"],
    buckets=LATENCY_BUCKETS_S,
)
COLD_START_SECONDS = Histogram(
    "flotilla_controller_cold_start_wait_seconds", "From the first held request to a ready copy.", ["model"],
    buckets=LATENCY_BUCKETS_S,
)
MODEL_COPIES = Gauge(
    "flotilla_model_copies",
    "Copies of a model by state: loading, ready, draining on live replicas; unreachable on replicas that are down.",
    ["model", "state"],
)
SHARD_MODELS = Gauge(
    "flotilla_shard_models", "Models whose queue a batching shard holds, as the controller assigned them.", ["shard"]
)
MODEL_PLACED = Gauge(
    "flotilla_model_placed", "1 where a replica holds a ready copy of the model (no series where it does not).",
    ["model", "replica"],
)
MODEL_MIN_COPIES = Gauge(
    "flotilla_model_min_copies", "The ready copies the model's spec asks for at least (min_copies).", ["model"]
)
MODEL_UNPLACEABLE = Gauge(
    "flotilla_model_unplaceable", "1 while the model's last placement found no replica with room.", ["model"]
)
MODEL_QUEUE_WAIT_MS = Gauge(
    "flotilla_model_queue_wait_milliseconds_mean",
    "Mean queue wait of the last interval the autoscaler observed (from the batchers' counters).", ["model"],
)
REPLICA_MEMORY_USED = Gauge("flotilla_replica_memory_used_bytes", "Memory of the copies placed on a replica.", ["replica"])
REPLICA_MEMORY_BUDGET = Gauge("flotilla_replica_memory_budget_bytes", "A replica's memory budget.", ["replica"])
REPLICA_HEALTHY = Gauge("flotilla_replica_healthy", "1 while the controller finds the Triton replica live.", ["replica"])

MIB = 1024 * 1024

# -- series that exist from the start, at 0 ------------------------------------------------

_SERVER_CODES = (
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "FAILED_PRECONDITION",
    "RESOURCE_EXHAUSTED", "INTERNAL", "UNAVAILABLE",
)
REQUEST_PATH: dict[str, tuple[str, tuple[str, ...]]] = {
    "router": ("Classify", (*_SERVER_CODES, "UNAUTHENTICATED")),
    "batcher": ("Classify", _SERVER_CODES),
    "preprocess": ("ProcessBatch", _SERVER_CODES),
}
"""Tier -> (its request-path method, every status code it can answer there): Flotilla's errors, an
upstream status passed through, the deadline and the caller going away; UNAUTHENTICATED at the router."""
QUEUE_REJECTION_REASONS = ("queue_full", "expired")
S3_GET_ERRORS = ("not_found", "refused", "unreachable")
CONTROLLER_EVENT_KINDS = (
    "loaded", "unloaded", "load_failed", "evicted", "cold_start", "scale_add", "scale_remove", "scale_zero",
    "placement_failed", "lost",
)

_served: dict[str, set[str]] = {}
"""Tier -> the models whose series ``models_served`` created in this process."""


def models_served(tier: str, models: Iterable[str]) -> None:
    """This process's ``tier`` serves exactly ``models`` now: their counters exist, at 0 until counted.

    Call it wherever a tier learns its models (the router's routes, a batcher's model, a worker's
    and the controller's fleet); models it no longer serves lose their series (counted or not).
    Per model: every code of the tier's request path, and the tier's own rejections and errors;
    per tier, once: admission rejections (router, batcher) and S3 GET errors (workers).
    """
    wanted = set(models)
    served = _served.setdefault(tier, set())
    for model in wanted - served:
        for metric, labels in _model_series(tier, model):
            metric.labels(*labels)
    for model in served - wanted:
        _forget(tier, model)
    if wanted and not served:
        for metric, labels in _tier_series(tier):
            metric.labels(*labels)
    _served[tier] = wanted


class OwnedSeries:
    """Gauges whose series belong to owners (a model, a replica, a shard): ``set`` gives an owner's
    series of a gauge their values now and removes those it no longer has, at the owner's cost, not
    the gauge's."""

    def __init__(self) -> None:
        self._held: dict[tuple[Gauge, str], set[tuple[str, ...]]] = {}

    def set(self, gauge: Gauge, owner: str, current: dict[tuple[str, ...], float]) -> None:
        for labels, value in current.items():
            gauge.labels(*labels).set(value)
        for labels in self._held.get((gauge, owner), set()) - set(current):
            gauge.remove(*labels)
        if current:
            self._held[(gauge, owner)] = set(current)
        else:
            self._held.pop((gauge, owner), None)


def models_changed(tier: str, *, added: Iterable[str] = (), removed: Iterable[str] = ()) -> None:
    """``models_served`` by difference: this tier now also serves ``added`` and no longer ``removed``
    (a fleet delta's cost is its size, not the fleet's)."""
    served = _served.setdefault(tier, set())
    first = not served
    for model in removed:
        if model in served:
            served.discard(model)
            _forget(tier, model)
    for model in added:
        if model not in served:
            served.add(model)
            for metric, labels in _model_series(tier, model):
                metric.labels(*labels)
    if first and served:
        for metric, labels in _tier_series(tier):
            metric.labels(*labels)


def _model_series(tier: str, model: str) -> Iterator[tuple[Counter | Histogram, tuple[str, ...]]]:
    if tier in REQUEST_PATH:
        method, codes = REQUEST_PATH[tier]
        for code in codes:
            yield REQUESTS, (tier, method, model, code)
    if tier == "batcher":
        for reason in QUEUE_REJECTION_REASONS:
            yield QUEUE_REJECTED, (model, reason)
    if tier == "controller":
        for kind in CONTROLLER_EVENT_KINDS:
            yield CONTROLLER_EVENTS, (model, kind)
        yield COLD_START_SECONDS, (model,)


def _tier_series(tier: str) -> Iterator[tuple[Counter, tuple[str, ...]]]:
    if tier in ("router", "batcher"):
        yield ADMISSION_REJECTED, (tier,)
    if tier == "preprocess":
        for kind in S3_GET_ERRORS:
            yield S3_ERRORS, ("get", kind)


def _forget(tier: str, model: str) -> None:
    """Remove ``model``'s series of ``tier``: those ``_model_series`` made and any other code counted since."""
    removals: list[tuple[Counter | Histogram, tuple[str, ...]]] = list(_model_series(tier, model))
    if tier in REQUEST_PATH:
        method, _ = REQUEST_PATH[tier]
        removals += [(REQUESTS, (tier, method, model, code.name)) for code in Code]
        removals.append((REQUEST_SECONDS, (tier, method, model)))
    for metric, labels in removals:
        with contextlib.suppress(KeyError):  # never created, or removed already
            metric.remove(*labels)


def serve_metrics(host: str, port: int) -> int:
    """Serve this process's metrics on ``http://host:port/metrics``; 0 picks a free port."""
    if port < 0:
        return 0
    server, _ = start_http_server(port, addr=host)
    return int(server.server_port)
