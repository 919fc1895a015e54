"""Console throughput and echo latency: a pvio console against a plain pty
pair and a socketpair, measured in the same run.

Two ends per transport, as an operator and a guest see them: the host end is
this process (plain blocking os.read/os.write on one fd), the guest end a
forked child. Only the way the bytes cross differs:

  pvio        a ``pvio serve`` daemon (its own process) with one console; the
              guest child runs ConsoleFront (trio) on the daemon's guest socket;
              this process opens the backend's pty (published as ``tty``), the
              way ``pvio console``, screen or pexpect do. The bytes cross the
              pty, the daemon, the xencons rings (2 KiB out, 1 KiB in) and the
              event channel; the daemon also logs everything the guest writes
  pty         os.openpty(): the guest holds the slave (raw mode), this process
              the master: what a local program on a terminal gets
  socketpair  an AF_UNIX stream socketpair: the cheapest byte stream between
              two processes

Workloads:

  out   guest -> host bulk: the guest writes random bytes as fast as it can,
        the host reads them (console output, a guest dumping a log)
  in    host -> guest bulk: the host writes, the guest reads (a paste, a file
        sent over the console)
  echo  the host writes a --msg-size message and waits for the guest to echo
        it back, one message at a time; every round trip is timed (p50/p99):
        interactive typing and programs driving a REPL (pexpect)

Every request is checked: the crc32 of what one end sent matches what the
other end received, and echoes come back byte for byte. The transports of a
workload run in interleaved time slices (--slices) so background load hits
all of them alike; ratios are pvio / baseline (throughput: higher is better;
latency: lower is better).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import select
import shutil
import socket
import sys
import tempfile
import time
import tty
import zlib
from collections.abc import Callable, Sequence
from typing import Any

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
from pvio.bench.block import _cpu_of, _cpu_self, _OtherLoad
from pvio.bench.ring import _machine

TRANSPORTS = ("pvio", "pty", "socketpair")
BASELINES = ("pty", "socketpair")
WORKLOADS = ("out", "in", "echo")
DOMAIN = "bench"
BLOCK = 1 << 20  # the random data both ends cycle through
_IO_TIMEOUT = 30.0  # seconds without progress before a case is declared stuck


# ------------------------------------------------------------- the guests


def _cyclic(block: bytes, offset: int, n: int) -> memoryview:
    """``n`` bytes (at most len(block)) of ``block`` repeated, from ``offset``."""
    off = offset % len(block)
    if off + n <= len(block):
        return memoryview(block)[off:off + n]
    return memoryview(block[off:] + block[:n - (len(block) - off)])


def _plain_guest(fd: int, ctl, block: bytes) -> None:
    """A guest on a plain fd (pty slave or socket): serves the control pipe."""
    ctl.send(("ready", {}))
    while True:
        cmd = ctl.recv()
        if cmd[0] == "stop":
            return
        if cmd[0] == "out":
            n, sent, crc = cmd[1], 0, 0
            while sent < n:
                chunk = _cyclic(block, sent, min(65536, n - sent))
                k = os.write(fd, chunk)
                crc = zlib.crc32(chunk[:k], crc)
                sent += k
            ctl.send(("ok", {"crc": crc}))
        elif cmd[0] == "in":
            n, got, crc = cmd[1], 0, 0
            while got < n:
                data = os.read(fd, min(65536, n - got))
                if not data:
                    raise BenchError("guest: end of file while reading")
                crc = zlib.crc32(data, crc)
                got += len(data)
            ctl.send(("ok", {"crc": crc}))
        elif cmd[0] == "echo":
            count, size = cmd[1], cmd[2]
            for _ in range(count):
                msg = bytearray()
                while len(msg) < size:
                    msg += os.read(fd, size - len(msg))
                view = memoryview(msg)
                while view:
                    view = view[os.write(fd, view):]
            ctl.send(("ok", {}))


def _pvio_guest(sock: str, ctl, block: bytes) -> None:
    """The guest end of the pvio console: ConsoleFront on the daemon's socket."""
    import trio

    from pvio.frontends.console import open_console
    from pvio.frontends.session import open_session

    async def recv_cmd():
        while not ctl.poll():
            await trio.lowlevel.wait_readable(ctl.fileno())
        return ctl.recv()

    async def main() -> None:
        async with open_session(sock, DOMAIN, pool_pages=16) as session:
            front = await open_console(session)
            stream = front.stream
            ctl.send(("ready", {}))
            while True:
                cmd = await recv_cmd()
                if cmd[0] == "stop":
                    break
                if cmd[0] == "out":
                    n, sent, crc = cmd[1], 0, 0
                    while sent < n:
                        chunk = _cyclic(block, sent, min(65536, n - sent))
                        await stream.send_all(chunk)
                        crc = zlib.crc32(chunk, crc)
                        sent += len(chunk)
                    reply = {"crc": crc}
                elif cmd[0] == "in":
                    n, got, crc = cmd[1], 0, 0
                    while got < n:
                        data = await stream.receive_some()
                        crc = zlib.crc32(data, crc)
                        got += len(data)
                    reply = {"crc": crc}
                else:
                    count, size = cmd[1], cmd[2]
                    for _ in range(count):
                        msg = bytearray()
                        while len(msg) < size:
                            msg += await stream.receive_some(size - len(msg))
                        await stream.send_all(msg)
                    reply = {}
                reply["throttled"] = stream.throttled
                ctl.send(("ok", reply))
            front.stream = None
            del stream

    trio.run(main)


