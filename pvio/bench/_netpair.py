"""Two network namespaces joined through pvio: what the net tests and ``pvio bench net`` run.

:func:`pvio_pair` starts ``pvio serve`` with two domains (``a`` and ``b``, one vif
each), creates two namespaces and runs ``pvio netfront-tap`` in each, so each
namespace has a TAP interface (``pv0``) whose frames travel over netif rings
through the daemon's switch. Everything it started is stopped by pid, and the
namespaces are deleted, when the block ends.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from pvio._netns import Netns, stop_process
from pvio.bench._common import BenchError

ADDR_A, ADDR_B = "10.202.0.1", "10.202.0.2"
MAC_A, MAC_B = "00:16:3e:20:00:0a", "00:16:3e:20:00:0b"
IFNAME = "pv0"

_CONFIG = f"""
[[domain]]
name = "a"
  [[domain.device]]
  type = "vif"
  devid = 0
  mac = "{MAC_A}"

[[domain]]
name = "b"
  [[domain.device]]
  type = "vif"
  devid = 0
  mac = "{MAC_B}"
"""


@dataclass
class PvioPair:
    root: str
    socket: str
    ns_a: Netns
    ns_b: Netns
    daemon: subprocess.Popen
    taps: list[subprocess.Popen] = field(default_factory=list)
    addr_a: str = ADDR_A
    addr_b: str = ADDR_B

    def log(self, name: str) -> str:
        try:
            with open(os.path.join(self.root, name), errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def pvio(self, *argv: str, **kwargs) -> subprocess.Popen:
        """Start ``python -m pvio ARGV`` against this daemon (in the host namespace)."""
        return subprocess.Popen([sys.executable, "-m", "pvio", *argv], **kwargs)


def _wait_for(pred, what: str, timeout: float, procs: dict[str, subprocess.Popen],
              pair: PvioPair) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        for name, proc in procs.items():
            if proc.poll() is not None:
                raise BenchError(f"{name} exited ({proc.returncode}) while waiting for "
                                 f"{what}:\n{pair.log(name + '.log')[-3000:]}")
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout} s waiting for {what}:\n" +
                             "\n".join(pair.log(n + ".log")[-2000:] for n in procs))
        time.sleep(0.05)


@contextlib.contextmanager
def pvio_pair(*, offloads: bool = True, taps: bool = True,
              timeout: float = 30.0) -> Iterator[PvioPair]:
    """A daemon and two namespaces whose ``pv0`` TAPs are pvio netfronts (see module doc).

    ``taps=False``: only the daemon (domains ``a`` and ``b`` left for the caller)."""
    root = tempfile.mkdtemp(prefix="pvio-net-", dir="/tmp")
    stack = contextlib.ExitStack()
    try:
        with open(os.path.join(root, "pvio.toml"), "w") as f:
            f.write(_CONFIG)
        sock = os.path.join(root, "xb.sock")
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        with open(os.path.join(root, "daemon.log"), "wb") as log:
            daemon = subprocess.Popen(
                [sys.executable, "-m", "pvio", "serve", "--config",
                 os.path.join(root, "pvio.toml"), "--socket", sock,
                 "--data-dir", os.path.join(root, "data")],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        stack.callback(stop_process, daemon)
        ns_a = stack.enter_context(Netns("pvio-a"))
        ns_b = stack.enter_context(Netns("pvio-b"))
        pair = PvioPair(root, sock, ns_a, ns_b, daemon)
        _wait_for(lambda: os.path.exists(sock + ".admin"), "the daemon's sockets", timeout,
                  {"daemon": daemon}, pair)
        for name, ns, addr in (("tap-a", ns_a, ADDR_A), ("tap-b", ns_b, ADDR_B))[:2 * taps]:
            argv = ["netfront-tap", "--socket", sock, "--domain", name[-1], "--ifname", IFNAME,
                    "--address", f"{addr}/24"] + ([] if offloads else ["--no-offloads"])
            with open(os.path.join(root, f"{name}.log"), "wb") as log:
                pair.taps.append(ns.popen(sys.executable, "-m", "pvio", *argv, stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env=env))
        if taps:
            procs = {"daemon": daemon, "tap-a": pair.taps[0], "tap-b": pair.taps[1]}
            _wait_for(lambda: all(" is vif " in pair.log(f"{n}.log") for n in ("tap-a", "tap-b")),
                      "both netfront-tap processes", timeout, procs, pair)
        yield pair
    finally:
        stack.close()
        shutil.rmtree(root, ignore_errors=True)
