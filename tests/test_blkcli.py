"""`pvio blk`: info, read, write, copy and export against a real `pvio serve` process.

Every daemon and export started here is a subprocess stopped by its pid. The
export test is the issue's acceptance: unmodified mkfs.ext4 and e2fsck work on
the FUSE file, and the disk read back through blkfront is byte-identical to
the daemon's image (qemu-img compare and a byte comparison).
"""

from __future__ import annotations

import io
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pvio._blkcli import byte_count, device_id
from pvio._progress import Progress, human_bytes, human_duration

DISK_SIZE = 64 << 20  # the embedded default config's vbd
DEVID = 51712
TIMEOUT = 60


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "XENSTORED_PATH")}


class Daemon:
    """`python -m pvio serve` in a subprocess; sockets in a short /tmp directory
    (Unix socket paths are limited to 107 bytes), data in ``data_dir``."""

    def __init__(self, data_dir: Path, config: Path | None = None) -> None:
        self.run_dir = Path(tempfile.mkdtemp(prefix="pvio-blk-", dir="/tmp"))
        self.socket = str(self.run_dir / "xb.sock")
        self.data_dir = data_dir
        self.log_path = data_dir.parent / f"serve-{data_dir.name}.log"
        argv = [sys.executable, "-m", "pvio", "serve", "--socket", self.socket,
                "--data-dir", str(data_dir)]
        if config is not None:
            argv += ["--config", str(config)]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=_env())
        deadline = time.monotonic() + 20
        while not (os.path.exists(self.socket) and os.path.exists(self.socket + ".admin")):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"pvio serve did not start:\n{self.log}")
            time.sleep(0.05)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def image(self, name: str = "guest-xvda.img") -> Path:
        return self.data_dir / name

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
                pytest.fail(f"pvio serve ignored SIGTERM:\n{self.log}")
        shutil.rmtree(self.run_dir, ignore_errors=True)


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path / "data")
    try:
        yield d
    finally:
        d.stop()


def blk(daemon_or_socket, *args: str, input: bytes | None = None,
        check: bool = True) -> subprocess.CompletedProcess:
    socket = getattr(daemon_or_socket, "socket", daemon_or_socket)
    result = subprocess.run([sys.executable, "-m", "pvio", "blk", *args, "--socket", socket],
                            input=input, capture_output=True, timeout=TIMEOUT, env=_env())
    if check:
        assert result.returncode == 0, (args, result.returncode, result.stderr.decode())
    return result


def mounted(path: Path) -> bool:
    # /proc/mounts escapes spaces and such as \040; our tmp paths have none.
    return any(line.split()[1] == str(path) for line in Path("/proc/mounts").read_text()
               .splitlines())


# ------------------------------------------------------------------ helpers


def test_byte_counts_and_device_names():
    assert byte_count("4096") == 4096
    assert byte_count("0x1000") == 4096
    assert byte_count("64K") == 64 << 10
    assert byte_count("1M") == byte_count("1MiB") == byte_count("1mb") == 1 << 20
    assert byte_count("2G") == 2 << 30
    assert device_id("xvda") == 51712
    assert device_id("xvdb") == 51728
    assert device_id("51712") == 51712
    import argparse

    for bad in ("", "-1", "1X", "one"):
        with pytest.raises(argparse.ArgumentTypeError):
            byte_count(bad)
    with pytest.raises(argparse.ArgumentTypeError):
        device_id("sda")


def test_progress_bar_renders_bytes_percent_rate_eta():
    now = [100.0]
    out = io.StringIO()
    bar = Progress(64 << 20, label="a -> b", stream=out, enabled=True, clock=lambda: now[0])
    now[0] = 102.0
    bar.update(16 << 20)
    line = bar.render(100)
    assert line.startswith("a -> b  [")
    assert "16.0 MiB / 64.0 MiB" in line
    assert " 25%" in line
    assert "8.0 MiB/s" in line
    assert "ETA 0:06" in line  # 48 MiB left at 8 MiB/s
    assert len(bar.render(60)) < 60
    now[0] = 108.0
    bar.update(48 << 20)
    bar.close()
    bar.close()
    text = out.getvalue()
    assert text.endswith("\n") and text.count("\n") == 1
    assert "100%" in text.rsplit("\r", 1)[1] and "in 0:08" in text
    assert human_bytes(1023) == "1023 B" and human_bytes(1536) == "1.5 KiB"
    assert human_duration(3700) == "1:01:40"


