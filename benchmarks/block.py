#!/usr/bin/env python3
"""Block benchmark: a pvio disk against in-process os.pread/os.pwrite and a
request/response block server over a Unix socket.

The same as ``pvio bench block`` (all options are shared), runnable from a
checkout without the console script::

    python benchmarks/block.py                 # table on stdout, progress on stderr
    python benchmarks/block.py --json          # one JSON object with 'ratios'
    python benchmarks/block.py --seconds 1 --size 64M

See ``pvio bench block --help`` for what is measured.
"""

from __future__ import annotations

import sys

from pvio.bench.block import main

if __name__ == "__main__":
    sys.exit(main())
