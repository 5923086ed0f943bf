"""The ceiling bench's two points run against real router and batcher processes
(short windows: this checks the measurement works, not what it measures)."""

from __future__ import annotations

from pathlib import Path

import pytest

from flotilla.bench import ceiling
from flotilla.config import load_settings
from tests.integration.conftest import REPO


@pytest.fixture
def settings(tmp_path: Path):  # type: ignore[no-untyped-def]
    return load_settings(REPO / "bench" / "flotilla-bench.yaml", run_dir=tmp_path / "run")


async def test_a_batcher_alone_forms_full_batches_and_is_metered(settings, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(ceiling, "WARMUP_S", 0.5)
    point = await ceiling.batcher_point(settings, tmp_path, max_batch_size=8, window_s=1.0)
    assert point["errors"] == 0 and point["requests"] > 100, point
    assert point["cpu_us_per_request"] > 0 and point["ceiling_requests_per_s_one_core"] > 0
    assert 1 <= point["mean_batch"] <= 8
    assert point["unary_batches"] == 0  # every batch went to the worker on the batcher's relay stream


async def test_a_router_alone_relays_every_call_and_is_metered(settings, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(ceiling, "WARMUP_S", 0.5)
    point = await ceiling.router_point(settings, tmp_path, window_s=1.0)
    assert point["errors"] == 0 and point["requests"] > 100, point
    assert point["cpu_us_per_request"] > 0 and point["calls_per_relay_message"] >= 1
    lines = ceiling.readme_lines({"measured_at": "now", "points": [point]})
    assert any("| router |" in line for line in lines)


async def test_a_router_with_its_relay_unpaced_relays_every_call(settings, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(ceiling, "WARMUP_S", 0.5)
    point = await ceiling.router_point(settings, tmp_path, window_s=1.0, pacing_ms=0.0)
    assert point["errors"] == 0 and point["requests"] > 100, point
    assert point["pacing_ms"] == 0.0 and point["calls_per_relay_message"] >= 1
    assert "pacing_ms: 0.0" in (tmp_path / "router.yaml").read_text()  # the router process ran with it


async def test_an_empty_grpc_server_answers_every_call_and_is_metered(settings, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(ceiling, "WARMUP_S", 0.5)
    point = await ceiling.empty_server_point(settings, tmp_path, window_s=1.0)
    assert point["errors"] == 0 and point["requests"] > 100, point
    assert point["tier"] == ceiling.EMPTY_SERVER and point["cpu_us_per_request"] > 0
    assert ceiling.summary({"points": [point]})["empty_grpc_server_alone_cpu_us_per_request"] > 0


async def test_a_relay_proxy_relays_every_call_and_is_metered(settings, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(ceiling, "WARMUP_S", 0.5)
    point = await ceiling.relay_proxy_point(settings, tmp_path, window_s=1.0)
    assert point["errors"] == 0 and point["requests"] > 100, point
    assert point["tier"] == ceiling.RELAY_PROXY and point["cpu_us_per_request"] > 0
    assert point["calls_per_relay_message"] >= 1, "every call went over the relay to the instant batcher"
    assert ceiling.summary({"points": [point]})["relay_proxy_alone_cpu_us_per_request"] > 0
