"""pvio.testing.fixtures: in-process pairs a user's test suite can use as they are."""

from __future__ import annotations

import os

import trio

from pvio.testing.fixtures import block_pair, console_pair, net_pair


async def test_block_pair_writes_and_reads_back():
    async with block_pair(size="4M") as (disk, daemon):
        await disk.write(4096, b"pvio" * 1024)
        assert await disk.read(4096, 4096) == b"pvio" * 1024
        assert disk.size == 4 << 20
        (attached,) = daemon._claimed.values()
        assert attached.devices[0].driver.stats.requests.get("write") == 1


async def test_net_pair_frames_cross_the_switch():
    async with net_pair() as (a, b, daemon):
        dst, src = (bytes.fromhex(m.replace(":", "")) for m in (b.mac, a.mac))
        frame = dst + src + b"\x88\xb5" + b"hello" + bytes(41)
        await a.send(frame)
        with trio.fail_after(5):
            got = await b.receive()
        assert got.data == frame
        assert len(daemon.switch.ports) == 2


async def test_console_pair_reaches_the_pty():
    async with console_pair() as (console, daemon):
        (attached,) = daemon._claimed.values()
        tty = attached.devices[0].driver.tty
        fd = os.open(tty, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        try:
            await console.stream.send_all(b"from the guest\n")
            got = b""
            with trio.fail_after(5):
                while b"from the guest" not in got:
                    await trio.lowlevel.wait_readable(fd)
                    got += os.read(fd, 4096)
        finally:
            os.close(fd)
