"""Deliberately broken implementations, kept to prove the kits catch what they claim.

Each one is a small, realistic mistake:

- :class:`NoNotifyLogicRings`: ring ends that forget the notify barrier logic:
  a push notifies whenever it published something (ignoring the peer's event
  index), and the final check does not re-arm the event index.
- :class:`TrustingRings`: a back end that trusts the frontend's ``req_prod`` and
  consumes whatever it says is there.
- :class:`WrongIdBlkBackend`: a blkback answering every request with id + 1.
- :class:`RefusingBlkBackend`: a blkback that refuses every connect.
- :func:`skip_states_frontend`: a blkfront that publishes its ring and jumps
  straight to Connected, skipping Initialised (and never waits for the backend).
"""

from __future__ import annotations

import struct

import trio

from pvio.backends.blkback import BlkBackend
from pvio.ring import BackRing, FrontRing
from pvio.testing.ring import PvioRings
from pvio.xenbus.device import DeviceError


class _NoNotifyFront:
    def __init__(self, ring: FrontRing, buf) -> None:
        self.ring, self.buf = ring, buf

    def put_requests(self, data) -> int:
        return self.ring.put_requests(data)

    def push_requests(self) -> bool:
        old = struct.unpack_from("<I", self.buf, 0)[0]
        self.ring.push_requests()
        return struct.unpack_from("<I", self.buf, 0)[0] != old  # forgot req_event

    def take_responses(self):
        return self.ring.take_responses()

    def final_check_for_responses(self) -> int:
        return self.ring.unconsumed_responses  # forgot to re-arm rsp_event


class _NoNotifyBack:
    def __init__(self, ring: BackRing, buf) -> None:
        self.ring, self.buf = ring, buf

    def take_requests(self):
        return self.ring.take_requests()

    def put_responses(self, data) -> int:
        return self.ring.put_responses(data)

    def push_responses(self) -> bool:
        old = struct.unpack_from("<I", self.buf, 8)[0]
        self.ring.push_responses()
        return struct.unpack_from("<I", self.buf, 8)[0] != old

    def final_check_for_requests(self) -> int:
        return self.ring.unconsumed_requests


class NoNotifyLogicRings(PvioRings):
    def front(self, spec, buf, start):
        return _NoNotifyFront(super().front(spec, buf, start), buf)

    def back(self, spec, buf, start):
        return _NoNotifyBack(super().back(spec, buf, start), buf)


class _TrustingBack:
    """Consumes ``req_prod - req_cons`` slots, whatever req_prod says."""

    def __init__(self, spec, buf, start: int) -> None:
        self.spec, self.buf, self.cons = spec, buf, start
        self.ring = BackRing.attach(spec, buf, start)  # for the response side
        self.nr = self.ring.nr_ents

    def take_requests(self) -> bytes:
        prod = struct.unpack_from("<I", self.buf, 0)[0]
        out = bytearray()
        while self.cons != prod:
            slot = 64 + (self.cons % self.nr) * self.spec.slot_size
            out += self.buf[slot:slot + self.spec.req_size]
            self.cons = (self.cons + 1) & 0xFFFFFFFF
        struct.pack_into("<I", self.buf, 4, (self.cons + 1) & 0xFFFFFFFF)
        return bytes(out)

    def put_responses(self, data) -> int:
        return self.ring.put_responses(data)

    def push_responses(self) -> bool:
        return self.ring.push_responses()

    def final_check_for_requests(self) -> int:
        return self.ring.final_check_for_requests()


class TrustingRings(PvioRings):
    def back(self, spec, buf, start):
        return _TrustingBack(spec, buf, start)


class WrongIdBlkBackend(BlkBackend):
    inline_io = False  # every request through _execute

    async def _execute(self, reqs, mapper, pool, feats):
        results = await super()._execute(reqs, mapper, pool, feats)
        return [((rid + 1) & ((1 << 64) - 1), op, status) for rid, op, status in results]


class RefusingBlkBackend(BlkBackend):
    async def start(self, conn, frontend):
        raise DeviceError("refuses every connect")


async def skip_states_frontend(socket_path: str, domain: str) -> None:
    from pvio.frontends.session import open_session
    from pvio.testing._blk import RawBlkFront

    async with open_session(socket_path, domain, pool_pages=64) as session:
        vbd = next(d for d in await session.devices() if d.type == "vbd")
        path = f"device/vbd/{vbd.devid}"
        driver = RawBlkFront(session)
        await driver.publish(session.xs, path)
        await session.xs.write(f"{path}/state", "4")  # Connected: Initialised skipped
        await trio.sleep(0.5)
        await session.xs.write(f"{path}/state", "5")
        await trio.sleep(0.2)
        await session.xs.write(f"{path}/state", "6")
        driver.release_transport()