def _guest_entry(kind: str, arg, ctl, block: bytes, close_fds: Sequence[int]) -> None:
    for fd in close_fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    try:
        if kind == "pvio":
            _pvio_guest(arg, ctl, block)
        else:
            _plain_guest(arg, ctl, block)
    except BaseException as exc:  # tell the host instead of dying silently
        with contextlib.suppress(Exception):
            ctl.send(("error", {"error": f"{type(exc).__name__}: {exc}"}))
        raise


# ------------------------------------------------------------- the host side


class _Transport:
    """The host end of one transport: an fd, the guest child and its control pipe."""

    def __init__(self, name: str, fd: int, proc, ctl) -> None:
        self.name, self.fd, self.proc, self.ctl = name, fd, proc, ctl
        self.daemon_pid: int | None = None
        self.throttled = 0

    def call(self, *cmd, timeout: float = _IO_TIMEOUT) -> dict:
        self.ctl.send(cmd)
        return self.reply(timeout)

    def reply(self, timeout: float = _IO_TIMEOUT) -> dict:
        if not self.ctl.poll(timeout):
            raise BenchError(f"{self.name}: the guest did not answer within {timeout:.0f} s")
        kind, info = self.ctl.recv()
        if kind == "error":
            raise BenchError(f"{self.name}: the guest failed: {info['error']}")
        if "throttled" in info:
            self.throttled = info["throttled"]
        return info

    def pids(self) -> list[int]:
        return [p for p in (self.proc.pid, self.daemon_pid) if p]

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            if self.proc.is_alive():
                self.ctl.send(("stop",))
        self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.terminate()  # SIGTERM to this child's pid
            self.proc.join(timeout=5)
        with contextlib.suppress(OSError):
            os.close(self.fd)


def _wait_io(fd: int, write: bool, what: str) -> None:
    r, w, _ = select.select([] if write else [fd], [fd] if write else [], [], _IO_TIMEOUT)
    if not (r or w):
        raise BenchError(f"{what}: no progress for {_IO_TIMEOUT:.0f} s")


def _read_n(t: _Transport, n: int) -> int:
    got, crc = 0, 0
    while got < n:
        _wait_io(t.fd, False, t.name)
        data = os.read(t.fd, min(65536, n - got))
        if not data:
            raise BenchError(f"{t.name}: end of file")
        crc = zlib.crc32(data, crc)
        got += len(data)
    return crc


def _write_n(t: _Transport, n: int, block: bytes) -> int:
    sent, crc = 0, 0
    while sent < n:
        chunk = _cyclic(block, sent, min(65536, n - sent))
        _wait_io(t.fd, True, t.name)
        k = os.write(t.fd, chunk)
        crc = zlib.crc32(chunk[:k], crc)
        sent += k
    return crc


