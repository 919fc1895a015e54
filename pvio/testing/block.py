"""Block device conformance: checks for any blkif backend and any blkif frontend.

**Backend kit** (:data:`BLOCK_BACKEND_CHECKS`, :func:`check_block_backend`):
pvio plays the frontend against a running store/daemon (any implementation that
serves pvio's transport: the guest socket, fd hand-over, xs_wire). Each check
claims the domain, attaches the vbd with :class:`~pvio.testing._blk.RawBlkFront`
(the real handshake, then raw ring bytes) and checks one rule: the state
machine, I/O, every validation rule of blkif §2, grants, hostile ring indices
and event floods. Devices are released between checks.

**Frontend kit** (:data:`BLOCK_FRONTEND_CHECKS`, :func:`check_block_frontend`):
pvio plays the backend. It runs an in-process daemon whose blkback records
what the frontend does (a recording blkback subclass), starts the frontend (a
program, or an async factory) with the store socket in ``PVIO_SOCKET`` and the
domain in ``PVIO_DOMAIN``, and checks the frontend's state sequence, keys and
requests. Then it plays hostile backends (a
response with a wrong id, an impossible ``rsp_prod``, a backend that vanishes)
and checks that the frontend notices instead of hanging or crashing.
"""

from __future__ import annotations

import random
import struct
import sys
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from pvio.layouts import BlkifOp, BlkifRsp
from pvio.layouts import XenbusState as S
from pvio.testing._blk import (
    PAGE,
    RSP,
    SECTOR,
    RawBlkFront,
    attach_raw,
    discard_req,
    indirect_req,
    rw_req,
    seg_bytes,
)
from pvio.testing._core import Check, KitError, Report, expect, run_checks
from pvio.testing._frontend import (
    FrontendEnv,
    FrontendTarget,
    Observation,
    Scenario,
    common_checks,
    decimal_key,
    hostile_check,
    program_main,
    run_frontend,
    vanish,
)
from pvio.xenbus.device import backend_path
from pvio.xenbus.state import parse_state

# ======================================================================= backend kit


@dataclass
class BackendTarget:
    """Where the backend under test is: its guest socket, the domain to claim, the device."""

    socket: str
    domain: str = "guest"
    devid: int | None = None  # None: the first device of the kit's type
    peer_domain: str | None = None  # net: a second domain with a vif, for RX checks


class _Attached:
    def __init__(self, session, raw: RawBlkFront, device, devid: int) -> None:
        self.session, self.raw, self.device, self.devid = session, raw, device, devid

    @property
    def xs(self):
        return self.session.xs

    @property
    def be(self) -> str:
        return backend_path("vbd", self.session.domid, self.devid)

    async def backend_key(self, key: str) -> bytes | None:
        return await self.xs.read_or_none(f"{self.be}/{key}")

    async def backend_state(self) -> S:
        return parse_state(await self.backend_key("state"))

    async def sectors(self) -> int:
        raw = await self.backend_key("sectors")
        expect(raw is not None and raw.isdigit(), f"backend published sectors={raw!r}")
        return int(raw)


@asynccontextmanager
async def _attach(target: BackendTarget, **kwargs):
    from pvio.frontends.session import open_session

    async with open_session(target.socket, target.domain, pool_pages=512) as session:
        devid = target.devid
        if devid is None:
            vbds = sorted(d.devid for d in await session.devices() if d.type == "vbd")
            if not vbds:
                raise KitError(f"domain {target.domain!r} offers no vbd")
            devid = vbds[0]
        raw, device = await attach_raw(session, devid, **kwargs)
        yield _Attached(session, raw, device, devid)


async def _wait_backend(att: _Attached, want: set[S], timeout: float = 5.0) -> S:
    with trio.move_on_after(timeout):
        while True:
            state = await att.backend_state()
            if state in want:
                return state
            await trio.sleep(0.02)
    return await att.backend_state()


def _ids(n: int) -> list[int]:
    rng = random.Random(0x5EED)
    return rng.sample(range(1, 1 << 62), n)


async def _bb_connects(t: BackendTarget) -> None:
    async with _attach(t) as att:
        state = await att.backend_state()
        expect(state == S.Connected, f"after the frontend published its ring and went "
               f"Initialised, the backend is {state.name}, not Connected")
        for key in ("sectors", "info", "sector-size"):
            value = await att.backend_key(key)
            expect(value is not None and value.strip().isdigit(),
                   f"a Connected backend must publish {key} (decimal); it has {value!r}")


