"""gh-77894 (CPython before 3.12.6): the garbage collector may clear a
memoryview that sits in a reference cycle while a cffi ``from_buffer``
pointer still exports it, and freeing that pointer then crashes the process.
Every long-lived pointer pvio keeps must therefore be taken from the
exporting object (:func:`pvio.ring._lib.pin_buffer`), never from a view.

The check walks the objects of a daemon with a connected vbd, vif and
console, and of the frontends attached to them, after traffic (so that
lazily made buffers exist too)."""

from __future__ import annotations

import gc
import mmap

import trio

from pvio.frontends.console import open_console
from pvio.frontends.session import open_session
from pvio.ring._lib import ffi, pin_buffer
from tests import blk_helpers, console_helpers, net_helpers
from tests.gc_helpers import pointers_into_memoryviews
from tests.pvio_daemon import running_daemon, watchdog

CONFIG = net_helpers.switch() + blk_helpers.domain(
    "g", blk_helpers.vbd(), net_helpers.vif(0), console_helpers.console(0)) + "\n" + \
    net_helpers.domain("h", net_helpers.vif(0, net_helpers.mac(7)))


def test_the_check_finds_a_pointer_into_a_memoryview():
    class Holder:
        __module__ = "pvio.test"

    view = memoryview(mmap.mmap(-1, 8192))[4096:]
    holder = Holder()
    holder.direct = ffi.from_buffer("uint8_t[]", view)
    holder.pinned = pin_buffer(view)
    assert pointers_into_memoryviews(holder) == ["root.direct"]


async def test_no_long_lived_pointer_of_a_daemon_or_frontend_is_into_a_memoryview():
    async with watchdog(30, "pin_buffer audit"), running_daemon(CONFIG) as daemon, \
            open_session(daemon.config.socket, "g") as g, \
            open_session(daemon.config.socket, "h") as h:
        blk, _ = await blk_helpers.attach_blk(g)
        nic = await net_helpers.attach_net(g)
        peer = await net_helpers.attach_net(h)
        console = await open_console(g)
        await blk.write(0, b"x" * 8192)
        assert await blk.read(0, 8192) == b"x" * 8192
        frame = net_helpers.eth(peer.mac, nic.mac, b"audit" + bytes(100))
        await nic.send(frame)
        with trio.fail_after(5):
            assert (await peer.receive()).data == frame
        await console.stream.send_all(b"audit\n")
        gc.collect()
        assert pointers_into_memoryviews(daemon) == []
        for front in (g, h, blk, nic, peer, console):
            assert pointers_into_memoryviews(front) == [], front
