"""Network benchmark: pvio's vif path against the kernel's veth and a Python relay.

Two workloads, each measured for pvio and for the alternative in the same run:

  tcp           iperf3 TCP throughput between two network namespaces. pvio: each
                namespace has a TAP fed by ``pvio netfront-tap`` (checksum offload
                and TSO mapped to netif GSO), joined by the daemon's switch.
                Alternative: a veth pair between two namespaces, the kernel's limit.
  small_frames  64-byte Ethernet frames per second from one process to another
                through a switch. pvio: a netfront in domain ``a`` sends as fast as
                ``send_many`` lets it, the daemon switches, a netfront in domain
                ``b`` counts. Alternative: sender -> Python relay -> receiver over
                Unix datagram sockets (what a user would otherwise write).

Each workload runs ``--rounds`` times (default 2), pvio and its alternative taking
turns, and each side is represented by its best round: the machines this runs on are
shared, and a burst of someone else's load in one measurement should not decide the
ratio. Both sides get the same treatment; every round's rate is in the output
(``rounds`` of each case).

``--json`` prints one object with ``cases`` and ``ratios`` (``tcp_vs_veth``,
``small_frames_vs_relay``: pvio's rate over the alternative's). Needs root (network
namespaces), iperf3 and /dev/net/tun. Timing is reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

from pvio._netns import available, stop_process
from pvio.bench._common import BenchError, choices, positive, progress, report, standalone
from pvio.bench._net_baselines import iperf3_tcp, relay_small_frames, veth_tcp
from pvio.bench._netpair import MAC_A, MAC_B, pvio_pair
from pvio.bench.ring import _machine

WORKLOADS = ("tcp", "small_frames")

_RECEIVER = r"""
import json, sys, time, trio
from pvio.frontends.session import open_session
from pvio.frontends.netfront import open_netfront

async def main(sock, size, warmup, seconds):
    async with open_session(sock, "b") as session:
        nic = await open_netfront(session)
        print("ready", flush=True)
        frames = bad = 0
        for f in await nic.receive_many(1024):
            frames += 1
            bad += len(f.data) != size
        start = time.perf_counter()
        mark = None
        while True:
            got = await nic.receive_many(1024)
            frames += len(got)
            bad += sum(len(f.data) != size for f in got)
            now = time.perf_counter()
            if mark is None:
                if now - start >= warmup:
                    mark = (frames, now)
            elif now - mark[1] >= seconds:
                break
        print(json.dumps({"frames": frames - mark[0], "seconds": now - mark[1], "bad": bad,
                          "rx_packets": nic.stats.rx_packets}), flush=True)

trio.run(main, sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]))
"""

_SENDER = r"""
import sys, trio
from pvio.frontends.session import open_session
from pvio.frontends.netfront import open_netfront
from pvio.netif import Frame

async def main(sock, size, dst, src):
    async with open_session(sock, "a") as session:
        nic = await open_netfront(session)
        print("ready", flush=True)
        frame = Frame(bytes.fromhex(dst.replace(":", "")) + bytes.fromhex(src.replace(":", ""))
                      + b"\x88\xb5" + bytes(size - 14))
        batch = [frame] * 64
        while True:
            await nic.send_many(batch)