async def _bb_initwait_features(t: BackendTarget) -> None:
    from pvio.frontends.session import open_session

    async with open_session(t.socket, t.domain, pool_pages=64) as session:
        vbds = [d for d in await session.devices() if d.type == "vbd"]
        if not vbds:
            raise KitError(f"domain {t.domain!r} offers no vbd")
        be = vbds[0].backend
        with trio.move_on_after(5):
            while parse_state(await session.xs.read_or_none(f"{be}/state")) != S.InitWait:
                await trio.sleep(0.02)
        state = parse_state(await session.xs.read_or_none(f"{be}/state"))
        expect(state == S.InitWait, f"before any frontend key the backend is {state.name}; "
               "it must wait in InitWait with its features published")
        for key in ("feature-flush-cache", "feature-discard", "feature-max-indirect-segments",
                    "max-ring-page-order", "multi-queue-max-queues"):
            value = await session.xs.read_or_none(f"{be}/{key}")
            expect(value is None or value.strip().isdigit(),
                   f"{key} must be a decimal number if present, not {value!r}")


async def _bb_write_read(t: BackendTarget) -> None:
    async with _attach(t) as att:
        raw = att.raw
        _, wref, wpage = raw.page(fill=b"pvio-conformance")
        _, rref, rpage = raw.page()
        wid, rid = _ids(2)
        [(i, op, st)] = await raw.call(rw_req(BlkifOp.WRITE, wid, 8, [(wref, 0, 7)]))
        expect((i, op, st) == (wid, BlkifOp.WRITE, BlkifRsp.OKAY),
               f"a valid one-page WRITE was answered (id {i:#x}, op {op}, status {st}); "
               f"expected (id {wid:#x}, op {int(BlkifOp.WRITE)}, status 0)")
        [(i, op, st)] = await raw.call(rw_req(BlkifOp.READ, rid, 8, [(rref, 0, 7)]))
        expect(st == BlkifRsp.OKAY, f"a valid READ of what was written got status {st}")
        expect(bytes(rpage) == bytes(wpage), "a READ of sectors 8..15 did not return the "
               "bytes the WRITE put there")


async def _bb_response_ids(t: BackendTarget) -> None:
    async with _attach(t) as att:
        raw = att.raw
        _, ref, _ = raw.page()
        ids = _ids(min(32, raw.ring.nr_ents))
        answers = await raw.call(*[rw_req(BlkifOp.READ, rid, k, [(ref, 0, 0)])
                                   for k, rid in enumerate(ids)])
        got = [a[0] for a in answers]
        expect(sorted(got) == sorted(ids), f"{len(ids)} requests with distinct 64-bit ids "
               f"got answers for ids {sorted(set(got) - set(ids))[:4]} not asked for, or "
               f"missed {sorted(set(ids) - set(got))[:4]}")
        expect(all(op == BlkifOp.READ for _, op, _ in answers),
               "every response must echo its request's operation")


async def _expect_status(att: _Attached, request: bytes, want: set[int], what: str) -> None:
    [(_, _, st)] = await att.raw.call(request)
    names = {int(v): v.name for v in BlkifRsp}
    expect(st in want, f"{what}: answered status {st} ({names.get(st, '?')}); expected "
           f"{' or '.join(names.get(w, str(w)) for w in sorted(want))}")
    # and the device still works
    _, ref, _ = att.raw.page()
    [(_, _, st)] = await att.raw.call(rw_req(BlkifOp.READ, 1, 0, [(ref, 0, 0)]))
    expect(st == BlkifRsp.OKAY, f"after {what}, a valid READ got status {st}: the device "
           "must keep working after a refused request")


async def _bb_out_of_range(t: BackendTarget) -> None:
    async with _attach(t) as att:
        sectors = await att.sectors()
        _, ref, _ = att.raw.page()
        await _expect_status(att, rw_req(BlkifOp.READ, 7, sectors - 1, [(ref, 0, 7)]),
                             {BlkifRsp.ERROR}, "a READ running past the last sector")
        await _expect_status(att, rw_req(BlkifOp.READ, 8, (1 << 64) - 4, [(ref, 0, 7)]),
                             {BlkifRsp.ERROR}, "a READ at sector 2^64-4 (overflow)")


