"""``flotilla top``: a live terminal view of a running stack, read from its metrics.

Each refresh scrapes every metrics endpoint of the stack (``/metrics`` over
HTTP) and computes the view from the last two scrapes, as Prometheus would
over that window: rates and mean batch from counter increases, p50/p99 from
the increase of each histogram bucket (``histogram_quantile`` over
``increase``), gauges from the latest scrape. A value no process exports
shows as ``-``; a zero is a zero.

    flotilla top  2026-11-23 10:50:13  interval 2.0 s  6/6 targets scraped

    MODEL                 REQ/S   P50 ms   P99 ms   ERR/S  QUEUE  WAIT99 ms   BATCH  COPIES  ON REPLICAS
    efficientnet-lite0    116.5     45.3     98.7    0.00      0       22.1    3.66       2  127.0.0.1:35169, ...

    REPLICA             HEALTHY  USED MiB  BUDGET MiB  MODELS
    127.0.0.1:35169         yes       179        1500  efficientnet-lite0

The core is pure and needs no stack: ``parse_metrics`` turns exposition
text into samples, ``model_rows`` and ``replica_rows`` turn two scrapes into
rows, ``render`` turns a ``Frame`` into text. Only ``scrape`` and ``run``
touch the network and the terminal.
"""

from __future__ import annotations

import json
import math
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from flotilla.common import metrics

Labels = tuple[tuple[str, str], ...]
Samples = dict[str, dict[Labels, float]]
"""Sample name (``..._total``, ``..._bucket``) -> sorted label pairs -> value."""

TARGETS_FILE = "metrics-targets.json"
CLEAR_HOME = "\x1b[H\x1b[2J"
ROUTER_TIER = "router"


def _name(metric: MetricWrapperBase, suffix: str = "") -> str:
    """The exposed sample name of a metric from the contract (``flotilla.common.metrics``)."""
    return next(iter(metric.describe())).name + suffix


REQUESTS = _name(metrics.REQUESTS, "_total")
REQUEST_BUCKETS = _name(metrics.REQUEST_SECONDS, "_bucket")
QUEUE_DEPTH = _name(metrics.QUEUE_DEPTH)
QUEUE_WAIT_BUCKETS = _name(metrics.QUEUE_WAIT_SECONDS, "_bucket")
BATCHES = _name(metrics.BATCHES, "_total")
BATCH_ITEMS = _name(metrics.BATCH_ITEMS, "_total")
MODEL_COPIES = _name(metrics.MODEL_COPIES)
MODEL_PLACED = _name(metrics.MODEL_PLACED)
MODEL_UNPLACEABLE = _name(metrics.MODEL_UNPLACEABLE)
REPLICA_HEALTHY = _name(metrics.REPLICA_HEALTHY)
REPLICA_MEMORY_USED = _name(metrics.REPLICA_MEMORY_USED)
REPLICA_MEMORY_BUDGET = _name(metrics.REPLICA_MEMORY_BUDGET)


def parse_metrics(text: str) -> Samples:
    """Prometheus exposition text -> samples (``_created`` timestamps dropped)."""
    samples: Samples = defaultdict(dict)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.endswith("_created"):
                samples[sample.name][tuple(sorted(sample.labels.items()))] = sample.value
    return dict(samples)


@dataclass(frozen=True)
class Scrape:
    """One scrape of every target."""

    time_s: float
    """Monotonic clock when the scrape began (the targets are scraped concurrently)."""
    targets: dict[str, Samples]
    """Process name -> its samples, for every target that answered."""
    failed: dict[str, str]
    """Process name -> why it did not answer."""


def increase(before: Scrape, after: Scrape) -> Samples:
    """Each series' increase from ``before`` to ``after``, summed over the targets.

    A value lower than before is a restarted process: its increase is the
    new value (as Prometheus counts resets). A series new in a target seen
    before started at 0; a target not scraped before has no known increase.
    """
    total: Samples = defaultdict(lambda: defaultdict(float))
    for target, now in after.targets.items():
        then = before.targets.get(target)
        if then is None:
            continue
        for name, series in now.items():
            previous = then.get(name, {})
            for labels, value in series.items():
                start = previous.get(labels, 0.0)
                total[name][labels] += value - start if value >= start else value
    return total


