"""``pvio blk``: a pvio disk for ordinary tools (info, read, write, copy, export).

Each command opens a frontend domain session on the daemon's guest socket,
attaches one vbd with :class:`pvio.frontends.blkfront.BlkFront` (the full
XenbusState handshake), does its I/O through the shared ring, flushes, and
closes the device again. ``export`` keeps the device attached and serves it
as a single FUSE file (``pyfuse3``, running in the same trio loop as the
session) until SIGINT/SIGTERM, so unmodified programs (mkfs, fsck, dd,
qemu-img...) work on the disk.

A domain is attached by one session at a time: while ``pvio blk export``
runs, the other ``pvio blk`` commands on the same domain are refused (EBUSY).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import json
import logging
import os
import re
import signal
import stat
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import trio

from pvio import config as cfg

log = logging.getLogger("pvio.blk")

DESCRIPTION = """\
Work on a pvio disk from the command line. Every command attaches the disk as
a real blkfront (XenbusState handshake, grants, a shared ring) to the running
daemon (`pvio serve`), does its I/O through the ring, flushes and detaches.
`export` keeps the disk attached and exposes it as a FUSE file, so ordinary
programs can use it.

OFFSET and LENGTH are bytes, with an optional binary suffix: 4096, 0x1000,
64K, 1M, 1MiB, 2G. A domain is attached by one session at a time: while an
`export` runs, the other commands on that domain are refused.
"""

EPILOG = """\
examples:
  pvio blk info                          size, sector size, features, ring
  pvio blk info --json
  pvio blk write 1M -i boot.bin          write a file at byte 1 MiB
  printf hello | pvio blk write 0        ... or standard input
  pvio blk read 0 512 -o mbr.bin         read the first sector
  pvio blk read 1M 4K | hexdump -C
  pvio blk copy disk.raw pvio:           a local image onto the disk (progress bar)
  pvio blk copy pvio: out.raw            the whole disk into a local file
  pvio blk copy part.img pvio:1M         ... at byte 1 MiB
  pvio blk export /mnt/pvio &            the disk as the file /mnt/pvio/disk
  mkfs.ext4 -F /mnt/pvio/disk && e2fsck -f -n /mnt/pvio/disk
  kill %1                                unmounts cleanly (SIGINT/SIGTERM)
  pvio blk info --domain web --device xvdb --socket /run/pvio/xenbus.sock