async def _bb_bad_segments(t: BackendTarget) -> None:
    async with _attach(t) as att:
        _, ref, _ = att.raw.page()
        await _expect_status(att, rw_req(BlkifOp.READ, 1, 0, [(ref, 5, 2)]), {BlkifRsp.ERROR},
                             "a segment with last_sect < first_sect")
        await _expect_status(att, rw_req(BlkifOp.READ, 2, 0, [(ref, 0, 8)]), {BlkifRsp.ERROR},
                             "a segment with last_sect 8 (past a 4 KiB page)")
        await _expect_status(att, rw_req(BlkifOp.READ, 3, 0, [(ref, 0, 0)], nseg=12),
                             {BlkifRsp.ERROR}, "nr_segments 12 (> 11)")
        await _expect_status(att, rw_req(BlkifOp.READ, 4, 0, [], nseg=0), {BlkifRsp.ERROR},
                             "a READ with 0 segments")


async def _bb_unknown_op(t: BackendTarget) -> None:
    async with _attach(t) as att:
        _, ref, _ = att.raw.page()
        await _expect_status(att, rw_req(99, 5, 0, [(ref, 0, 0)]),
                             {BlkifRsp.ERROR, BlkifRsp.EOPNOTSUPP}, "operation 99")


async def _bb_bad_grants(t: BackendTarget) -> None:
    async with _attach(t) as att:
        raw = att.raw
        _, other, _ = raw.page(domid=att.session.domid + 1000)
        _, ro, _ = raw.page(readonly=True)
        await _expect_status(att, rw_req(BlkifOp.READ, 1, 0, [(4095 + 10**6, 0, 0)]),
                             {BlkifRsp.ERROR}, "a segment with grant ref out of the table")
        await _expect_status(att, rw_req(BlkifOp.READ, 2, 0, [(other, 0, 0)]),
                             {BlkifRsp.ERROR}, "a segment granted to another domain")
        await _expect_status(att, rw_req(BlkifOp.READ, 3, 0, [(ro, 0, 0)]),
                             {BlkifRsp.ERROR}, "a READ into a read-only grant")
        await _expect_status(att, rw_req(BlkifOp.READ, 4, 0, [(0, 0, 0)]),
                             {BlkifRsp.ERROR}, "grant ref 0 (reserved, never granted)")


async def _bb_flush(t: BackendTarget) -> None:
    async with _attach(t) as att:
        [(_, op, st)] = await att.raw.call(rw_req(BlkifOp.FLUSH_DISKCACHE, 9, 0, [], nseg=0))
        expect(op == BlkifOp.FLUSH_DISKCACHE and st == BlkifRsp.OKAY,
               f"FLUSH_DISKCACHE on a backend offering feature-flush-cache got op {op}, "
               f"status {st}")


async def _bb_discard(t: BackendTarget) -> None:
    async with _attach(t) as att:
        sectors = await att.sectors()
        [(_, _, st)] = await att.raw.call(discard_req(3, 0, 8))
        expect(st == BlkifRsp.OKAY, f"a DISCARD of sectors 0..7 got status {st}")
        await _expect_status(att, discard_req(4, sectors, 8), {BlkifRsp.ERROR},
                             "a DISCARD past the end of the disk")


async def _bb_indirect(t: BackendTarget) -> None:
    async with _attach(t) as att:
        raw = att.raw
        _, data_ref, data = raw.page(fill=b"indirect")
        _, seg_ref, segs = raw.page()
        segs[:8] = seg_bytes([(data_ref, 0, 7)])
        [(_, op, st)] = await raw.call(indirect_req(BlkifOp.WRITE, 11, 64, 1, [seg_ref]))
        expect(op == BlkifOp.INDIRECT and st == BlkifRsp.OKAY,
               f"an INDIRECT WRITE of one segment got op {op} status {st}; a response to an "
               "indirect request carries operation INDIRECT")
        _, rref, rpage = raw.page()
        [(_, _, st)] = await raw.call(rw_req(BlkifOp.READ, 12, 64, [(rref, 0, 7)]))
        expect(st == BlkifRsp.OKAY and bytes(rpage) == bytes(data),
               "data written with an INDIRECT request did not read back")


