"""Ring ends hold the shared mapping until released (so it is never unmapped under them)."""

import os

import pytest

from pvio.ring import BLKIF, BackRing, FrontRing, LocalProtocolError, SharedMemory


def test_shared_memory_cannot_close_under_a_ring_until_released():
    shm = SharedMemory.create(4 * 4096)
    front = FrontRing.init(BLKIF, shm.page(0))
    back = BackRing.attach(BLKIF, shm.page(0))
    with pytest.raises(LocalProtocolError):
        shm.close()
    front.produce(bytes(BLKIF.req_size))  # the mapping is intact after the refusal
    assert len(back.take_requests()) == BLKIF.req_size
    front.release()
    back.release()
    shm.close()


async def test_a_peer_notifying_for_nothing_is_throttled_real_work_is_not():
    """hardening.md #7: wake-ups with no work are counted; past a budget the waiter
    pauses, so a flooding peer costs bounded CPU; a wake-up with work resets it."""
    import trio

    from pvio.ring import EventChannelTable, wait_for_work

    shm = SharedMemory.create(4096)
    front = FrontRing.init(BLKIF, shm.page(0))
    back = BackRing.attach(BLKIF, shm.page(0))
    table = EventChannelTable(1)
    unbound = table.alloc_unbound(0)
    back_chan = EventChannelTable(0).bind_interdomain(1, unbound.port, tuple(
        os.dup(fd) for fd in unbound.peer_fds()))
    back_chan.consume()  # the bind's own pending event
    wakes = 0
    with trio.move_on_after(0.5):
        while True:
            unbound.channel.notify()  # a flood of events, no requests
            await wait_for_work(back, back_chan)
            wakes += 1
    assert wakes <= back_chan.spurious <= wakes + 1  # the last pause was cut short
    assert back_chan.throttled >= 1
    assert wakes < back_chan.SPURIOUS_BUDGET + 10  # bounded: 0.5 s buys few pauses
    # Real work resets the count: the next wake-up is served at once.
    front.produce(bytes(BLKIF.req_size))
    unbound.channel.notify()
    with trio.fail_after(0.1):
        await wait_for_work(back, back_chan)
    assert back_chan._idle_wakes == 0
    for end in (front, back):
        end.release()
    back_chan.close()
    table.close_all()
    shm.close()


def test_regression_a_refused_call_keeps_no_pointer_into_the_caller_s_buffer():
    """gh-77894 (see pvio.ring._lib.pin_buffer): a cffi pointer into a
    memoryview that outlives the call in a traceback's frame could crash the
    garbage collector. A put of a partial item and a read from a broken byte
    ring raised while holding one; now the caller's view can be released while
    the error (and its traceback) is still kept (BufferError before)."""
    from pvio.ring import RingBrokenError, console_rings

    shm = SharedMemory.create(4096)
    front = FrontRing.init(BLKIF, shm.page(0))
    view = memoryview(bytearray(BLKIF.req_size + 1))
    with pytest.raises(LocalProtocolError) as kept:
        front.put_requests(view)
    view.release()
    del kept
    front.release()

    page = memoryview(bytearray(4096))
    _, rx = console_rings(page, frontend=False)  # reads the guest's "out" ring
    page[3084:3088] = (5000).to_bytes(4, "little")  # out_prod beyond the buffer
    buf = memoryview(bytearray(64))
    with pytest.raises(RingBrokenError) as kept:
        rx.readinto(buf)
    buf.release()
    del kept
    shm.close()
