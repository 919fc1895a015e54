"""Helpers for tests that run a real ``pvio serve`` process or an in-process Daemon.

* :class:`ServeProcess` / :func:`serving`: ``python -m pvio serve`` as a child
  process with its log in a file; stopped by pid (SIGTERM, and SIGKILL only
  after a timeout, in which case the test fails).
* :func:`running_daemon`: an in-process :class:`~pvio.daemon.Daemon` on a TOML
  text; :func:`wait_state` waits for a XenbusState node through a watch;
  :func:`watchdog` bounds a trio test (used from async fixtures).

Unix socket paths are limited to 107 bytes, and pytest's ``tmp_path`` names
grow with the test name, so the daemon's sockets live in a short directory
from :func:`short_tmpdir` instead.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import trio

#: What a graceful SIGTERM shutdown logs (pvio/daemon.py, serve_until_signal/shutdown).
GRACEFUL_LINES = ("SIGTERM received: closing devices", "all devices closed")
READY_LINE = "pvio daemon ready"


@contextlib.contextmanager
def short_tmpdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pvio-t-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without systemd's NOTIFY_SOCKET, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "XENSTORED_PATH")}
    env.update(extra)
    return env


class ServeProcess:
    """One ``python -m pvio serve`` subprocess with its log in a file."""

    def __init__(self, root: Path, *args: str, env: dict[str, str] | None = None,
                 socket: str | None = None) -> None:
        self.root = root
        self.socket = socket or str(root / "run" / "xb.sock")
        self.admin = self.socket + ".admin"
        self.data_dir = str(root / "data")
        self.log_path = root / "serve.log"
        self.argv = [sys.executable, "-m", "pvio", "serve", "--socket", self.socket,
                     "--data-dir", self.data_dir, *args]
        self.env = env if env is not None else clean_env()
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None
        self.signalled = False

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def log(self) -> str:
        try:
            return self.log_path.read_text()
        except FileNotFoundError:
            return ""

    def start(self, *, wait: bool = True, timeout: float = 20.0) -> ServeProcess:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=self.env,
                                         cwd=self.root)
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Until both sockets exist and the daemon logged that it is ready."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"pvio serve exited early ({self.proc.returncode}):\n"
                                     f"{self.log}")
            if (os.path.exists(self.socket) and os.path.exists(self.admin)
                    and READY_LINE in self.log):
                return
            time.sleep(0.02)
        self.kill()
        raise AssertionError(f"pvio serve not ready within {timeout} s:\n{self.log}")

    def wait_exit(self, timeout: float) -> int:
        """Wait for the process to exit on its own; kill it and fail on timeout."""
        assert self.proc is not None
        try:
            self.returncode = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"pvio serve still running after {timeout} s:\n"
                                 f"{self.log}") from None
        return self.returncode

    def wait_refused(self, timeout: float) -> int:
        """For a configuration the daemon must refuse: wait for it to exit. If it
        comes up instead, stop it (SIGTERM by pid) and fail."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            if READY_LINE in self.log:
                self.stop()
                raise AssertionError(f"pvio serve accepted the configuration:\n{self.log}")
            time.sleep(0.02)
        return self.wait_exit(0.1)

    def signal(self, signum: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signum)
        self.signalled = True

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM by pid (unless already signalled), then wait; returns the exit
        code (fails on a hang)."""
        assert self.proc is not None
        if self.proc.poll() is None and not self.signalled:
            self.signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    async def astop(self, timeout: float = 20.0) -> int:
        """:meth:`stop` for trio tests (does not block the event loop)."""
        assert self.proc is not None
        if self.proc.poll() is None and not self.signalled:
            self.signal(signal.SIGTERM)
        with trio.move_on_after(timeout):
            while self.proc.poll() is None:
                await trio.sleep(0.02)
        return self.wait_exit(0.1)

    def kill(self) -> None:
        """Last resort (the test fails anyway): SIGKILL by pid and reap."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def assert_graceful(self) -> None:
        """Exit code 0 and the graceful-shutdown log lines."""
        log = self.log
        assert self.returncode == 0, f"pvio serve exited {self.returncode}:\n{log}"
        for line in GRACEFUL_LINES:
            assert line in log, f"{line!r} not in the daemon log:\n{log}"
        assert "Traceback" not in log, log


@contextlib.contextmanager
def serving(*args: str, env: dict[str, str] | None = None) -> Iterator[ServeProcess]:
    """A ready ``pvio serve`` in a short temporary directory; SIGTERM on exit,
    asserting a graceful shutdown (exit 0, logged) unless the body stopped it."""
    with short_tmpdir() as root:
        serve = ServeProcess(root, *args, env=env)
        serve.start()
        try:
            yield serve
        except BaseException:
            serve.kill()
            raise
        if serve.returncode is None:
            serve.stop()
            serve.assert_graceful()


# ------------------------------------------------------------- in-process daemon


@contextlib.asynccontextmanager
async def running_daemon(toml: str, **daemon_kwargs):
    """An in-process :class:`~pvio.daemon.Daemon` on ``toml`` (``daemon_kwargs``
    go to it), sockets in a short temporary directory; shut down (devices closed)
    when the block exits."""
    from pvio import config as cfg
    from pvio.daemon import Daemon

    with short_tmpdir() as root:
        config = cfg.parse(toml, source="test config", socket=f"{root}/run/xb.sock",
                           data_dir=f"{root}/data")
        async with trio.open_nursery() as nursery:
            daemon = await nursery.start(Daemon(config, **daemon_kwargs).run)
            try:
                yield daemon
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(10):
                    await daemon.shutdown()
                nursery.cancel_scope.cancel()


async def wait_state(xs, path: str, want, timeout: float = 5.0):
    """Until the state node ``path`` reads ``want`` (a XenbusState or a predicate);
    returns the state. Fails (trio.TooSlowError) after ``timeout``."""
    from pvio.xenbus.state import parse_state

    ok = want if callable(want) and not isinstance(want, int) else (lambda s: s == want)
    with trio.fail_after(timeout):
        async with xs.watch(path) as events:
            async for _ in events:
                state = parse_state(await xs.read_or_none(path))
                if ok(state):
                    return state
    raise AssertionError(f"watch on {path} ended before it reached {want}")


async def refused_while_backing_off(daemon, session, attach, name: str, dtype: str,
                                   devid: int) -> None:
    """After ``name``'s device stalled the daemon once, ``attach(session)`` (a
    new session) is refused at once (DeviceError, not a timeout) while the
    device backs off (pvio.xenbus.device.StallBackoff); returns when the
    back-off is over."""
    import pytest

    from pvio.xenbus.device import DeviceError

    backoff = daemon._backoffs[(name, dtype, devid)]
    assert backoff.count == 1 and backoff.refusal(trio.current_time())
    with pytest.raises(DeviceError, match="closed before it connected"):
        await attach(session)
    while backoff.refusal(trio.current_time()) is not None:
        await trio.sleep(0.05)


async def _watchdog(seconds: float, what: str) -> None:
    await trio.sleep(seconds)
    raise trio.TooSlowError(f"{what}: still running after {seconds} s (hang?)")


@contextlib.asynccontextmanager
async def watchdog(seconds: float, what: str = "test"):
    """Fail (TooSlowError, cancelling the test) if the block outlives ``seconds``.

    Used from async fixtures: pytest-trio cancels the test when a fixture's
    background task raises, and reports the error.
    """
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watchdog, seconds, what)
        yield
        nursery.cancel_scope.cancel()
