"""Named regression tests for blkfront bugs found in review."""

import os
import signal
import time

import trio

from pvio.backends.blkback import BlkBackend
from pvio.frontends.blkfront import BLK_KEYS, BlkDeviceError, BlkFront
from pvio.frontends.session import open_session
from tests.pvio_daemon import ServeProcess, running_daemon, short_tmpdir

TOML = """
[[domain]]
name = "guest"
  [[domain.device]]
  type = "vbd"
  devid = 1
  image = "disk.img"
  size = "8M"
"""


async def test_cancelled_request_keeps_its_slot_until_the_backend_answers(monkeypatch):
    """A caller cancelled while the backend still held its request used to put the
    slot back at once: the late answer then disabled the device ("not outstanding")
    or completed a new request that reused the slot with the old status and data."""
    real_io = BlkBackend._io

    def slow_io(self, plans):
        time.sleep(0.3)  # the worker thread holds the batch for a while
        return real_io(self, plans)

    monkeypatch.setattr(BlkBackend, "_io", slow_io)
    monkeypatch.setattr(BlkBackend, "inline_io", False)  # the worker-thread path
    async with running_daemon(TOML) as daemon, open_session(daemon.config.socket) as session:
        front = BlkFront(session)
        device = await session.attach(front, 1, BLK_KEYS)
        with trio.fail_after(10):
            await device.connected.wait()
        await front.write(0, b"A" * 4096)
        with trio.move_on_after(0.05) as cancelled:
            await front.read(0, 4096)  # answered after 0.3 s: we give up first
        assert cancelled.cancelled_caught
        with trio.fail_after(10):
            await front.write(4096, b"B" * 4096)  # may reuse slots meanwhile
            assert await front.read(4096, 4096) == b"B" * 4096
            assert await front.read(0, 4096) == b"A" * 4096
        assert front.error is None
        with trio.fail_after(10):  # every slot and permit came back
            while len(front._free) != len(front._slots):
                await trio.sleep(0.01)


async def test_lost_daemon_without_reconnect_fails_pending_calls_instead_of_hanging():
    """With reconnect=False a lost store connection used to end the device loop
    without telling the driver, so requests in flight waited forever."""
    with short_tmpdir() as root:
        (root / "cfg.toml").write_text(TOML)
        serve = ServeProcess(root, "--config", str(root / "cfg.toml")).start()
        try:
            async with open_session(serve.socket) as session:
                front = BlkFront(session)
                device = await session.attach(front, 1, BLK_KEYS)
                with trio.fail_after(10):
                    await device.connected.wait()
                outcome: list[BaseException] = []

                async def keep_writing() -> None:
                    try:
                        while True:
                            await front.write(0, os.urandom(1 << 20))
                    except BlkDeviceError as exc:
                        outcome.append(exc)

                with trio.fail_after(20):
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(keep_writing)
                        await trio.sleep(0.3)
                        os.kill(serve.pid, signal.SIGKILL)
                assert len(outcome) == 1
                assert "daemon" in str(outcome[0]) or "not connected" in str(outcome[0])
        finally:
            serve.proc.wait(timeout=20) if serve.proc.poll() is not None else serve.stop()