async def _bb_hostile_index(t: BackendTarget) -> None:
    async with _attach(t) as att:
        ring = att.raw.ring
        buf = att.raw.area(0)
        struct.pack_into("<I", buf, 0, ring.req_prod_pvt + ring.nr_ents + 5)  # req_prod
        att.raw.channel.notify()
        state = await _wait_backend(att, {S.Closing, S.Closed})
        expect(state in (S.Closing, S.Closed), f"the frontend published req_prod "
               f"{ring.nr_ents + 5} ahead (more than the ring holds); the backend is still "
               f"{state.name}: it must stop serving that device (ring §6)")
    async with _attach(t) as att:  # the backend still serves a fresh device
        _, ref, _ = att.raw.page()
        [(_, _, st)] = await att.raw.call(rw_req(BlkifOp.READ, 1, 0, [(ref, 0, 0)]))
        expect(st == BlkifRsp.OKAY, "after one device was disconnected for a broken ring, a "
               "new attach of the same domain did not work")


async def _bb_event_flood(t: BackendTarget) -> None:
    async with _attach(t) as att:
        for _ in range(20000):
            att.raw.channel.notify()
        _, ref, _ = att.raw.page()
        [(_, _, st)] = await att.raw.call(rw_req(BlkifOp.READ, 1, 0, [(ref, 0, 0)]),
                                          timeout=10)
        expect(st == BlkifRsp.OKAY, "after a flood of 20000 empty notifications a READ "
               f"got status {st}")


async def _bb_notifies(t: BackendTarget) -> None:
    async with _attach(t) as att:
        raw = att.raw
        _, ref, _ = raw.page()
        raw.send(rw_req(BlkifOp.READ, 1, 0, [(ref, 0, 0)]))
        raw.ring.final_check_for_responses()  # arm rsp_event: the backend must notify
        with trio.move_on_after(5):
            await raw.channel.wait()
        expect(raw.ring.take_responses(), "the backend answered without raising the event "
               "channel although rsp_event asked for it (ring §2.4), or did not answer")


async def _bb_state_abuse(t: BackendTarget) -> None:
    from pvio.frontends.session import open_session

    async with open_session(t.socket, t.domain, pool_pages=64) as session:
        vbd = next((d for d in await session.devices() if d.type == "vbd"), None)
        if vbd is None:
            raise KitError(f"domain {t.domain!r} offers no vbd")
        fe = f"device/vbd/{vbd.devid}"
        # Garbage, an unknown state, and Connected with no ring published at all.
        for value in ("not-a-state", "99", "-1", str(int(S.Connected))):
            await session.xs.write(f"{fe}/state", value)
            await trio.sleep(0.05)
        state = parse_state(await session.xs.read_or_none(f"{vbd.backend}/state"))
        expect(state != S.Connected, "a frontend that wrote garbage states and then "
               "Connected without publishing a ring got a Connected backend")
    async with _attach(t) as att:  # the backend (and the daemon) still serve the domain
        _, ref, _ = att.raw.page()
        [(_, _, st)] = await att.raw.call(rw_req(BlkifOp.READ, 1, 0, [(ref, 0, 0)]))
        expect(st == BlkifRsp.OKAY, "after the state-machine abuse, a fresh attach of the "
               "same domain did not work")


async def _bb_close(t: BackendTarget) -> None:
    async with _attach(t) as att:
        await att.device.close()
        state = await _wait_backend(att, {S.Closed})
        expect(state == S.Closed, f"after the frontend went Closing, the backend is "
               f"{state.name}, not Closed (xenbus §5)")


def _c(name: str, section: str, rule: str, fn, needs: str = "") -> Check:
    return Check(name, section, rule, fn, needs=needs)


