"""The alternatives ``pvio bench net`` measures pvio's network path against.

  veth_tcp            the kernel's own answer: iperf3 TCP between two network
                      namespaces joined by a veth pair (bulk throughput, big segments,
                      no Python anywhere)
  relay_small_frames  what a Python user would otherwise write to join two endpoints
                      that exchange small frames: a sender process writes
                      ``frame_size``-byte datagrams as fast as it can to a Unix
                      datagram socket, a Python relay process forwards each one
                      (``recv_into`` a bytearray, ``send`` the slice) over a second
                      Unix datagram socket to a receiver process that counts them

Unix datagram sockets give the relay path backpressure for free: a blocking sender
waits while its peer's receive queue is full (``net.unix.max_dgram_qlen``), so
nothing is dropped and nothing queues without bound; the rate measured is the rate
the slowest of the three processes sustains.

Both return plain dicts; failures raise BenchError.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time

from pvio._netns import Netns, available, stop_process, veth_pair
from pvio.bench._common import BenchError

IPERF_PORT = 5201
_SERVER_ADDR, _CLIENT_ADDR = "10.201.0.1", "10.201.0.2"
_START_TIMEOUT = 10.0


# ------------------------------------------------------------ veth + iperf3


def _listening(ns: Netns, port: int) -> bool:
    """Whether something in ``ns`` listens on TCP ``port`` (read from /proc, no
    connection: a probe connection would be the one test of ``iperf3 -s -1``)."""
    tables = ns.run("cat", "/proc/net/tcp", "/proc/net/tcp6").stdout
    want = f":{port:04X}"
    for line in tables.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 3 and fields[1].endswith(want) and fields[3] == "0A":  # LISTEN
            return True
    return False


def iperf3_tcp(server_ns: Netns, client_ns: Netns, server_addr: str, seconds: float,
               extra: tuple[str, ...] = ()) -> dict:
    """One iperf3 TCP test from ``client_ns`` to ``server_addr`` in ``server_ns``.

    ``seconds`` is rounded to whole seconds (at least 1): iperf3's ``-t`` is an
    integer. Returns ``bits_per_second`` (end.sum_received), ``retransmits``
    (end.sum_sent), the ``bytes`` and ``seconds`` of sum_received, and the
    per-interval receive rates (``intervals``, bits/s) to spot stalls."""
    if shutil.which("iperf3") is None:
        raise BenchError("iperf3 is not installed")
    duration = max(1, round(seconds))
    server = server_ns.popen(
        "iperf3", "-s", "-1", "-J", "-B", server_addr, "-p", str(IPERF_PORT),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        deadline = time.monotonic() + _START_TIMEOUT
        while not _listening(server_ns, IPERF_PORT):
            if server.poll() is not None:
                out, err = server.communicate()
                raise BenchError(f"iperf3 server exited ({server.returncode}): "
                                 f"{(err or out).strip()[-2000:]}")
            if time.monotonic() > deadline:
                raise BenchError(f"iperf3 server not listening after {_START_TIMEOUT} s")
            time.sleep(0.02)
        client = client_ns.run(
            "iperf3", "-c", server_addr, "-p", str(IPERF_PORT), "-t", str(duration),
            "-J", *extra, check=False, timeout=duration + 30)
        try:
            result = json.loads(client.stdout)
        except ValueError:
            raise BenchError(f"iperf3 client (exit {client.returncode}) printed no JSON: "
                             f"{(client.stderr or client.stdout).strip()[-2000:]}"
                             ) from None
        if client.returncode != 0 or "error" in result:
            raise BenchError(f"iperf3 client failed (exit {client.returncode}): "
                             f"{result.get('error', client.stderr.strip())}")
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.communicate(timeout=5)  # -1: it exits after this one test
    finally:
        stop_process(server)
    try:
        received = result["end"]["sum_received"]
        sent = result["end"]["sum_sent"]
        return {
            "bits_per_second": float(received["bits_per_second"]),
            "retransmits": int(sent["retransmits"]),
            "bytes": int(received["bytes"]),
            "seconds": float(received["seconds"]),
            "intervals": [float(i["sum"]["bits_per_second"]) for i in result["intervals"]],
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise BenchError(f"iperf3 JSON without end.sum_received/sum_sent: {exc!r}") from None


def veth_tcp(seconds: float) -> dict:
    """iperf3 TCP throughput from one namespace to another over a veth pair
    (see :func:`iperf3_tcp` for what is returned)."""
    reason = available()
    if reason is not None:
        raise BenchError(f"veth baseline: {reason}")
    try:
        with Netns("pvio-srv") as server_ns, Netns("pvio-cli") as client_ns:
            veth_pair(server_ns, client_ns, f"{_SERVER_ADDR}/24", f"{_CLIENT_ADDR}/24")
            return iperf3_tcp(server_ns, client_ns, _SERVER_ADDR, seconds)
    except RuntimeError as exc:  # Netns / veth_pair / run failures
        if isinstance(exc, BenchError):
            raise
        raise BenchError(f"veth baseline: {exc}") from exc


# ------------------------------------------------------------ Unix datagram relay

# Each program prints "ready" once its sockets are set up.

_RECEIVER = r"""
import json, signal, socket, sys, time
path, size, warmup, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(path)
print("ready", flush=True)
buf = bytearray(65536)
recv_into = s.recv_into
frames = bad = 0
mark = None