def test_progress_bar_is_silent_off_a_terminal():
    out = io.StringIO()
    with Progress(10, stream=out) as bar:
        bar.update(10)
    assert out.getvalue() == ""


def test_blk_help_lists_the_actions_with_examples():
    result = subprocess.run([sys.executable, "-m", "pvio", "blk", "--help"],
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0
    for action in ("info", "read", "write", "copy", "export"):
        assert action in result.stdout
    assert "pvio blk copy disk.raw pvio:" in result.stdout
    top = subprocess.run([sys.executable, "-m", "pvio", "--help"], capture_output=True,
                         text=True, timeout=TIMEOUT)
    assert "blk" in top.stdout
    copy = subprocess.run([sys.executable, "-m", "pvio", "blk", "copy", "--help"],
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert "--no-progress" in copy.stdout and "--device" in copy.stdout


# ------------------------------------------------------------------ against a daemon


def test_info_reports_the_negotiated_disk(daemon):
    text = blk(daemon, "info").stdout.decode()
    assert f"vbd/{DEVID} of domain 'guest'" in text
    assert f"{DISK_SIZE} bytes (64.0 MiB, {DISK_SIZE // 512} sectors)" in text
    assert "sector size  512 bytes" in text
    assert "read-only    no" in text
    assert "flush-cache=1" in text and "max-indirect-segments=" in text
    assert "32 entries in 1 page(s)" in text

    info = json.loads(blk(daemon, "info", "--json", "--device", "xvda").stdout)
    assert info["size"] == DISK_SIZE
    assert info["sector_size"] == 512
    assert info["read_only"] is False
    assert info["devid"] == DEVID
    assert info["ring_entries"] == 32 and info["queues"] == 1
    assert info["features"]["flush-cache"] == 1

    bigger = json.loads(blk(daemon, "info", "--json", "--ring-order", "2").stdout)
    assert bigger["ring_entries"] == 128 and bigger["ring_pages"] == 4


def test_write_then_read_round_trip(daemon, tmp_path):
    data = os.urandom(100_000)
    offset = 12_345  # neither sector- nor page-aligned
    assert blk(daemon, "write", str(offset), input=data).stdout == b""
    assert blk(daemon, "read", str(offset), str(len(data))).stdout == data
    # ... and the bytes are where the daemon keeps them.
    with open(daemon.image(), "rb") as img:
        img.seek(offset)
        assert img.read(len(data)) == data

    src, dst = tmp_path / "in.bin", tmp_path / "out.bin"
    src.write_bytes(os.urandom(5000))
    blk(daemon, "write", "1M", "-i", str(src))
    blk(daemon, "read", "0x100000", "5000", "-o", str(dst))
    assert dst.read_bytes() == src.read_bytes()
    # The first write is untouched by the second.
    assert blk(daemon, "read", str(offset), "16").stdout == data[:16]


def test_copy_8mib_in_and_out_is_identical(daemon, tmp_path):
    src, out = tmp_path / "random.raw", tmp_path / "out.raw"
    payload = os.urandom(8 << 20)
    src.write_bytes(payload)

    result = blk(daemon, "copy", str(src), "pvio:", "--progress")
    bar = result.stderr.decode()
    assert "random.raw -> pvio:vbd/51712" in bar
    assert "8.0 MiB / 8.0 MiB" in bar and "100%" in bar and bar.endswith("\n")

    quiet = blk(daemon, "copy", "pvio:", str(out), "--no-progress")
    assert quiet.stderr == b"" and quiet.stdout == b""
    copied = out.read_bytes()
    assert len(copied) == DISK_SIZE
    assert copied[: len(payload)] == payload
    assert copied[len(payload):].count(0) == DISK_SIZE - len(payload)

    same = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw",
                           str(daemon.image()), str(out)],
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert same.returncode == 0, same.stdout + same.stderr
    assert "Images are identical" in same.stdout
    # The 8 MiB source against the 64 MiB copy: identical, the rest being zeros.
    prefix = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src),
                             str(out)], capture_output=True, text=True, timeout=TIMEOUT)
    assert prefix.returncode == 0, prefix.stdout + prefix.stderr

    # At an offset, and out from an offset.
    blk(daemon, "copy", str(src), "pvio:56M", "--no-progress")
    tail = tmp_path / "tail.raw"
    blk(daemon, "copy", "pvio:56M", str(tail), "--no-progress")
    assert tail.read_bytes() == payload


