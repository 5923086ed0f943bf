"""flotilla top's core: two scrapes of synthetic metric text -> rows -> text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flotilla.clients import top
from flotilla.clients.top import Frame, ModelRow, ReplicaRow, Scrape, parse_metrics

MODEL = "efficientnet-lite0"
BOUNDS = ("0.005", "0.01", "0.025", "0.05", "+Inf")


def latency(tier: str, model: str, counts: tuple[int, ...]) -> str:
    """Router latency histogram text with cumulative ``counts`` per bound of BOUNDS."""
    name = "flotilla_grpc_request_duration_seconds"
    labels = f'method="Classify",model="{model}",tier="{tier}"'
    lines = [f"# TYPE {name} histogram"]
    lines += [f'{name}_bucket{{{labels},le="{le}"}} {n}' for le, n in zip(BOUNDS, counts, strict=True)]
    lines += [f"{name}_count{{{labels}}} {counts[-1]}", f"{name}_sum{{{labels}}} 1.0"]
    return "\n".join(lines) + "\n"


def requests(tier: str, model: str, ok: int, unavailable: int) -> str:
    name = "flotilla_grpc_requests"
    labels = f'method="Classify",model="{model}",tier="{tier}"'
    return (f"# TYPE {name} counter\n{name}_total{{{labels},code=\"OK\"}} {ok}\n"
            f"{name}_total{{{labels},code=\"UNAVAILABLE\"}} {unavailable}\n")


def batcher(depth: int, batches: int, items: int, wait_counts: tuple[int, ...]) -> str:
    wait = "flotilla_batcher_queue_wait_seconds"
    lines = [
        "# TYPE flotilla_batcher_queue_depth gauge", f'flotilla_batcher_queue_depth{{model="{MODEL}"}} {depth}',
        "# TYPE flotilla_batcher_batches counter", f'flotilla_batcher_batches_total{{model="{MODEL}"}} {batches}',
        f'flotilla_batcher_batches_created{{model="{MODEL}"}} 1.7e9',
        "# TYPE flotilla_batcher_batch_items counter", f'flotilla_batcher_batch_items_total{{model="{MODEL}"}} {items}',
        f"# TYPE {wait} histogram",
    ]
    lines += [f'{wait}_bucket{{model="{MODEL}",le="{le}"}} {n}' for le, n in zip(BOUNDS, wait_counts, strict=True)]
    return "\n".join(lines) + "\n"


CONTROLLER = """\
# TYPE flotilla_model_copies gauge
flotilla_model_copies{model="efficientnet-lite0",state="ready"} 2
flotilla_model_copies{model="efficientnet-lite0",state="loading"} 1
flotilla_model_copies{model="open-nsfw",state="ready"} 1
# TYPE flotilla_model_placed gauge
flotilla_model_placed{model="efficientnet-lite0",replica="triton-0"} 1
flotilla_model_placed{model="efficientnet-lite0",replica="triton-1"} 1
flotilla_model_placed{model="open-nsfw",replica="triton-1"} 1
flotilla_model_placed{model="open-nsfw",replica="triton-0"} 0
# TYPE flotilla_model_unplaceable gauge
flotilla_model_unplaceable{model="efficientnet-lite0"} 0
flotilla_model_unplaceable{model="open-nsfw"} 1
# TYPE flotilla_replica_healthy gauge
flotilla_replica_healthy{replica="triton-0"} 1
flotilla_replica_healthy{replica="triton-1"} 0
# TYPE flotilla_replica_memory_used_bytes gauge
flotilla_replica_memory_used_bytes{replica="triton-0"} 187695104
flotilla_replica_memory_used_bytes{replica="triton-1"} 449839104
# TYPE flotilla_replica_memory_budget_bytes gauge
flotilla_replica_memory_budget_bytes{replica="triton-0"} 1073741824
flotilla_replica_memory_budget_bytes{replica="triton-1"} 2147483648
"""


def scrape(time_s: float, **targets: str) -> Scrape:
    return Scrape(time_s=time_s, targets={name: parse_metrics(text) for name, text in targets.items()}, failed={})


@pytest.fixture
def two_scrapes() -> tuple[Scrape, Scrape]:
    """2 s apart: the router answered 40 more OK and 4 more UNAVAILABLE; the batcher formed 10 batches of 40."""
    before = scrape(
        10.0,
        router=requests("router", MODEL, ok=100, unavailable=1) + latency("router", MODEL, (50, 90, 100, 101, 101)),
        batcher=batcher(depth=0, batches=30, items=100, wait_counts=(100, 100, 100, 100, 100)),
        controller=CONTROLLER,
    )
    after = scrape(
        12.0,
        # of the 44 new calls: 0 under 5 ms, 22 in (5, 10] ms, 20 in (10, 25] ms, 2 in (25, 50] ms
        router=requests("router", MODEL, ok=140, unavailable=5) + latency("router", MODEL, (50, 112, 142, 145, 145)),
        batcher=batcher(depth=3, batches=40, items=140, wait_counts=(120, 130, 140, 140, 140)),
        controller=CONTROLLER,
    )
    return before, after


def row(rows: list[ModelRow], model: str) -> ModelRow:
    return next(r for r in rows if r.model == model)


def test_rates_and_errors_come_from_counter_increases(two_scrapes: tuple[Scrape, Scrape]) -> None:
    lite0 = row(top.model_rows(*two_scrapes), MODEL)
    assert lite0.requests_per_s == pytest.approx(44 / 2)
    assert lite0.errors_per_s == pytest.approx(4 / 2)


def test_percentiles_interpolate_within_the_bucket_deltas(two_scrapes: tuple[Scrape, Scrape]) -> None:
    lite0 = row(top.model_rows(*two_scrapes), MODEL)
    # rank 22 of 44 is the last of the 22 calls in (5, 10] ms
    assert lite0.p50_s == pytest.approx(0.010)
    # rank 43.56 is 1.56 of the 2 calls in (25, 50] ms
    assert lite0.p99_s == pytest.approx(0.025 + 0.025 * 1.56 / 2)
    # queue wait: 20 in [0, 5] ms, 10 in (5, 10] ms, 10 in (10, 25] ms; rank 39.6
    assert lite0.queue_wait_p99_s == pytest.approx(0.010 + 0.015 * 9.6 / 10)


def test_mean_batch_queue_depth_and_placement(two_scrapes: tuple[Scrape, Scrape]) -> None:
    rows = top.model_rows(*two_scrapes)
    lite0 = row(rows, MODEL)
    assert lite0.mean_batch == pytest.approx(40 / 10)
    assert lite0.queue_depth == 3
    assert (lite0.copies, lite0.copies_changing, lite0.replicas) == (2, "+1 loading", ("triton-0", "triton-1"))
    nsfw = row(rows, "open-nsfw")  # known only from the controller: no traffic numbers
    assert (nsfw.copies, nsfw.replicas, nsfw.unplaceable, lite0.unplaceable) == (1, ("triton-1",), True, False)
    assert nsfw.requests_per_s is None and nsfw.p50_s is None and nsfw.mean_batch is None


def test_replicas_show_health_memory_and_models(two_scrapes: tuple[Scrape, Scrape]) -> None:
    assert top.replica_rows(two_scrapes[1]) == [
        ReplicaRow("triton-0", True, 187695104, 1073741824, (MODEL,)),
        ReplicaRow("triton-1", False, 449839104, 2147483648, (MODEL, "open-nsfw")),
    ]


def test_only_the_router_tier_counts_and_other_tiers_do_not_add_models() -> None:
    before = scrape(0.0, batcher=requests("batcher", "other", ok=5, unavailable=0))
    after = scrape(1.0, batcher=requests("batcher", "other", ok=9, unavailable=0))
    assert top.model_rows(before, after) == []


def test_a_restarted_process_counts_from_zero_and_a_new_series_from_zero() -> None:
    before = scrape(0.0, router=requests("router", MODEL, ok=500, unavailable=0))
    after = scrape(1.0, router=requests("router", MODEL, ok=7, unavailable=0) + requests("router", "b", ok=3, unavailable=1))
    rows = top.model_rows(before, after)
    assert row(rows, MODEL).requests_per_s == 7
    assert (row(rows, "b").requests_per_s, row(rows, "b").errors_per_s) == (4, 1)


def test_a_target_new_since_the_last_scrape_has_no_rate_yet() -> None:
    before = scrape(0.0)
    after = scrape(1.0, router=requests("router", MODEL, ok=5, unavailable=0))
    lite0 = row(top.model_rows(before, after), MODEL)
    assert lite0.requests_per_s is None


def test_quantile_edges() -> None:
    inf = float("inf")
    assert top.quantile(0.5, []) is None
    assert top.quantile(0.5, [(0.1, 0), (inf, 0)]) is None
    assert top.quantile(0.5, [(0.1, 4), (inf, 4)]) == pytest.approx(0.05)  # linear from 0
    assert top.quantile(0.99, [(0.1, 1), (inf, 10)]) == 0.1  # beyond the last bound: the last bound


def test_render_aligns_numbers_and_dashes_what_is_missing(two_scrapes: tuple[Scrape, Scrape]) -> None:
    before, after = two_scrapes
    after = Scrape(after.time_s, after.targets, failed={"batcher-x": "127.0.0.1:9: connection refused"})
    text = top.render(top.build_frame(before, after, wall_time_s=0.0))
    lines = text.splitlines()
    assert "interval 2.0 s  3/4 targets scraped" in lines[0]
    assert lines[1] == "not answering: batcher-x (127.0.0.1:9: connection refused)"
    header = next(line for line in lines if line.startswith("MODEL"))
    lite0 = next(line for line in lines if line.startswith(MODEL))
    nsfw = next(line for line in lines if line.startswith("open-nsfw"))
    assert lite0.split()[1:10] == ["22.0", "10.0", "44.5", "2.00", "3", "24.4", "4.00", "2", "triton-0,"]
    assert lite0.endswith("triton-0, triton-1  (+1 loading)")
    assert nsfw.split()[1:] == ["-", "-", "-", "-", "-", "-", "-", "1", "triton-1", "(unplaceable)"]
    # right-aligned: each number ends where its column header ends
    for column in ("REQ/S", "P99 ms", "BATCH", "COPIES"):
        end = header.index(column) + len(column)
        assert lite0[end - 1] != " " and lite0[end] == " ", column
        assert nsfw[end - 1] != " ", column
    triton1 = next(line for line in lines if line.startswith("triton-1"))
    assert triton1.split() == ["triton-1", "NO", "429", "2048", f"{MODEL},", "open-nsfw"]


def test_render_without_any_metrics_says_so() -> None:
    text = top.render(Frame(wall_time_s=0.0, interval_s=1.0, scraped=0, failed={}, models=[], replicas=[]))
    assert "(no model has metrics yet)" in text and "(no replica metrics" in text


def test_targets_come_from_the_file_sd_file_else_the_fallback(tmp_path: Path) -> None:
    targets = top.Targets(tmp_path / top.TARGETS_FILE, {"router": "127.0.0.1:1"})
    assert targets.current() == {"router": "127.0.0.1:1"}
    targets.file.write_text(json.dumps([
        {"targets": ["127.0.0.1:2"], "labels": {"process": "router", "tier": "router"}},
        {"targets": ["127.0.0.1:3"], "labels": {"process": "batcher-a", "tier": "batcher"}},
    ]))
    assert targets.current() == {"router": "127.0.0.1:2", "batcher-a": "127.0.0.1:3"}


def test_scrape_reports_a_target_that_does_not_answer() -> None:
    result = top.scrape({"gone": "127.0.0.1:1"}, timeout_s=1.0)
    assert result.targets == {} and result.failed["gone"].startswith("127.0.0.1:1: ")
