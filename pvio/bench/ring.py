"""Request/response round trips between two processes: a pvio shared ring
against the transports a Python user would otherwise pick.

A frontend (this process, the load generator) keeps Q blkif requests
outstanding against a backend (a forked child) that handles each request in
Python: it unpacks the request header with a precompiled struct.Struct,
checks the operation and segment count, and packs a blkif_response echoing
the id. That work is the same function for every transport; only the way the
bytes cross the process boundary differs:

  pvio         a multi-page blkif ring (112-byte requests, 16-byte responses)
               on a sealed memfd with eventfd event channels: notify only when
               RING_PUSH_*_AND_CHECK_NOTIFY says so; wait by spinning in C
               (GIL released, --busy-poll-us), then FINAL_CHECK, then eventfd
  pvio-nopoll  the same ring, sleeping on the eventfd as soon as it is empty
  pvio-nopoll-noahead
               the same without wake-ahead (not run by default: it shows what
               wake-ahead is worth). With it, an end woken with work kicks its
               peer at once if the peer waits for its next item, so that the
               peer's halted CPU wakes while the work is done
  socketpair   AF_UNIX stream socketpair carrying the same 112-byte requests
               and 16-byte responses: one sendall per batch, recv_into a
               reused buffer, partial records carried over
  mp.Pipe      multiprocessing.Pipe(): one send_bytes per batch,
               recv_bytes_into a reused buffer

At queue depth 1 every round trip is timed (p50/p99). At higher depths
requests/s are counted; pvio pushes in chunks of --chunk so that both
processes work at once, the others send each refill in one call (their
fastest overall). All transports of a depth run side by side, in interleaved time
slices, so background load hits them alike; the table gives ratios against
the socketpair, which drift much less than absolute numbers.

targets (2 vCPUs): Q=256 at least 2.5x the socketpair's requests/s; Q=1 p99
at most 15 us with busy-poll; Q=1 without busy-poll no worse than the
socketpair. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import multiprocessing
import os
import platform
import resource
import socket
import struct
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pvio import __version__
from pvio.bench._common import BenchError, choices, positive, progress, report, standalone
from pvio.layouts import BLKIF_MAX_SEGMENTS_PER_REQUEST, XEN_PAGE_SIZE, BlkifOp, BlkifRsp
from pvio.ring import (
    BLKIF,
    BackRing,
    BusyPoll,
    EventChannelTable,
    FrontRing,
    SharedMemory,
    wait_for_work_blocking,
)

TRANSPORTS = ("pvio", "pvio-nopoll", "socketpair", "mp.Pipe")
#: Run only when asked for (--transports): pvio-nopoll without wake-ahead.
EXTRA_TRANSPORTS = ("pvio-nopoll-noahead",)
BASELINE = "socketpair"
DEFAULT_DEPTHS = (1, 32, 256)

# blkif_request header (operation, nr_segments, handle, id, sector_number) plus
# the segment array left unparsed: exactly one 112-byte request per record, so
# iter_unpack walks a batch without slicing.
REQ = struct.Struct("<BBH4xQQ88x")
# blkif_request with its first segment (gref, first_sect, last_sect), to build
# the frontend's requests.
REQ_SEG0 = struct.Struct("<BBH4xQQIBB2x")
# blkif_response: id, operation, status.
RSP = struct.Struct("<QBxh4x")
REQ_SIZE = REQ.size
RSP_SIZE = RSP.size
assert BLKIF.req_size == REQ_SIZE and BLKIF.rsp_size == RSP_SIZE

OP_STOP = 0xFF  # a ring backend exits on a lone request with this operation
_OKAY = int(BlkifRsp.OKAY)
_ERROR = int(BlkifRsp.ERROR)
_OP_WRITE = int(BlkifOp.WRITE)  # READ (0) and WRITE (1) are served
_MAX_SEGS = BLKIF_MAX_SEGMENTS_PER_REQUEST
_WAIT_TIMEOUT = 2.0  # seconds a ring end sleeps before checking its peer is alive


# --------------------------------------------------------------- the work


def handle_batch(reqs, out: bytearray) -> int:
    """The backend's per-request work, identical for every transport.

    ``reqs`` holds whole 112-byte blkif requests; one 16-byte response per
    request is packed into ``out``. Returns the number of response bytes.
    """
    pack = RSP.pack_into
    off = 0
    for op, nseg, _handle, rid, _sector in REQ.iter_unpack(reqs):
        if op <= _OP_WRITE and 0 < nseg <= _MAX_SEGS:
            pack(out, off, rid, op, _OKAY)
        else:
            pack(out, off, rid, op, _ERROR)
        off += RSP_SIZE
    return off


def make_requests(depth: int) -> bytearray:
    """2 x depth READ requests with ids 0..depth-1 (twice over, so that any run
    of up to ``depth`` consecutive ids is one contiguous slice)."""
    buf = bytearray(2 * depth * REQ_SIZE)
    for i in range(2 * depth):
        rid = i % depth
        REQ_SEG0.pack_into(buf, i * REQ_SIZE, int(BlkifOp.READ), 1, 0, rid, rid * 8,
                           rid, 0, 7)
    return buf


# ------------------------------------------------------------- transports
#
# Each transport has a backend loop (run in the forked child) and a client
# with ``send(batch)`` and ``recv() -> memoryview`` of whole responses (blocking
# until at least one is there) used by the generic frontend drivers below.


@dataclass
class _Case:
    transport: str
    depth: int
    busy_poll_us: float
    pages: int
    chunk: int


def _usage() -> dict[str, float]:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"cpu_s": ru.ru_utime + ru.ru_stime, "voluntary_switches": ru.ru_nvcsw,
            "involuntary_switches": ru.ru_nivcsw}


_TICK = os.sysconf("SC_CLK_TCK")


def _rusage() -> tuple[float, int, int]:
    """(CPU seconds, voluntary, involuntary context switches) of this process."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime, ru.ru_nvcsw, ru.ru_nivcsw