def test_errors_are_clear(daemon, tmp_path):
    gone = blk(str(tmp_path / "no-daemon.sock"), "info", check=False)
    assert gone.returncode == 1
    assert b"no pvio daemon" in gone.stderr and b"pvio serve" in gone.stderr

    no_dev = blk(daemon, "info", "--device", "51728", check=False)
    assert no_dev.returncode == 1
    assert b"no vbd 51728; it has: 51712" in no_dev.stderr

    no_dom = blk(daemon, "info", "--domain", "nobody", check=False)
    assert no_dom.returncode == 1 and b"no domain 'nobody'" in no_dom.stderr

    past = blk(daemon, "read", "63M", "2M", check=False)
    assert past.returncode == 1 and b"past the end" in past.stderr and past.stdout == b""

    big = tmp_path / "big.raw"
    big.write_bytes(b"\1" * (DISK_SIZE + 512))
    too_big = blk(daemon, "copy", str(big), "pvio:", check=False)
    assert too_big.returncode == 1 and b"does not fit" in too_big.stderr
    overflow = blk(daemon, "write", "64M", input=b"x", check=False)
    assert overflow.returncode == 1 and b"past the end" in overflow.stderr

    neither = blk(daemon, "copy", str(big), str(tmp_path / "x"), check=False)
    assert neither.returncode == 1 and b"exactly one of SRC and DST" in neither.stderr

    missing = blk(daemon, "copy", str(tmp_path / "missing.raw"), "pvio:", check=False)
    assert missing.returncode == 1 and b"cannot open" in missing.stderr

    not_dir = blk(daemon, "export", str(big), check=False)
    assert not_dir.returncode == 1 and b"not a directory" in not_dir.stderr


def test_read_only_disk_refuses_writes(tmp_path):
    config = tmp_path / "ro.toml"
    config.write_text('[[domain]]\nname = "guest"\n\n  [[domain.device]]\n  type = "vbd"\n'
                      '  devid = 51712\n  image = "ro.img"\n  size = "1M"\n  mode = "r"\n')
    d = Daemon(tmp_path / "data", config)
    try:
        info = json.loads(blk(d, "info", "--json").stdout)
        assert info["read_only"] is True and info["size"] == 1 << 20
        refused = blk(d, "write", "0", input=b"nope", check=False)
        assert refused.returncode == 1
        assert b"read-only" in refused.stderr
        src = tmp_path / "s.raw"
        src.write_bytes(b"\1" * 4096)
        refused = blk(d, "copy", str(src), "pvio:", check=False)
        assert refused.returncode == 1 and b"read-only" in refused.stderr
        assert blk(d, "read", "0", "4096").stdout == bytes(4096)
    finally:
        d.stop()


