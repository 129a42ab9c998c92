"""``python -m bench.tasks``: see ``python -m bench.tasks --help``."""

from __future__ import annotations

import sys

from bench.tasks.cli import main

if __name__ == "__main__":
    sys.exit(main())