def _out(t: _Transport, n: int, block: bytes) -> None:
    t.ctl.send(("out", n))
    crc = _read_n(t, n)
    if t.reply()["crc"] != crc:
        raise BenchError(f"{t.name}: guest -> host data corrupted (crc mismatch)")


def _in(t: _Transport, n: int, block: bytes) -> None:
    t.ctl.send(("in", n))
    crc = _write_n(t, n, block)
    if t.reply()["crc"] != crc:
        raise BenchError(f"{t.name}: host -> guest data corrupted (crc mismatch)")


def _echo(t: _Transport, count: int, size: int, rtts: list[int], seq: list[int]) -> None:
    t.ctl.send(("echo", count, size))
    for _ in range(count):
        seq[0] += 1
        msg = (b"%x:" % seq[0]).ljust(size, b".")[:size]
        t0 = time.perf_counter_ns()
        view = memoryview(msg)
        while view:
            _wait_io(t.fd, True, t.name)
            view = view[os.write(t.fd, view):]
        got = bytearray()
        while len(got) < size:
            _wait_io(t.fd, False, t.name)
            got += os.read(t.fd, size - len(got))
        rtts.append(time.perf_counter_ns() - t0)
        if got != msg:
            raise BenchError(f"{t.name}: echo came back different: {bytes(got)!r}")
    t.reply()


class _Acc:
    def __init__(self) -> None:
        self.bytes = 0
        self.elapsed = 0.0
        self.requests = 0
        self.rtts: list[int] = []
        self.cpu_host = self.cpu_guest = self.cpu_daemon = 0.0
        self.throttled = 0


