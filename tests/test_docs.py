"""The Sphinx site documents every public name (parsed from docs/*.rst; building the site
is CI's job: ``sphinx-build -W``)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import openfactory_nats
from openfactory_nats import otel, prometheus

DOCS = Path(__file__).resolve().parent.parent / "docs"
_DIRECTIVE = re.compile(r"^\.\. auto(?:class|exception|function|data|attribute|module)::\s*(\S+)\s*$", re.M)
_MEMBERS = re.compile(r"^\.\. automodule::\s*(\S+)\s*\n((?:[ \t]+:.*\n)*)", re.M)


def documented() -> set[str]:
    """Every dotted name an autodoc directive of docs/*.rst documents."""
    names: set[str] = set()
    for page in DOCS.glob("*.rst"):
        text = page.read_text(encoding="utf-8")
        names.update(_DIRECTIVE.findall(text))
        for module, options in _MEMBERS.findall(text):
            members = re.search(r":members:(.*)", options)
            if members and members.group(1).strip():
                names.update(f"{module}.{m.strip()}" for m in members.group(1).split(","))
    return names


def test_every_public_name_is_documented() -> None:
    names = documented()
    for module in (openfactory_nats, prometheus, otel):
        missing = {f"{module.__name__}.{n}" for n in module.__all__} - names
        assert not missing, f"add an autodoc directive to a page of docs/ for {sorted(missing)}"


def test_every_documented_name_exists() -> None:
    for dotted in documented():
        module_name, _, attr = dotted.rpartition(".")
        try:
            module = importlib.import_module(dotted)
        except ImportError:
            module = importlib.import_module(module_name)
            assert hasattr(module, attr), f"docs document {dotted}, which does not exist"


def test_the_metrics_table_names_every_metric() -> None:
    doc = prometheus.__doc__ or ""
    for kind, name, _, _ in prometheus.METRICS.values():
        exported = f"openfactory_nats_{name}_total" if kind == "counter" else f"openfactory_nats_{name}"
        assert f"``{exported}``" in doc, f"{exported} is missing from the table in prometheus.py's docstring"


def test_the_docs_version_is_the_package_version() -> None:
    namespace: dict[str, object] = {"__file__": str(DOCS / "conf.py")}
    exec(compile((DOCS / "conf.py").read_text(encoding="utf-8"), str(DOCS / "conf.py"), "exec"), namespace)
    assert namespace["release"] == openfactory_nats.__version__


def test_the_version_is_set_once_and_the_changelog_has_it() -> None:
    init = (DOCS.parent / "openfactory_nats" / "__init__.py").read_text(encoding="utf-8")
    assert len(re.findall(r"\d+\.\d+\.\d+", init)) == 1  # one copy, read by setup.cfg's attr:
    assert "version = attr: openfactory_nats.__version__" in (DOCS.parent / "setup.cfg").read_text()
    assert f"\n{openfactory_nats.__version__} - " in (DOCS.parent / "CHANGELOG.rst").read_text(encoding="utf-8")
    assert "Apache License" in (DOCS.parent / "LICENSE").read_text(encoding="utf-8")
