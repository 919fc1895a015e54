"""Backend restart without harm, as a stress run: kill -9 the daemon under load.

A ``pvio serve`` daemon (its embedded default: domain "guest", disk xvda) serves a
BlkFront in this process. --writers tasks (default 32: queue depth 32) each
rewrite their own 4 KiB blocks with verifiable patterns (sha256 of writer and
sequence number) and remember the last pattern acknowledged for each block.
--kills times, once at least 200 more requests were answered, the daemon is
killed with SIGKILL and a new one started on the same socket and image; the
frontend reconnects with backoff, renegotiates and resubmits what was not
answered (Linux blkfront's blkif_recover).

At the end the image must hold exactly the last acknowledged pattern of every
block, and no write may have failed: the exit status is 1 otherwise. The test
suite runs this with --kills 20; run more here, e.g. ``pvio bench recovery
--kills 500``. The report gives the time from each kill to the reconnection.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from typing import Any

import trio

from pvio.bench._common import (
    BenchError,
    positive,
    progress,
    report,
    standalone,
    start_serve,
)

BLOCK = 4096
MIN_REQUESTS_BETWEEN_KILLS = 200


def pattern(writer: int, seq: int) -> bytes:
    """The 4 KiB a writer puts in its block at its ``seq``-th write."""
    return hashlib.sha256(f"{writer}:{seq}".encode()).digest() * (BLOCK // 32)


async def _stress(sock: str, data: str, log: str, procs: list, kills: int, writers: int,
                  blocks_per_writer: int, progress: Callable[[str], None] | None) -> dict:
    from pvio.frontends.blkfront import BLK_KEYS, BlkFront
    from pvio.frontends.session import open_session

    acked: dict[int, bytes] = {}
    errors: list[str] = []
    reconnect_ms: list[float] = []
    async with open_session(sock, "guest", reconnect=True, recovery_timeout=30) as session:
        front = BlkFront(session)
        device = await session.attach(front, 51712, BLK_KEYS)
        with trio.move_on_after(30):
            await device.connected.wait()
        if front.ring is None:
            raise BenchError(f"blkfront did not connect (error: {front.error})")
        stop = trio.Event()

        async def writer(w: int) -> None:
            seq = 0
            while not stop.is_set():
                block = w * blocks_per_writer + seq % blocks_per_writer
                data = pattern(w, seq)
                try:
                    await front.write(block * BLOCK, data)
                except Exception as exc:  # an application-visible error
                    errors.append(repr(exc))
                    return
                acked[block] = data
                seq += 1

        async with trio.open_nursery() as nursery:
            for w in range(writers):
                nursery.start_soon(writer, w)
            for k in range(kills):
                before = front.stats["requests"]
                with trio.fail_after(60):
                    while front.stats["requests"] < before + MIN_REQUESTS_BETWEEN_KILLS:
                        await trio.sleep(0.01)
                reconnections = device.reconnections
                procs[-1].proc.send_signal(signal.SIGKILL)
                t0 = time.perf_counter()
                procs[-1].proc.wait()
                procs.append(start_serve(sock, data, log))
                with trio.fail_after(60):
                    while device.reconnections == reconnections:
                        await trio.sleep(0.005)
                reconnect_ms.append((time.perf_counter() - t0) * 1000)
                if progress:
                    progress(f"kill {k + 1}/{kills}: reconnected in {reconnect_ms[-1]:.0f} ms, "
                             f"{front.stats['requests']:,} requests answered, "
                             f"{front.stats['resubmitted']:,} resubmitted")
                if errors:
                    break
            stop.set()
        await front.flush()
        stats = dict(front.stats)
        reconnections = device.reconnections
    return {"acked": acked, "errors": errors, "reconnect_ms": reconnect_ms,
            "stats": stats, "reconnections": reconnections}


def run_stress(*, kills: int = 20, writers: int = 32, blocks_per_writer: int = 64,
               directory: str | None = None,
               progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the stress and return its report; ``ok`` is False if anything acknowledged
    was lost or corrupted, or a write failed."""
    root = tempfile.mkdtemp(prefix="pvio-kill9-", dir=directory)
    sock, data = os.path.join(root, "run", "xb.sock"), os.path.join(root, "data")
    t0 = time.perf_counter()
    log = os.path.join(root, "serve.log")
    procs = [start_serve(sock, data, log)]
    try:
        out = trio.run(_stress, sock, data, log, procs, kills, writers, blocks_per_writer,
                       progress)
        with open(os.path.join(data, "guest-xvda.img"), "rb") as image:
            disk = image.read(writers * blocks_per_writer * BLOCK)
    finally:
        for proc in procs:
            proc.stop()
        shutil.rmtree(root, ignore_errors=True)
    acked = out["acked"]
    lost = sorted(b for b, data in acked.items()
                  if disk[b * BLOCK:(b + 1) * BLOCK] != data)
    ms = sorted(out["reconnect_ms"])
    return {
        "benchmark": "pvio bench recovery",
        "config": {"kills": kills, "writers": writers, "blocks_per_writer": blocks_per_writer},
        "wall_s": time.perf_counter() - t0,
        "kills": len(ms),
        "reconnections": out["reconnections"],
        "requests": out["stats"]["requests"],
        "resubmitted": out["stats"]["resubmitted"],
        "blocks_written": len(acked),
        "blocks": writers * blocks_per_writer,
        "lost_blocks": lost,
        "errors": out["errors"],
        "reconnect_ms": {"min": ms[0], "median": ms[len(ms) // 2], "max": ms[-1]} if ms else None,
        "ok": not lost and not out["errors"] and out["reconnections"] == kills,
    }


def format_table(r: dict[str, Any]) -> str:
    ms = r["reconnect_ms"] or {"min": 0, "median": 0, "max": 0}
    lines = [
        f"kills (SIGKILL + restart)    {r['kills']}",
        f"reconnections                {r['reconnections']}",
        f"requests answered            {r['requests']:,}",
        f"resubmitted after a kill     {r['resubmitted']:,}",
        f"reconnect after kill (ms)    min {ms['min']:.0f}  median {ms['median']:.0f}  "
        f"max {ms['max']:.0f}",
        f"blocks written / checked     {r['blocks_written']} / {r['blocks']}",
        f"acknowledged writes lost     {len(r['lost_blocks'])}",
        f"application errors           {len(r['errors'])}",
        "",
        "OK: the image holds exactly what was acknowledged" if r["ok"] else
        "FAILED: " + "; ".join([*(f"block {b} lost" for b in r["lost_blocks"][:5]),
                                *r["errors"][:3]]),
        f"({r['wall_s']:.0f} s)",
    ]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kills", type=positive(int), default=20, metavar="N",
                        help="how many times to SIGKILL and restart the daemon (default: 20)")
    parser.add_argument("--writers", type=positive(int), default=32, metavar="Q",
                        help="concurrent writer tasks, i.e. queue depth (default: 32)")
    parser.add_argument("--dir", metavar="DIR", default=None,
                        help="where the temporary socket and image go (default: the system "
                        "temp dir)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object instead of the summary; no progress lines")


def run(args: argparse.Namespace) -> int:
    result: dict[str, Any] = {}

    def measure() -> dict[str, Any]:
        result.update(run_stress(kills=args.kills, writers=args.writers, directory=args.dir,
                                 progress=None if args.json else progress))
        return result

    status = report("recovery", args.json, measure, format_table)
    return 1 if status == 0 and not result["ok"] else status


def main(argv: list[str] | None = None) -> int:
    return standalone("recovery", __doc__, add_arguments, run, argv)
