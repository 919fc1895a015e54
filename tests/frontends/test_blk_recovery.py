"""Backend restart without harm: kill -9 the daemon under load, nothing acknowledged lost.

Issue acceptance "durability under fault": writes of verifiable patterns in
flight at queue depth 32; the daemon is killed with SIGKILL and restarted 20
times; the frontend reconnects, renegotiates and resubmits what was not
answered (blkfront's blkif_recover). Afterwards: zero application errors, and
the image holds exactly the last acknowledged pattern of every block.
"""

import hashlib
import os
import signal
import subprocess
import sys
import time

import trio

from pvio.frontends.blkfront import BLK_KEYS, BlkFront
from pvio.frontends.session import open_session

WRITERS = 32  # queue depth
BLOCKS_PER_WRITER = 64
KILLS = 20


def _start_daemon(sock: str, data: str) -> subprocess.Popen:
    if os.path.exists(sock):
        os.unlink(sock)  # a SIGKILLed daemon leaves its socket behind
    proc = subprocess.Popen(
        [sys.executable, "-m", "pvio", "serve", "--socket", sock, "--data-dir", data],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while not os.path.exists(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("pvio serve did not start")
        time.sleep(0.01)
    return proc


def _pattern(writer: int, seq: int) -> bytes:
    return hashlib.sha256(f"{writer}:{seq}".encode()).digest() * (4096 // 32)


async def test_kill_9_the_daemon_20_times_under_qd32_loses_nothing_acknowledged(tmp_path):
    sock, data = str(tmp_path / "run" / "xb.sock"), str(tmp_path / "data")
    procs = [_start_daemon(sock, data)]
    acked: dict[int, bytes] = {}
    errors: list[str] = []
    try:
        async with open_session(sock, "guest", reconnect=True, recovery_timeout=30) as session:
            front = BlkFront(session)
            device = await session.attach(front, 51712, BLK_KEYS)
            with trio.fail_after(30):
                await device.connected.wait()
            stop = trio.Event()

            async def writer(w: int) -> None:
                seq = 0
                while not stop.is_set():
                    block = w * BLOCKS_PER_WRITER + seq % BLOCKS_PER_WRITER
                    pattern = _pattern(w, seq)
                    try:
                        await front.write(block * 4096, pattern)
                    except Exception as exc:  # an application-visible error
                        errors.append(repr(exc))
                        return
                    acked[block] = pattern
                    seq += 1

            async with trio.open_nursery() as nursery:
                for w in range(WRITERS):
                    nursery.start_soon(writer, w)
                for _ in range(KILLS):
                    before = front.stats["requests"]
                    with trio.fail_after(60):
                        while front.stats["requests"] < before + 200:  # writes are flowing
                            await trio.sleep(0.01)
                    reconnections = device.reconnections
                    procs[-1].send_signal(signal.SIGKILL)
                    procs[-1].wait()
                    procs.append(_start_daemon(sock, data))
                    with trio.fail_after(60):
                        while device.reconnections == reconnections:
                            await trio.sleep(0.01)
                stop.set()
            await front.flush()
            stats = dict(front.stats)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)

    assert errors == []
    assert device.reconnections == KILLS
    assert stats["reconnects"] == KILLS
    assert stats["resubmitted"] > 0  # requests really were in flight at the kills
    with open(os.path.join(data, "guest-xvda.img"), "rb") as image:
        disk = image.read(WRITERS * BLOCKS_PER_WRITER * 4096)
    lost = [b for b, pattern in acked.items() if disk[b * 4096 : (b + 1) * 4096] != pattern]
    assert len(acked) == WRITERS * BLOCKS_PER_WRITER
    assert lost == []
