"""`flotilla bench --against REV`: its worktrees run their own code, and its comparison."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flotilla.bench import ab
from flotilla.bench.ab import Comparison, Side, compare, table

REPO = Path(__file__).resolve().parents[2]


def test_a_worktree_imports_its_own_services_not_this_checkouts() -> None:
    # The editable install maps flotilla.services onto this checkout's services/: without the
    # worktree's links a base revision would silently run the head's services.
    rev = ab.git("rev-parse", "HEAD", cwd=REPO)
    path = ab.worktree(REPO, rev, "test-worktree")
    try:
        found = subprocess.run(
            [sys.executable, "-c", "import flotilla, flotilla.services.preprocess.processor as p, "
             "flotilla.clients.client as c; print(flotilla.__file__); print(p.__file__); print(c.__file__)"],
            cwd=path, check=True, capture_output=True, text=True,
        ).stdout.split()
        assert all(Path(f).resolve().is_relative_to(path) for f in found), found
        assert (path / "build").resolve() == (REPO / "build").resolve()
    finally:
        ab.remove_worktree(REPO, path)
    assert not path.exists()


def test_the_head_is_the_checkouts_state_uncommitted_changes_included(tmp_path: Path) -> None:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "first")
    (tmp_path / "f.txt").write_text("one\n")
    git("add", "f.txt")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "second")
    assert ab.head_rev(tmp_path) == git("rev-parse", "HEAD"), "a clean checkout is its HEAD"
    (tmp_path / "f.txt").write_text("two\n")
    snapshot = ab.head_rev(tmp_path)
    assert snapshot != git("rev-parse", "HEAD")
    assert git("show", f"{snapshot}:f.txt") == "two"
    assert (tmp_path / "f.txt").read_text() == "two\n", "the checkout itself is left as it was"


def test_figures_both_sides_have_are_compared_by_their_medians() -> None:
    base = [{"rps": 100.0, "cpu_us": 50, "only_base": 1.0, "label": "x"},
            {"rps": 120.0, "cpu_us": 70, "only_base": 1.0, "label": "x"}]
    head = [{"rps": 150.0, "cpu_us": 30, "flag": True, "label": "x"},
            {"rps": 180.0, "cpu_us": 30, "flag": True, "label": "x"}]
    got = compare(base, head)
    assert [c.figure for c in got] == ["rps", "cpu_us"], "numbers both sides reported in every round"
    assert got[0].ratio == pytest.approx(165.0 / 110.0)
    assert got[1].ratio == pytest.approx(30.0 / 60.0)
    assert Comparison("zero", [0.0], [1.0]).ratio is None
    text = table(got, Side("base", "a" * 40, Path()), Side("head", "b" * 40, Path()))
    assert "| rps | 100 / 120 | 150 / 180 | 1.500 |" in text


def test_only_one_part_at_a_time() -> None:
    with pytest.raises(SystemExit, match="one of cpu, overhead, ceiling"):
        ab.run("HEAD", "all", repo=REPO)