"""

#: Bytes per local read/write in read, write and copy; BlkFront splits each
#: chunk into ring requests and keeps them all in flight.
CHUNK = 4 << 20
#: How long the handshake may take before a command gives up.
CONNECT_TIMEOUT = 15.0

_SIZE = re.compile(r"^(0x[0-9a-f]+|\d+)\s*([kmgtp]?)(i?b)?$")
_XVD = re.compile(r"^xvd([a-p])$")


class BlkError(Exception):
    """A user-facing failure: the message says what went wrong and what to do."""


def byte_count(text: str) -> int:
    """'4096', '0x1000', '64K', '1M', '1MiB', '2G' -> bytes (binary suffixes)."""
    m = _SIZE.match(text.strip().lower())
    if not m:
        raise argparse.ArgumentTypeError(
            f"bad byte count {text!r} (use e.g. 4096, 0x1000, 64K, 1M, 2G)")
    value = int(m.group(1), 0)
    return value << (10 * " kmgtp".index(m.group(2) or " "))


def device_id(text: str) -> int:
    """A vbd devid: a number (51712) or a Xen disk name (xvda = 51712, xvdb = 51728...)."""
    m = _XVD.match(text.strip().lower())
    if m:
        return (202 << 8) | ((ord(m.group(1)) - ord("a")) << 4)
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"bad device {text!r} (a devid such as 51712, or xvda..xvdp)") from None
    if value < 0:
        raise argparse.ArgumentTypeError("a devid is not negative")
    return value


# ----------------------------------------------------------------- arguments


class _HelpFormatter(argparse.HelpFormatter):
    """Wraps one-paragraph descriptions; keeps text with line breaks (examples) as is."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text.strip("\n"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Build ``pvio blk``'s sub-commands on ``parser``."""
    common = argparse.ArgumentParser(add_help=False)
    conn = common.add_argument_group("which disk")
    conn.add_argument("--socket", metavar="PATH",
                      help=f"the daemon's guest socket (default: {cfg.default_socket()})")
    conn.add_argument("--domain", metavar="NAME", default="guest",
                      help="the configured domain to attach as (default: guest)")
    conn.add_argument("--device", metavar="DEVID", type=device_id,
                      help="the vbd's devid, e.g. 51712 or xvda (default: the first vbd "
                      "the daemon offers the domain)")
    conn.add_argument("--ring-order", metavar="N", type=int, default=0, choices=range(5),
                      help="ring-page-order to ask for: a ring of 2^N pages, 32*2^N "
                      "requests in flight per queue (default: 0)")
    conn.add_argument("--queues", metavar="N", type=int, default=1, choices=range(1, 5),
                      help="ring queues to ask for (multi-queue; the backend may offer "
                      "fewer; default: 1)")
    common.add_argument("-v", "--verbose", action="count", default=0,
                        help="log the session and the handshake (-vv for debug)")

    sub = parser.add_subparsers(dest="blk", metavar="ACTION", required=True)
    fmt = _HelpFormatter

    info = sub.add_parser(
        "info", parents=[common], formatter_class=fmt,
        help="size, sector size, read-only, negotiated features, ring size",
        description="Attach the disk and print what the handshake negotiated: its size, "
        "sector size, whether it is read-only, the backend's features and the ring.",
        epilog="examples:\n  pvio blk info\n  pvio blk info --json | jq .size\n")
    info.add_argument("--json", action="store_true", help="one JSON object")

    read = sub.add_parser(
        "read", parents=[common], formatter_class=fmt,
        help="read LENGTH bytes at OFFSET to standard output or a file",
        description="Read LENGTH bytes of the disk at OFFSET (any alignment) and write them "
        "unchanged to standard output (binary) or to FILE. Refuses to write binary data to "
        "a terminal unless given -o -.",
        epilog="examples:\n  pvio blk read 0 512 -o mbr.bin\n"
        "  pvio blk read 1M 4K | hexdump -C\n")
    read.add_argument("offset", metavar="OFFSET", type=byte_count)
    read.add_argument("length", metavar="LENGTH", type=byte_count)
    read.add_argument("-o", "--output", metavar="FILE",
                      help="write to FILE instead of standard output ('-': standard output)")

    write = sub.add_parser(
        "write", parents=[common], formatter_class=fmt,
        help="write standard input or a file to the disk at OFFSET",
        description="Write everything read from standard input (or FILE) to the disk at "
        "OFFSET (any alignment: partial sectors are read, modified and written), then "
        "flush the disk's cache. Input that would run past the end of the disk is an error.",
        epilog="examples:\n  printf hello | pvio blk write 0\n"
        "  pvio blk write 1M -i boot.bin\n")
    write.add_argument("offset", metavar="OFFSET", type=byte_count)
    write.add_argument("-i", "--input", metavar="FILE",
                       help="read from FILE instead of standard input ('-': standard input)")

    copy = sub.add_parser(
        "copy", parents=[common], formatter_class=fmt,
        help="copy a local file onto the disk, or the disk into a local file",
        description="Copy between a local file and the disk. Exactly one of SRC and DST is "
        "'pvio:' (the disk, from its first byte) or 'pvio:OFFSET'. A file copied onto the "
        "disk must fit; copying the disk out writes everything from OFFSET to its end. "
        "The disk is flushed at the end. A progress bar (bytes, percent, rate, ETA) goes to "
        "standard error when it is a terminal, or always with --progress.",
        epilog="examples:\n  pvio blk copy disk.raw pvio:\n  pvio blk copy pvio: out.raw\n"
        "  pvio blk copy part.img pvio:1M --no-progress\n")
    copy.add_argument("src", metavar="SRC", help="a local file, or pvio:[OFFSET]")
    copy.add_argument("dst", metavar="DST", help="a local file, or pvio:[OFFSET]")
    bar = copy.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_true", default=None,
                     help="always show the progress bar")
    bar.add_argument("--no-progress", dest="progress", action="store_false",
                     help="never show the progress bar")

    export = sub.add_parser(
        "export", parents=[common], formatter_class=fmt,
        help="FUSE-mount the disk as a single file for ordinary programs",
        description="Mount a FUSE file system on MOUNTPOINT holding one file, 'disk' "
        "(change it with --name), as large as the disk. Its reads, writes and fsync go "
        "through blkfront to the daemon; fsync flushes the disk's cache. The path of the "
        "file is printed once it is mounted. Runs until SIGINT or SIGTERM (or until the "
        "file system is unmounted), then flushes the disk, unmounts and detaches. Like a "
        "block device, the file's size is fixed: truncation is ignored and writes past "
        "its end fail with ENOSPC. The session reconnects if the daemon restarts. Needs "
        "pyfuse3 (pip install 'pvio[export]') and /dev/fuse.",
        epilog="examples:\n  pvio blk export /mnt/pvio &\n"
        "  mkfs.ext4 -F /mnt/pvio/disk && e2fsck -f -n /mnt/pvio/disk\n"
        "  qemu-img convert -n -O raw image.qcow2 /mnt/pvio/disk\n"
        "  kill %1\n")
    export.add_argument("mountpoint", metavar="MOUNTPOINT", help="an existing directory")
    export.add_argument("--name", default="disk",
                        help="the file's name in MOUNTPOINT (default: disk)")
    export.add_argument("--read-only", action="store_true",
                        help="mount read-only even if the disk is writable")
    export.add_argument("--allow-other", action="store_true",
                        help="let other users reach the file (FUSE allow_other)")


