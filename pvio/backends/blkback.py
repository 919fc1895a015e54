"""blkback: the block backend (io/blkif.h).

This module currently provides the transport and the handshake: image
creation, the backend keys Xen's toolstack and blkback publish, ring mapping
and event-channel binding. Request processing arrives with the block-device
issue; until then nothing optional is advertised, because a backend must not
advertise what it does not honour (blkif.h).
"""

from __future__ import annotations

import os

from pvio.layouts import VDISK_READONLY
from pvio.xenbus.device import DeviceError
from pvio.xenbus.ringdev import VBD, BackendConnection, RingBackendDriver

SECTOR = 512


def ensure_image(path: str, size: int) -> None:
    """Create a sparse raw image of ``size`` bytes if it does not exist yet."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        if os.fstat(fd).st_size == 0:
            os.ftruncate(fd, size)
    finally:
        os.close(fd)


class BlkBackend(RingBackendDriver):
    layout = VBD

    def __init__(self, domain, image: str, mode: str = "w") -> None:
        super().__init__(domain)
        self.image = image
        self.mode = mode

    @property
    def size(self) -> int:
        return os.stat(self.image).st_size

    def toolstack_keys(self) -> dict[str, str]:
        """Keys libxl writes when it creates the backend node."""
        return {"params": self.image, "mode": self.mode, "type": "file",
                "device-type": "disk"}

    async def start(self, conn: BackendConnection, frontend: dict) -> dict[str, str]:
        protocol = (frontend.get("protocol") or b"x86_64-abi").decode("ascii", "replace")
        if protocol not in ("x86_64-abi", "arm-abi"):
            raise DeviceError(f"unsupported blkif protocol {protocol!r} (native layout only)")
        info = VDISK_READONLY if self.mode == "r" else 0
        return {"sectors": str(self.size // SECTOR), "info": str(info),
                "sector-size": str(SECTOR), "physical-sector-size": str(SECTOR)}
