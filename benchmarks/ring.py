#!/usr/bin/env python3
"""Ring benchmark: pvio's shared ring against a socketpair and multiprocessing.Pipe.

The same as ``pvio bench ring`` (all options are shared), runnable from a
checkout without the console script::

    python benchmarks/ring.py                 # table on stdout, progress on stderr
    python benchmarks/ring.py --json          # one JSON object with 'ratios'
    python benchmarks/ring.py --seconds 1 --depths 1,256

See benchmarks/README.md for what is measured and how to read the numbers.
"""

from __future__ import annotations

import sys

from pvio.bench.ring import main

if __name__ == "__main__":
    sys.exit(main())
