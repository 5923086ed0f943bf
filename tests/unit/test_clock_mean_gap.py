"""``MeanGap`` (flotilla.common.clock): the moving mean of the gaps between events."""

from __future__ import annotations

import math

import pytest

from flotilla.common.clock import MeanGap


def test_with_no_start_the_first_event_only_starts_and_the_second_gives_the_first_gap() -> None:
    gaps = MeanGap(0.5)
    assert gaps.mean_s == math.inf
    gaps.note(10.0)
    assert gaps.mean_s == math.inf
    gaps.note(10.4)
    assert gaps.mean_s == pytest.approx(0.4)
    gaps.note(10.6)  # a gap of 0.2, weighted a half
    assert gaps.mean_s == pytest.approx(0.3)


def test_with_a_start_the_first_event_gives_a_gap_from_it() -> None:
    gaps = MeanGap(0.125, since_s=5.0)
    gaps.note(5.01)
    assert gaps.mean_s == pytest.approx(0.01)
    gaps.note(5.09)  # 0.08 weighted an eighth
    assert gaps.mean_s == pytest.approx(0.01 + 0.125 * (0.08 - 0.01))