def latest(scrape: Scrape) -> Samples:
    """The latest value of each series, summed over the targets (gauges)."""
    total: Samples = defaultdict(lambda: defaultdict(float))
    for samples in scrape.targets.values():
        for name, series in samples.items():
            for labels, value in series.items():
                total[name][labels] += value
    return total


def _matching(samples: Samples, name: str, **want: str) -> Iterator[tuple[dict[str, str], float]]:
    for labels, value in samples.get(name, {}).items():
        found = dict(labels)
        if all(found.get(key) == wanted for key, wanted in want.items()):
            yield found, value


def _sum(samples: Samples, name: str, **want: str) -> float | None:
    """Sum of the matching series; None when there is none."""
    values = [value for _, value in _matching(samples, name, **want)]
    return sum(values) if values else None


def quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """The q-quantile of cumulative ``(upper bound, count)`` buckets, as Prometheus's histogram_quantile.

    Linear within the bucket that holds the rank, from 0 below the first
    bound; a rank in the ``+Inf`` bucket gets the highest finite bound.
    None when the buckets hold no observations.
    """
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for upper_bound, count in buckets:
        if count >= rank and count > lower_count:
            if math.isinf(upper_bound):
                return lower_bound
            return lower_bound + (upper_bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = upper_bound, count
    return lower_bound


def _buckets(samples: Samples, name: str, **want: str) -> list[tuple[float, float]]:
    """Cumulative buckets of the matching histogram series, summed by bound."""
    by_bound: dict[float, float] = defaultdict(float)
    for labels, value in _matching(samples, name, **want):
        by_bound[float(labels["le"])] += value
    return sorted(by_bound.items())


@dataclass(frozen=True)
class ModelRow:
    """One model over the interval; None where no process exports the metric (shown as ``-``)."""

    model: str
    requests_per_s: float | None
    p50_s: float | None
    p99_s: float | None
    errors_per_s: float | None
    queue_depth: float | None
    queue_wait_p99_s: float | None
    mean_batch: float | None
    copies: int | None
    """Ready copies."""
    copies_changing: str
    """Copies on their way in or out, e.g. ``+1 loading``; empty when none."""
    replicas: tuple[str, ...]
    """Replicas holding a ready copy."""
    unplaceable: bool = False
    """The controller's last placement found no replica with room for it."""


@dataclass(frozen=True)
class ReplicaRow:
    replica: str
    healthy: bool | None
    memory_used_bytes: float | None
    memory_budget_bytes: float | None
    models: tuple[str, ...]
    """Models placed on it."""


def _labels_of(samples: Samples, label: str, *names: str, **want: str) -> set[str]:
    return {found[label] for name in names for found, _ in _matching(samples, name, **want) if found.get(label)}


def model_rows(before: Scrape, after: Scrape) -> list[ModelRow]:
    """Per model: the router's rate, latency and errors, the batcher's queue and batches, the controller's copies."""
    inc, now = increase(before, after), latest(after)
    interval_s = after.time_s - before.time_s

    def rate(value: float | None) -> float | None:
        return None if value is None or interval_s <= 0 else value / interval_s

    models = _labels_of(now, "model", REQUESTS, tier=ROUTER_TIER)
    models |= _labels_of(now, "model", QUEUE_DEPTH, BATCHES, MODEL_COPIES, MODEL_PLACED)
    rows = []
    for model in sorted(models):
        requests = _sum(inc, REQUESTS, tier=ROUTER_TIER, model=model)
        errors = None if requests is None else requests - (
            _sum(inc, REQUESTS, tier=ROUTER_TIER, model=model, code="OK") or 0.0)
        latency = _buckets(inc, REQUEST_BUCKETS, tier=ROUTER_TIER, model=model)
        batches, items = _sum(inc, BATCHES, model=model), _sum(inc, BATCH_ITEMS, model=model)
        copies = {found["state"]: int(value) for found, value in _matching(now, MODEL_COPIES, model=model)}
        changing = ", ".join(f"+{n} {state}" for state, n in sorted(copies.items()) if state != "ready" and n)
        rows.append(ModelRow(
            model=model,
            requests_per_s=rate(requests),
            p50_s=quantile(0.5, latency),
            p99_s=quantile(0.99, latency),
            errors_per_s=rate(errors),
            queue_depth=_sum(now, QUEUE_DEPTH, model=model),
            queue_wait_p99_s=quantile(0.99, _buckets(inc, QUEUE_WAIT_BUCKETS, model=model)),
            mean_batch=items / batches if batches and items is not None else None,
            copies=copies.get("ready", 0) if copies else None,
            copies_changing=changing,
            replicas=tuple(sorted(
                found["replica"] for found, value in _matching(now, MODEL_PLACED, model=model) if value >= 1)),
            unplaceable=(_sum(now, MODEL_UNPLACEABLE, model=model) or 0.0) >= 1,
        ))
    return rows


def replica_rows(after: Scrape) -> list[ReplicaRow]:
    """Per Triton replica, from the controller's gauges: health, memory, the models placed on it."""
    now = latest(after)
    replicas = _labels_of(now, "replica", REPLICA_HEALTHY, REPLICA_MEMORY_USED, REPLICA_MEMORY_BUDGET, MODEL_PLACED)
    rows = []
    for replica in sorted(replicas):
        healthy = _sum(now, REPLICA_HEALTHY, replica=replica)
        rows.append(ReplicaRow(
            replica=replica,
            healthy=None if healthy is None else healthy >= 1,
            memory_used_bytes=_sum(now, REPLICA_MEMORY_USED, replica=replica),
            memory_budget_bytes=_sum(now, REPLICA_MEMORY_BUDGET, replica=replica),
            models=tuple(sorted(
                found["model"] for found, value in _matching(now, MODEL_PLACED, replica=replica) if value >= 1)),
        ))
    return rows


@dataclass(frozen=True)
class Frame:
    """Everything one refresh shows."""

    wall_time_s: float
    interval_s: float
    scraped: int
    failed: dict[str, str]
    models: list[ModelRow]
    replicas: list[ReplicaRow]


def build_frame(before: Scrape, after: Scrape, wall_time_s: float) -> Frame:
    return Frame(
        wall_time_s=wall_time_s, interval_s=after.time_s - before.time_s, scraped=len(after.targets),
        failed=after.failed, models=model_rows(before, after), replicas=replica_rows(after),
    )


def _num(value: float | None, width: int, spec: str, scale: float = 1.0) -> str:
    return ("-" if value is None else format(value * scale, spec)).rjust(width)


def render(frame: Frame) -> str:
    """The frame as fixed-width text: a header, the model table, the replica table."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(frame.wall_time_s))
    total = frame.scraped + len(frame.failed)
    lines = [f"flotilla top  {stamp}  interval {frame.interval_s:.1f} s  {frame.scraped}/{total} targets scraped"]
    if frame.failed:
        lines.append("not answering: " + ", ".join(f"{name} ({why})" for name, why in sorted(frame.failed.items())))
    lines.append("")
    width = max([18, *(len(row.model) for row in frame.models)])
    lines.append(f"{'MODEL':<{width}}  {'REQ/S':>7}  {'P50 ms':>7}  {'P99 ms':>7}  {'ERR/S':>6}  {'QUEUE':>5}  "
                 f"{'WAIT99 ms':>9}  {'BATCH':>6}  {'COPIES':>6}  ON REPLICAS")
    for m in frame.models:
        placed = ", ".join(m.replicas) or ("-" if m.copies is None else "none")
        notes = ", ".join(note for note in (m.copies_changing, "unplaceable" if m.unplaceable else "") if note)
        placed += f"  ({notes})" if notes else ""
        lines.append(
            f"{m.model:<{width}}  {_num(m.requests_per_s, 7, '.1f')}  {_num(m.p50_s, 7, '.1f', 1e3)}  "
            f"{_num(m.p99_s, 7, '.1f', 1e3)}  {_num(m.errors_per_s, 6, '.2f')}  {_num(m.queue_depth, 5, '.0f')}  "
            f"{_num(m.queue_wait_p99_s, 9, '.1f', 1e3)}  {_num(m.mean_batch, 6, '.2f')}  "
            f"{_num(m.copies, 6, '.0f')}  {placed}"
        )
    if not frame.models:
        lines.append("(no model has metrics yet)")
    lines.append("")
    width = max([18, *(len(row.replica) for row in frame.replicas)])
    lines.append(f"{'REPLICA':<{width}}  {'HEALTHY':>7}  {'USED MiB':>8}  {'BUDGET MiB':>10}  MODELS")
    for r in frame.replicas:
        healthy = "-" if r.healthy is None else ("yes" if r.healthy else "NO")
        lines.append(
            f"{r.replica:<{width}}  {healthy:>7}  {_num(r.memory_used_bytes, 8, '.0f', 1 / metrics.MIB)}  "
            f"{_num(r.memory_budget_bytes, 10, '.0f', 1 / metrics.MIB)}  {', '.join(r.models) or '-'}"
        )
    if not frame.replicas:
        lines.append("(no replica metrics: the controller exports none yet)")
    return "\n".join(lines)


@dataclass(frozen=True)
class Targets:
    """Where the metrics endpoints are: the stack's file_sd file, re-read at each refresh
    (batchers come and go), else a fixed map (stack.json's ``metrics``)."""

    file: Path
    fallback: dict[str, str]

    def current(self) -> dict[str, str]:
        """Process name -> host:port."""
        try:
            groups = json.loads(self.file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return dict(self.fallback)
        found: dict[str, str] = {}
        for group in groups:
            for address in group.get("targets", []):
                name = group.get("labels", {}).get("process", address)
                found[address if name in found else name] = address
        return found


def _fetch(address: str, timeout_s: float) -> Samples:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=timeout_s) as response:
        return parse_metrics(response.read().decode("utf-8"))


def scrape(targets: dict[str, str], timeout_s: float = 2.0) -> Scrape:
    """Scrape every target at once; one that fails or answers garbage lands in ``failed``."""
    started_s = time.monotonic()
    answered: dict[str, Samples] = {}
    failed: dict[str, str] = {}
    if targets:
        with ThreadPoolExecutor(max_workers=len(targets)) as pool:
            futures = {name: pool.submit(_fetch, address, timeout_s) for name, address in targets.items()}
            for name, future in futures.items():
                try:
                    answered[name] = future.result()
                except Exception as exc:  # connection refused, timeout, HTTP error, unparseable text
                    reason = getattr(exc, "reason", None) or exc
                    failed[name] = f"{targets[name]}: {reason}"
    return Scrape(time_s=started_s, targets=answered, failed=failed)


def run(targets: Targets, interval_s: float, *, once: bool = False, out: TextIO) -> None:
    """Scrape, wait ``interval_s``, scrape and draw; ``once`` prints one frame and returns,
    otherwise redraw in place every ``interval_s`` until interrupted."""
    if not once:
        out.write(f"{CLEAR_HOME}flotilla top: first scrape, next frame in {interval_s:.1f} s ...\n")
        out.flush()
    previous = scrape(targets.current(), timeout_s=min(2.0, max(interval_s, 0.5)))
    while True:
        time.sleep(max(0.0, previous.time_s + interval_s - time.monotonic()))
        current = scrape(targets.current(), timeout_s=min(2.0, max(interval_s, 0.5)))
        text = render(build_frame(previous, current, time.time()))
        out.write(text + "\n" if once else CLEAR_HOME + text + "\n")
        out.flush()
        if once:
            return
        previous = current
