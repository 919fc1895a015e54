"""examples/c-blkfront against a real pvio daemon: the specs are enough to write a frontend.

``c-blkfront`` is a C blkfront built only from Xen's unmodified public headers
(libxen-dev) and libc, following specs/xenbus.md and specs/ring.md: its own
xs_wire client, sealed memfds and eventfds handed over with the PVIO_*
messages, the XenbusState handshake, a blkif ring driven with Xen's RING_*
macros. Each test builds it with its Makefile (in a temporary copy), runs it
against ``pvio serve`` (a subprocess) or an in-process daemon, and checks the
result independently from Python: the pattern it wrote must be in the daemon's
image file on disk, at the right offset, and nowhere else.

Processes are stopped by pid; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from pvio.backends.blkback import BlkBackend
from pvio.xenbus.device import DeviceError
from tests.blk_helpers import XVDA, XVDB, domain, vbd
from tests.pvio_daemon import ServeProcess, clean_env, running_daemon, short_tmpdir, watchdog

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "c-blkfront"
NSECT = 16  # sectors the program writes and reads back
TAG = 32  # each sector starts with a NUL-padded text tag of this size
RUN_TIMEOUT = 30.0  # the program's own waits time out after 10 s


@pytest.fixture(scope="module")
def c_blkfront(tmp_path_factory) -> Path:
    """The example built by its own Makefile, in a copy (the source tree stays clean)."""
    build = tmp_path_factory.mktemp("c-blkfront")
    for name in ("c-blkfront.c", "Makefile"):
        shutil.copy(EXAMPLE / name, build / name)
    res = subprocess.run(["make", "-C", str(build)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    return build / "c-blkfront"


def pattern(first: int, sector_size: int) -> bytes:
    """What c-blkfront writes to sectors ``first .. first + NSECT - 1`` (see fill_pattern)."""
    out = bytearray()
    for sector in range(first, first + NSECT):
        base = sector * sector_size
        data = bytearray((((base + i) % 251) ^ ((base + i) // 4096)) & 0xFF
                         for i in range(sector_size))
        data[:TAG] = f"pvio c-blkfront sector {sector}".encode().ljust(TAG, b"\0")
        out += data
    return bytes(out)


def run_c(binary: Path, args: tuple[str, ...] = (), stderr_path: Path | None = None,
          **env: str) -> tuple[int, str]:
    """Run the program to completion: (exit code, stderr). Killed by pid on a hang."""
    environ = {k: v for k, v in clean_env().items() if not k.startswith("PVIO_")}
    environ.update(env)
    with contextlib.ExitStack() as stack:
        err = (stack.enter_context(open(stderr_path, "w")) if stderr_path
               else subprocess.PIPE)
        proc = subprocess.Popen([str(binary), *args], env=environ, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err, text=True)
        try:
            _, stderr = proc.communicate(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.communicate()
            pytest.fail(f"c-blkfront still running after {RUN_TIMEOUT} s")
    if stderr_path is not None:
        stderr = stderr_path.read_text()
    return proc.returncode, stderr


@contextlib.contextmanager
def serve(toml: str) -> Iterator[ServeProcess]:
    """``pvio serve --config`` on ``toml``, ready; stopped by pid (SIGTERM) afterwards,
    which must be graceful unless the test stopped it itself."""
    with short_tmpdir() as root:
        config = root / "pvio.toml"
        config.write_text(toml)
        daemon = ServeProcess(root, "--config", str(config)).start()
        try:
            yield daemon
        except BaseException:
            daemon.kill()
            raise
        if daemon.returncode is None:
            daemon.stop()
            daemon.assert_graceful()


def image(daemon: ServeProcess, name: str) -> bytes:
    return (Path(daemon.data_dir) / name).read_bytes()


def test_writes_reads_back_and_closes(c_blkfront):
    with serve(domain("guest", vbd(XVDA, "disk.img", "4M"))) as daemon:
        rc, err = run_c(c_blkfront, PVIO_SOCKET=daemon.socket)
        assert rc == 0, err + daemon.log
        for line in ("claimed domain 'guest': we are dom1",
                     f"vbd {XVDA}: frontend /local/domain/1/device/vbd/{XVDA}",
                     "disk: 8192 sectors of 512 bytes", "wrote sectors 0..15",
                     "flushed the disk cache", "read back and verified 8192 bytes",
                     "revoked all grants", "ok: device closed"):
            assert line in err, err
        # The daemon saw the whole handshake, including the orderly close.
        for line in ("frontend Initialised, backend InitWait -> Connected",
                     "frontend Closing, backend Connected -> Closing",
                     "frontend Closed, backend Closing -> Closed"):
            assert line in daemon.log, daemon.log
        disk = image(daemon, "disk.img")
        assert disk[:NSECT * 512] == pattern(0, 512)
        assert disk[NSECT * 512:].count(0) == len(disk) - NSECT * 512


def test_explicit_devid_large_sectors_and_socket_argument(c_blkfront):
    """Socket as argv[1], the second disk by devid, 4096-byte sectors
    (feature-large-sector-size: sector numbers in sector-size units), sector 7."""
    toml = domain("vm1", vbd(XVDA, "a.img", "1M"),
                  vbd(XVDB, "b.img", "1M") + "  sector_size = 4096\n")
    with serve(toml) as daemon:
        rc, err = run_c(c_blkfront, (daemon.socket, str(XVDB)), PVIO_DOMAIN="vm1",
                        PVIO_SECTOR="7")
        assert rc == 0, err + daemon.log
        assert "disk: 256 sectors of 4096 bytes" in err, err
        assert "wrote sectors 7..22" in err, err
        start, length = 7 * 4096, NSECT * 4096
        other, disk = image(daemon, "a.img"), image(daemon, "b.img")
        assert disk[start:start + length] == pattern(7, 4096)
        assert disk[:start].count(0) == start
        assert disk[start + length:].count(0) == len(disk) - start - length
        assert other.count(0) == len(other)  # xvda untouched


def test_wrong_domain_name_is_a_clear_error(c_blkfront):
    with serve(domain("guest", vbd(XVDA, "disk.img", "1M"))) as daemon:
        rc, err = run_c(c_blkfront, PVIO_SOCKET=daemon.socket, PVIO_DOMAIN="nope")
        assert rc == 1, err
        last = err.strip().splitlines()[-1]
        assert last == ("c-blkfront: error: cannot claim domain 'nope': ENOENT "
                        "(the daemon has no domain of that name)"), err
        assert "claim refused: ENOENT" in daemon.log


def test_no_socket_is_a_usage_error(c_blkfront):
    rc, err = run_c(c_blkfront)
    assert rc == 2 and err.startswith("usage: "), err


def test_daemon_dying_is_a_clear_error(c_blkfront, tmp_path):
    """The daemon dies while the program waits for a reply: a clear error, exit 1."""
    with serve(domain("guest", vbd(XVDA, "disk.img", "1M"))) as daemon:
        daemon.signal(signal.SIGSTOP)  # it accepts nothing until it is killed
        stderr_path = tmp_path / "stderr"
        connected = threading.Event()

        def killer() -> None:  # once the program is connected and waiting: SIGKILL
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not connected.is_set():
                if stderr_path.exists() and "connected to" in stderr_path.read_text():
                    connected.set()
                time.sleep(0.01)
            daemon.signal(signal.SIGKILL)

        thread = threading.Thread(target=killer)
        thread.start()
        try:
            rc, err = run_c(c_blkfront, stderr_path=stderr_path, PVIO_SOCKET=daemon.socket)
        finally:
            thread.join(timeout=15)
        assert daemon.wait_exit(10) == -signal.SIGKILL
        assert connected.is_set(), err
        assert rc == 1, err
        last = err.strip().splitlines()[-1]
        # Killed while the program waited for the pool's reply (or, rarely, just before
        # it could send it): either way the same clear reason.
        assert last.startswith("c-blkfront: error: the store closed the connection "), err
        assert " pool " in last, err


async def test_backend_refusing_the_connection_is_a_clear_error(c_blkfront, monkeypatch):
    """A backend that maps the ring and then refuses (Closing, with a logged reason):
    the program revokes its grants, goes Closed as the state machine says, exits 1."""

    async def refuse(self, conn, frontend):
        raise DeviceError("refused by the test")

    monkeypatch.setattr(BlkBackend, "start", refuse)
    async with watchdog(60, "c-blkfront refused"), \
            running_daemon(domain("guest", vbd(XVDA, "disk.img", "1M"))) as daemon:
        rc, err = await trio.to_thread.run_sync(
            lambda: run_c(c_blkfront, PVIO_SOCKET=daemon.config.socket))
    assert rc == 1, err
    lines = err.strip().splitlines()
    assert "c-blkfront: frontend state -> Closed (6)" in lines, err
    assert "grant(s) still mapped" not in err, err
    assert lines[-1].startswith("c-blkfront: error: the backend went to Closing (5) while "
                                "waiting for backend Connected"), err
