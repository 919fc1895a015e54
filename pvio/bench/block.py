"""Block I/O through a pvio disk against what a Python user would otherwise do.

Three ways to read and write the same image file, measured in the same run:

  pvio     a ``pvio serve`` daemon in its own process (blkback: its C fast path
           does os.preadv/os.pwritev straight into and out of the granted pool
           pages, in the event loop, the image being in memory) and a BlkFront
           in this process, on PoolBuffers (its zero-copy buffers)
  socket   a request/response block server over a Unix stream socket: an
           asyncio server process (Protocol, every complete request of a
           ``data_received`` parsed with struct, os.pread/os.pwrite per request,
           the answers in one ``writelines``) and, in this process, a trio
           client with BlkFront's API that pipelines the requests of all callers
           over one socket (id-tagged 20-byte requests, 12-byte answers followed
           by the data; a batch call sends all its requests in one send)
  pread    os.pread/os.pwrite of the file in a plain loop in this process, no
           second process at all: the Python limit

Workloads (the image is pre-filled so every read hits the page cache):

  rand4k_qd1        4 KiB random reads, one at a time (latency of each timed)
  rand4k_qd32       4 KiB random reads, 32 in flight
  seq64k_read_qd1   64 KiB sequential reads, one at a time (latency of each timed)
  seq64k_read       64 KiB sequential reads, --seq-depth in flight (default 32)
  seq64k_write      64 KiB sequential writes, --seq-depth in flight (no flush)

pread has no queue: it runs the same one-at-a-time loop in every workload, the
rate any deeper queue has to compete with. At Q > 1, pvio and socket keep Q requests
in flight the same way (--api): by default two tasks each submit Q/2 requests per
read_many/write_many call (io_submit style); --api tasks runs Q tasks each awaiting
readinto/write.

The three systems of a workload run in interleaved time slices (--slices), so a
burst of background load hits all of them alike. Every pvio and socket case
first checks that it reads the same bytes as os.pread.

targets (2 vCPUs): 64 KiB sequential reads at least 0.7x the in-process
os.pread rate; 4 KiB random reads at queue depth 32 at least 2x the socket
server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import trio

from pvio.bench._common import (
    BenchError,
    Proc,
    choices,
    positive,
    progress,
    report,
    standalone,
    start_serve,
)
from pvio.bench.ring import _machine, _proc_stat

SYSTEMS = ("pvio", "socket", "pread")
WORKLOADS = ("rand4k_qd1", "rand4k_qd32", "seq64k_read_qd1", "seq64k_read", "seq64k_write")
DEFAULT_SEQ_DEPTH = 32
DEFAULT_SIZE = 256 << 20
KIB = 1024
_PATTERN_SEED = 0x9E3779B9
_READ, _WRITE = 0, 1

# socket protocol: request id, op, offset, length (+ length bytes for a write);
# answer id, status (0 or -errno), length (+ length bytes for a read).
SOCK_REQ = struct.Struct("<IB3xQI")
SOCK_RSP = struct.Struct("<IiI")


# ------------------------------------------------------------ workloads


def _workload(name: str, seq_depth: int) -> dict[str, Any]:
    return {
        "rand4k_qd1": {"op": _READ, "bs": 4 * KIB, "depth": 1, "random": True},
        "rand4k_qd32": {"op": _READ, "bs": 4 * KIB, "depth": 32, "random": True},
        "seq64k_read_qd1": {"op": _READ, "bs": 64 * KIB, "depth": 1, "random": False},
        "seq64k_read": {"op": _READ, "bs": 64 * KIB, "depth": seq_depth, "random": False},
        "seq64k_write": {"op": _WRITE, "bs": 64 * KIB, "depth": seq_depth, "random": False},
    }[name]


class _Offsets:
    """Offsets of one workload: random block-aligned ones from a precomputed
    table, or a sequential cursor wrapping at the end of the disk."""

    def __init__(self, size: int, bs: int, rand: bool, seed: int) -> None:
        self.blocks = size // bs
        self.bs = bs
        self.rand = rand
        rng = random.Random(seed)
        self.table = [rng.randrange(self.blocks) * bs for _ in range(1 << 16)] if rand else []
        self.i = 0

    def next(self) -> int:
        i = self.i
        self.i = i + 1
        if self.rand:
            return self.table[i & 0xFFFF]
        return (i % self.blocks) * self.bs


# ------------------------------------------------------------ the image


def make_image(path: str, size: int) -> None:
    """Write ``size`` bytes of a pseudo-random pattern (so reads hit the page cache)."""
    block = random.Random(_PATTERN_SEED).randbytes(1 << 20)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        pos = 0
        while pos < size:
            n = min(len(block), size - pos)
            os.pwrite(fd, memoryview(block)[:n], pos)
            pos += n
    finally:
        os.close(fd)


def _bench_dir(base: str | None) -> str:
    if base is None and os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        base = "/dev/shm"  # tmpfs: no writeback noise in the write workload
    return tempfile.mkdtemp(prefix="pvio-bb-", dir=base)


# ------------------------------------------------------- socket server


class _BlockServerProtocol(asyncio.Protocol):
    """One client connection of the socket block server."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        fd, hdr, rsp = self.fd, SOCK_REQ.size, SOCK_RSP.pack
        out: list[bytes] = []
        pos, end = 0, len(buf)
        with memoryview(buf) as view:
            while end - pos >= hdr:
                rid, op, offset, length = SOCK_REQ.unpack_from(buf, pos)
                if op == _READ:
                    try:
                        data = os.pread(fd, length, offset)
                    except OSError as exc:
                        out.append(rsp(rid, -exc.errno, 0))
                    else:
                        out.append(rsp(rid, 0, len(data)))
                        out.append(data)
                    pos += hdr
                elif op == _WRITE:
                    if end - pos - hdr < length:
                        break  # the rest of this write's data is still on its way
                    try:
                        n = os.pwrite(fd, view[pos + hdr:pos + hdr + length], offset)
                        status = 0 if n == length else -5
                    except OSError as exc:
                        status = -exc.errno
                    out.append(rsp(rid, status, 0))
                    pos += hdr + length
                else:
                    out.append(rsp(rid, -22, 0))
                    pos += hdr
        del buf[:pos]
        if out:
            self.transport.writelines(out)


