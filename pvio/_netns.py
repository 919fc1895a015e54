"""Throwaway Linux network namespaces for tests and benchmarks (private).

A :class:`Netns` is a named namespace made with ``ip netns add`` and removed with
``ip netns del``; everything run in it goes through ``ip netns exec``, which execs the
program itself (no intermediate process), so a :class:`subprocess.Popen` from
:meth:`Netns.popen` has the program's own pid. ``veth_pair`` joins two namespaces::

    with Netns() as a, Netns() as b:
        veth_pair(a, b, "10.9.0.1/24", "10.9.0.2/24")
        server = b.popen("iperf3", "-s", "-1")
        a.run("ping", "-c", "1", "-W", "2", "10.9.0.2")
    # server stopped, both namespaces (and the veth pair with them) gone

All of it needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) and iproute2; ``available()``
says whether this process has both, and why not.

Only processes started through :meth:`Netns.popen` are stopped on close, by pid: a
program that forks children of its own must stop them itself. A namespace lives on
(unnamed) while any process is still inside it, which is why close stops them first.
"""

from __future__ import annotations

import functools
import itertools
import os
import shlex
import shutil
import subprocess
from typing import Any

__all__ = ["Netns", "available", "stop_process", "veth_pair"]

_IFNAMSIZ = 15  # longest interface name Linux accepts (IFNAMSIZ - 1)
_ns_counter = itertools.count()
_veth_counter = itertools.count()


def _run(argv: list[str], *, check: bool = True, timeout: float = 30) -> (
        subprocess.CompletedProcess[str]):
    """``subprocess.run`` with text output captured; RuntimeError (command + stderr)
    when it exits non-zero (if ``check``) or runs longer than ``timeout`` seconds."""
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (
            exc.stderr or "")
        raise RuntimeError(f"{shlex.join(argv)}: timed out after {timeout} s"
                           + (f": {stderr.strip()}" if stderr.strip() else "")) from None
    except OSError as exc:  # the program itself (ip) is missing or not executable
        raise RuntimeError(f"{shlex.join(argv)}: {exc}") from exc
    if check and result.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} failed (exit {result.returncode}): "
                           f"{result.stderr.strip() or '(no stderr)'}")
    return result


def stop_process(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """Stop ``proc`` by its pid: SIGTERM, up to ``timeout`` s to exit, then SIGKILL.

    Reaps it either way; a process that has already exited is only reaped."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Netns:
    """A uniquely named network namespace, with ``lo`` up, removed by :meth:`close`.

    The name is ``f"{prefix}-{pid}-{n}"`` (``n`` counts the namespaces of this
    process; a name left over from an earlier process with the same pid is skipped).
    Use it as a context manager, or call :meth:`close` (idempotent) yourself.
    """

    #: seconds close() gives each process between SIGTERM and SIGKILL
    stop_timeout: float = 5.0

    def __init__(self, prefix: str = "pvio") -> None:
        self._procs: list[subprocess.Popen] = []
        self._closed = True  # until the namespace exists
        pid = os.getpid()
        for _ in range(100):
            name = f"{prefix}-{pid}-{next(_ns_counter)}"
            result = _run(["ip", "netns", "add", name], check=False)
            if result.returncode == 0:
                break
            if "File exists" not in result.stderr:
                raise RuntimeError(f"ip netns add {name} failed (exit {result.returncode}): "
                                   f"{result.stderr.strip() or '(no stderr)'}")
        else:
            raise RuntimeError(f"ip netns add: no free name {prefix}-{pid}-N after 100 tries")
        self.name = name
        self._closed = False
        try:
            self.run("ip", "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    @property
    def exec_prefix(self) -> list[str]:
        """The argv prefix that runs a command inside this namespace."""
        return ["ip", "netns", "exec", self.name]

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"network namespace {getattr(self, 'name', '?')} is closed")

    def run(self, *argv: str, check: bool = True, timeout: float = 30) -> (
            subprocess.CompletedProcess[str]):
        """Run ``argv`` in the namespace and wait for it; stdout/stderr captured as text.

        With ``check`` a non-zero exit raises RuntimeError naming the command and
        carrying its stderr; so does running longer than ``timeout`` seconds (the
        program is killed) in any case."""
        self._check_open()
        return _run([*self.exec_prefix, *argv], check=check, timeout=timeout)

    def popen(self, *argv: str, **kwargs: Any) -> subprocess.Popen:
        """Start ``argv`` in the namespace (``kwargs`` go to :class:`subprocess.Popen`).

        The process is stopped by :meth:`close` if it is still running then."""
        self._check_open()
        proc = subprocess.Popen([*self.exec_prefix, *argv], **kwargs)
        self._procs.append(proc)
        return proc

    def close(self) -> None:
        """Stop the processes :meth:`popen` started, then delete the namespace.

        Does nothing once it has succeeded. If ``ip netns del`` fails it raises
        RuntimeError and a later call tries again."""
        if self._closed:
            return
        while self._procs:
            stop_process(self._procs[-1], self.stop_timeout)
            self._procs.pop()
        _run(["ip", "netns", "del", self.name])
        self._closed = True

    def __enter__(self) -> Netns:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Netns {getattr(self, 'name', '?')} {state}>"


def _veth_names(name: str) -> tuple[str, str]:
    """Two interface names unique to this call (pid and call counter), <= 15 chars."""
    suffix = f"{os.getpid():x}-{next(_veth_counter):x}"
    base = name[: max(0, _IFNAMSIZ - 1 - len(suffix))] + suffix
    if len(base) + 1 > _IFNAMSIZ:
        raise ValueError(f"veth name {base!r}a is longer than {_IFNAMSIZ} characters")
    return base + "a", base + "b"


def veth_pair(a: Netns, b: Netns, addr_a: str, addr_b: str, *, name: str = "veth") -> None:
    """Join ``a`` and ``b`` with a veth pair: one end in each, ``addr_a``/``addr_b``
    (CIDR, e.g. ``"10.9.0.1/24"``) assigned, both up.

    The ends are named ``name`` (shortened as needed) plus this process's pid and a
    per-call counter, ``a``/``b``; each is created directly inside its namespace.
    They go away with the namespaces; on a failure here the pair is removed at once
    and RuntimeError raised."""
    a._check_open()
    b._check_open()
    end_a, end_b = _veth_names(name)
    _run(["ip", "-n", a.name, "link", "add", end_a, "type", "veth",
          "peer", "name", end_b, "netns", b.name])
    try:
        for ns, end, addr in ((a, end_a, addr_a), (b, end_b, addr_b)):
            _run(["ip", "-n", ns.name, "addr", "add", addr, "dev", end])
            _run(["ip", "-n", ns.name, "link", "set", end, "up"])
    except BaseException:
        _run(["ip", "-n", a.name, "link", "del", end_a], check=False)  # takes end_b too
        raise


@functools.cache
def _probe() -> str | None:
    """Create and delete a namespace once: the only sure test of the privileges."""
    try:
        Netns(prefix="pvio-probe").close()
    except RuntimeError as exc:
        return f"cannot create a network namespace: {exc}"
    return None


def available() -> str | None:
    """None when ``ip`` works and this process may create namespaces, else why not."""
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    return _probe()
