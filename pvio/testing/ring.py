"""Ring conformance: a ring implementation against Xen's ``io/ring.h`` semantics.

The implementation is reached through a :class:`RingAdapter`: two factories that
put a front or back end on a shared buffer (any language, e.g. cffi or ctypes
over a C library). Each check drives the implementation under test and pvio's
reference rings (differentially tested against Xen's own C macros compiled from
libxen-dev, tests/ring/) through the same operations on two buffers, and
compares every return value and every byte of the shared page.

A ring end is any object with the methods of :class:`pvio.ring.FrontRing` /
:class:`pvio.ring.BackRing` that the checks use: ``put_requests(data) -> int``,
``push_requests() -> bool`` (the notify decision), ``take_responses() -> bytes``,
``final_check_for_responses() -> int``; and ``take_requests() -> bytes``,
``put_responses(data) -> int``, ``push_responses() -> bool``,
``final_check_for_requests() -> int``. Data are whole slots, concatenated. A
ring end must raise (any exception) when the peer published an impossible
index (``RING_REQUEST_PROD_OVERFLOW`` / ``RING_RESPONSE_PROD_OVERFLOW``).
"""

from __future__ import annotations

import importlib
import random
from dataclasses import dataclass
from typing import Any, Protocol

from pvio.ring import BLKIF, NETIF_RX, NETIF_TX, BackRing, FrontRing, RingSpec
from pvio.ring.shm import PAGE_SIZE
from pvio.testing._core import Check, Report, expect, run_checks


class RingAdapter(Protocol):
    def front(self, spec: RingSpec, buf, start: int | None) -> Any:
        """A front end on ``buf``: ``start`` None means SHARED_RING_INIT + FRONT_RING_INIT,
        else FRONT_RING_ATTACH at ``start`` (the shared indices are already there)."""

    def back(self, spec: RingSpec, buf, start: int) -> Any:
        """A back end on ``buf`` (BACK_RING_ATTACH at ``start``)."""


@dataclass
class PvioRings:
    """pvio's own rings as a :class:`RingAdapter` (the default, and the reference)."""

    def front(self, spec: RingSpec, buf, start: int | None) -> FrontRing:
        return FrontRing.init(spec, buf) if start is None else FrontRing.attach(spec, buf,
                                                                                start)

    def back(self, spec: RingSpec, buf, start: int) -> BackRing:
        return BackRing.attach(spec, buf, start)


def load_adapter(spec: str | None) -> RingAdapter:
    """``MODULE:FACTORY`` (called with no arguments) or None for pvio's rings."""
    if not spec:
        return PvioRings()
    module, sep, name = spec.partition(":")
    if not sep:
        raise ValueError("want MODULE:FACTORY")
    return getattr(importlib.import_module(module), name)()


def _shared_start(buf, start: int) -> None:
    """Put all four shared indices at ``start`` (and the events one past), as a
    frontend that had already run this far would have left them."""
    import struct

    struct.pack_into("<IIII", buf, 0, start & 0xFFFFFFFF, (start + 1) & 0xFFFFFFFF,
                     start & 0xFFFFFFFF, (start + 1) & 0xFFFFFFFF)


class _Pair:
    """The implementation under test and the reference, side by side."""

    def __init__(self, adapter: RingAdapter, spec: RingSpec, start: int | None) -> None:
        self.spec = spec
        self.bufs = [bytearray(PAGE_SIZE), bytearray(PAGE_SIZE)]
        self.ends = []
        for buf, impl in zip(self.bufs, (adapter, PvioRings()), strict=True):
            if start is not None:
                _shared_start(buf, start)
            front = impl.front(spec, buf, start)
            back = impl.back(spec, buf, 0 if start is None else start)
            self.ends.append((front, back))
        self.step = 0

    def same(self, what: str, a, b) -> None:
        expect(a == b, f"step {self.step} ({what}): the implementation returned {a!r}, "
               f"Xen's ring.h semantics give {b!r}")

    def same_page(self, what: str) -> None:
        test, ref = self.bufs
        if test != ref:
            diff = next(i for i in range(len(test)) if test[i] != ref[i])
            field = {0: "req_prod", 4: "req_event", 8: "rsp_prod", 12: "rsp_event"}.get(
                diff - diff % 4, f"slot byte {diff - 64}" if diff >= 64 else "header pad")
            expect(False, f"step {self.step} ({what}): the shared page differs from Xen's "
                   f"at byte {diff} ({field}): {test[diff]:#04x} vs {ref[diff]:#04x}")

    def both(self, what: str, side: int, op):
        self.step += 1
        results = []
        for ends in self.ends:
            results.append(op(ends[side]))
        self.same(what, *[_plain(r) for r in results])
        self.same_page(what)
        return results[1]


def _plain(value):
    if isinstance(value, (memoryview, bytearray)):
        return bytes(value)
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return value


def _payload(rng: random.Random, spec: RingSpec, n: int, size: int) -> bytes:
    return bytes(rng.getrandbits(8) for _ in range(n * size))