def serve_socket(path: str, image: str) -> None:
    """The socket block server's process: serve ``image`` on ``path`` until SIGTERM."""
    fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = loop.create_future()
        loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
        server = await loop.create_unix_server(lambda: _BlockServerProtocol(fd), path)
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        async with server:
            await stop

    asyncio.run(main())


class SocketBlockClient:
    """The socket server's client: BlkFront's ``readinto``/``write`` API over one
    pipelined Unix socket, for any number of concurrent trio tasks."""

    def __init__(self, sock: socket.socket, depth: int = 256) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._free = list(range(depth))
        self._waiting: dict[int, list] = {}
        self._backlog = bytearray()
        self._backlog_ready = trio.Event()
        self._rbuf = bytearray(8 << 20)
        self.error: str | None = None

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._writer)
            task_status.started()
            await self._reader()
            nursery.cancel_scope.cancel()

    def _send(self, *parts) -> None:
        if self._backlog:
            for p in parts:
                self._backlog += p
            return
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        try:
            n = self.sock.send(data)
        except BlockingIOError:
            n = 0
        if n < len(data):
            self._backlog += memoryview(data)[n:]
            self._backlog_ready.set()

    async def _writer(self) -> None:
        while True:
            await self._backlog_ready.wait()
            self._backlog_ready = trio.Event()
            while self._backlog:
                await trio.lowlevel.wait_writable(self.sock)
                try:
                    n = self.sock.send(self._backlog)
                except BlockingIOError:
                    continue
                del self._backlog[:n]

    async def _reader(self) -> None:
        rbuf = self._rbuf
        view = memoryview(rbuf)
        have, hdr = 0, SOCK_RSP.size
        unpack = SOCK_RSP.unpack_from
        waiting = self._waiting
        while True:
            await trio.lowlevel.wait_readable(self.sock)
            try:
                n = self.sock.recv_into(view[have:])
            except BlockingIOError:
                continue
            if n == 0:
                self._fail("the server closed the connection")
                return
            have += n
            pos = 0
            while have - pos >= hdr:
                rid, status, length = unpack(rbuf, pos)
                if have - pos - hdr < length:
                    break
                w = waiting.pop(rid, None)
                if w is None:
                    self._fail(f"answer for request {rid}, which is not outstanding")
                    return
                if length:
                    w[0][:length] = view[pos + hdr:pos + hdr + length]
                w[2] = status
                w[1].set()
                pos += hdr + length
            if pos:
                rest = have - pos
                if rest:
                    rbuf[:rest] = view[pos:have]
                have = rest

    def _fail(self, reason: str) -> None:
        self.error = reason
        for w in self._waiting.values():
            w[2] = -5
            w[1].set()
        self._waiting.clear()

    async def readinto(self, offset: int, buf) -> int:
        await self._many(_READ, [(offset, buf)])
        return memoryview(buf).nbytes

    async def write(self, offset: int, data) -> int:
        await self._many(_WRITE, [(offset, data)])
        return memoryview(data).nbytes

    async def _many(self, op: int, items) -> None:
        """Every request of ``items`` in one send, then wait for all the answers
        (BlkFront.read_many/write_many over the socket)."""
        if self.error:
            raise OSError(5, self.error)
        countdown = _Countdown(len(items))
        calls, parts = [], []
        for offset, buf in items:
            view = memoryview(buf).cast("B")
            rid = self._free.pop()
            w = [view if op == _READ else None, countdown, 0]
            self._waiting[rid] = w
            calls.append((rid, w))
            parts.append(SOCK_REQ.pack(rid, op, offset, len(view)))
            if op == _WRITE:
                parts.append(view)
        try:
            self._send(b"".join(parts))
            await countdown.event.wait()
        finally:
            for rid, _ in calls:
                self._free.append(rid)
        for _, w in calls:
            if w[2] < 0:
                raise OSError(-w[2], f"block server: {os.strerror(-w[2])}")

    async def read_many(self, items) -> None:
        await self._many(_READ, items)

    async def write_many(self, items) -> None:
        await self._many(_WRITE, items)