# ----------------------------------------------------------------- the disk


@dataclass
class Disk:
    """An attached vbd: the session, the frontend device and its BlkFront."""

    session: object
    device: object
    front: object  # BlkFront
    socket: str
    domain: str

    @property
    def label(self) -> str:
        return f"vbd/{self.device.devid}"

    def check_writable(self) -> None:
        if self.front.readonly:
            raise BlkError(f"{self.label} of domain {self.domain!r} is read-only "
                           "(its backend publishes VDISK_READONLY: mode = \"r\" in the "
                           "daemon's config)")

    def check_range(self, offset: int, length: int) -> None:
        size = self.front.size
        if offset + length > size:
            raise BlkError(f"{offset}+{length} is past the end of {self.label} "
                           f"({size} bytes)")


def _pool_pages(ring_order: int, queues: int) -> int:
    """Guest memory for a BlkFront: each ring slot owns up to 33 pages (32 data pages
    and an indirect page), taken from at most half of the free pool."""
    from pvio.frontends.blkfront import MAX_INDIRECT_SEGMENTS

    entries = (32 << ring_order) * queues  # blkif: 32 requests per ring page
    return 2 * entries * (MAX_INDIRECT_SEGMENTS + 2) + 2 * queues * (1 << ring_order) + 64


@contextlib.asynccontextmanager
async def open_disk(socket: str | None, domain: str = "guest", devid: int | None = None, *,
                    ring_order: int = 0, queues: int = 1, reconnect: bool = False,
                    timeout: float = CONNECT_TIMEOUT) -> AsyncIterator[Disk]:
    """Attach a vbd of ``domain`` (the first one offered unless ``devid``)."""
    from pvio.frontends.session import open_session
    from pvio.xenbus.store import XenstoreError

    socket = socket or cfg.default_socket()
    if not os.path.exists(socket):
        raise BlkError(f"no pvio daemon: {socket} does not exist (start one with "
                       "`pvio serve`, or pass --socket PATH)")
    pages = _pool_pages(ring_order, queues)
    entered = False
    try:
        async with open_session(socket, domain, pool_pages=pages, grant_entries=pages,
                                reconnect=reconnect) as session:
            entered = True
            device, front = await _attach(session, domain, devid, ring_order, queues,
                                          timeout)
            disk = Disk(session, device, front, socket, domain)
            # Without reconnect, requests in flight when the daemon dies would
            # wait forever (blkfront is not told): stop the body instead.
            lost, watcher = trio.CancelScope(), trio.CancelScope()
            if not reconnect:
                session._nursery.start_soon(_cancel_when_lost, session.xs, lost, watcher)
            try:
                with lost:
                    yield disk
                if lost.cancelled_caught:
                    raise BlkError(f"lost the connection to the daemon at {socket} "
                                   "(did `pvio serve` stop?) before the operation "
                                   "completed")
            finally:
                watcher.cancel()
                with trio.CancelScope(shield=True), trio.move_on_after(10):
                    try:
                        if session.xs.lost.is_set():
                            await front.detach()  # no store to say Closing to
                        else:
                            await device.close()
                    except Exception as exc:  # the body's outcome matters more
                        log.warning("closing %s failed: %s", disk.label, exc)
    except BaseException as exc:
        if entered:
            raise
        leaf = _single_leaf(exc)
        if isinstance(leaf, ConnectionRefusedError):
            # open_client's message names the socket, the reason and the fix.
            raise BlkError(f"no pvio daemon: {leaf}") from None
        if isinstance(leaf, XenstoreError):
            raise BlkError(_claim_error(leaf, domain, socket)) from None
        raise