class Done(Exception):
    pass

def tick(signum, frame):
    global mark
    if mark is None:  # end of the warmup: the measurement starts
        mark = (frames, time.perf_counter())
        return
    raise Done

signal.signal(signal.SIGALRM, tick)
if recv_into(buf) != size:  # the first frame starts the clock
    bad += 1
frames = 1
signal.setitimer(signal.ITIMER_REAL, warmup, seconds)
try:
    while True:
        if recv_into(buf) != size:
            bad += 1
        frames += 1
except Done:
    end = (frames, time.perf_counter())
signal.setitimer(signal.ITIMER_REAL, 0)
print(json.dumps({"frames": end[0] - mark[0], "seconds": end[1] - mark[1], "bad": bad}),
      flush=True)
"""

_RELAY = r"""
import socket, sys
listen_path, out_path = sys.argv[1], sys.argv[2]
inp = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
inp.bind(listen_path)
out = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
out.connect(out_path)
print("ready", flush=True)
buf = bytearray(65536)
view = memoryview(buf)
recv_into = inp.recv_into
send = out.send
while True:
    n = recv_into(buf)
    send(view[:n])
"""

_SENDER = r"""
import socket, sys
path, size = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.connect(path)
print("ready", flush=True)
frame = bytes(range(256)) * (size // 256) + bytes(size % 256)
send = s.send
while True:
    send(frame)
"""


def _start(code: str, args: list[str], tmp: str, role: str) -> subprocess.Popen:
    with open(os.path.join(tmp, f"{role}.err"), "wb") as err:  # the child keeps its copy
        return subprocess.Popen([sys.executable, "-I", "-c", code, *args],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=err, text=True)


def _stderr(tmp: str, role: str) -> str:
    try:
        with open(os.path.join(tmp, f"{role}.err"), errors="replace") as f:
            return f.read().strip()[-2000:]
    except OSError:
        return ""


def _read_line(proc: subprocess.Popen, timeout: float, tmp: str, role: str) -> str:
    """The next stdout line of ``proc``; BenchError if it exits or stays silent."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""
    if not line:
        if proc.poll() is None:
            raise BenchError(f"relay baseline: the {role} printed nothing in time")
        raise BenchError(f"relay baseline: the {role} exited ({proc.returncode}): "
                         f"{_stderr(tmp, role) or '(no stderr)'}")
    return line


def relay_small_frames(seconds: float, frame_size: int = 64, *,
                       warmup: float = 0.5) -> dict:
    """Frames per second a sender -> Python relay -> receiver chain of three processes
    moves over Unix datagram sockets, ``frame_size`` bytes each.

    The receiver starts its clock at the first frame, lets ``warmup`` seconds pass,
    then counts the frames of the next ``seconds`` seconds (a SIGALRM interval timer
    marks both ends, so its receive loop does no timekeeping of its own). Returns
    ``frames_per_second``, ``frames`` and ``seconds`` of that window."""
    if not 0 < frame_size <= 65536:
        raise ValueError(f"frame_size must be 1..65536, not {frame_size}")
    if seconds <= 0 or warmup <= 0:
        raise ValueError("seconds and warmup must be > 0")
    tmp = tempfile.mkdtemp(prefix="pvio-relay-")
    recv_path = os.path.join(tmp, "receiver.sock")
    relay_path = os.path.join(tmp, "relay.sock")
    procs: list[subprocess.Popen] = []
    try:
        receiver = _start(_RECEIVER, [recv_path, str(frame_size), str(warmup), str(seconds)],
                          tmp, "receiver")
        procs.append(receiver)
        _read_line(receiver, _START_TIMEOUT, tmp, "receiver")
        relay = _start(_RELAY, [relay_path, recv_path], tmp, "relay")
        procs.append(relay)
        _read_line(relay, _START_TIMEOUT, tmp, "relay")
        sender = _start(_SENDER, [relay_path, str(frame_size)], tmp, "sender")
        procs.append(sender)
        _read_line(sender, _START_TIMEOUT, tmp, "sender")
        # the receiver prints its counts and exits; relay and sender must live till then
        deadline = time.monotonic() + _START_TIMEOUT + warmup + seconds
        while not select.select([receiver.stdout], [], [], 0.1)[0]:
            for proc, role in ((relay, "relay"), (sender, "sender")):
                if proc.poll() is not None:
                    raise BenchError(f"relay baseline: the {role} exited early "
                                     f"({proc.returncode}): {_stderr(tmp, role)}")
            if time.monotonic() > deadline:
                break  # _read_line reports it
        line = _read_line(receiver, 0, tmp, "receiver")
        try:
            counts = json.loads(line)
        except ValueError:
            raise BenchError(f"relay baseline: receiver printed {line!r}") from None
        if counts["bad"]:
            raise BenchError(f"relay baseline: {counts['bad']} frames of the wrong size")
        frames, elapsed = int(counts["frames"]), float(counts["seconds"])
        return {"frames_per_second": frames / elapsed, "frames": frames, "seconds": elapsed}
    finally:
        for proc in reversed(procs):
            stop_process(proc)
            if proc.stdout is not None:
                proc.stdout.close()
        shutil.rmtree(tmp, ignore_errors=True)
