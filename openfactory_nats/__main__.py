"""``python -m openfactory_nats``: the command-line tool."""

from __future__ import annotations

import sys

from ._tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