async def _cancel_when_lost(xs, lost: trio.CancelScope, watcher: trio.CancelScope) -> None:
    with watcher:
        await xs.lost.wait()
        lost.cancel()


async def _attach(session, domain: str, devid: int | None, ring_order: int, queues: int,
                  timeout: float):
    from pvio.frontends.blkfront import BLK_KEYS, BlkFront
    from pvio.xenbus.device import DeviceError

    offered = [d for d in await session.devices() if d.type == "vbd"]
    if not offered:
        raise BlkError(f"domain {domain!r} has no vbd (disk) device")
    if devid is None:
        chosen = offered[0]
    else:
        chosen = next((d for d in offered if d.devid == devid), None)
        if chosen is None:
            raise BlkError(f"domain {domain!r} has no vbd {devid}; it has: "
                           + ", ".join(str(d.devid) for d in offered))
    front = BlkFront(session, ring_page_order=ring_order, queues=queues)
    device = await session.attach(front, chosen.devid, BLK_KEYS)
    why = None
    try:
        await device.wait_connected(timeout)
    except DeviceError as exc:  # refused or closed by the backend
        why = str(exc)
    except trio.TooSlowError:
        why = f"did not connect within {timeout:.0f} s"
    if why is not None or front.ring is None:
        peer = getattr(device.status.peer_state, "name", "?")
        raise BlkError(f"vbd/{chosen.devid} of domain {domain!r}: {why or 'no ring'} "
                       f"(frontend {device.status.state.name}, backend "
                       f"{peer}{'; ' + front.error if front.error else ''})")
    return device, front


