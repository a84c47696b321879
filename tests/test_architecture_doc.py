"""docs/architecture.md names every module under library/, networks/ and tools/ (package __init__.py
files aside), and every module path it names exists."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDERS = ("library", "networks", "tools")


def _modules() -> set[str]:
    found = set()
    for folder in FOLDERS:
        for root, dirs, files in os.walk(os.path.join(ROOT, folder)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for name in files:
                if name.endswith(".py") and name != "__init__.py":
                    found.add(os.path.relpath(os.path.join(root, name), ROOT).replace(os.sep, "/"))
    return found


def _doc() -> str:
    with open(os.path.join(ROOT, "docs", "architecture.md"), encoding="utf-8") as f:
        return f.read()


def test_every_module_has_a_line():
    named = set(re.findall(r"`((?:library|networks|tools)/[\w/]+\.py)`", _doc()))
    missing = sorted(_modules() - named)
    assert not missing, f"add a line for each to docs/architecture.md: {missing}"


def test_every_named_module_exists():
    named = set(re.findall(r"`((?:library|networks|tools)/[\w/]+\.py)`", _doc()))
    stale = sorted(path for path in named if not os.path.isfile(os.path.join(ROOT, path)))
    assert not stale, f"docs/architecture.md names modules that do not exist: {stale}"
    assert len(_modules()) > 80  # the walk found the tree