def _cpu_of(pid: int) -> float:
    """CPU seconds used so far by process ``pid`` (clock-tick resolution)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def _proc_stat() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine so far, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        user, nice, system, _idle, _iowait, irq, softirq, steal = v[:8]
    except (OSError, ValueError):
        return 0.0, 0.0
    return (user + nice + system + irq + softirq) / _TICK, steal / _TICK


def _own_cpu_s() -> float:
    """CPU seconds of this process and its waited-for children (the backends)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + ch.ru_utime + ch.ru_stime


class _OtherLoad:
    """How many CPUs *other* processes (and the hypervisor, as steal) took
    while we measured. Tick-sampled, so good to about +-0.1 CPU."""

    def __init__(self) -> None:
        self.t, self.own = time.perf_counter(), _own_cpu_s()
        self.busy, self.steal = _proc_stat()

    def cpus(self) -> tuple[float, float]:
        """(CPUs used by other processes, CPUs stolen by the hypervisor)."""
        wall = time.perf_counter() - self.t
        busy, steal = _proc_stat()
        other = (busy - self.busy) - (_own_cpu_s() - self.own)
        if wall <= 0:
            return 0.0, 0.0
        return max(0.0, other / wall), max(0.0, (steal - self.steal) / wall)


def _usage_since(before: dict[str, float], wall: float) -> dict[str, float]:
    now = _usage()
    out = {k: now[k] - before[k] for k in now}
    out["cpu_util"] = out["cpu_s"] / wall if wall > 0 else 0.0
    return out


def _backend_main(loop: Callable[..., dict | None], stats_tx, close_first, *args) -> None:
    """Child process: run one transport's backend loop, then report its statistics."""
    for obj in close_first:  # the frontend's ends, inherited by fork: EOF must reach us
        obj.close()
    before, t0 = _usage(), time.perf_counter()
    extra = loop(*args) or {}
    stats = _usage_since(before, time.perf_counter() - t0)
    stats.update(extra)
    with contextlib.suppress(OSError):
        stats_tx.send(stats)


class _Client:
    """The frontend side of one case: a forked backend plus ``send``/``recv``."""

    send: Callable[[Any], Any]
    recv: Callable[[], memoryview]

    def _start(self, loop, close_first: tuple, *args) -> None:
        self.stats_rx, stats_tx = _CTX.Pipe(duplex=False)
        self.proc = _CTX.Process(target=_backend_main,
                                 args=(loop, stats_tx, (self.stats_rx, *close_first), *args),
                                 daemon=True)
        self.proc.start()
        stats_tx.close()

    def _stop(self) -> None:
        """Make the backend loop return (EOF, or a stop request)."""
        raise NotImplementedError

    def _extra(self) -> dict[str, Any]:
        return {}

    def close(self) -> dict[str, Any]:
        """Stop the backend; returns {"frontend": ..., "backend": its lifetime stats}."""
        stats: dict[str, Any] = {"frontend": self._extra()}
        self._stop()
        if self.stats_rx.poll(10):
            with contextlib.suppress(EOFError):
                stats["backend"] = self.stats_rx.recv()
        self.stats_rx.close()
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        return stats