def _single_leaf(exc: BaseException) -> BaseException:
    """The one exception inside nested single-member ExceptionGroups (else ``exc``)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _claim_error(exc, domain: str, socket: str) -> str:
    if exc.name == "EBUSY":
        return (f"domain {domain!r} is already attached by another session (one session "
                "per domain: is a `pvio blk export` running?)")
    if exc.name == "ENOENT":
        return f"the daemon at {socket} has no domain {domain!r} ({exc.detail})"
    if exc.name == "EACCES":
        return f"not allowed to attach domain {domain!r}: {exc.detail}"
    return f"cannot attach domain {domain!r}: {exc}"


# ----------------------------------------------------------------- commands


def run(args) -> int:
    """Entry point for ``pvio blk ACTION``: returns the exit status."""
    from pvio.cli import _setup_logging

    _setup_logging(args.verbose - 1)
    action = {"info": _info, "read": _read, "write": _write, "copy": _copy,
              "export": _export}[args.blk]
    prog = f"pvio blk {args.blk}"
    try:
        return trio.run(action, args)
    except BaseException as exc:
        leaves = list(_leaves(exc))
        for leaf in leaves:
            if isinstance(leaf, KeyboardInterrupt):
                return 130
        if any(isinstance(leaf, BrokenPipeError) for leaf in leaves):
            # The reader went away (`pvio blk read ... | head`): quiet, like cat.
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 128 + signal.SIGPIPE
        for leaf in leaves:
            message = _describe(leaf)
            if message is not None:
                print(f"{prog}: {message}", file=sys.stderr)
                return 1
        raise


def _leaves(exc: BaseException):
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


def _describe(exc: BaseException) -> str | None:
    from pvio.frontends.blkfront import BlkDeviceError

    if isinstance(exc, BlkError):
        return str(exc)
    if isinstance(exc, BlkDeviceError):
        return f"I/O error: {exc}"
    if isinstance(exc, ConnectionError):
        return f"lost the daemon: {exc}"
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror}{where}"
    return None


async def _info(args) -> int:
    async with open_disk(args.socket, args.domain, args.device,
                         ring_order=args.ring_order, queues=args.queues) as disk:
        front = disk.front
        queues, entries = _ring_shape(front)
        info = {
            "socket": disk.socket,
            "domain": disk.domain,
            "domid": disk.session.domid,
            "device": f"vbd/{disk.device.devid}",
            "devid": disk.device.devid,
            "backend": disk.device.be,
            "size": front.size,
            "sectors": front.sectors,
            "sector_size": front.sector_size,
            "read_only": front.readonly,
            "features": {k.removeprefix("feature-"): v for k, v in front.features.items()},
            "queues": queues,
            "ring_page_order": args.ring_order,
            "ring_pages": 1 << args.ring_order,
            "ring_entries": entries,
            "max_request_bytes": front._max_request_bytes(),
        }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    from pvio._progress import human_bytes

    feats = "  ".join(f"{k}={v}" for k, v in info["features"].items())
    print(f"device       {info['device']} of domain {info['domain']!r} "
          f"(attached as dom{info['domid']}; backend {info['backend']})")
    print(f"size         {info['size']} bytes ({human_bytes(info['size'])}, "
          f"{info['sectors']} sectors)")
    print(f"sector size  {info['sector_size']} bytes")
    print(f"read-only    {'yes' if info['read_only'] else 'no'}")
    print(f"features     {feats}")
    queues = f"{info['queues']} queues of " if info["queues"] > 1 else ""
    print(f"ring         {queues}{info['ring_entries']} entries in {info['ring_pages']} "
          f"page(s) (ring-page-order {info['ring_page_order']}); up to "
          f"{human_bytes(info['max_request_bytes'])} per request")
    return 0


def _ring_shape(front) -> tuple[int, int]:
    """(queues, entries per queue); no reference to the rings outlives the call (the
    session cannot unmap guest memory that a ring still views)."""
    rings = getattr(front, "rings", None) or [front.ring]
    return len(rings), rings[0].nr_ents


async def _pump(read: Callable[[int, int], Awaitable[bytes]],
                write: Callable[[int, bytes], Awaitable[object]],
                total: int | None, progress=None) -> int:
    """Move bytes from ``read(pos, n)`` to ``write(pos, data)`` until ``total``
    (or end of input), reading the next chunk while the last one is written."""
    send, recv = trio.open_memory_channel(2)

    async def producer() -> None:
        async with send:
            pos = 0
            while total is None or pos < total:
                want = CHUNK if total is None else min(CHUNK, total - pos)
                data = await read(pos, want)
                if not data:
                    break
                await send.send((pos, data))
                pos += len(data)

    done = 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(producer)
        async with recv:
            async for pos, data in recv:
                await write(pos, data)
                done += len(data)
                if progress is not None:
                    progress.update(len(data))
    return done


def _local_reader(stream):
    async def read(_pos: int, n: int) -> bytes:
        return await trio.to_thread.run_sync(stream.read, n)
    return read


def _local_writer(stream):
    async def write(_pos: int, data: bytes) -> None:
        await trio.to_thread.run_sync(stream.write, data)
    return write


@contextlib.contextmanager
def _open_local(path: str | None, mode: str, std):
    if path in (None, "-"):
        yield std.buffer
        std.buffer.flush()
        return
    try:
        f = open(path, mode)  # noqa: SIM115 - closed below
    except OSError as exc:
        raise BlkError(f"cannot open {path}: {exc.strerror}") from None
    with f:
        yield f


def _regular_size(stream) -> int | None:
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


async def _read(args) -> int:
    if args.output is None and sys.stdout.isatty():
        raise BlkError("refusing to write binary data to a terminal: use -o FILE, a pipe, "
                       "or -o - to insist")
    async with open_disk(args.socket, args.domain, args.device,
                         ring_order=args.ring_order, queues=args.queues) as disk:
        disk.check_range(args.offset, args.length)
        with _open_local(args.output, "wb", sys.stdout) as out:
            await _pump(lambda pos, n: disk.front.read(args.offset + pos, n),
                        _local_writer(out), args.length)
    return 0


async def _write(args) -> int:
    async with open_disk(args.socket, args.domain, args.device,
                         ring_order=args.ring_order, queues=args.queues) as disk:
        disk.check_writable()
        with _open_local(args.input, "rb", sys.stdin) as src:
            size = _regular_size(src)
            if size is not None:
                disk.check_range(args.offset, size - src.tell())
            await _pump(_local_reader(src), _disk_writer(disk, args.offset), None)
        await disk.front.flush()
    return 0


def _disk_writer(disk: Disk, offset: int):
    async def write(pos: int, data: bytes) -> None:
        if offset + pos + len(data) > disk.front.size:
            raise BlkError(f"the input runs past the end of {disk.label} "
                           f"({disk.front.size} bytes) when written at {offset}; "
                           f"{pos} bytes were written")
        await disk.front.write(offset + pos, data)
    return write


def _pvio_side(text: str) -> int | None:
    """'pvio:' -> 0, 'pvio:1M' -> 1048576, anything else -> None (a local file)."""
    if not text.startswith("pvio:"):
        return None
    rest = text[len("pvio:"):]
    if not rest:
        return 0
    try:
        return byte_count(rest)
    except argparse.ArgumentTypeError as exc:
        raise BlkError(str(exc)) from None


async def _copy(args) -> int:
    from pvio._progress import Progress

    src_off, dst_off = _pvio_side(args.src), _pvio_side(args.dst)
    if (src_off is None) == (dst_off is None):
        raise BlkError("exactly one of SRC and DST must be the disk, written 'pvio:' or "
                       "'pvio:OFFSET' (e.g. `pvio blk copy disk.raw pvio:`)")
    async with open_disk(args.socket, args.domain, args.device,
                         ring_order=args.ring_order, queues=args.queues) as disk:
        if dst_off is not None:  # local file -> disk
            disk.check_writable()
            with _open_local(args.src, "rb", sys.stdin) as src:
                total = _regular_size(src)
                if total is None:
                    raise BlkError(f"{args.src} is not a regular file (for a stream use "
                                   "`pvio blk write OFFSET`)")
                if dst_off + total > disk.front.size:
                    raise BlkError(f"{args.src} ({total} bytes) does not fit in {disk.label} "
                                   f"({disk.front.size} bytes) at offset {dst_off}")
                label = f"{os.path.basename(args.src)} -> pvio:{disk.label}"
                with Progress(total, label=label, enabled=args.progress) as bar:
                    await _pump(_local_reader(src), _disk_writer(disk, dst_off), total, bar)
                    await disk.front.flush()
        else:  # disk -> local file
            if src_off > disk.front.size:
                raise BlkError(f"offset {src_off} is past the end of {disk.label} "
                               f"({disk.front.size} bytes)")
            total = disk.front.size - src_off
            with _open_local(args.dst, "wb", sys.stdout) as out:
                label = f"pvio:{disk.label} -> {os.path.basename(args.dst)}"
                with Progress(total, label=label, enabled=args.progress) as bar:
                    await _pump(lambda pos, n: disk.front.read(src_off + pos, n),
                                _local_writer(out), total, bar)
                    await trio.to_thread.run_sync(_sync, out)
    return 0


def _sync(stream) -> None:
    stream.flush()
    with contextlib.suppress(OSError, ValueError):
        os.fsync(stream.fileno())


# ----------------------------------------------------------------- export

ROOT_INODE = 1
DISK_INODE = 2


def _fuse_filesystem(pyfuse3, disk: Disk, name: str, read_only: bool):
    """A pyfuse3 file system with one file, ``name``, backed by ``disk``'s BlkFront."""
    from pvio.frontends.blkfront import BlkDeviceError

    front = disk.front
    FUSEError = pyfuse3.FUSEError

    def guarded(fn):
        """Turn a failed disk request into EIO instead of a crashed FUSE loop."""
        async def wrapper(*args, **kwargs):
            try:
                return await fn(*args, **kwargs)
            except FUSEError:
                raise
            except (BlkDeviceError, OSError) as exc:
                print(f"pvio blk export: {fn.__name__}: {exc}", file=sys.stderr, flush=True)
                raise FUSEError(errno.EIO) from None
        wrapper.__name__ = fn.__name__
        return wrapper

    class DiskFS(pyfuse3.Operations):
        supports_dot_lookup = False
        enable_writeback_cache = False

        def __init__(self) -> None:
            super().__init__()
            now = time.time_ns()
            self.file_name = name.encode()
            self.read_only = read_only
            self.mode = 0o444 if read_only else 0o644
            self.uid, self.gid = os.getuid(), os.getgid()
            self.atime = self.mtime = self.ctime = now
            self.stats = {"reads": 0, "writes": 0, "fsyncs": 0}

        def _attrs(self, inode: int) -> pyfuse3.EntryAttributes:
            attrs = pyfuse3.EntryAttributes()
            attrs.st_ino = inode
            attrs.generation = 0
            attrs.entry_timeout = 60
            attrs.attr_timeout = 1
            attrs.st_uid, attrs.st_gid = self.uid, self.gid
            attrs.st_blksize = max(4096, front.sector_size)
            attrs.st_atime_ns, attrs.st_mtime_ns = self.atime, self.mtime
            attrs.st_ctime_ns = self.ctime
            if inode == ROOT_INODE:
                attrs.st_mode = stat.S_IFDIR | 0o755
                attrs.st_nlink = 2
                attrs.st_size = 0
            elif inode == DISK_INODE:
                attrs.st_mode = stat.S_IFREG | self.mode
                attrs.st_nlink = 1
                attrs.st_size = front.size
                attrs.st_blocks = -(-front.size // 512)
            else:
                raise FUSEError(errno.ENOENT)
            return attrs

        async def getattr(self, inode, ctx=None):
            return self._attrs(inode)

        async def lookup(self, parent_inode, name, ctx=None):
            if parent_inode != ROOT_INODE:
                raise FUSEError(errno.ENOTDIR)
            if name in (b".", b".."):
                return self._attrs(ROOT_INODE)
            if name == self.file_name:
                return self._attrs(DISK_INODE)
            raise FUSEError(errno.ENOENT)

        async def setattr(self, inode, attr, fields, fh, ctx):
            # Like a block device, the disk's size is what it is: truncation
            # (open's O_TRUNC, ftruncate) is ignored. Mode, owner and times are
            # kept for the life of the mount.
            if inode != DISK_INODE:
                raise FUSEError(errno.EPERM)
            if fields.update_mode:
                self.mode = stat.S_IMODE(attr.st_mode)
            if fields.update_uid:
                self.uid = attr.st_uid
            if fields.update_gid:
                self.gid = attr.st_gid
            if fields.update_atime:
                self.atime = attr.st_atime_ns
            if fields.update_mtime:
                self.mtime = attr.st_mtime_ns
            self.ctime = time.time_ns()
            return self._attrs(inode)

        async def opendir(self, inode, ctx):
            if inode != ROOT_INODE:
                raise FUSEError(errno.ENOTDIR)
            return inode

        async def readdir(self, fh, start_id, token):
            if start_id == 0:
                pyfuse3.readdir_reply(token, self.file_name, self._attrs(DISK_INODE), 1)

        async def releasedir(self, fh):
            pass

        async def open(self, inode, flags, ctx):
            if inode != DISK_INODE:
                raise FUSEError(errno.EISDIR)
            if self.read_only and flags & os.O_ACCMODE != os.O_RDONLY:
                raise FUSEError(errno.EROFS)
            return pyfuse3.FileInfo(fh=inode)

        @guarded
        async def read(self, fh, off, size):
            n = max(0, min(size, front.size - off))
            if n == 0:
                return b""
            self.stats["reads"] += 1
            return await front.read(off, n)

        @guarded
        async def write(self, fh, off, buf):
            if self.read_only:
                raise FUSEError(errno.EROFS)
            n = max(0, min(len(buf), front.size - off))
            if n == 0:
                raise FUSEError(errno.ENOSPC)
            await front.write(off, memoryview(buf)[:n])
            self.stats["writes"] += 1
            self.mtime = self.ctime = time.time_ns()
            return n

        @guarded
        async def fsync(self, fh, datasync):
            self.stats["fsyncs"] += 1
            await front.flush()

        async def flush(self, fh):
            pass  # close(2): writes already reached the backend; fsync makes them durable

        async def release(self, fh):
            pass

        async def statfs(self, ctx):
            data = pyfuse3.StatvfsData()
            data.f_bsize = data.f_frsize = front.sector_size
            data.f_blocks = front.sectors
            data.f_bfree = data.f_bavail = 0
            data.f_files = 2
            data.f_ffree = data.f_favail = 0
            data.f_namemax = 255
            return data

        async def create(self, parent_inode, name, mode, flags, ctx):
            raise FUSEError(errno.EPERM)

        async def mknod(self, parent_inode, name, mode, rdev, ctx):
            raise FUSEError(errno.EPERM)

        async def mkdir(self, parent_inode, name, mode, ctx):
            raise FUSEError(errno.EPERM)

        async def unlink(self, parent_inode, name, ctx):
            raise FUSEError(errno.EPERM)

        async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new,
                         flags, ctx):
            raise FUSEError(errno.EPERM)

    return DiskFS()


