"""FailureSummary: the first failure at once, then one count line per interval."""

from __future__ import annotations

import logging

import pytest

from flotilla.pool.logsummary import FailureSummary


class Clock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


def test_a_storm_of_failures_becomes_a_few_lines(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    summary = FailureSummary(logging.getLogger("t"), interval_s=10.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger="t"):
        for i in range(8000):  # 8000 failures over 40 s
            clock.now_s = i * 0.005
            summary.note("batcher 127.0.0.1:1", f"call failed: refused #{i}")
        summary.flush()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "batcher 127.0.0.1:1: call failed: refused #0"
    assert len(lines) == 8, lines  # 4 windows: first failure + one count line each
    counted = sum(int(line.split(": ")[1].split()[0]) for line in lines if "more failures" in line)
    assert counted + 4 == 8000
    assert "latest: call failed: refused #7999" in lines[-1]


def test_keys_are_summarised_apart(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    summary = FailureSummary(logging.getLogger("t"), interval_s=10.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger="t"):
        for key in ("a", "b", "a", "b"):
            summary.note(key, "down")
        summary.flush()
    assert [r.getMessage() for r in caplog.records] == [
        "a: down", "b: down", "a: 1 more failures in the last 0.0 s (latest: down)",
        "b: 1 more failures in the last 0.0 s (latest: down)",
    ]
