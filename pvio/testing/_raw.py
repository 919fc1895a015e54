"""What the raw (possibly hostile) frontends of the kits share: granted pages, attaching."""

from __future__ import annotations

from pvio.testing._core import Violation
from pvio.xenbus.device import DeviceError

PAGE = 4096


def granted_page(session, views: list, *, readonly: bool = False, domid: int = 0,
                 fill: bytes | None = None) -> tuple[int, int, memoryview]:
    """A fresh pool page of ``session`` granted to ``domid``: (frame, gref, view).

    The view is appended to ``views`` so its owner can release it before the
    session closes its pool.
    """
    frame = session.pool.alloc(1)
    view = session.pool.shm.page(frame)
    view[:] = (fill * (PAGE // len(fill) + 1))[:PAGE] if fill else bytes(PAGE)
    ref = session.gnttab.grant_access(domid, frame, readonly=readonly)
    views.append(view)
    return frame, ref, view


async def attach_driver(session, driver, type_: str, devid: int, keys: tuple[str, ...],
                        timeout: float):
    """Attach ``driver`` to ``session``'s ``type_`` device ``devid``; wait for Connected."""
    offered = {d.devid for d in await session.devices() if d.type == type_}
    if devid not in offered:
        raise LookupError(f"no {type_} {devid} offered (offered: {sorted(offered)})")
    device = await session.attach(driver, devid, keys)
    try:
        await device.wait_connected(timeout)
    except DeviceError as exc:
        if device.status.last_error:  # our own frontend failed: the kit's trouble
            raise
        raise Violation(f"the backend closed the device before it connected: {exc}") from exc
    return driver, device