async def _export(args) -> int:
    try:
        import pyfuse3
    except ImportError:
        raise BlkError("export needs pyfuse3: pip install 'pvio[export]' (it builds against "
                       "libfuse3: apt-get install libfuse3-dev fuse3 pkg-config)") from None
    mountpoint = os.path.abspath(args.mountpoint)
    try:
        if not stat.S_ISDIR(os.stat(mountpoint).st_mode):
            raise BlkError(f"{mountpoint} is not a directory")
    except OSError as exc:
        hint = (f" (a stale mount? try `fusermount3 -u {mountpoint}`)"
                if exc.errno == errno.ENOTCONN else "")
        raise BlkError(f"cannot use {mountpoint} as a mount point: {exc.strerror}{hint}") \
            from None
    if not os.path.exists("/dev/fuse"):
        raise BlkError("/dev/fuse does not exist: load the fuse module (modprobe fuse) or, "
                       "in a container, pass the device through")
    if "/" in args.name or args.name in ("", ".", ".."):
        raise BlkError(f"bad file name {args.name!r}")

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_disk(args.socket, args.domain, args.device,
                             ring_order=args.ring_order, queues=args.queues,
                             reconnect=True) as disk:
            read_only = args.read_only or disk.front.readonly
            fs = _fuse_filesystem(pyfuse3, disk, args.name, read_only)
            options = set(pyfuse3.default_options)
            options |= {f"fsname=pvio:{disk.domain}/{disk.label}", "subtype=pvio"}
            if read_only:
                options.add("ro")
            if args.allow_other:
                options.add("allow_other")
            try:
                pyfuse3.init(fs, mountpoint, options)
            except RuntimeError as exc:
                raise BlkError(f"cannot mount on {mountpoint}: {exc}") from None
            stopped_by = None
            try:
                print(os.path.join(mountpoint, args.name), flush=True)
                print(f"pvio blk export: {disk.label} of domain {disk.domain!r} "
                      f"({disk.front.size} bytes{', read-only' if read_only else ''}) "
                      f"mounted; SIGINT or SIGTERM unmounts", file=sys.stderr, flush=True)
                async with trio.open_nursery() as nursery:

                    async def until_signal() -> None:
                        nonlocal stopped_by
                        async for signum in signals:
                            stopped_by = signal.Signals(signum).name
                            pyfuse3.terminate()
                            return

                    nursery.start_soon(until_signal)
                    try:
                        await pyfuse3.main()
                    except OSError as exc:
                        if exc.errno != errno.ENODEV:  # ENODEV: unmounted under us
                            raise
                    nursery.cancel_scope.cancel()
            finally:
                with trio.CancelScope(shield=True):
                    pyfuse3.close(unmount=True)
                    with trio.move_on_after(10):
                        await disk.front.flush()
            why = (f"{stopped_by} received: flushed and unmounted" if stopped_by
                   else "unmounted by someone else: flushed")
            print(f"pvio blk export: {why} {mountpoint} "
                  f"({fs.stats['reads']} reads, {fs.stats['writes']} writes, "
                  f"{fs.stats['fsyncs']} fsyncs)", file=sys.stderr, flush=True)
    return 0