def _run_slice(t: _Transport, workload: str, seconds: float, acc: _Acc, sizes: dict,
               block: bytes, msg_size: int, seq: list[int], *, measure: bool = True) -> None:
    """Requests of ``workload`` on ``t`` for about ``seconds``; each request's size
    adapts so that it lasts about a quarter of the slice."""
    target = max(seconds / 4, 0.01)
    th0 = t.throttled
    c0 = (_cpu_self(), _cpu_of(t.proc.pid), _cpu_of(t.daemon_pid))
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        n = sizes[workload]
        r0 = time.perf_counter()
        if workload == "out":
            _out(t, n, block)
        elif workload == "in":
            _in(t, n, block)
        else:
            _echo(t, n, msg_size, acc.rtts if measure else [], seq)
        took = time.perf_counter() - r0
        if measure:
            acc.requests += 1
            acc.bytes += n if workload != "echo" else 2 * n * msg_size
        low, high = (1, 10_000) if workload == "echo" else (4096, 64 << 20)
        if took < target / 2:
            sizes[workload] = min(high, n * 2)
        elif took > target * 2:
            sizes[workload] = max(low, n // 2)
    if measure:
        acc.elapsed += time.perf_counter() - start
        acc.cpu_host += _cpu_self() - c0[0]
        acc.cpu_guest += _cpu_of(t.proc.pid) - c0[1]
        acc.cpu_daemon += _cpu_of(t.daemon_pid) - c0[2]
        acc.throttled += t.throttled - th0


def _pct(values: list[int], p: float) -> float:
    return values[min(len(values) - 1, int(p * len(values)))] / 1000


def _case_row(transport: str, workload: str, acc: _Acc, msg_size: int) -> dict[str, Any]:
    wall = max(acc.elapsed, 1e-9)
    row: dict[str, Any] = {
        "transport": transport,
        "workload": workload,
        "requests": acc.requests,
        "bytes": acc.bytes,
        "elapsed_s": acc.elapsed,
        "mb_per_s": acc.bytes / wall / 1e6,
        "cpu_host": acc.cpu_host / wall,
        "cpu_guest": acc.cpu_guest / wall,
    }
    if transport == "pvio":
        row["cpu_daemon"] = acc.cpu_daemon / wall
        row["guest_throttled"] = acc.throttled
    if workload == "echo":
        rtts = sorted(acc.rtts)
        n = len(rtts)
        row.update(round_trips=n, msg_size=msg_size, rt_per_s=n / wall,
                   mean_us=sum(rtts) / max(n, 1) / 1000, p50_us=_pct(rtts, 0.50),
                   p90_us=_pct(rtts, 0.90), p99_us=_pct(rtts, 0.99), max_us=rtts[-1] / 1000)
    return row


# ------------------------------------------------------------- setup


def _start_daemon(root: str) -> tuple[Proc, str]:
    sock = os.path.join(root, "xb.sock")
    config = os.path.join(root, "bench.toml")
    with open(config, "w") as f:
        f.write(f'[[domain]]\nname = "{DOMAIN}"\n\n  [[domain.device]]\n'
                '  type = "console"\n  devid = 0\n')
    return start_serve(sock, root, os.path.join(root, "serve.log"), config), sock


def _find_tty(sock: str) -> str:
    import trio

    from pvio._console_cli import _find_tty as find

    return trio.run(find, sock + ".admin", DOMAIN, 0)[1]


def _backend_statistics(sock: str) -> dict[str, int]:
    import trio

    from pvio.xenbus.client import open_client

    async def read() -> dict[str, int]:
        out: dict[str, int] = {}
        async with open_client(sock + ".admin") as xs:
            for domid in await xs.directory("/local/domain/0/backend/console"):
                base = f"/local/domain/0/backend/console/{domid}/0/statistics"
                with contextlib.suppress(Exception):
                    for key in await xs.directory(base):
                        raw = await xs.read_or_none(f"{base}/{key}")
                        if raw and raw.isdigit():
                            out[key] = int(raw)
        return out

    try:
        return trio.run(read)
    except Exception:  # statistics are a bonus; never fail the run for them
        return {}


def _start(transports: Sequence[str], root: str, block: bytes):
    """Start the daemon (if pvio runs) and fork every guest *before* this process
    runs trio (the pvio guest runs trio in its child)."""
    ctx = multiprocessing.get_context("fork")
    daemon, sock = (_start_daemon(root) if "pvio" in transports else (None, None))
    started: list[_Transport] = []
    try:
        for name in transports:
            parent_ctl, child_ctl = ctx.Pipe()
            if name == "pty":
                host_fd, guest_fd = os.openpty()
                tty.setraw(guest_fd)
                arg, close = guest_fd, [host_fd]
            elif name == "socketpair":
                a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                host_fd, guest_fd = a.detach(), b.detach()
                arg, close = guest_fd, [host_fd]
            else:
                host_fd, guest_fd, arg, close = -1, -1, sock, []
            close += [t.fd for t in started]
            proc = ctx.Process(target=_guest_entry, args=(name, arg, child_ctl, block, close),
                               name=f"pvio-bench-console-{name}", daemon=True)
            proc.start()
            child_ctl.close()
            if guest_fd >= 0:
                os.close(guest_fd)
            t = _Transport(name, host_fd, proc, parent_ctl)
            started.append(t)
        for t in started:
            t.reply(timeout=30)  # "ready"
            if t.name == "pvio":
                t.fd = os.open(_find_tty(sock), os.O_RDWR | os.O_NOCTTY)
                t.daemon_pid = daemon.pid
    except BaseException:
        for t in started:
            t.stop()
        if daemon is not None:
            daemon.stop()
        raise
    return daemon, sock, started


# ------------------------------------------------------------- reporting


def _ratios(cases: list[dict]) -> dict[str, float | None]:
    by = {(c["transport"], c["workload"]): c for c in cases}

    def get(transport: str, workload: str, key: str) -> float | None:
        c = by.get((transport, workload))
        return c.get(key) if c else None

    def div(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    out: dict[str, float | None] = {}
    for base in BASELINES:
        for w in ("out", "in"):
            out[f"{w}_vs_{base}"] = div(get("pvio", w, "mb_per_s"), get(base, w, "mb_per_s"))
        for p in ("p50", "p99"):
            out[f"echo_{p}_vs_{base}"] = div(get("pvio", "echo", f"{p}_us"),
                                              get(base, "echo", f"{p}_us"))
    out.update(
        out_mb_per_s=get("pvio", "out", "mb_per_s"),
        in_mb_per_s=get("pvio", "in", "mb_per_s"),
        echo_p50_us=get("pvio", "echo", "p50_us"),
        echo_p99_us=get("pvio", "echo", "p99_us"),
    )
    return out


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_table(report: dict[str, Any]) -> str:
    cases = report["cases"]
    by = {(c["transport"], c["workload"]): c for c in cases}
    head = (f"{'workload':<8} {'transport':<11} {'MB/s':>8} {'rt/s':>8} {'p50 µs':>9} "
            f"{'p99 µs':>9} {'CPUs':>5}  {'vs pty':>8} {'vs socketpair':>13}")
    lines = [head, "-" * len(head)]
    workload = None
    for c in cases:
        if workload is not None and c["workload"] != workload:
            lines.append("")
        workload = c["workload"]
        vs = []
        for base in BASELINES:
            b = by.get((base, c["workload"]))
            if not b or b is c:
                vs.append("-")
            elif c["workload"] == "echo":
                vs.append(f"{c['p99_us'] / b['p99_us']:.2f}x p99")
            else:
                vs.append(f"{c['mb_per_s'] / b['mb_per_s']:.2f}x")
        cpus = c["cpu_host"] + c["cpu_guest"] + c.get("cpu_daemon", 0.0)
        lines.append(
            f"{c['workload']:<8} {c['transport']:<11} {c['mb_per_s']:>8.2f} "
            f"{_fmt(c.get('rt_per_s'), '8,.0f'):>8} {_fmt(c.get('p50_us'), '9.1f'):>9} "
            f"{_fmt(c.get('p99_us'), '9.1f'):>9} {cpus:>5.2f}  {vs[0]:>8} {vs[1]:>13}")
    lines.append("")
    lines.append("vs: out/in MB/s ratio (higher is better); echo: p99 ratio (lower is better). "
                 "CPUs: CPU time of\nthe host, guest (and pvio daemon) processes / wall time.")
    guest = {c["workload"]: c["guest_throttled"] for c in cases if c.get("guest_throttled")}
    backend = report.get("pvio_backend_statistics", {}).get("throttled")
    if guest or backend:
        per = ", ".join(f"{w} {n}" for w, n in guest.items()) or "none"
        lines.append(f"pvio rate limit (wake-ups that moved nothing, up to 200 ms each): "
                     f"guest stream throttled {per}; backend stream {backend or 0} times "
                     "in the run.")
    cfg, m = report["config"], report["machine"]
    lines.append(
        f"({cfg['seconds']:g} s per case in {cfg['slices']} interleaved slices; echo "
        f"messages of {cfg['msg_size']} bytes; {m['usable_cpus']} CPUs, Python "
        f"{m['python']}, other processes {m.get('other_cpus', 0.0):.2f} CPUs, steal "
        f"{m.get('steal_cpus', 0.0):.2f}; {report['wall_s']:.0f} s)")
    busy = m.get("other_cpus", 0.0) + m.get("steal_cpus", 0.0)
    if busy > 0.25:
        lines.append(f"WARNING: other processes (or the hypervisor) took {busy:.2f} of "
                     f"{m['usable_cpus']} CPUs during the run; the numbers do not describe "
                     f"an idle {m['usable_cpus']}-CPU machine.")
    return "\n".join(lines)


# ------------------------------------------------------------------ entry


def run_benchmark(
    *,
    seconds: float = 1.0,
    warmup: float = 0.1,
    slices: int = 4,
    msg_size: int = 64,
    workloads: Sequence[str] = WORKLOADS,
    transports: Sequence[str] = TRANSPORTS,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run every (workload, transport) case and return the report as a dict."""
    transports, workloads = list(transports), list(workloads)
    block = os.urandom(BLOCK)
    root = tempfile.mkdtemp(prefix="pvio-bench-console-", dir="/tmp")
    t_start = time.perf_counter()
    daemon = sock = None
    started: list[_Transport] = []
    cases: list[dict[str, Any]] = []
    try:
        daemon, sock, started = _start(transports, root, block)
        pids = [p for t in started for p in t.pids()]
        other = _OtherLoad(pids)
        seq = [0]
        for workload in workloads:
            accs = {t.name: _Acc() for t in started}
            sizes = {t.name: {"out": 65536, "in": 65536, "echo": 8} for t in started}
            for t in started:  # unmeasured warm-up; also sizes the requests
                _run_slice(t, workload, warmup, accs[t.name], sizes[t.name], block,
                           msg_size, seq, measure=False)
            for i in range(slices):
                order = started[i % len(started):] + started[:i % len(started)]
                for t in order:
                    _run_slice(t, workload, seconds / slices, accs[t.name], sizes[t.name],
                               block, msg_size, seq)
            for t in started:
                row = _case_row(t.name, workload, accs[t.name], msg_size)
                cases.append(row)
                if progress:
                    lat = (f", p50 {row['p50_us']:.0f} µs, p99 {row['p99_us']:.0f} µs"
                           if workload == "echo" else "")
                    progress(f"{workload:<5} {t.name:<11} {row['mb_per_s']:>9.2f} MB/s{lat}")
        other_cpus, steal_cpus = other.cpus()
        backend: dict[str, int] = {}
        if sock:
            time.sleep(1.1)  # the daemon publishes its counters once a second
            backend = _backend_statistics(sock)
    finally:
        for t in started:
            t.stop()
        if daemon is not None:
            daemon.stop()
        shutil.rmtree(root, ignore_errors=True)
    machine = _machine()
    machine["other_cpus"], machine["steal_cpus"] = other_cpus, steal_cpus
    return {
        "benchmark": "pvio bench console",
        "config": {
            "seconds": seconds,
            "warmup": warmup,
            "slices": slices,
            "msg_size": msg_size,
            "workloads": workloads,
            "transports": transports,
            "ring_bytes": {"out": 2048, "in": 1024},
        },
        "wall_s": time.perf_counter() - t_start,
        "cases": cases,
        "ratios": _ratios(cases),
        "pvio_backend_statistics": backend,
        "machine": machine,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--seconds", type=positive(float), default=1.0, metavar="S",
        help="measured time per workload and transport, excluding warm-ups (default: 1)")
    parser.add_argument(
        "--warmup", type=float, default=0.1, metavar="S",
        help="unmeasured warm-up of each case before its first slice (default: 0.1)")
    parser.add_argument(
        "--slices", type=positive(int), default=4, metavar="N",
        help="split each case's measured time into N slices, interleaved with the other "
        "transports' slices of the same workload (default: 4)")
    parser.add_argument(
        "--msg-size", type=positive(int), default=64, metavar="BYTES",
        help="size of each echo message (default: 64; at most 1024, the console's "
        "input ring)")
    parser.add_argument(
        "--workloads", type=choices(WORKLOADS), default=list(WORKLOADS), metavar="W,W,...",
        help=f"which workloads to run (default: {','.join(WORKLOADS)})")
    parser.add_argument(
        "--transports", type=choices(TRANSPORTS), default=list(TRANSPORTS),
        metavar="T,T,...",
        help=f"which transports to run (default: {','.join(TRANSPORTS)}); ratios need "
        "pvio and the baseline")
    parser.add_argument(
        "--json", action="store_true",
        help="print one JSON object (cases, ratios, machine) instead of the table; "
        "no progress lines")


def run(args: argparse.Namespace) -> int:
    if args.msg_size > 1024:
        print("pvio bench console: --msg-size is at most 1024 (the console's input ring)",
              file=sys.stderr)
        return 2

    return report("console", args.json, lambda: run_benchmark(
            seconds=args.seconds, warmup=args.warmup, slices=args.slices,
            msg_size=args.msg_size, workloads=args.workloads, transports=args.transports,
            progress=None if args.json else progress), format_table)


def main(argv: list[str] | None = None) -> int:
    return standalone("console", __doc__, add_arguments, run, argv)
