"""Shared helpers of the blkif / blkback / blkfront tests.

- Hand-built blkif wire bytes and :class:`RawBlkFront` (a frontend that runs the
  real handshake, then puts any bytes on the ring) live in
  :mod:`pvio.testing._blk`, shared with the conformance kit; re-exported here.
- TOML configurations for in-process daemons.
"""

from __future__ import annotations

from pvio.frontends.blkfront import BLK_KEYS, BlkFront
from pvio.testing._blk import (  # noqa: F401 - re-exported for the tests
    PAGE,
    REQ_SIZE,
    RSP,
    RSP_SIZE,
    SECTOR,
    U64,
    XVDA,
    XVDB,
    RawBlkFront,
    attach_raw,
    discard_req,
    indirect_req,
    rw_req,
    seg_bytes,
)
from pvio.xenbus.device import backend_path, frontend_path

# --- configurations ----------------------------------------------------------------------


def vbd(devid: int = XVDA, image: str = "disk.img", size: str = "4M", mode: str = "w") -> str:
    return (f'  [[domain.device]]\n  type = "vbd"\n  devid = {devid}\n'
            f'  image = "{image}"\n  size = "{size}"\n  mode = "{mode}"\n')


def domain(name: str, *devices: str) -> str:
    return f'[[domain]]\nname = "{name}"\n' + "".join(devices)


# --- daemon-side introspection -------------------------------------------------------------


def backend_device(daemon, name: str, devid: int = XVDA):
    """The daemon's BackendDevice of ``name``'s vbd ``devid`` (its driver is a BlkBackend)."""
    for device in daemon._claimed[name].devices:
        if device.driver.type == "vbd" and device.devid == devid:
            return device
    raise KeyError((name, devid))


async def attach_blk(session, devid: int = XVDA, timeout: float = 5.0, **kwargs):
    """A connected BlkFront on ``devid``: (front, FrontendDevice)."""
    front = BlkFront(session, **kwargs)
    device = await session.attach(front, devid, BLK_KEYS)
    await device.wait_connected(timeout)
    return front, device


def paths(session, devid: int = XVDA) -> tuple[str, str]:
    """(backend dir, frontend dir) of ``session``'s vbd ``devid``."""
    return backend_path("vbd", session.domid, devid), frontend_path("vbd", session.domid, devid)



def leaves(exc: BaseException) -> list[BaseException]:
    """The non-group exceptions inside ``exc`` (itself if it is not a group)."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in leaves(sub)]
    return [exc]


class blk_error:
    """``with blk_error():`` the block raises BlkDeviceError, possibly wrapped in
    exception groups by trio nurseries (see test_blkfront's
    ``test_io_errors_are_plain_blk_device_errors`` for the strict form)."""

    def __init__(self, match: str | None = None) -> None:
        self.match = match
        self.value: BaseException | None = None

    def __enter__(self):
        return self

    def __exit__(self, typ, exc, tb) -> bool:
        from pvio.frontends.blkfront import BlkDeviceError

        if exc is None:
            raise AssertionError("BlkDeviceError not raised")
        found = leaves(exc)
        if not all(isinstance(e, BlkDeviceError) for e in found):
            return False  # re-raise the unexpected exception
        self.value = found[0]
        if self.match is not None:
            assert any(self.match in str(e) for e in found), found
        return True


def slow_backend(monkeypatch, seconds: float) -> None:
    """Every batch blkback serves sits ``seconds`` in its worker thread (the C
    fast path is switched off, so every request goes there): requests stay in
    flight long enough to cancel callers, close buffers or detach meanwhile."""
    import time

    from pvio.backends.blkback import BlkBackend

    real_io = BlkBackend._io

    def slow_io(self, plans):
        time.sleep(seconds)
        return real_io(self, plans)

    monkeypatch.setattr(BlkBackend, "inline_io", False)
    monkeypatch.setattr(BlkBackend, "_io", slow_io)