def _ring_stats(end, chan, poll: BusyPoll | None) -> dict[str, int]:
    sent, suppressed = end.notifications
    kicks, wasted = end.wake_ahead_stats
    return {
        "notify_sent": sent,
        "notify_suppressed": suppressed,
        "events_received": chan.received,
        "spin_hits": poll.hits if poll else 0,
        "spin_misses": poll.misses if poll else 0,
        "wake_ahead_sent": kicks,
        "wake_ahead_wasted": wasted,
    }


def _ring_backend(shm_fd: int, pages: int, port: int, fds: tuple[int, int],
                  window_us: float, wake_ahead: bool) -> dict:
    shm = SharedMemory.from_fd(shm_fd, min_size=pages * XEN_PAGE_SIZE, name="bench-ring")
    back = BackRing.attach(BLKIF, shm.page(0, pages))
    chan = EventChannelTable(domid=1).bind_interdomain(0, port, fds)
    chan.wake_ahead = wake_ahead
    poll = BusyPoll(window_us) if window_us > 0 else None
    out = bytearray(back.nr_ents * RSP_SIZE)
    outv = memoryview(out)
    take, put, push = back.take_requests, back.put_responses, back.push_responses
    notify = chan.notify
    ppid = os.getppid()
    while True:
        reqs = take()  # everything available: fewer, larger batches
        if not reqs:
            if not wait_for_work_blocking(back, chan, poll, _WAIT_TIMEOUT) and \
                    os.getppid() != ppid:
                break  # the frontend is gone
            continue
        if reqs[0] == OP_STOP:
            break
        put(outv[: handle_batch(reqs, out)])
        if push():
            notify()
    return _ring_stats(back, chan, poll)


class _RingClient(_Client):
    def __init__(self, case: _Case) -> None:
        self.shm = SharedMemory.create(case.pages * XEN_PAGE_SIZE, name="bench-ring")
        self.page = self.shm.page(0, case.pages)
        self.front = FrontRing.init(BLKIF, self.page)
        self.table = EventChannelTable(domid=0)
        unbound = self.table.alloc_unbound(remote_domid=1)
        self.chan = unbound.channel
        self.chan.wake_ahead = case.transport != "pvio-nopoll-noahead"
        window = case.busy_poll_us if case.transport == "pvio" else 0.0
        self.poll = BusyPoll(window) if window > 0 else None
        self._start(_ring_backend, (), os.dup(self.shm.fileno()), case.pages, unbound.port,
                    unbound.peer_fds(), window, self.chan.wake_ahead)
        front, chan = self.front, self.chan
        put, push, notify = front.put_requests, front.push_requests, chan.notify
        take, poll, proc = front.take_responses, self.poll, self.proc

        def send(batch) -> None:
            if put(batch) * REQ_SIZE != len(batch):
                raise BenchError("ring full: more requests outstanding than slots")
            if push():
                notify()

        def recv() -> memoryview:
            while True:
                rsp = take()
                if rsp:
                    return rsp
                if not wait_for_work_blocking(front, chan, poll, _WAIT_TIMEOUT) and \
                        not proc.is_alive():
                    raise BenchError(f"ring backend died (exit code {proc.exitcode})")

        self.send, self.recv = send, recv

    def _extra(self) -> dict[str, Any]:
        return _ring_stats(self.front, self.chan, self.poll)

    def _stop(self) -> None:
        stop = bytearray(REQ_SIZE)
        stop[0] = OP_STOP
        self.send(stop)

    def close(self) -> dict[str, Any]:
        stats = super().close()
        self.table.close_all()
        # Drop everything exporting the mapping (the ring end holds a cffi
        # buffer on it) so that the memfd can be unmapped.
        del self.send, self.recv, self.front
        gc.collect()
        try:
            self.page.release()
            self.shm.close()
        except BufferError:  # still referenced from a traceback: leave it to exit
            pass
        return stats


