"""Two revisions measured alternately on this machine (``flotilla bench --against REV --only PART``).

On a shared machine a bench figure moves by tens of percent between runs for
reasons outside the code (this project's 2-core machine: ONNX Runtime alone
5.5 to 7.9 CPU-ms per image within one day). What a change buys is measured
by running the code before and after it alternately, close in time, and
comparing within rounds: that is this module.

Each side runs in its own git worktree under ``.flotilla/ab/``: the base at
``REV``, the head at this checkout's state (HEAD plus uncommitted changes to
tracked files, through ``git stash create``). Both share this checkout's
``build/`` (models, photos) and virtual environment: a base whose
dependencies differ needs them installed here. Each round runs the part once
per side, base first, each from an empty ``bench/results.json`` in its
worktree (so its summary holds only that part's figures); the report gives
every summary figure both sides produced, per round, and head / base of
their medians. Nothing in this checkout's docs/benchmarks.md or bench/ is written.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

AB_DIR = Path(".flotilla") / "ab"
PARTS = ("cpu", "overhead", "ceiling")
# The package maps flotilla.services and flotilla.clients onto these top-level directories
# (pyproject's package-dir); a worktree's own copies are reached through links in its flotilla/.
MAPPED_PACKAGES = ("services", "clients")


@dataclass(frozen=True)
class Side:
    name: str
    """base or head."""
    rev: str
    """The commit it runs."""
    root: Path
    """Its worktree."""


@dataclass(frozen=True)
class Comparison:
    figure: str
    base: list[float]
    """One value per round."""
    head: list[float]

    @property
    def ratio(self) -> float | None:
        """head / base of the medians (None when the base's median is 0)."""
        base = statistics.median(self.base)
        return None if base == 0 else statistics.median(self.head) / base


def git(*args: str, cwd: Path | None = None) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def head_rev(repo: Path) -> str:
    """HEAD, or a commit of HEAD plus the uncommitted changes to tracked files when there are any."""
    return git("stash", "create", cwd=repo) or git("rev-parse", "HEAD", cwd=repo)


def worktree(repo: Path, rev: str, name: str) -> Path:
    """A detached worktree of ``rev`` at .flotilla/ab/<name> that imports its own code and uses
    ``repo``'s build/."""
    path = (repo / AB_DIR / name).resolve()
    if path.exists():
        remove_worktree(repo, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    git("worktree", "add", "--detach", "--force", str(path), rev, cwd=repo)
    (path / "build").symlink_to(repo.resolve() / "build", target_is_directory=True)
    for package in MAPPED_PACKAGES:
        link = path / "flotilla" / package
        if (path / package).is_dir() and not link.exists():
            link.symlink_to(Path("..") / package, target_is_directory=True)
    return path


def remove_worktree(repo: Path, path: Path) -> None:
    git("worktree", "remove", "--force", str(path), cwd=repo)


def run_side(side: Side, part: str, duration_s: float, log: Path) -> dict[str, object]:
    """One run of ``part`` on ``side`` (its output appended to ``log``); its summary figures."""
    results = side.root / "bench" / "results.json"
    results.unlink(missing_ok=True)
    with log.open("a", encoding="utf-8") as out:
        out.write(f"\n==== {side.name} ({side.rev[:12]}) {part} {time.strftime('%H:%M:%S')}\n")
        out.flush()
        done = subprocess.run(
            [sys.executable, "-m", "flotilla", "bench", "--only", part, "--duration-s", str(duration_s)],
            cwd=side.root, stdout=out, stderr=subprocess.STDOUT, check=False,
        )
    if done.returncode != 0:
        raise RuntimeError(f"the {side.name} side ({side.rev[:12]}) failed its {part} run; see {log}")
    summary = json.loads(results.read_text(encoding="utf-8")).get("summary", {})
    return summary if isinstance(summary, dict) else {}


def numbers(summary: dict[str, object]) -> dict[str, float]:
    """A summary's numeric figures (not its flags) as floats."""
    return {k: float(v) for k, v in summary.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def compare(base: list[dict[str, object]], head: list[dict[str, object]]) -> list[Comparison]:
    """Every numeric figure present in every round of both sides, in the head's order."""
    base_numbers, head_numbers = [numbers(s) for s in base], [numbers(s) for s in head]
    figures = [k for k, v in (head[0] if head else {}).items() if isinstance(v, int | float)]
    return [
        Comparison(k, [s[k] for s in base_numbers], [s[k] for s in head_numbers])
        for k in figures
        if all(k in s for s in base_numbers + head_numbers)
    ]


def table(comparisons: list[Comparison], base: Side, head: Side) -> str:
    lines = [
        f"| figure | base {base.rev[:8]} (per round) | head {head.rev[:8]} (per round) | head / base (medians) |",
        "|---|---|---|---|",
    ]
    for c in comparisons:
        ratio = "-" if c.ratio is None else f"{c.ratio:.3f}"
        lines.append(f"| {c.figure} | {' / '.join(f'{v:g}' for v in c.base)} | "
                     f"{' / '.join(f'{v:g}' for v in c.head)} | {ratio} |")
    return "\n".join(lines)


def run(against: str, part: str, *, rounds: int = 2, duration_s: float = 5.0, repo: Path | None = None) -> Path:
    """Measure ``part`` on ``against`` and on this checkout alternately; the report's path."""
    if part not in PARTS:
        raise SystemExit(f"--against compares one part at a time: --only one of {', '.join(PARTS)}")
    repo = (repo or Path.cwd()).resolve()
    base_rev = git("rev-parse", "--verify", f"{against}^{{commit}}", cwd=repo)
    head = head_rev(repo)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    sides = [Side("base", base_rev, worktree(repo, base_rev, f"base-{stamp}")),
             Side("head", head, worktree(repo, head, f"head-{stamp}"))]
    log = repo / AB_DIR / f"{part}-{stamp}.log"
    summaries: dict[str, list[dict[str, object]]] = {"base": [], "head": []}
    try:
        for round_ in range(1, rounds + 1):
            for side in sides:
                print(f"ab: round {round_}/{rounds}: {side.name} ({side.rev[:12]}) {part} ...", flush=True)
                summaries[side.name].append(run_side(side, part, duration_s, log))
    finally:
        for side in sides:
            remove_worktree(repo, side.root)
    comparisons = compare(summaries["base"], summaries["head"])
    report = repo / AB_DIR / f"{part}-{stamp}.json"
    report.write_text(json.dumps({
        "part": part, "base": base_rev, "head": head, "rounds": rounds, "duration_s": duration_s,
        "measured_at": stamp, "summaries": summaries,
        "comparison": [{"figure": c.figure, "base": c.base, "head": c.head, "head_over_base": c.ratio}
                       for c in comparisons],
    }, indent=2) + "\n", encoding="utf-8")
    print(table(comparisons, *sides))
    print(f"ab: report {report}; the runs' output {log}")
    return report
