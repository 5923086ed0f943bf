"""Every package in the tree is one the wheel ships (pyproject.toml lists them by hand).

The editable install of `make install` imports any folder with an ``__init__.py``, so a package
missing from ``[tool.setuptools] packages`` passes every other test and is absent only from the
built image (`pip install .` in the Dockerfile), as ``flotilla.services.router.kserve`` was.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_package_in_the_tree_is_listed_for_the_wheel() -> None:
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    found = set()
    for name, folder in setuptools["package-dir"].items():
        root = REPO / folder
        for init in root.rglob("__init__.py"):
            relative = init.parent.relative_to(root)
            found.add(".".join([name, *relative.parts]))
    assert found - listed == set(), "packages in the tree the wheel would leave out"
    assert listed - found == set(), "listed packages that are not in the tree"
