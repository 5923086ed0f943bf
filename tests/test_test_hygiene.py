"""The tests wait on something and look only at public state.

Read from the source with ``ast`` (nothing is imported or run), every file under ``tests/``:

- **no bare sleeps.** A ``time.sleep(d)`` or ``asyncio.sleep(d)`` whose ``d`` is anything but
  the literal ``0`` is a guess at how long something takes, and a slow machine outruns it. A
  test waits on an event the code sets, on the fake clock (``await clock.advance(d)``), or on
  a polled condition with a deadline (``tests/waiting.py``). ``asyncio.sleep(0)`` yields one
  loop step and is fine. A sleep that lets time pass on purpose (an outage held while load
  runs, a fake that stands for slow work) carries a ``# duration:`` comment on its line that
  says why it is a duration, not a wait; the polling helpers in ``ALLOWED_SLEEPERS`` sleep
  between looks by design.
- **no private members of product objects.** ``x._name`` where ``x`` is not ``self`` or
  ``cls`` reads what the code does not promise; the code grows a small public seam instead.
  Allowed: dunders; a ``_name`` the test file defines itself (its own helpers and fakes);
  the named-tuple API (``_replace``, ``_asdict``, ``_fields``, ``_make``), public despite the
  underscore.

A sleep inside a string (the script of a child process) is not a call and is not read.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.waiting import until, until_sync

TESTS = Path(__file__).resolve().parent

ALLOWED_SLEEPERS = {
    ("waiting.py", "until"),
    ("waiting.py", "until_sync"),
}
"""(file name, function name) of the helpers that poll a condition: they sleep between looks."""

NAMED_TUPLE_API = {"_replace", "_asdict", "_fields", "_make"}
SLEEP_MODULES = {"time", "asyncio"}
DURATION_MARK = "# duration:"


def scanned_files() -> list[Path]:
    return sorted(p for p in TESTS.rglob("*.py") if "__pycache__" not in p.parts)


def _shown(path: Path) -> str:
    return str(path.relative_to(TESTS.parent)) if path.is_relative_to(TESTS.parent) else str(path)


def _is_zero(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and not isinstance(node.value, bool) and node.value == 0


def _sleep_calls(tree: ast.AST) -> Iterator[tuple[ast.Call, str | None]]:
    """Every ``time.sleep``/``asyncio.sleep`` call (under any name it was imported as), with the
    name of the function it is in."""
    modules, functions = set(SLEEP_MODULES), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {a.asname for a in node.names if a.name in SLEEP_MODULES and a.asname}
        elif isinstance(node, ast.ImportFrom) and node.module in SLEEP_MODULES:
            functions |= {a.asname or a.name for a in node.names if a.name == "sleep"}

    def is_sleep(func: ast.expr) -> bool:
        if isinstance(func, ast.Attribute):
            return func.attr == "sleep" and isinstance(func.value, ast.Name) and func.value.id in modules
        return isinstance(func, ast.Name) and func.id in functions

    def walk(node: ast.AST, function: str | None) -> Iterator[tuple[ast.Call, str | None]]:
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) else function
            if isinstance(child, ast.Call) and is_sleep(child.func):
                yield child, function
            yield from walk(child, inner)

    yield from walk(tree, None)


def bare_sleeps(path: Path) -> list[str]:
    source = path.read_text()
    lines = source.splitlines()
    found = []
    for call, function in _sleep_calls(ast.parse(source)):
        if call.args and _is_zero(call.args[0]):
            continue
        if (path.name, function) in ALLOWED_SLEEPERS:
            continue
        last_line = lines[(call.end_lineno or call.lineno) - 1]
        if any(DURATION_MARK in lines[n - 1] for n in range(call.lineno, (call.end_lineno or call.lineno) + 1)):
            continue
        found.append(f"{_shown(path)}:{call.lineno}: {last_line.strip()}")
    return found


def _own_private_names(tree: ast.AST) -> set[str]:
    """The ``_names`` a file defines: functions, classes, assigned names and ``self._x`` attributes."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Attribute):
            names.add(node.target.attr)
    return {n for n in names if n.startswith("_")}


def private_reads(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    own = _own_private_names(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or not node.attr.startswith("_"):
            continue
        attr = node.attr
        if attr.startswith("__") and attr.endswith("__"):
            continue
        if isinstance(node.value, ast.Name) and node.value.id in {"self", "cls"}:
            continue
        if attr in own or attr in NAMED_TUPLE_API:
            continue
        found.append(f"{_shown(path)}:{node.lineno}: .{attr} on {ast.unparse(node.value)}")
    return found


def test_no_test_waits_with_a_bare_sleep() -> None:
    found = [hit for path in scanned_files() for hit in bare_sleeps(path)]
    assert not found, (
        "wait on an event, the fake clock or tests/waiting.py's until(); mark a deliberate "
        "duration with '# duration: why':\n" + "\n".join(found)
    )


def test_no_test_reads_a_private_member() -> None:
    found = [hit for path in scanned_files() for hit in private_reads(path)]
    assert not found, "add a public seam to the product code instead:\n" + "\n".join(found)


def test_the_scanner_sees_what_it_forbids(tmp_path: Path) -> None:
    probe = tmp_path / "test_probe.py"
    probe.write_text(
        "import asyncio, time\n"
        "class _Local:\n"
        "    def __init__(self):\n"
        "        self._mine = 1\n"
        "async def test(x, other):\n"
        "    await asyncio.sleep(0.2)\n"
        "    await asyncio.sleep(0)\n"
        "    time.sleep(1)  # duration: the outage lasts a second\n"
        "    time.sleep(delay_s)\n"
        "    x._stream\n"
        "    other._mine\n"
        "    x.__class__\n"
        "    x._replace(a=1)\n"
        "    'time.sleep(60)'\n"
        "from asyncio import sleep as pause\n"
        "async def later():\n"
        "    await pause(1)\n"
    )
    assert [h.removeprefix(f"{probe}:") for h in bare_sleeps(probe)] == [
        "6: await asyncio.sleep(0.2)", "9: time.sleep(delay_s)", "17: await pause(1)"
    ]
    assert [h.removeprefix(f"{probe}:") for h in private_reads(probe)] == ["10: ._stream on x"]


async def test_until_returns_once_the_condition_holds_and_fails_naming_what_it_waited_for() -> None:
    looks = iter([False, 0, [], "yes"])
    assert await until(lambda: next(looks), 5, "the fourth look", interval_s=0) >= 0

    async def never() -> bool:
        return False

    with pytest.raises(AssertionError, match="not within 0.05 s: the impossible"):
        await until(never, 0.05, "the impossible", interval_s=0.01)
    with pytest.raises(AssertionError, match="not within 0.05 s: the impossible"):
        until_sync(lambda: False, 0.05, "the impossible", interval_s=0.01)