class Export:
    """`pvio blk export MOUNTPOINT` in a subprocess, stopped by pid."""

    def __init__(self, daemon: Daemon, mountpoint: Path) -> None:
        self.mountpoint = mountpoint
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pvio", "blk", "export", str(mountpoint),
             "--socket", daemon.socket],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
            env=_env())
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        line = self.proc.stdout.readline().decode().strip() if ready else ""
        if not line:
            self.stop(signal.SIGTERM)
            pytest.fail(f"export did not print its file: {self.stderr}")
        self.path = Path(line)
        self.stderr = ""

    def stop(self, signum: int) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signum)
        try:
            _, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            _, err = self.proc.communicate(timeout=10)
        self.stderr = err.decode(errors="replace")
        return self.proc.returncode

    def cleanup(self) -> None:
        """After a failed test: never leave a process or a mount behind."""
        if self.proc.poll() is None:
            self.stop(signal.SIGTERM)
        if mounted(self.mountpoint):
            subprocess.run(["umount", "-l", str(self.mountpoint)], timeout=TIMEOUT)


def run_tool(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_export_mkfs_fsck_then_identical_copy(daemon, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    export = Export(daemon, mnt)
    try:
        assert export.path == mnt / "disk"
        assert mounted(mnt)
        assert os.stat(export.path).st_size == DISK_SIZE
        assert os.listdir(mnt) == ["disk"]

        mkfs = run_tool("mkfs.ext4", "-F", "-q", "-L", "pvio", str(export.path))
        assert mkfs.returncode == 0, mkfs.stdout + mkfs.stderr
        fsck = run_tool("e2fsck", "-f", "-n", str(export.path))
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        assert "clean" in fsck.stdout or "files" in fsck.stdout

        # One session per domain: the others are refused while the export runs.
        busy = blk(daemon, "info", check=False)
        assert busy.returncode == 1 and b"already attached" in busy.stderr

        assert export.stop(signal.SIGTERM) == 0, export.stderr
        assert "SIGTERM received: flushed and unmounted" in export.stderr
        assert not mounted(mnt)
        assert os.listdir(mnt) == []
    finally:
        export.cleanup()

    # The file system reached the daemon's image (ext4's magic at 1080)...
    image = daemon.image()
    with open(image, "rb") as img:
        img.seek(1080)
        assert img.read(2) == b"\x53\xef"
    # ... and reading the disk back through blkfront gives exactly that image.
    out = tmp_path / "out.raw"
    blk(daemon, "copy", "pvio:", str(out), "--no-progress")
    same = run_tool("qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), str(out))
    assert same.returncode == 0, same.stdout + same.stderr
    assert "Images are identical" in same.stdout
    assert out.read_bytes() == image.read_bytes()
    fsck = run_tool("e2fsck", "-f", "-n", str(out))
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_export_serves_ordinary_io_and_unmounts_on_sigint(daemon, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    export = Export(daemon, mnt)
    payload = os.urandom(3 << 20)
    try:
        fd = os.open(export.path, os.O_RDWR)
        try:
            assert os.pwrite(fd, payload, 1 << 20) == len(payload)
            os.fsync(fd)
            assert os.pread(fd, len(payload), 1 << 20) == payload
            # Like a block device: a fixed size, ENOSPC at the end, truncation ignored.
            assert os.pwrite(fd, b"ab", DISK_SIZE - 1) == 1
            with pytest.raises(OSError) as excinfo:
                os.pwrite(fd, b"x", DISK_SIZE)
            assert excinfo.value.errno == 28  # ENOSPC
            os.ftruncate(fd, 0)
            assert os.fstat(fd).st_size == DISK_SIZE
        finally:
            os.close(fd)
        with pytest.raises(PermissionError):
            (mnt / "another").write_bytes(b"x")
        copy = run_tool("dd", f"if={export.path}", f"of={tmp_path / 'dd.raw'}", "bs=1M",
                        "skip=1", "count=3", "status=none")
        assert copy.returncode == 0, copy.stderr
        assert (tmp_path / "dd.raw").read_bytes() == payload

        assert export.stop(signal.SIGINT) == 0, export.stderr
        assert "SIGINT received" in export.stderr
        assert not mounted(mnt)
    finally:
        export.cleanup()
    with open(daemon.image(), "rb") as img:
        img.seek(1 << 20)
        assert img.read(len(payload)) == payload
        img.seek(DISK_SIZE - 1)
        assert img.read() == b"a"