BLOCK_BACKEND_CHECKS = [
    _c("xenbus.backend-initwait", "xenbus §5",
       "before the frontend publishes anything, the backend waits in InitWait with its "
       "features published as decimal keys", _bb_initwait_features),
    _c("xenbus.backend-connects", "xenbus §5",
       "a frontend that publishes ring-ref, event-channel and goes Initialised gets a "
       "Connected backend with sectors, info and sector-size", _bb_connects),
    _c("blkif.write-read", "blkif §3", "data written to sectors reads back unchanged",
       _bb_write_read),
    _c("blkif.response-id", "blkif §2",
       "every request is answered once, with its id and operation", _bb_response_ids),
    _c("blkif.out-of-range", "blkif §2",
       "a transfer past the disk (or overflowing) is answered BLKIF_RSP_ERROR",
       _bb_out_of_range),
    _c("blkif.bad-segments", "blkif §2",
       "bad segment bounds and segment counts are answered BLKIF_RSP_ERROR",
       _bb_bad_segments),
    _c("blkif.unknown-op", "blkif §2", "an unknown operation is answered with an error",
       _bb_unknown_op),
    _c("grant.bad-refs", "ring §4.2",
       "a segment whose grant is out of range, for another domain, or read-only for a "
       "READ is answered BLKIF_RSP_ERROR", _bb_bad_grants),
    _c("blkif.flush", "blkif §3", "FLUSH_DISKCACHE is answered OKAY when offered", _bb_flush,
       needs="feature-flush-cache"),
    _c("blkif.discard", "blkif §3", "DISCARD inside the disk is OKAY, past it ERROR",
       _bb_discard, needs="feature-discard"),
    _c("blkif.indirect", "blkif §3",
       "an INDIRECT request moves data like a direct one and is answered as INDIRECT",
       _bb_indirect, needs="feature-max-indirect-segments"),
    _c("ring.notify-responses", "ring §2.4",
       "the backend raises the event channel when rsp_event asks for it", _bb_notifies),
    _c("ring.hostile-req-prod", "ring §6",
       "an impossible req_prod stops that device (Closing) and nothing else",
       _bb_hostile_index),
    _c("evtchn.flood", "ring §5",
       "a flood of notifications without work does not stop the backend", _bb_event_flood),
    _c("xenbus.state-abuse", "xenbus §5",
       "garbage or out-of-order frontend states never connect a device without a ring, "
       "and the domain can attach again afterwards", _bb_state_abuse),
    _c("xenbus.backend-closes", "xenbus §5",
       "a frontend going Closing makes the backend go Closed", _bb_close),
]


async def check_block_backend(target: BackendTarget, *, select=None,
                              progress=None) -> Report:
    """Run :data:`BLOCK_BACKEND_CHECKS` against the daemon at ``target``."""
    from pvio.frontends.session import open_session

    features: dict[str, bool] = {}

    async def offered(key: str) -> bool:
        if key not in features:
            async with open_session(target.socket, target.domain, pool_pages=64) as s:
                vbds = [d for d in await s.devices() if d.type == "vbd"]
                raw = await s.xs.read_or_none(f"{vbds[0].backend}/{key}") if vbds else None
            features[key] = raw is not None and raw.strip() not in (b"", b"0")
        return features[key]

    return await run_checks("block-backend", BLOCK_BACKEND_CHECKS, target, select=select,
                            offered=offered, progress=progress)


# ====================================================================== frontend kit


def _instrumented(obs: Observation, misbehave: str = ""):
    """A BlkBackend subclass that records requests (and misbehaves if asked)."""
    from pvio import blkif
    from pvio.backends.blkback import BlkBackend

    class StrictBlkBackend(BlkBackend):
        inline_io = False  # every request passes through _execute, which observes it

        async def _execute(self, reqs, mapper, pool, feats):
            if misbehave == "bad-rsp-prod":
                # Instead of answering, publish an rsp_prod 1000 past the requests.
                buf = self.conn.queues[0].mappings[0].buf
                struct.pack_into("<I", buf, 8, struct.unpack_from("<I", buf, 0)[0] + 1000)
                self.conn.queues[0].channel.notify()
                await trio.sleep(1)  # the frontend must notice; then carry on
            in_flight: set[int] = set()
            for req in reqs:
                obs.requests += 1
                if isinstance(req, blkif.BlkError):
                    obs.invalid.append(f"request id {req.id:#x}: {req.reason}")
                    continue
                if req.id in in_flight:
                    obs.duplicate_ids.append(req.id)
                in_flight.add(req.id)
            results = await super()._execute(reqs, mapper, pool, feats)
            for req, (rid, _, status) in zip(reqs, results, strict=True):
                if isinstance(req, blkif.BlkRequest) and status != BlkifRsp.OKAY:
                    obs.invalid.append(f"request id {rid:#x}: status {status} (its grants "
                                       "or range were refused)")
            if misbehave == "wrong-id" and obs.requests >= 2:
                results = [((rid + 1) & ((1 << 64) - 1), op, st) for rid, op, st in results]
            return results

    return StrictBlkBackend


_FRONTEND_CONFIG = """
[[domain]]
name = "{domain}"
  [[domain.device]]
  type = "vbd"
  devid = 51712
  image = "conformance.img"
  size = "4M"
"""


async def _run(target: FrontendTarget, misbehave: str = "") -> Observation:
    obs = Observation()
    tasks = [vanish] if misbehave == "vanish" else []
    scenario = Scenario(_FRONTEND_CONFIG, "vbd", _instrumented(obs, misbehave),
                        ("ring-ref", "ring-page-order", "ring-ref0", "event-channel",
                         "protocol"), tasks)
    return await run_frontend(target, scenario, obs)


