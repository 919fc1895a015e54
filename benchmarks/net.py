#!/usr/bin/env python3
"""Network benchmark: iperf3 TCP and 64-byte frames/s through pvio, against a veth
pair and a Python relay over Unix datagram sockets, in the same run.

The same as ``pvio bench net`` (all options are shared), runnable from a checkout
without the console script (needs root, iperf3 and /dev/net/tun)::

    python benchmarks/net.py                 # table on stdout, progress on stderr
    python benchmarks/net.py --json          # one JSON object with 'ratios'
    python benchmarks/net.py --seconds 3 --workloads small_frames

See ``pvio bench net --help`` for what is measured.
"""

from __future__ import annotations

import sys

from pvio.bench.net import main

if __name__ == "__main__":
    sys.exit(main())