class _Countdown:
    """``set()`` once per answer; ``event`` fires at the last one."""

    __slots__ = ("event", "left")

    def __init__(self, n: int) -> None:
        self.event = trio.Event()
        self.left = n

    def set(self) -> None:
        self.left -= 1
        if not self.left:
            self.event.set()


# ------------------------------------------------------------ processes


def _start_daemon(root: str, size: int) -> tuple[Proc, str]:
    sock = os.path.join(root, "xb.sock")
    config = os.path.join(root, "bench.toml")
    with open(config, "w") as f:
        f.write('[[domain]]\nname = "bench"\n\n  [[domain.device]]\n  type = "vbd"\n'
                f'  devid = 51712\n  image = "bench.img"\n  size = {size}\n  mode = "w"\n')
    return start_serve(sock, root, os.path.join(root, "serve.log"), config), sock


def _start_socket_server(root: str, image: str) -> tuple[Proc, str]:
    sock = os.path.join(root, "blk.sock")
    code = "import sys; from pvio.bench.block import serve_socket; " \
           "serve_socket(sys.argv[1], sys.argv[2])"
    proc = Proc("socket block server", [sys.executable, "-c", code, sock, image],
                 os.path.join(root, "socket-server.log"), stdout=subprocess.PIPE)
    line = proc.proc.stdout.readline()
    proc.proc.stdout.close()
    if line.strip() != b"ready":
        proc.proc.wait(timeout=10)
        raise proc.fail("did not start")
    return proc, sock


