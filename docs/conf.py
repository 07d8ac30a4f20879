"""Sphinx configuration: ``sphinx-build -W --keep-going -b html docs docs/_build/html``."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # autodoc imports the package from this checkout


def _version() -> str:
    """``openfactory_nats.__version__``, read without importing the package (nor nats-py)."""
    tree = ast.parse((ROOT / "openfactory_nats" / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__version__" for t in node.targets):
            value = ast.literal_eval(node.value)
            if isinstance(value, str):
                return value
    raise RuntimeError("openfactory_nats/__init__.py sets no __version__")


project = "openfactory-nats"
author = "OpenFactory"
copyright = "OpenFactory"  # noqa: A001 -- the name Sphinx reads
release = _version()
version = ".".join(release.split(".")[:2])

extensions = ["sphinx.ext.autodoc", "sphinx.ext.viewcode"]
exclude_patterns = ["_build"]
root_doc = "index"

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}

html_theme = "alabaster"
html_title = f"openfactory-nats {release}"