def _socket_backend(sock: socket.socket, depth: int) -> None:
    buf = bytearray((depth + 1) * REQ_SIZE)
    view = memoryview(buf)
    out = bytearray(len(buf) // REQ_SIZE * RSP_SIZE)
    outv = memoryview(out)
    recv_into, sendall = sock.recv_into, sock.sendall
    have = 0
    while True:
        n = recv_into(view[have:])
        if not n:
            return
        have += n
        whole = have - have % REQ_SIZE
        if not whole:
            continue
        sendall(outv[: handle_batch(view[:whole], out)])
        have -= whole
        if have:  # a partial request: keep it at the front of the buffer
            buf[:have] = buf[whole : whole + have]


class _SocketClient(_Client):
    def __init__(self, case: _Case) -> None:
        self.sock, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._start(_socket_backend, (self.sock,), peer, case.depth)
        peer.close()
        buf = bytearray((case.depth + 1) * RSP_SIZE)
        view = memoryview(buf)
        recv_into = self.sock.recv_into
        self.send = self.sock.sendall
        carry = 0  # bytes of a partial response left behind the last batch
        last = 0  # where that partial response starts

        def recv() -> memoryview:
            nonlocal carry, last
            have = carry
            if have:
                buf[:have] = buf[last : last + have]
            while True:
                n = recv_into(view[have:])
                if not n:
                    raise BenchError("socketpair backend closed the connection")
                have += n
                whole = have - have % RSP_SIZE
                if whole:
                    carry, last = have - whole, whole
                    return view[:whole]

        self.recv = recv

    def _stop(self) -> None:
        self.sock.close()


def _pipe_backend(conn, depth: int) -> None:
    buf = bytearray(depth * REQ_SIZE)
    view = memoryview(buf)
    out = bytearray(depth * RSP_SIZE)
    outv = memoryview(out)
    recv_into, send = conn.recv_bytes_into, conn.send_bytes
    while True:
        try:
            n = recv_into(buf)
        except EOFError:
            return
        send(outv[: handle_batch(view[:n], out)])


class _PipeClient(_Client):
    def __init__(self, case: _Case) -> None:
        self.conn, peer = _CTX.Pipe()
        self._start(_pipe_backend, (self.conn,), peer, case.depth)
        peer.close()
        buf = bytearray(case.depth * RSP_SIZE)
        view = memoryview(buf)
        recv_into = self.conn.recv_bytes_into
        self.send = self.conn.send_bytes

        def recv() -> memoryview:
            try:
                return view[: recv_into(buf)]
            except EOFError:
                raise BenchError("mp.Pipe backend closed the connection") from None

        self.recv = recv

    def _stop(self) -> None:
        self.conn.close()


_CTX = multiprocessing.get_context("fork")
_CLIENTS = {
    "pvio": _RingClient,
    "pvio-nopoll": _RingClient,
    "pvio-nopoll-noahead": _RingClient,
    "socketpair": _SocketClient,
    "mp.Pipe": _PipeClient,
}


# ---------------------------------------------------------------- drivers
#
# All transports of one queue depth run side by side: their backends are
# forked up front and the frontend gives each transport a time slice in turn
# (the order rotates every round). Load from elsewhere on a shared machine
# then hits every transport alike, which keeps the ratios meaningful. Each
# slice starts and ends with nothing outstanding and has its own short
# unmeasured warm-up.


def _check_last(rsp: memoryview, want_id: int) -> None:
    rid, _op, status = RSP.unpack_from(rsp, len(rsp) - RSP_SIZE)
    if rid != want_id or status != _OKAY:
        raise BenchError(f"bad response: id {rid} status {status}, expected id {want_id} OKAY")


def _latency_slice(client, req: memoryview, warmup: float, seconds: float,
                   rtts: list[int]) -> tuple[int, float, int]:
    """Queue depth 1: time every round trip (appended to ``rtts``, in ns)."""
    send, recv, clock, record = client.send, client.recv, time.perf_counter_ns, rtts.append
    t1 = clock()
    measure_from = t1 + int(warmup * 1e9)
    end = measure_from + int(seconds * 1e9)
    while t1 < measure_from:
        send(req)
        recv()
        t1 = clock()
    first, n0 = t1, len(rtts)
    while True:  # at least one measured round trip
        t0 = clock()
        send(req)
        rsp = recv()
        t1 = clock()
        record(t1 - t0)
        if t1 >= end:
            break
    _check_last(rsp, 0)
    n = len(rtts) - n0
    return n, (t1 - first) / 1e9, n


def _throughput_slice(client, tv: memoryview, depth: int, chunk: int, warmup: float,
                      seconds: float) -> tuple[int, float, int]:
    """Queue depth > 1: keep ``depth`` requests outstanding, count responses.

    Returns (responses, seconds, recv calls) over the measured part.
    """
    send, recv, clock = client.send, client.recv, time.perf_counter
    for i in range(0, depth, chunk):
        send(tv[i * REQ_SIZE : min(depth, i + chunk) * REQ_SIZE])
    outstanding = depth
    pos = 0  # template index (= id) of the next request to reissue
    done = recvs = 0
    start = clock()
    measure_from, end = start + warmup, start + warmup + seconds
    first = None
    done0 = 0
    while True:
        rsp = recv()
        k = len(rsp) // RSP_SIZE
        done += k
        outstanding -= k
        recvs += 1
        now = clock()
        if first is None:
            if now >= measure_from:
                first, done0, recvs = now, done, 0
        elif now >= end:
            break
        # Responses come back in order: reissue the k requests just answered.
        i = 0
        while i < k:
            j = min(k, i + chunk)
            send(tv[(pos + i) * REQ_SIZE : (pos + j) * REQ_SIZE])
            i = j
        pos = (pos + k) % depth
        outstanding += k
    _check_last(rsp, (pos + k - 1) % depth)
    while outstanding:  # drain: the next slice starts from an idle transport
        outstanding -= len(recv()) // RSP_SIZE
    return done - done0, now - first, recvs


def _median(xs: Sequence[float]) -> float:
    ys = sorted(xs)
    n = len(ys)
    return ys[n // 2] if n % 2 else (ys[n // 2 - 1] + ys[n // 2]) / 2


def run_depth(depth: int, transports: Sequence[str], *, seconds: float, warmup: float,
              slices: int, busy_poll_us: float, pages: int, chunk: int, alt_chunk: int = 0,
              progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Measure every transport at one queue depth, interleaved; one row each."""
    other = _OtherLoad()
    reqs = make_requests(depth)
    tv = memoryview(reqs)
    req = tv[:REQ_SIZE]
    clients: dict[str, _Client] = {}
    acc = {t: {"requests": 0, "elapsed": 0.0, "recvs": 0, "rates": [], "rtts": [],
               "wall": 0.0, "cpu_front": 0.0, "cpu_back": 0.0, "vcsw": 0, "ivcsw": 0}
           for t in transports}
    slice_s = seconds / slices
    slice_warmup = min(0.05, slice_s / 4)
    # pvio pushes in chunks of ``chunk``; the alternatives send each refill in
    # one call (their fastest overall) unless ``alt_chunk`` says otherwise.
    chunks = {t: chunk if t.startswith("pvio") else (alt_chunk or depth) for t in transports}
    try:
        for t in transports:
            clients[t] = _CLIENTS[t](_Case(t, depth, busy_poll_us, pages, chunks[t]))
        gc.collect()
        gc.freeze()  # nothing allocated from here on forms cycles; keep gc pauses out
        for t in transports:  # warm up every transport once (fork, caches, wake-ups)
            if depth == 1:
                _latency_slice(clients[t], req, warmup, 0.0, [])
            else:
                _throughput_slice(clients[t], tv, depth, chunks[t], warmup, 0.0)
        for r in range(slices):
            for t in transports[r % len(transports):] + transports[: r % len(transports)]:
                a = acc[t]
                pid = clients[t].proc.pid
                w0, ru0, b0 = time.perf_counter(), _rusage(), _cpu_of(pid)
                if depth == 1:
                    n, el, calls = _latency_slice(clients[t], req, slice_warmup, slice_s,
                                                  a["rtts"])
                else:
                    n, el, calls = _throughput_slice(clients[t], tv, depth, chunks[t],
                                                     slice_warmup, slice_s)
                a["wall"] += time.perf_counter() - w0
                ru1 = _rusage()
                a["cpu_front"] += ru1[0] - ru0[0]
                a["vcsw"] += ru1[1] - ru0[1]
                a["ivcsw"] += ru1[2] - ru0[2]
                a["cpu_back"] += _cpu_of(pid) - b0
                a["requests"] += n
                a["elapsed"] += el
                a["recvs"] += calls
                a["rates"].append(n / el if el > 0 else 0.0)
    finally:
        gc.unfreeze()
        # Newest first: a backend forked later holds (by inheritance) the
        # frontend ends of the earlier ones, which would hide their EOF.
        stats = {t: clients[t].close() for t in reversed(list(clients))}
    other_cpus, steal_cpus = other.cpus()  # backends joined: their CPU time is ours
    rows = []
    for t in transports:
        a = acc[t]
        rate = a["requests"] / a["elapsed"] if a["elapsed"] > 0 else 0.0
        row: dict[str, Any] = {
            "transport": t,
            "depth": depth,
            "busy_poll_us": busy_poll_us if t == "pvio" else 0,
            "chunk": min(chunks[t], depth),
            "requests": a["requests"],
            "elapsed_s": a["elapsed"],
            "req_per_s": rate,
            "slices": len(a["rates"]),
            "slice_req_per_s_min": min(a["rates"]),
            "slice_req_per_s_median": _median(a["rates"]),
            "slice_req_per_s_max": max(a["rates"]),
            # CPUs busy while this transport ran (1.0 = one CPU fully used)
            "cpu_frontend": a["cpu_front"] / a["wall"],
            "cpu_backend": a["cpu_back"] / a["wall"],
            # CPUs other processes on the machine kept busy during this depth
            "other_cpus": other_cpus,
            "steal_cpus": steal_cpus,
        }
        if t.startswith("pvio"):
            row["ring_pages"] = pages
            row["ring_slots"] = BLKIF.nr_ents(pages)
        if depth == 1:
            rtts = a["rtts"]
            rtts.sort()
            n = len(rtts)

            def pct(p: float, rtts=rtts, n=n) -> float:
                return rtts[min(n - 1, int(p * n))] / 1000

            row.update(mean_us=sum(rtts) / n / 1000, p50_us=pct(0.50), p90_us=pct(0.90),
                       p99_us=pct(0.99), p999_us=pct(0.999), max_us=rtts[-1] / 1000)
        else:
            row["mean_us"] = depth / rate * 1e6  # Little's law
            row["responses_per_recv"] = a["requests"] / max(1, a["recvs"])
        # The frontend's numbers cover its measured slices; the backend's its life.
        row["frontend"] = {"cpu_s": a["cpu_front"], "voluntary_switches": a["vcsw"],
                           "involuntary_switches": a["ivcsw"], **stats[t]["frontend"]}
        if "backend" in stats[t]:
            row["backend"] = stats[t]["backend"]
        rows.append(row)
        if progress:
            lat = f", p50 {row['p50_us']:.1f} µs, p99 {row['p99_us']:.1f} µs" \
                if depth == 1 else ""
            progress(f"Q={depth:<4} {t:<12} {rate:>12,.0f} req/s{lat}")
    return rows


# ------------------------------------------------------------- reporting


def _machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        usable = os.cpu_count()
    return {
        "cpus": os.cpu_count(),
        "usable_cpus": usable,
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "pvio": __version__,
        "loadavg": list(os.getloadavg()),
    }


def _ratios(cases: list[dict]) -> dict[str, float | None]:
    by = {(c["transport"], c["depth"]): c for c in cases}

    def rate_ratio(transport: str, depth: int) -> float | None:
        a, b = by.get((transport, depth)), by.get((BASELINE, depth))
        return a["req_per_s"] / b["req_per_s"] if a and b else None

    def get(transport: str, depth: int, key: str) -> float | None:
        c = by.get((transport, depth))
        return c.get(key) if c else None

    def div(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    return {
        "q256_vs_socketpair": rate_ratio("pvio", 256),
        "q256_nopoll_vs_socketpair": rate_ratio("pvio-nopoll", 256),
        "q256_vs_pipe": div(get("pvio", 256, "req_per_s"), get("mp.Pipe", 256, "req_per_s")),
        "q32_vs_socketpair": rate_ratio("pvio", 32),
        "q32_nopoll_vs_socketpair": rate_ratio("pvio-nopoll", 32),
        "q1_vs_socketpair": rate_ratio("pvio", 1),
        "q1_p50_us": get("pvio", 1, "p50_us"),
        "q1_p99_us": get("pvio", 1, "p99_us"),
        "q1_p50_us_nopoll": get("pvio-nopoll", 1, "p50_us"),
        "q1_p99_us_nopoll": get("pvio-nopoll", 1, "p99_us"),
        "q1_p99_us_socketpair": get(BASELINE, 1, "p99_us"),
        "q1_nopoll_vs_socketpair_p50": div(get("pvio-nopoll", 1, "p50_us"),
                                           get(BASELINE, 1, "p50_us")),
        "q1_nopoll_vs_socketpair_p99": div(get("pvio-nopoll", 1, "p99_us"),
                                           get(BASELINE, 1, "p99_us")),
    }


def _targets(ratios: dict[str, float | None]) -> dict[str, dict[str, Any]]:
    def target(value: float | None, op: str, limit: float, what: str) -> dict[str, Any]:
        met = None if value is None else (value >= limit if op == ">=" else value <= limit)
        return {"what": what, "value": value, "target": f"{op} {limit:g}", "met": met}

    return {
        "q256_vs_socketpair": target(ratios["q256_vs_socketpair"], ">=", 2.5,
                                     "Q=256 req/s, pvio (busy-poll) / socketpair"),
        "q1_p99_us": target(ratios["q1_p99_us"], "<=", 15.0,
                            "Q=1 p99 round trip (µs), pvio with busy-poll"),
        "q1_nopoll_vs_socketpair_p99": target(
            ratios["q1_nopoll_vs_socketpair_p99"], "<=", 1.0,
            "Q=1 p99, pvio without busy-poll / socketpair"),
    }


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_table(report: dict[str, Any]) -> str:
    cases = report["cases"]
    base = {c["depth"]: c for c in cases if c["transport"] == BASELINE}
    w = max(12, *(len(c["transport"]) for c in cases))
    head = (f"{'transport':<{w}} {'Q':>4} {'req/s':>11} {'mean µs':>8} {'p50 µs':>7} "
            f"{'p99 µs':>7} {'CPUs':>5}  {'vs socketpair':<20}")
    lines = [head, "-" * len(head)]
    depth = None
    for c in cases:
        if depth is not None and c["depth"] != depth:
            lines.append("")
        depth = c["depth"]
        b = base.get(c["depth"])
        if b is None:
            vs = "-"
        elif c["depth"] == 1 and "p99_us" in c:
            vs = (f"{c['req_per_s'] / b['req_per_s']:.2f}x, p99 "
                  f"{c['p99_us'] / b['p99_us']:.2f}x")
        else:
            vs = f"{c['req_per_s'] / b['req_per_s']:.2f}x"
        lines.append(
            f"{c['transport']:<{w}} {c['depth']:>4} {c['req_per_s']:>11,.0f} "
            f"{c['mean_us']:>8.1f} {_fmt(c.get('p50_us'), '7.1f'):>7} "
            f"{_fmt(c.get('p99_us'), '7.1f'):>7} "
            f"{c['cpu_frontend'] + c['cpu_backend']:>5.2f}  {vs:<20}"
        )
    lines.append("")
    lines.append("vs socketpair: requests/s ratio (higher is better); at Q=1 also the p99 "
                 "ratio (lower is better).\nmean µs at Q>1 by Little's law; CPUs: CPU time "
                 "of both processes / wall time (busy-polling costs CPU).")
    lines.append("targets:")
    for t in report["targets"].values():
        v = t["value"]
        state = "n/a" if t["met"] is None else ("met" if t["met"] else "MISSED")
        lines.append(f"  {t['what']}: {_fmt(v, '.2f')} (target {t['target']}) {state}")
    cfg = report["config"]
    m = report["machine"]
    alt = f"chunks of {cfg['alt_chunk']}" if cfg["alt_chunk"] else "each refill at once"
    lines.append(
        f"({cfg['seconds']:g} s per case in {cfg['slices']} interleaved slices; busy-poll "
        f"{cfg['busy_poll_us']:g} µs; ring {cfg['pages']} pages = {cfg['ring_slots']} slots; "
        f"pvio pushes in chunks of {cfg['chunk']}, the others send {alt}; "
        f"{m['usable_cpus']} CPUs, Python {m['python']}, "
        f"other processes {m.get('other_cpus', 0.0):.2f} CPUs, steal "
        f"{m.get('steal_cpus', 0.0):.2f}; {report['wall_s']:.0f} s)"
    )
    busy = m.get("other_cpus", 0.0) + m.get("steal_cpus", 0.0)
    if busy > 0.25:
        lines.append(
            f"WARNING: other processes (or the hypervisor) took {busy:.2f} of "
            f"{m['usable_cpus']} CPUs during "
            "the run; the two benchmark processes then share a CPU (see CPUs above) and the "
            "numbers do not describe a {}-CPU machine.".format(m["usable_cpus"]))
    return "\n".join(lines)


# ------------------------------------------------------------------ entry


def run_benchmark(
    depths: Sequence[int] = DEFAULT_DEPTHS,
    *,
    seconds: float = 2.0,
    warmup: float = 0.3,
    slices: int = 8,
    busy_poll_us: float = 50.0,
    pages: int = 8,
    chunk: int = 32,
    alt_chunk: int = 0,
    transports: Sequence[str] = TRANSPORTS,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run every (depth, transport) case and return the report as a dict."""
    slots = BLKIF.nr_ents(pages)
    if max(depths) > slots:
        raise ValueError(f"queue depth {max(depths)} exceeds the {slots} slots of a "
                         f"{pages}-page blkif ring (use --pages)")
    transports = list(transports)
    load_before = os.getloadavg()
    other = _OtherLoad()
    t0 = time.perf_counter()
    cases: list[dict[str, Any]] = []
    for depth in depths:
        cases += run_depth(depth, transports, seconds=seconds, warmup=warmup, slices=slices,
                           busy_poll_us=busy_poll_us, pages=pages, chunk=chunk,
                           alt_chunk=alt_chunk,
                           progress=progress)
    wall = time.perf_counter() - t0
    ratios = _ratios(cases)
    for c in cases:
        b = next((x for x in cases if x["transport"] == BASELINE and x["depth"] == c["depth"]),
                 None)
        c["vs_socketpair"] = c["req_per_s"] / b["req_per_s"] if b else None
    machine = _machine()
    machine["loadavg_before"] = list(load_before)
    machine["other_cpus"], machine["steal_cpus"] = other.cpus()
    return {
        "benchmark": "pvio bench ring",
        "config": {
            "depths": list(depths),
            "transports": transports,
            "seconds": seconds,
            "warmup": warmup,
            "slices": slices,
            "busy_poll_us": busy_poll_us,
            "pages": pages,
            "ring_slots": slots,
            "chunk": chunk,
            "alt_chunk": alt_chunk,
            "request_bytes": REQ_SIZE,
            "response_bytes": RSP_SIZE,
        },
        "wall_s": wall,
        "cases": cases,
        "ratios": ratios,
        "targets": _targets(ratios),
        "machine": machine,
    }


def _depths(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of integers: {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("queue depths must be positive integers")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--depths", type=_depths, default=list(DEFAULT_DEPTHS), metavar="Q,Q,...",
        help="queue depths (requests kept outstanding); depth 1 measures the round-trip "
        "latency of each request, larger depths measure requests/s (default: 1,32,256)")
    parser.add_argument(
        "--seconds", type=positive(float), default=2.0, metavar="S",
        help="measured time per transport and depth, excluding warm-ups (default: 2)")
    parser.add_argument(
        "--warmup", type=float, default=0.3, metavar="S",
        help="unmeasured warm-up of each transport before its first slice (default: 0.3)")
    parser.add_argument(
        "--slices", type=positive(int), default=8, metavar="N",
        help="split each transport's measured time into N slices, interleaved with the "
        "other transports' slices so that background load hits all of them alike "
        "(default: 8)")
    parser.add_argument(
        "--busy-poll-us", type=float, default=50.0, metavar="US",
        help="busy-poll window of the 'pvio' cases, both ends: spin this long (GIL "
        "released) before arming the event and sleeping on the eventfd. The 'pvio-nopoll' "
        "cases never spin (default: 50)")
    parser.add_argument(
        "--pages", type=positive(int), default=8, metavar="N",
        help="ring size in 4 KiB pages; must hold the largest depth "
        "(8 pages = 256 blkif slots, 16 = 512; default: 8)")
    parser.add_argument(
        "--chunk", type=positive(int), default=32, metavar="N",
        help="the pvio frontend pushes requests in batches of at most N (one put+push "
        "each), so that both processes work in parallel (default: 32)")
    parser.add_argument(
        "--alt-chunk", type=int, default=0, metavar="N",
        help="the same for the socketpair and mp.Pipe frontends (one sendall/send_bytes "
        "each); 0, the default, sends each refill in one call, their fastest overall")
    parser.add_argument(
        "--transports", type=choices(TRANSPORTS + EXTRA_TRANSPORTS),
        default=list(TRANSPORTS), metavar="T,T,...",
        help=f"which transports to run (default: {','.join(TRANSPORTS)}; also "
        f"{','.join(EXTRA_TRANSPORTS)}); ratios need '{BASELINE}'")
    parser.add_argument(
        "--json", action="store_true",
        help="print one JSON object (cases, ratios, targets, machine) instead of the table; "
        "no progress lines")


def run(args: argparse.Namespace) -> int:
    slots = BLKIF.nr_ents(args.pages)
    if max(args.depths) > slots:
        print(f"pvio bench ring: queue depth {max(args.depths)} needs more than "
              f"{args.pages} ring pages ({slots} slots); raise --pages", file=sys.stderr)
        return 2

    return report("ring", args.json, lambda: run_benchmark(
        args.depths,
        seconds=args.seconds,
        warmup=args.warmup,
        slices=args.slices,
        busy_poll_us=args.busy_poll_us,
        pages=args.pages,
        chunk=args.chunk,
        alt_chunk=args.alt_chunk,
        transports=args.transports,
        progress=None if args.json else progress,
    ), format_table)


def main(argv: list[str] | None = None) -> int:
    return standalone("ring", __doc__, add_arguments, run, argv)