def _sequence(adapter: RingAdapter, spec: RingSpec, seed: int, start: int | None,
              steps: int = 300) -> None:
    rng = random.Random(seed)
    pair = _Pair(adapter, spec, start)
    nr = (PAGE_SIZE - 64) // spec.slot_size
    nr = 1 << (nr.bit_length() - 1)
    outstanding = 0  # requests pushed but not answered
    answered = 0  # responses pushed, not taken
    queued = 0  # requests taken by the back end, not answered
    for _ in range(steps):
        action = rng.choice(["produce", "produce", "consume", "answer", "take", "final_f",
                             "final_b"])
        if action == "produce" and outstanding + answered + queued < nr:
            k = rng.randint(1, min(8, nr - outstanding - answered - queued))
            data = _payload(rng, spec, k, spec.req_size)
            pair.both("put_requests", 0, lambda f, d=data: f.put_requests(d))
            pair.both("push_requests (notify?)", 0, lambda f: f.push_requests())
            outstanding += k
        elif action == "consume":
            got = pair.both("take_requests", 1, lambda b: b.take_requests())
            n = len(got) // spec.req_size
            outstanding -= n
            queued += n
        elif action == "answer" and queued:
            k = rng.randint(1, queued)
            data = _payload(rng, spec, k, spec.rsp_size)
            pair.both("put_responses", 1, lambda b, d=data: b.put_responses(d))
            pair.both("push_responses (notify?)", 1, lambda b: b.push_responses())
            queued -= k
            answered += k
        elif action == "take":
            got = pair.both("take_responses", 0, lambda f: f.take_responses())
            answered -= len(got) // spec.rsp_size
        elif action == "final_f":
            pair.both("final_check_for_responses", 0, lambda f: bool(
                f.final_check_for_responses()))
        elif action == "final_b":
            pair.both("final_check_for_requests", 1, lambda b: bool(
                b.final_check_for_requests()))


async def _init_layout(adapter: RingAdapter) -> None:
    for spec in (BLKIF, NETIF_TX, NETIF_RX):
        pair = _Pair(adapter, spec, None)
        pair.same_page(f"{spec.name}: SHARED_RING_INIT + FRONT_RING_INIT")


async def _notify(adapter: RingAdapter) -> None:
    for seed in range(4):
        _sequence(adapter, BLKIF, seed, None)


async def _netif(adapter: RingAdapter) -> None:
    for seed in range(2):
        _sequence(adapter, NETIF_TX, 100 + seed, None)
        _sequence(adapter, NETIF_RX, 200 + seed, None)


async def _wrap(adapter: RingAdapter) -> None:
    for seed, start in enumerate((0xFFFFFFFF - 40, 0xFFFFFF00, 0x7FFFFFF0)):
        _sequence(adapter, BLKIF, 300 + seed, start)


def _raises(fn) -> bool:
    try:
        fn()
    except Exception:
        return True
    return False


async def _trusts_req_prod(adapter: RingAdapter) -> None:
    import struct

    buf = bytearray(PAGE_SIZE)
    front = adapter.front(BLKIF, buf, None)
    back = adapter.back(BLKIF, buf, 0)
    nr = BLKIF.nr_ents()
    front.put_requests(bytes(BLKIF.req_size))
    front.push_requests()
    struct.pack_into("<I", buf, 0, nr + 7)  # a hostile frontend: req_prod past the ring
    expect(_raises(back.take_requests), f"req_prod {nr + 7} with nothing answered is more "
           f"than a {nr}-slot ring holds; the back end consumed it instead of refusing "
           "(RING_REQUEST_PROD_OVERFLOW)")


async def _trusts_rsp_prod(adapter: RingAdapter) -> None:
    import struct

    buf = bytearray(PAGE_SIZE)
    front = adapter.front(BLKIF, buf, None)
    front.put_requests(bytes(BLKIF.req_size))
    front.push_requests()
    struct.pack_into("<I", buf, 8, 50)  # a hostile backend: rsp_prod past req_prod
    expect(_raises(front.take_responses), "rsp_prod 50 with one request outstanding; the "
           "front end consumed it instead of refusing (RING_RESPONSE_PROD_OVERFLOW)")


RING_CHECKS = [
    Check("ring.init-layout", "ring §2.3", "SHARED_RING_INIT + FRONT_RING_INIT leave the "
          "page as Xen's macros do (indices 0, events 1, zeroed pad)", _init_layout),
    Check("ring.notify-decision", "ring §2.4", "RING_PUSH_*_AND_CHECK_NOTIFY, the consumers "
          "and RING_FINAL_CHECK_* give Xen's notify decisions and page bytes (blkif)",
          _notify),
    Check("ring.netif-rings", "ring §2.1", "netif tx/rx rings (12- and 8-byte slots, "
          "different request and response sizes) behave as Xen's", _netif),
    Check("ring.index-wrap", "ring §2.2", "free-running u32 indices wrap at 2^32 exactly as "
          "Xen's", _wrap),
    Check("ring.request-overflow", "ring §6", "a back end refuses a req_prod more than a ring "
          "ahead instead of trusting it", _trusts_req_prod),
    Check("ring.response-overflow", "ring §6", "a front end refuses an rsp_prod beyond its "
          "requests instead of trusting it", _trusts_rsp_prod),
]


async def check_ring(adapter: RingAdapter, *, select=None, progress=None) -> Report:
    """Run :data:`RING_CHECKS` on ``adapter``'s rings."""
    return await run_checks("ring", RING_CHECKS, adapter, select=select, progress=progress)
