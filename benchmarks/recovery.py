#!/usr/bin/env python3
"""Durability stress: kill -9 the block daemon N times under queue-depth-32 writes.

The same as ``pvio bench recovery`` (all options are shared)::

    python benchmarks/recovery.py --kills 500
    python benchmarks/recovery.py --json

Exit status 1 if any acknowledged write was lost or corrupted, or a write failed.
See ``pvio bench recovery --help``.
"""

from __future__ import annotations

import sys

from pvio.bench.recovery import main

if __name__ == "__main__":
    sys.exit(main())
