"""In-process frontend/backend pairs for your own tests.

Each helper starts a pvio daemon inside the calling trio program (sockets in a
private temporary directory), opens a domain session on it, attaches one device
and yields once it is Connected; everything is closed when the block exits::

    async with block_pair(size="16M") as (disk, daemon):
        await disk.write(0, b"hello")

    async with net_pair() as (a, b, daemon):       # two vifs on one switch
        await a.send(frame_for(b.mac))

    async with console_pair() as (console, daemon):
        await console.stream.send_all(b"hi\\n")

``daemon`` is the :class:`pvio.daemon.Daemon` (its ``switch``, its devices), so a
test can look at the backend side too. ``backend_classes`` swaps in your own
backend class for a device type (e.g. an instrumented or deliberately broken one).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator

import trio

from pvio import config as cfg


@contextlib.asynccontextmanager
async def running_daemon(toml: str, *, backend_classes: dict | None = None):
    """A :class:`~pvio.daemon.Daemon` on the TOML ``toml``, in this trio program."""
    from pvio.daemon import Daemon

    root = tempfile.mkdtemp(prefix="pvio-pair-", dir="/tmp")  # short: AF_UNIX paths
    try:
        config = cfg.parse(toml, source="pvio.testing", socket=f"{root}/xb.sock",
                           data_dir=f"{root}/data")
        async with trio.open_nursery() as nursery:
            daemon = await nursery.start(Daemon(config, backend_classes=backend_classes).run)
            try:
                yield daemon
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(10):
                    await daemon.shutdown(frontend_timeout=2)
                nursery.cancel_scope.cancel()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _domain(name: str, device: str) -> str:
    return f'[[domain]]\nname = "{name}"\n  [[domain.device]]\n{device}'


@contextlib.asynccontextmanager
async def block_pair(*, size: str = "16M", sector_size: int = 512,
                     backend_classes: dict | None = None, **blkfront) -> AsyncIterator:
    """(a connected :class:`~pvio.frontends.blkfront.BlkFront`, the daemon)."""
    from pvio.frontends.blkfront import BLK_KEYS, BlkFront
    from pvio.frontends.session import open_session

    toml = _domain("guest", f'  type = "vbd"\n  devid = 51712\n  size = "{size}"\n'
                            f'  sector_size = {sector_size}\n')
    async with running_daemon(toml, backend_classes=backend_classes) as daemon, \
            open_session(daemon.config.socket, "guest") as session:
        front = BlkFront(session, **blkfront)
        device = await session.attach(front, 51712, BLK_KEYS)
        await device.wait_connected(10)
        yield front, daemon


@contextlib.asynccontextmanager
async def net_pair(*, offloads: bool = False, backend_classes: dict | None = None,
                   **netfront) -> AsyncIterator:
    """(NetFront of domain a, NetFront of domain b, the daemon): two vifs, one switch."""
    from pvio.frontends.netfront import open_netfront
    from pvio.frontends.session import open_session

    toml = (_domain("a", '  type = "vif"\n  devid = 0\n  mac = "00:16:3e:00:00:0a"\n') + "\n"
            + _domain("b", '  type = "vif"\n  devid = 0\n  mac = "00:16:3e:00:00:0b"\n'))
    async with running_daemon(toml, backend_classes=backend_classes) as daemon, \
            open_session(daemon.config.socket, "a") as sa, \
            open_session(daemon.config.socket, "b") as sb:
        a = await open_netfront(sa, offloads=offloads, **netfront)
        b = await open_netfront(sb, offloads=offloads, **netfront)
        yield a, b, daemon


@contextlib.asynccontextmanager
async def console_pair(*, backend_classes: dict | None = None) -> AsyncIterator:
    """(a connected :class:`~pvio.frontends.console.ConsoleFront`, the daemon); the
    backend's pty is ``daemon``'s console driver ``tty``."""
    from pvio.frontends.console import open_console
    from pvio.frontends.session import open_session

    toml = _domain("guest", '  type = "console"\n  devid = 0\n')
    async with running_daemon(toml, backend_classes=backend_classes) as daemon, \
            open_session(daemon.config.socket, "guest") as session:
        yield await open_console(session), daemon
