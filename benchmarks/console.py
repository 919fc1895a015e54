#!/usr/bin/env python3
"""Console benchmark: a pvio console against a plain pty pair and a socketpair.

The same as ``pvio bench console`` (all options are shared), runnable from a
checkout without the console script::

    python benchmarks/console.py                 # table on stdout, progress on stderr
    python benchmarks/console.py --json          # one JSON object with 'ratios'
    python benchmarks/console.py --seconds 2 --workloads echo

See ``pvio bench console --help`` for what is measured.
"""

from __future__ import annotations

import sys

from pvio.bench.console import main

if __name__ == "__main__":
    sys.exit(main())
