"""The version matrix: the test suite under each supported CPython, at both ends of the
nats-py range that ``setup.cfg`` admits.

::

    nox -l                  # every session
    nox -t ci               # the sessions .ci/run runs (after the README's own test run)
    nox -s tests            # the whole matrix, 3 Pythons x 2 nats-py (about 15 minutes)
    nox -s "tests(python='3.13', nats='floor')" -- -x tests/test_versions.py

``floor`` installs the lowest nats-py of ``install_requires`` (``==`` the ``>=`` bound);
``newest`` lets pip pick the newest release the range admits, so a new nats-py is tested
as soon as it is out. An interpreter that cannot be found fails its session (also outside
CI): pyenv's interpreters are found where pyenv installs them, whichever it selects.
"""

from __future__ import annotations

import configparser
import glob
import os
import re
import shutil
import subprocess
from pathlib import Path

import nox

ROOT = Path(__file__).parent
PYTHONS = ("3.11", "3.12", "3.13")

nox.options.error_on_missing_interpreters = True
nox.options.sessions = ["tests"]


def _nats_requirement() -> str:
    """The nats-py requirement of ``install_requires`` in setup.cfg."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    for line in config["options"]["install_requires"].splitlines():
        line = line.split("#", 1)[0].strip()
        if re.match(r"nats-py\b", line):
            return line
    raise RuntimeError("setup.cfg: no nats-py in install_requires")


NATS_REQUIREMENT = _nats_requirement()
_floor = re.search(r">=\s*([\w.]+)", NATS_REQUIREMENT)
if _floor is None:
    raise RuntimeError(f"setup.cfg: {NATS_REQUIREMENT!r} has no >= bound")
NATS_FLOOR = _floor.group(1)
NATS = {"floor": f"nats-py=={NATS_FLOOR}", "newest": NATS_REQUIREMENT}

# The combinations .ci/run tests, besides the README's own run (python3, the newest
# nats-py): every Python with the newest nats-py, and the floor on the newest Python,
# the corner where an old nats-py most likely meets an asyncio it was not written for.
CI = {("3.12", "newest"), ("3.13", "newest"), ("3.13", "floor")}


def _runs(python: str) -> bool:
    found = shutil.which(f"python{python}")
    if found is None:
        return False
    try:  # a pyenv shim is on PATH also for versions that pyenv does not select
        return subprocess.run([found, "-c", ""], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _version_key(path: str) -> tuple[int, ...]:
    version = Path(path).parents[1].name
    return tuple(int(part) for part in re.findall(r"\d+", version))


def _put_pyenv_interpreters_on_path() -> None:
    """Link each supported CPython that PATH lacks from pyenv's versions folder (the
    newest patch release) into a folder put first on PATH, so that nox finds it as
    ``pythonX.Y``; nothing else of that installation shadows what PATH had."""
    pyenv_root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    links = ROOT / ".nox" / "interpreters"
    for python in PYTHONS:
        if _runs(python):
            continue
        candidates = glob.glob(os.path.join(pyenv_root, "versions", f"{python}.*", "bin", f"python{python}"))
        candidates = [c for c in candidates if re.fullmatch(r"\d+\.\d+\.\d+", Path(c).parents[1].name)]
        if not candidates:
            continue  # nox reports it missing, and fails
        links.mkdir(parents=True, exist_ok=True)
        link = links / f"python{python}"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(max(candidates, key=_version_key))
    if links.is_dir():
        os.environ["PATH"] = f"{links}{os.pathsep}{os.environ.get('PATH', '')}"


_put_pyenv_interpreters_on_path()


@nox.session(python=False, tags=["ci"])
def interpreters(session: nox.Session) -> None:
    """Fail unless every supported CPython is here: CI's README run covers the one that
    ``python3`` is, the tests sessions tagged ``ci`` the others."""
    for python in PYTHONS:
        if not _runs(python):
            session.error(f"python{python} not found (pyenv install {python}, or put it on PATH)")
        session.run(f"python{python}", "-c", "import sys; print(sys.executable, sys.version.split()[0])", external=True)
    session.run("python3", "--version", external=True)


@nox.session
@nox.parametrize(
    "python,nats",
    [nox.param(python, nats, tags=["ci"] if (python, nats) in CI else []) for python in PYTHONS for nats in NATS],
)
def tests(session: nox.Session, nats: str) -> None:
    """The whole test suite under one Python and one end of the nats-py range."""
    session.install("-e", ".[test]", NATS[nats])
    session.run(
        "python",
        "-c",
        "import importlib.metadata as m, platform; "
        "print('python', platform.python_version(), 'nats-py', m.version('nats-py'))",
    )
    if nats == "floor":
        session.run(
            "python",
            "-c",
            f"import importlib.metadata as m; v = m.version('nats-py'); "
            f"assert v == {NATS_FLOOR!r}, f'nats-py {{v}} installed, not the floor {NATS_FLOOR}'",
        )
    session.run("python", "-m", "pytest", "-p", "no:cacheprovider", *session.posargs)