trio.run(main, sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4])
"""


def _line(proc: subprocess.Popen, timeout: float, what: str) -> str:
    import select

    deadline = time.monotonic() + timeout
    while not select.select([proc.stdout], [], [], 0.1)[0]:
        if proc.poll() is not None or time.monotonic() > deadline:
            err = proc.stderr.read() if proc.poll() is not None else ""
            raise BenchError(f"{what} did not answer (exit {proc.poll()}): {err[-2000:]}")
    return proc.stdout.readline().strip()


def pvio_small_frames(seconds: float, frame_size: int = 64, warmup: float = 0.5) -> dict:
    """Frames per second from a netfront sender through the daemon to a netfront receiver."""
    with pvio_pair(taps=False) as pair:
        procs = []
        try:
            def start(code: str, *args: str) -> subprocess.Popen:
                proc = subprocess.Popen([sys.executable, "-c", code, pair.socket, *args],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
                procs.append(proc)
                return proc

            receiver = start(_RECEIVER, str(frame_size), str(warmup), str(seconds))
            if _line(receiver, 20, "the pvio receiver") != "ready":
                raise BenchError("the pvio receiver did not start")
            sender = start(_SENDER, str(frame_size), MAC_B, MAC_A)
            if _line(sender, 20, "the pvio sender") != "ready":
                raise BenchError("the pvio sender did not start")
            counts = json.loads(_line(receiver, 30 + warmup + seconds, "the pvio receiver"))
        finally:
            for proc in reversed(procs):
                stop_process(proc)
        if counts["bad"]:
            raise BenchError(f"pvio: {counts['bad']} frames of the wrong size")
        return {"frames_per_second": counts["frames"] / counts["seconds"],
                "frames": counts["frames"], "seconds": counts["seconds"]}


def pvio_tcp(seconds: float) -> dict:
    with pvio_pair() as pair:
        return iperf3_tcp(pair.ns_b, pair.ns_a, pair.addr_b, seconds)


def _best(runs: list[dict], key: str) -> dict:
    best = dict(max(runs, key=lambda r: r[key]))
    best["rounds"] = [r[key] for r in runs]
    return best


def run_benchmark(*, seconds: float, workloads: list[str], frame_size: int, rounds: int = 2,
                  progress=None) -> dict[str, Any]:
    reason = available()
    if reason is not None:
        raise BenchError(f"needs network namespaces: {reason}")
    say = progress or (lambda line: None)
    cases: dict[str, dict] = {}
    ratios: dict[str, float] = {}
    if "tcp" in workloads:
        pvio_runs, veth_runs = [], []
        for r in range(rounds):
            say(f"tcp (round {r + 1}/{rounds}): iperf3 {max(1, round(seconds))} s over pvio...")
            pvio_runs.append(pvio_tcp(seconds))
            say(f"  {pvio_runs[-1]['bits_per_second'] / 1e9:.2f} Gbit/s; over veth...")
            veth_runs.append(veth_tcp(seconds))
            say(f"  {veth_runs[-1]['bits_per_second'] / 1e9:.2f} Gbit/s")
        cases["tcp_pvio"] = _best(pvio_runs, "bits_per_second")
        cases["tcp_veth"] = _best(veth_runs, "bits_per_second")
        ratios["tcp_vs_veth"] = (cases["tcp_pvio"]["bits_per_second"]
                                 / cases["tcp_veth"]["bits_per_second"])
    if "small_frames" in workloads:
        pvio_runs, relay_runs = [], []
        for r in range(rounds):
            say(f"small_frames (round {r + 1}/{rounds}): {frame_size}-byte frames for "
                f"{seconds} s over pvio...")
            pvio_runs.append(pvio_small_frames(seconds, frame_size))
            say(f"  {pvio_runs[-1]['frames_per_second']:,.0f} frames/s; "
                "over the Python relay...")
            relay_runs.append(relay_small_frames(seconds, frame_size))
            say(f"  {relay_runs[-1]['frames_per_second']:,.0f} frames/s")
        cases["small_frames_pvio"] = _best(pvio_runs, "frames_per_second")
        cases["small_frames_relay"] = _best(relay_runs, "frames_per_second")
        ratios["small_frames_vs_relay"] = (cases["small_frames_pvio"]["frames_per_second"]
                                           / cases["small_frames_relay"]["frames_per_second"])
    for case in cases.values():
        case.pop("intervals", None)
    return {"config": {"seconds": seconds, "frame_size": frame_size, "workloads": workloads,
                       "rounds": rounds},
            "machine": _machine(), "cases": cases, "ratios": ratios,
            "targets": {"tcp_vs_veth": 0.25, "small_frames_vs_relay": 2.0}}


def format_table(result: dict) -> str:
    rows = ["case                     rate"]
    for name, case in result["cases"].items():
        if "bits_per_second" in case:
            rows.append(f"{name:<24} {case['bits_per_second'] / 1e9:8.2f} Gbit/s "
                        f"({case['retransmits']} retransmits)")
        else:
            rows.append(f"{name:<24} {case['frames_per_second']:>12,.0f} frames/s")
    rows.append("")
    for name, ratio in result["ratios"].items():
        target = result["targets"][name]
        rows.append(f"{name:<24} {ratio:8.2f}x   (target >= {target}x: "
                    f"{'met' if ratio >= target else 'missed'})")
    return "\n".join(rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=positive(float), default=5.0, metavar="S",
                        help="measured time per case (default: 5; TCP rounds to whole s)")
    parser.add_argument("--frame-size", type=positive(int), default=64, metavar="BYTES",
                        help="small-frame size, Ethernet header included (default: 64)")
    parser.add_argument("--workloads", type=choices(WORKLOADS), default=list(WORKLOADS),
                        metavar="W,W", help=f"which workloads (default: {','.join(WORKLOADS)})")
    parser.add_argument("--rounds", type=positive(int), default=2, metavar="N",
                        help="rounds per workload, pvio and its alternative taking turns; "
                             "each side's best round is compared (default: 2)")
    parser.add_argument("--json", action="store_true",
                        help="one JSON object (cases, ratios, machine); no progress lines")


def run(args: argparse.Namespace) -> int:
    if not 60 <= args.frame_size <= 1514:
        print("pvio bench net: --frame-size must be 60..1514", file=sys.stderr)
        return 2
    return report("net", args.json, lambda: run_benchmark(
        seconds=args.seconds, workloads=args.workloads, frame_size=args.frame_size,
        rounds=args.rounds, progress=None if args.json else progress), format_table)


def main(argv: list[str] | None = None) -> int:
    return standalone("net", __doc__, add_arguments, run, argv)