class _OtherLoad:
    """CPUs that processes other than ours (and the hypervisor, as steal) took
    while we measured; tick-sampled, good to about +-0.1 CPU."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self.t, self.own = time.perf_counter(), self._own()
        self.busy, self.steal = _proc_stat()

    def _own(self) -> float:
        return _cpu_self() + sum(_cpu_of(p) for p in self.pids)

    def cpus(self) -> tuple[float, float]:
        wall = time.perf_counter() - self.t
        busy, steal = _proc_stat()
        other = (busy - self.busy) - (self._own() - self.own)
        if wall <= 0:
            return 0.0, 0.0
        return max(0.0, other / wall), max(0.0, (steal - self.steal) / wall)


def _cpu_self() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_of(pid: int | None) -> float:
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


# ------------------------------------------------------------ measuring


class _Acc:
    """What the slices of one (workload, system) case add up to."""

    def __init__(self) -> None:
        self.ops = 0
        self.wall = 0.0
        self.cpu_client = 0.0
        self.cpu_server = 0.0
        self.lat_ns: list[int] = []
        self.slice_rates: list[float] = []


def _sync_slice(fd: int, wl: dict, offsets: _Offsets, buf: bytearray, seconds: float,
                acc: _Acc | None) -> None:
    """In-process os.pread/os.pwrite loop for ``seconds``."""
    clock, clock_ns = time.perf_counter, time.perf_counter_ns
    nxt = offsets.next
    bs = wl["bs"]
    lat: list[int] = [] if acc is not None and wl["depth"] == 1 else None
    ops = 0
    cpu0 = _cpu_self()
    t0 = clock()
    deadline = t0 + seconds
    if wl["op"] == _READ:
        pread = os.pread
        while clock() < deadline:
            if lat is not None:
                s = clock_ns()
                pread(fd, bs, nxt())
                lat.append(clock_ns() - s)
            else:
                pread(fd, bs, nxt())
            ops += 1
    else:
        pwrite = os.pwrite
        while clock() < deadline:
            if lat is not None:
                s = clock_ns()
                pwrite(fd, buf, nxt())
                lat.append(clock_ns() - s)
            else:
                pwrite(fd, buf, nxt())
            ops += 1
    wall = clock() - t0
    if acc is not None:
        acc.ops += ops
        acc.wall += wall
        acc.cpu_client += _cpu_self() - cpu0
        acc.slice_rates.append(ops / wall)
        if lat is not None:
            acc.lat_ns += lat


async def _async_slice(dev, wl: dict, offsets: _Offsets, bufs: list, seconds: float,
                       acc: _Acc | None, server_pid: int | None, api: str = "batch") -> None:
    """``depth`` trio tasks doing ``dev.readinto``/``dev.write`` for ``seconds``
    (api "tasks"), or two tasks each submitting ``depth/2`` requests per
    ``dev.read_many``/``dev.write_many`` call (api "batch", Q > 1)."""
    clock, clock_ns = time.perf_counter, time.perf_counter_ns
    nxt = offsets.next
    record = acc is not None and wl["depth"] == 1
    lat: list[int] = []
    done = [0]
    deadline = clock() + seconds

    async def worker(buf) -> None:
        call = dev.readinto if wl["op"] == _READ else dev.write
        n = 0
        while clock() < deadline:
            if record:
                s = clock_ns()
                await call(nxt(), buf)
                lat.append(clock_ns() - s)
            else:
                await call(nxt(), buf)
            n += 1
        done[0] += n

    async def batch_worker(mine: list) -> None:
        call = dev.read_many if wl["op"] == _READ else dev.write_many
        n = 0
        while clock() < deadline:
            await call([(nxt(), buf) for buf in mine])
            n += len(mine)
        done[0] += n

    depth = wl["depth"]
    cpu0, scpu0 = _cpu_self(), _cpu_of(server_pid)
    t0 = clock()
    async with trio.open_nursery() as nursery:
        if api == "batch" and depth > 1:
            half = depth // 2
            nursery.start_soon(batch_worker, bufs[:half])
            nursery.start_soon(batch_worker, bufs[half:depth])
        else:
            for k in range(depth):
                nursery.start_soon(worker, bufs[k])
    wall = clock() - t0
    if acc is not None:
        acc.ops += done[0]
        acc.wall += wall
        acc.cpu_client += _cpu_self() - cpu0
        acc.cpu_server += _cpu_of(server_pid) - scpu0
        acc.slice_rates.append(done[0] / wall)
        acc.lat_ns += lat


def _pct(sorted_ns: list[int], p: float) -> float:
    return sorted_ns[min(len(sorted_ns) - 1, int(p * len(sorted_ns)))] / 1000


def _case_row(workload: str, system: str, wl: dict, acc: _Acc) -> dict[str, Any]:
    rate = acc.ops / acc.wall if acc.wall > 0 else 0.0
    depth = 1 if system == "pread" else wl["depth"]
    row: dict[str, Any] = {
        "workload": workload,
        "system": system,
        "op": "read" if wl["op"] == _READ else "write",
        "block_bytes": wl["bs"],
        "depth": depth,
        "ops": acc.ops,
        "seconds": acc.wall,
        "ops_per_s": rate,
        "mb_per_s": rate * wl["bs"] / 1e6,
        "mean_us": depth / rate * 1e6 if rate else None,  # Little's law
        "slice_ops_per_s_min": min(acc.slice_rates) if acc.slice_rates else None,
        "slice_ops_per_s_max": max(acc.slice_rates) if acc.slice_rates else None,
        # CPUs busy while this case ran (1.0 = one CPU fully used)
        "cpu_client": acc.cpu_client / acc.wall if acc.wall else 0.0,
        "cpu_server": acc.cpu_server / acc.wall if acc.wall else 0.0,
    }
    if acc.lat_ns:
        lat = sorted(acc.lat_ns)
        row.update(mean_us=sum(lat) / len(lat) / 1000, p50_us=_pct(lat, 0.50),
                   p99_us=_pct(lat, 0.99), max_us=lat[-1] / 1000)
    return row


async def _verify(dev, fd: int, size: int, name: str) -> None:
    """``dev`` reads what os.pread reads (a few blocks, aligned and odd sizes)."""
    for offset, length in ((0, 4096), (size - 65536, 65536), (size // 3 // 512 * 512, 12288),
                           (size // 2, 131072)):
        buf = bytearray(length)
        await dev.readinto(offset, buf)
        if bytes(buf) != os.pread(fd, length, offset):
            raise BenchError(f"{name}: read at {offset}+{length} differs from os.pread")
    # the buffers and the batch call the measured cases use
    bufs = _buffers(dev, 65536, bytes(65536), 4)
    await dev.read_many([(size // 4 + k * 65536, b) for k, b in enumerate(bufs)])
    for k, b in enumerate(bufs):
        got = bytes(b.view if hasattr(b, "view") else b)
        if got != os.pread(fd, 65536, size // 4 + k * 65536):
            raise BenchError(f"{name}: read_many at {size // 4 + k * 65536} differs from "
                             "os.pread")
        if hasattr(b, "close"):
            b.close()


async def _run_all(*, image: str, size: int, daemon_sock: str | None, daemon_pid: int | None,
                   sock_path: str | None, sock_pid: int | None, workloads: Sequence[str],
                   systems: Sequence[str], seconds: float, warmup: float, slices: int,
                   seq_depth: int, progress, api: str = "batch") -> list[dict[str, Any]]:
    from pvio.frontends.blkfront import BLK_KEYS, BlkFront
    from pvio.frontends.session import open_session

    fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    rows: list[dict[str, Any]] = []
    async with contextlib.AsyncExitStack() as stack:
        devs: dict[str, Any] = {}
        pids: dict[str, int | None] = {"pread": None}
        nursery = await stack.enter_async_context(trio.open_nursery())
        stack.callback(nursery.cancel_scope.cancel)
        if "pvio" in systems:
            session = await stack.enter_async_context(open_session(daemon_sock, "bench"))
            offered = [d for d in await session.devices() if d.type == "vbd"]
            if not offered:
                raise BenchError("the daemon offers no vbd")
            front = BlkFront(session)
            device = await session.attach(front, offered[0].devid, BLK_KEYS)
            with trio.move_on_after(20):
                await device.connected.wait()
            if front.ring is None or front.size != size:
                raise BenchError(f"blkfront did not connect (error: {front.error})")
            devs["pvio"], pids["pvio"] = front, daemon_pid
        if "socket" in systems:
            sk = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sk.connect(sock_path)
            stack.callback(sk.close)
            client = SocketBlockClient(sk)
            await nursery.start(client.run)
            devs["socket"], pids["socket"] = client, sock_pid
        for name, dev in devs.items():
            await _verify(dev, fd, size, name)

        for workload in workloads:
            wl = _workload(workload, seq_depth)
            bs = wl["bs"]
            fill = random.Random(_PATTERN_SEED).randbytes(1 << 20)[:bs]
            bufs = {s: _buffers(devs.get(s), bs, fill, max(1, wl["depth"])) for s in systems}
            accs = {s: _Acc() for s in systems}
            offs = {s: _Offsets(size, bs, wl["random"], seed=WORKLOADS.index(workload))
                    for s in systems}
            order = list(systems)
            for s in order:  # warm-up (unmeasured), then interleaved slices
                await _one(s, devs, fd, wl, offs[s], bufs[s], warmup, None, pids, api)
            for k in range(slices):
                rot = order[k % len(order):] + order[:k % len(order)]
                for s in rot:
                    await _one(s, devs, fd, wl, offs[s], bufs[s], seconds / slices, accs[s],
                               pids, api)
            for buf in bufs.get("pvio", []):
                buf.close()
            for s in systems:
                row = _case_row(workload, s, wl, accs[s])
                rows.append(row)
                if progress:
                    lat = (f", p50 {row['p50_us']:.1f} µs, p99 {row['p99_us']:.1f} µs"
                           if "p50_us" in row else "")
                    progress(f"{workload:<15} {s:<7} Q={row['depth']:<3} "
                             f"{row['ops_per_s']:>10,.0f} ops/s {row['mb_per_s']:>8,.1f} MB/s"
                             f"{lat}")
        if "pvio" in devs:
            with trio.move_on_after(5):
                await device.close()
    os.close(fd)
    return rows


def _buffers(dev, bs: int, fill: bytes, n: int) -> list:
    """The request buffers of one case: for pvio, PoolBuffers (BlkFront's
    zero-copy path: the backend moves the data straight into or out of them);
    otherwise bytearrays."""
    if dev is None or not hasattr(dev, "buffer"):
        return [bytearray(fill) for _ in range(n)]
    out = []
    for _ in range(n):
        buf = dev.buffer(bs)
        buf.view[:] = fill
        out.append(buf)
    return out


async def _one(system: str, devs: dict, fd: int, wl: dict, offsets: _Offsets, bufs: list,
               seconds: float, acc: _Acc | None, pids: dict, api: str) -> None:
    if system == "pread":
        _sync_slice(fd, wl, offsets, bufs[0], seconds, acc)
        await trio.lowlevel.checkpoint()
    else:
        await _async_slice(devs[system], wl, offsets, bufs, seconds, acc, pids[system], api)


# ------------------------------------------------------------- reporting


def _ratios(cases: list[dict]) -> dict[str, float | None]:
    by = {(c["workload"], c["system"]): c for c in cases}

    def ratio(workload: str, a: str, b: str) -> float | None:
        x, y = by.get((workload, a)), by.get((workload, b))
        return x["ops_per_s"] / y["ops_per_s"] if x and y and y["ops_per_s"] else None

    def get(workload: str, system: str, key: str) -> float | None:
        c = by.get((workload, system))
        return c.get(key) if c else None

    return {
        "seq64k_read_vs_pread": ratio("seq64k_read", "pvio", "pread"),
        "rand4k_qd32_vs_socket": ratio("rand4k_qd32", "pvio", "socket"),
        "seq64k_read_vs_socket": ratio("seq64k_read", "pvio", "socket"),
        "seq64k_read_qd1_vs_pread": ratio("seq64k_read_qd1", "pvio", "pread"),
        "seq64k_read_qd1_vs_socket": ratio("seq64k_read_qd1", "pvio", "socket"),
        "seq64k_write_vs_pwrite": ratio("seq64k_write", "pvio", "pread"),
        "seq64k_write_vs_socket": ratio("seq64k_write", "pvio", "socket"),
        "rand4k_qd1_vs_socket": ratio("rand4k_qd1", "pvio", "socket"),
        "rand4k_qd1_vs_pread": ratio("rand4k_qd1", "pvio", "pread"),
        "rand4k_qd32_vs_pread": ratio("rand4k_qd32", "pvio", "pread"),
        "rand4k_qd32_vs_qd1": _div(get("rand4k_qd32", "pvio", "ops_per_s"),
                                   get("rand4k_qd1", "pvio", "ops_per_s")),
        "socket_seq64k_read_vs_pread": ratio("seq64k_read", "socket", "pread"),
        "rand4k_qd1_p50_us": get("rand4k_qd1", "pvio", "p50_us"),
        "rand4k_qd1_p99_us": get("rand4k_qd1", "pvio", "p99_us"),
        "rand4k_qd1_p99_us_socket": get("rand4k_qd1", "socket", "p99_us"),
    }


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _targets(ratios: dict[str, float | None], seq_depth: int) -> dict[str, dict[str, Any]]:
    def target(value: float | None, limit: float, what: str) -> dict[str, Any]:
        return {"what": what, "value": value, "target": f">= {limit:g}",
                "met": None if value is None else value >= limit}

    return {
        "seq64k_read_vs_pread": target(
            ratios["seq64k_read_vs_pread"], 0.7,
            f"64 KiB sequential reads (Q={seq_depth}), pvio / in-process os.pread"),
        "rand4k_qd32_vs_socket": target(
            ratios["rand4k_qd32_vs_socket"], 2.0,
            "4 KiB random reads at Q=32, pvio / socket server"),
    }


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_table(report: dict[str, Any]) -> str:
    cases = report["cases"]
    by = {(c["workload"], c["system"]): c for c in cases}
    head = (f"{'workload':<15} {'system':<7} {'Q':>3} {'ops/s':>9} {'MB/s':>8} "
            f"{'mean µs':>8} {'p50 µs':>7} {'p99 µs':>7} {'CPUs':>5}  "
            f"{'vs pread':>8} {'vs socket':>9}")
    lines = [head, "-" * len(head)]
    workload = None
    for c in cases:
        if workload is not None and c["workload"] != workload:
            lines.append("")
        workload = c["workload"]
        vs = []
        for base in ("pread", "socket"):
            b = by.get((c["workload"], base))
            vs.append(f"{c['ops_per_s'] / b['ops_per_s']:.2f}x"
                      if b and b is not c and b["ops_per_s"] else "-")
        lines.append(
            f"{c['workload']:<15} {c['system']:<7} {c['depth']:>3} {c['ops_per_s']:>9,.0f} "
            f"{c['mb_per_s']:>8,.1f} {_fmt(c.get('mean_us'), '8.1f'):>8} "
            f"{_fmt(c.get('p50_us'), '7.1f'):>7} {_fmt(c.get('p99_us'), '7.1f'):>7} "
            f"{c['cpu_client'] + c['cpu_server']:>5.2f}  {vs[0]:>8} {vs[1]:>9}")
    lines.append("")
    lines.append("vs: ops/s ratio (higher is better). mean µs at Q>1 by Little's law; CPUs: "
                 "CPU time of the client\nand server processes / wall time (pread: one "
                 "process, no server).")
    lines.append("targets:")
    for t in report["targets"].values():
        state = "n/a" if t["met"] is None else ("met" if t["met"] else "MISSED")
        lines.append(f"  {t['what']}: {_fmt(t['value'], '.2f')} (target {t['target']}) "
                     f"{state}")
    cfg, m = report["config"], report["machine"]
    lines.append(
        f"({cfg['seconds']:g} s per case in {cfg['slices']} interleaved slices; "
        f"{cfg['size'] >> 20} MiB image in {cfg['image_fs']}; "
        f"{m['usable_cpus']} CPUs, Python {m['python']}, other processes "
        f"{m.get('other_cpus', 0.0):.2f} CPUs, steal {m.get('steal_cpus', 0.0):.2f}; "
        f"{report['wall_s']:.0f} s)")
    busy = m.get("other_cpus", 0.0) + m.get("steal_cpus", 0.0)
    if busy > 0.25:
        lines.append(f"WARNING: other processes (or the hypervisor) took {busy:.2f} of "
                     f"{m['usable_cpus']} CPUs during the run; the numbers do not describe "
                     f"an idle {m['usable_cpus']}-CPU machine.")
    return "\n".join(lines)


def _fs_type(path: str) -> str:
    best, fstype = "", "?"
    with contextlib.suppress(OSError), open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and path.startswith(parts[1]) and len(parts[1]) > len(best):
                best, fstype = parts[1], parts[2]
    return fstype


def run_benchmark(
    *,
    seconds: float = 2.0,
    warmup: float = 0.2,
    slices: int = 4,
    size: int = DEFAULT_SIZE,
    seq_depth: int = DEFAULT_SEQ_DEPTH,
    workloads: Sequence[str] = WORKLOADS,
    systems: Sequence[str] = SYSTEMS,
    directory: str | None = None,
    progress: Callable[[str], None] | None = None,
    api: str = "batch",
) -> dict[str, Any]:
    """Start the daemon and the socket server, run every case, return the report."""
    if size < 1 << 20 or size % (64 * KIB):
        raise ValueError("size must be a multiple of 64 KiB and at least 1 MiB")
    systems = [s for s in SYSTEMS if s in systems]
    workloads = [w for w in WORKLOADS if w in workloads]
    root = _bench_dir(directory)
    procs: list[Proc] = []
    t0 = time.perf_counter()
    try:
        image = os.path.join(root, "bench.img")
        make_image(image, size)
        daemon_sock = daemon_pid = sock_path = sock_pid = None
        if "pvio" in systems:
            daemon, daemon_sock = _start_daemon(root, size)
            procs.append(daemon)
            daemon_pid = daemon.pid
        if "socket" in systems:
            server, sock_path = _start_socket_server(root, image)
            procs.append(server)
            sock_pid = server.pid
        other = _OtherLoad([p.pid for p in procs])
        load_before = os.getloadavg()
        cases = trio.run(lambda: _run_all(
            image=image, size=size, daemon_sock=daemon_sock, daemon_pid=daemon_pid,
            sock_path=sock_path, sock_pid=sock_pid, workloads=workloads, systems=systems,
            seconds=seconds, warmup=warmup, slices=slices, seq_depth=seq_depth,
            progress=progress, api=api))
        other_cpus, steal_cpus = other.cpus()
        image_fs = _fs_type(root)
    finally:
        for p in reversed(procs):
            p.stop()
        shutil.rmtree(root, ignore_errors=True)
    ratios = _ratios(cases)
    machine = _machine()
    machine.update(loadavg_before=list(load_before), other_cpus=other_cpus,
                   steal_cpus=steal_cpus)
    return {
        "benchmark": "pvio bench block",
        "config": {"seconds": seconds, "warmup": warmup, "slices": slices, "size": size,
                   "seq_depth": seq_depth, "workloads": workloads, "systems": systems,
                   "api": api, "image_fs": image_fs},
        "wall_s": time.perf_counter() - t0,
        "cases": cases,
        "ratios": ratios,
        "targets": _targets(ratios, seq_depth),
        "machine": machine,
    }


# ------------------------------------------------------------------ entry


def _size(text: str) -> int:
    from pvio.config import ConfigError, parse_size

    try:
        value = parse_size(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value < 1 << 20 or value % (64 * KIB):
        raise argparse.ArgumentTypeError("size must be a multiple of 64K and at least 1M")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--seconds", type=positive(float), default=2.0, metavar="S",
        help="measured time per workload and system, excluding warm-ups (default: 2)")
    parser.add_argument(
        "--warmup", type=float, default=0.2, metavar="S",
        help="unmeasured warm-up of each case before its first slice (default: 0.2)")
    parser.add_argument(
        "--slices", type=positive(int), default=4, metavar="N",
        help="split each case's measured time into N slices, interleaved with the other "
        "systems' slices of the same workload (default: 4)")
    parser.add_argument(
        "--size", type=_size, default=DEFAULT_SIZE, metavar="BYTES",
        help="image size, e.g. 64M, 1G; pre-filled, so it must fit in the page cache "
        "(default: 256M)")
    parser.add_argument(
        "--seq-depth", type=positive(int), default=DEFAULT_SEQ_DEPTH, metavar="Q",
        help="requests in flight in the seq64k_read and seq64k_write workloads (at most 32, "
        f"the slots of blkfront's one-page ring; default: {DEFAULT_SEQ_DEPTH})")
    parser.add_argument(
        "--workloads", type=choices(WORKLOADS), default=list(WORKLOADS), metavar="W,W,...",
        help=f"which workloads to run (default: {','.join(WORKLOADS)})")
    parser.add_argument(
        "--systems", type=choices(SYSTEMS), default=list(SYSTEMS), metavar="S,S,...",
        help=f"which systems to run (default: {','.join(SYSTEMS)}); ratios need all three")
    parser.add_argument(
        "--api", choices=("batch", "tasks"), default="batch",
        help="how the pvio and socket clients keep Q>1 requests in flight: 'batch', two "
        "tasks each submitting Q/2 requests per read_many/write_many call (io_submit "
        "style; the default), or 'tasks', Q tasks each awaiting readinto/write")
    parser.add_argument(
        "--dir", metavar="DIR", default=None,
        help="where the temporary image and sockets go (default: /dev/shm when writable, "
        "so writes cause no disk writeback; else the system temp dir)")
    parser.add_argument(
        "--json", action="store_true",
        help="print one JSON object (cases, ratios, targets, machine) instead of the table; "
        "no progress lines")


def run(args: argparse.Namespace) -> int:
    if args.seq_depth > 32:
        print("pvio bench block: --seq-depth is at most 32 (the blkfront ring's slots)",
              file=sys.stderr)
        return 2

    return report("block", args.json, lambda: run_benchmark(
            seconds=args.seconds, warmup=args.warmup, slices=args.slices, size=args.size,
            seq_depth=args.seq_depth, workloads=args.workloads, systems=args.systems,
            directory=args.dir, progress=None if args.json else progress, api=args.api),
        format_table)


def main(argv: list[str] | None = None) -> int:
    return standalone("block", __doc__, add_arguments, run, argv)
