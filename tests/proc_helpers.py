"""Process-resource probes shared by the leak tests (fds, RSS)."""

import gc
import os


def open_fd_count() -> int:
    """This process's open fds, after a collection: sockets and mappings of
    earlier tests that only the cycle collector closes would otherwise make
    the count drift while the code under test leaks nothing."""
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


def rss_bytes() -> int:
    """This process's resident set size, from /proc/self/status."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")
