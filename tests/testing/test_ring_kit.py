"""The ring kit: Xen's own C macros pass it, pvio's rings pass it, and the
deliberately broken rings fail exactly the checks that should catch them."""

from __future__ import annotations

from pvio.testing.ring import RING_CHECKS, PvioRings, check_ring
from tests.testing.broken import NoNotifyLogicRings, TrustingRings


class _XenEnd:
    """One end of a ring driven by Xen's unmodified ring.h macros (tests/ring/xen_c.py)."""

    def __init__(self, xen, spec, buf, start, front: bool) -> None:
        self.xen, self.t = xen, spec.name
        ffi = xen.ffi
        self.page = ffi.from_buffer(buf)
        self.size = len(buf)
        self.r = ffi.new(f"struct {self.t}_{'front' if front else 'back'}_ring *")
        self.req = self.fn("req_size")()
        self.rsp = self.fn("rsp_size")()
        if front and start is None:
            self.fn("shared_ring_init")(self.page)
            self.fn("front_init")(self.r, self.page, self.size)
        elif front:
            self.fn("front_attach")(self.r, self.page, self.size, start)
        else:
            self.fn("back_attach")(self.r, self.page, self.size, start)
        self.nr = self.fn("const_ring_size")(self.size)

    def fn(self, name):
        return self.xen.ring(self.t, name)

    def _take(self, name: str, size: int) -> bytes:
        dst = self.xen.ffi.new("uint8_t[]", self.nr * size)
        n = self.fn(name)(self.r, dst, self.nr)
        if n < 0:
            raise ValueError("ring.h overflow check refused the peer's index")
        return bytes(self.xen.ffi.buffer(dst, n * size))

    # front
    def put_requests(self, data) -> int:
        return self.fn("front_put")(self.r, self.xen.ffi.from_buffer(bytes(data)),
                                    len(data) // self.req)

    def push_requests(self) -> bool:
        return bool(self.fn("front_push_check")(self.r))

    def take_responses(self) -> bytes:
        return self._take("front_take", self.rsp)

    def final_check_for_responses(self) -> int:
        return self.fn("front_final_check")(self.r)

    # back
    def take_requests(self) -> bytes:
        return self._take("back_take", self.req)

    def put_responses(self, data) -> int:
        n = len(data) // self.rsp
        self.fn("back_put")(self.r, self.xen.ffi.from_buffer(bytes(data)), n)
        return n

    def push_responses(self) -> bool:
        return bool(self.fn("back_push_check")(self.r))

    def final_check_for_requests(self) -> int:
        return self.fn("back_final_check")(self.r)


class XenCRings:
    def __init__(self, xen) -> None:
        self.xen = xen

    def front(self, spec, buf, start):
        return _XenEnd(self.xen, spec, buf, start, front=True)

    def back(self, spec, buf, start):
        return _XenEnd(self.xen, spec, buf, start, front=False)


async def test_xens_own_ring_macros_pass_every_check(xen):
    # The kit's reference is pvio's ring; this proves it is Xen's semantics.
    report = await check_ring(XenCRings(xen))
    assert report.ok, report.format()
    assert len(report.results) == len(RING_CHECKS)


async def test_pvios_rings_pass_every_check():
    report = await check_ring(PvioRings())
    assert report.ok, report.format()


async def test_forgotten_notify_barrier_logic_fails_the_notify_check():
    report = await check_ring(NoNotifyLogicRings())
    result = report.result("ring.notify-decision")
    assert result.outcome == "fail"
    assert "ring §2.4" in result.line and "notify" in result.line
    assert "Xen's ring.h semantics give" in result.message
    # layout and overflow refusal are not what this implementation gets wrong
    assert report.result("ring.init-layout").outcome == "pass"
    assert report.result("ring.request-overflow").outcome == "pass"
    assert not report.ok


async def test_a_back_end_that_trusts_indices_fails_the_overflow_check():
    report = await check_ring(TrustingRings())
    result = report.result("ring.request-overflow")
    assert result.outcome == "fail"
    assert "[ring §6]" in result.line
    assert "RING_REQUEST_PROD_OVERFLOW" in result.message
    assert report.result("ring.response-overflow").outcome == "pass"  # its front end is fine