async def _bf_keys(env: FrontendEnv) -> None:
    obs = await env.strict()
    keys = obs.keys_at_initialised
    decimal_key(obs, "event-channel")
    ring = keys.get("ring-ref") or keys.get("ring-ref0")
    expect(ring is not None and ring.strip().isdigit(),
           f"at Initialised, ring-ref must be a decimal grant ref; it is {ring!r}")
    proto = keys.get("protocol")
    expect(proto in (None, b"x86_64-abi", b"arm-abi"),
           f"protocol {proto!r} is not a native ABI name")


async def _bf_requests_valid(env: FrontendEnv) -> None:
    obs = await env.strict()
    expect(obs.requests > 0, "the frontend sent no request at all")
    expect(not obs.invalid, f"{len(obs.invalid)} of {obs.requests} requests were invalid, "
           f"e.g. {obs.invalid[:3]}")


async def _bf_unique_ids(env: FrontendEnv) -> None:
    obs = await env.strict()
    expect(not obs.duplicate_ids, f"ids {obs.duplicate_ids[:4]} were in flight twice in one "
           "batch")


_COMMON = common_checks("blkif §4", "finishes its work")
BLOCK_FRONTEND_CHECKS = [
    _COMMON["completes"],
    _COMMON["states"],
    Check("blkif.frontend-keys", "blkif §1", "ring-ref, event-channel (and protocol) are "
          "published before Initialised", _bf_keys, timeout=90),
    Check("blkif.requests-valid", "blkif §2", "every request the frontend sends passes the "
          "backend's validation", _bf_requests_valid, timeout=90),
    Check("blkif.unique-ids", "blkif §2", "no id is in flight twice", _bf_unique_ids,
          timeout=90),
    _COMMON["closes"],
    hostile_check("hostile.wrong-id", "blkif §4", "a response with an id not in flight is "
                  "detected (the frontend fails, it does not hang or crash)", "wrong-id",
                  "a backend answering with wrong ids"),
    hostile_check("hostile.bad-rsp-prod", "ring §6", "an impossible rsp_prod is detected "
                  "(fail, not hang or crash)", "bad-rsp-prod",
                  "a backend publishing an impossible rsp_prod"),
    _COMMON["vanish"],
]


async def check_block_frontend(target: FrontendTarget, *, select=None,
                               progress=None) -> Report:
    """Run :data:`BLOCK_FRONTEND_CHECKS` against the frontend ``target``."""
    return await run_checks("block-frontend", BLOCK_FRONTEND_CHECKS,
                            FrontendEnv(target, _run, _run), select=select, progress=progress)


# ------------------------------------------------------------ pvio's own frontend program


async def reference_block_frontend(socket_path: str, domain: str) -> None:
    """pvio's blkfront doing what the kit expects of a frontend: attach, write a
    pattern, flush, read it back, verify, close."""
    from pvio.frontends.blkfront import BLK_KEYS, BlkFront
    from pvio.frontends.session import open_session

    async with open_session(socket_path, domain, pool_pages=256) as session:
        vbds = [d for d in await session.devices() if d.type == "vbd"]
        if not vbds:
            raise RuntimeError(f"domain {domain!r} offers no vbd")
        front = BlkFront(session)
        device = await session.attach(front, vbds[0].devid, BLK_KEYS)
        await device.wait_connected(10)
        pattern = bytes(range(256)) * (4 * PAGE // 256)
        await front.write(8 * SECTOR, pattern)
        await front.flush()
        back = await front.read(8 * SECTOR, len(pattern))
        if back != pattern:
            raise RuntimeError("error: read back differs from what was written")
        await device.close()


def main() -> int:
    """``python -m pvio.testing.block``: pvio's blkfront as a frontend program
    (``PVIO_SOCKET``, ``PVIO_DOMAIN``), e.g. for ``pvio conformance block --frontend-cmd``."""
    return program_main(reference_block_frontend, "wrote, flushed, read back and verified "
                        "16 KiB")


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "BLOCK_BACKEND_CHECKS",
    "BLOCK_FRONTEND_CHECKS",
    "RSP",
    "BackendTarget",
    "FrontendTarget",
    "Observation",
    "check_block_backend",
    "check_block_frontend",
    "reference_block_frontend",
]
