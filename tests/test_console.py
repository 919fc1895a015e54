"""pvio.console (ConsoleStream, HeadTailBuffer) and the console command line.

ConsoleStream as a ``trio.abc.HalfCloseableStream``: two ends (guest and
backend) built directly over one ``xencons_interface`` page with
:func:`pvio.ring.console_rings` and a pair of event channels from
:class:`pvio.ring.EventChannelTable` (tests/console_helpers.py).

Why not ``trio.testing.check_half_closeable_stream``: Xen's console page has
no close and no end-of-file, so three of its checks cannot hold for any
implementation of io/console.h:

* "closing the receiver makes the sender's send_all raise BrokenResourceError"
  and "closing the receiver wakes wait_send_all_might_not_block": nothing in
  the page tells a writer that the reader is gone (the XenbusState handshake
  does; see tests/frontends/test_console.py for ConsoleFront);
* "after the sender closes, receive_some returns b''" (same reason);
* "after send_eof, receive_some returns b''": send_eof sends Ctrl-D (0x04),
  which a tty turns into end-of-input, but the stream delivers it as a byte.

Everything else the generic check covers is tested here explicitly (the same
scenarios, written out), plus what the generic check misses: no data lost by a
cancelled receive_some, the u32 index wrap, the bogus-index check, and the rate
limit on unproductive wake-ups (which must not throttle legitimate traffic).

Command line, against a ``python -m pvio serve`` subprocess (everything stopped
by pid): an interactive ``bash`` run by ``pvio guest-console`` is driven through
the backend's pty with pexpect, the way a new user would (prompt, command,
output, Ctrl-C, ``exit 3``); ``pvio console`` attaches in a real terminal
(pexpect.spawn), detaches on Ctrl-] and restores the terminal mode.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import subprocess
import sys
import time

import pexpect
import pexpect.fdpexpect
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from trio.testing import assert_checkpoints, wait_all_tasks_blocked

from pvio._console_cli import _find_tty
from pvio.console import EOT, HeadTailBuffer
from pvio.ring import RingBrokenError
from tests.blk_helpers import leaves
from tests.console_helpers import (
    IN_CONS,
    IN_PROD,
    IN_SIZE,
    OUT_CONS,
    OUT_OFF,
    OUT_PROD,
    OUT_SIZE,
    echo_forever,
    get_u32,
    make_pair,
    pct,
    set_u32,
    stream_pair,
)
from tests.evtchn_helpers import blocked_send
from tests.pvio_daemon import clean_env, serving

MIB = 1 << 20


def busy(exc: BaseException) -> bool:
    return all(isinstance(e, trio.BusyResourceError) for e in leaves(exc))


async def clog(stream) -> int:
    """Fill ``stream``'s send ring behind its back (no notify): sends now block."""
    return stream.tx.write(b"c" * stream.tx.size)


# ----------------------------------------------------------------- the page itself


async def test_each_end_writes_its_own_half_of_the_page():
    async with stream_pair() as (guest, back, page):
        await guest.send_all(b"to the backend")
        await back.send_all(b"to the guest")
        assert page[OUT_OFF:OUT_OFF + 14] == b"to the backend"
        assert page[0:12] == b"to the guest"
        assert get_u32(page, OUT_PROD) == 14 and get_u32(page, IN_PROD) == 12
        assert await back.receive_some() == b"to the backend"
        assert await guest.receive_some() == b"to the guest"
        assert get_u32(page, OUT_CONS) == 14 and get_u32(page, IN_CONS) == 12
        assert (guest.tx.size, guest.rx.size) == (OUT_SIZE, IN_SIZE)


@pytest.mark.parametrize("start", [0xFFFFFF00, 0xFFFFFFFF, 0x7FFFFFFF])
async def test_indices_run_freely_across_2_to_the_32(start):
    data = random.Random(start).randbytes(3 * OUT_SIZE + 123)
    async with stream_pair(start=start) as (guest, back, page):
        for sender, receiver in ((guest, back), (back, guest)):
            got = bytearray()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sender.send_all, data)
                while len(got) < len(data):
                    got += await receiver.receive_some()
            assert got == data
        assert get_u32(page, OUT_PROD) == (start + len(data)) & 0xFFFFFFFF
        assert get_u32(page, IN_CONS) == (start + len(data)) & 0xFFFFFFFF


# ------------------------------------------------------ trio stream semantics


async def test_send_and_receive_accept_every_buffer_type():
    async with stream_pair() as (guest, back, _):
        for sender, receiver in ((guest, back), (back, guest)):
            with assert_checkpoints():
                await sender.send_all(b"")  # no special meaning
            for data in (b"x", bytearray(b"1"), memoryview(b"2"), memoryview(b"abc")[1:]):
                with assert_checkpoints():
                    await sender.send_all(data)
                with assert_checkpoints():
                    assert await receiver.receive_some(1) == bytes(data)[:1]
                if len(data) > 1:
                    assert await receiver.receive_some() == bytes(data)[1:]
            await sender.send_all(b"xy")
            assert await receiver.receive_some(None) == b"xy"


async def test_receive_some_checks_max_bytes():
    async with stream_pair() as (guest, back, _):
        for bad, exc in ((0, ValueError), (-1, ValueError), (1.5, TypeError)):
            with pytest.raises(exc):
                await guest.receive_some(bad)
        await back.send_all(b"abcdef")
        assert await guest.receive_some(4) == b"abcd"
        assert await guest.receive_some(100_000) == b"ef"


async def test_one_receiver_and_one_sender_at_a_time():
    async with stream_pair() as (guest, back, _):
        with pytest.raises(BaseExceptionGroup) as caught:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(guest.receive_some, 1)
                nursery.start_soon(guest.receive_some, 1)
        assert busy(caught.value)
        await clog(back)
        with pytest.raises(BaseExceptionGroup) as caught:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(back.send_all, b"123")
                nursery.start_soon(back.send_all, b"123")
        assert busy(caught.value)


async def test_duplex_one_mib_each_way_in_random_chunks():
    """trio's duplex check: both ends send and receive at once."""
    size, chunk_max = MIB, 1 << 14
    data = random.Random(0).randbytes(size)

    async def sender(stream, payload, seed):
        rng, view = random.Random(seed), memoryview(payload)
        while view:
            n = rng.randint(1, chunk_max)
            await stream.send_all(view[:n])
            view = view[n:]

    async def receiver(stream, expected, seed):
        rng, got = random.Random(seed), bytearray()
        while len(got) < len(expected):
            chunk = await stream.receive_some(rng.randint(1, chunk_max))
            assert chunk
            got += chunk
        assert got == expected

    async with stream_pair() as (guest, back, _):
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sender, guest, data, 0)
                nursery.start_soon(sender, back, data[::-1], 1)
                nursery.start_soon(receiver, guest, data[::-1], 2)
                nursery.start_soon(receiver, back, data, 3)
        assert guest.bytes_out == back.bytes_in == size
        assert back.bytes_out == guest.bytes_in == size


async def test_send_all_waits_for_room_and_resumes():
    async with stream_pair() as (guest, back, _):
        await clog(back)
        done = trio.Event()

        async def send():
            await back.send_all(b"after")
            done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            await trio.testing.wait_all_tasks_blocked()
            assert not done.is_set()
            got = bytearray()
            while not got.endswith(b"after"):
                got += await guest.receive_some()
        assert got == b"c" * IN_SIZE + b"after"


async def test_close_semantics():
    async with stream_pair() as (guest, _back, _):
        with assert_checkpoints():
            await guest.aclose()
        await guest.aclose()  # repeatedly is fine
        for call in (lambda: guest.send_all(b"x"), lambda: guest.send_all(b""),
                     lambda: guest.receive_some(10)):
            with pytest.raises(trio.ClosedResourceError):
                await call()
    async with stream_pair() as (guest, _back, _):
        with trio.CancelScope() as scope:  # a cancelled aclose still closes
            scope.cancel()
            await guest.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await guest.send_all(b"123")


async def test_close_wakes_a_blocked_receiver_and_a_blocked_sender():
    async with stream_pair() as (guest, _back, _):
        await clog(guest)

        async def expect_closed(afn, *args):
            with pytest.raises(trio.ClosedResourceError):
                await afn(*args)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(expect_closed, guest.receive_some, 10)
            nursery.start_soon(expect_closed, guest.send_all, b"xyzzy")
            await trio.testing.wait_all_tasks_blocked()
            await guest.aclose()


async def test_cancelled_calls_raise_cancelled_and_the_stream_still_closes():
    async with stream_pair() as (guest, back, _):
        with trio.CancelScope() as scope:
            scope.cancel()
            with pytest.raises(trio.Cancelled):
                await guest.receive_some(1)
        await guest.aclose()
        await back.aclose()


async def test_a_cancelled_receive_some_consumes_nothing():
    """trio's rule: a call that raises Cancelled did nothing. Here receive_some
    copies the bytes out of the ring and publishes in_cons, *then* checkpoints;
    cancelled there, the bytes are gone from the ring and never returned
    (pvio/console.py ConsoleStream.receive_some: checkpoint_if_cancelled()
    before reading, cancel_shielded_checkpoint() after)."""
    async with stream_pair() as (guest, back, _):
        await back.send_all(b"precious")
        assert guest.rx.pending() == 8
        with trio.CancelScope() as scope:
            scope.cancel()
            got = await guest.receive_some()
        assert scope.cancelled_caught, f"returned {got!r} despite the cancel"
        assert guest.rx.pending() == 8, "a cancelled receive_some consumed the data"
        assert await guest.receive_some() == b"precious"


# ---------------------------------------------------- wait_send_all_might_not_block


async def test_wait_send_all_might_not_block_wakes_when_the_reader_makes_room():
    async with stream_pair() as (guest, back, _):
        await clog(back)
        record = []

        async def waiter(scope):
            record.append("waiter sleeping")
            await back.wait_send_all_might_not_block()
            record.append("waiter woke up")
            scope.cancel()

        async def reader():
            await trio.testing.wait_all_tasks_blocked()
            record.append("reader starting")
            while True:
                await guest.receive_some(100)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter, nursery.cancel_scope)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(reader)
        assert record == ["waiter sleeping", "reader starting", "waiter woke up"]


async def test_wait_send_all_might_not_block_is_a_checkpoint():
    """Every trio async call checkpoints; with room in the ring this one returns
    without one (ConsoleStream.wait_send_all_might_not_block: add
    ``await trio.lowlevel.checkpoint()`` on the non-blocking path)."""
    async with stream_pair() as (guest, _back, _):
        with assert_checkpoints():
            await guest.wait_send_all_might_not_block()


async def test_wait_send_all_might_not_block_on_a_closed_stream_raises_closed():
    """trio.abc.SendStream: ClosedResourceError "if you previously closed this
    stream object, or if another task closes it while the call is running".
    ConsoleStream.wait_send_all_might_not_block returns instead (its loop ends
    on ``_closed``; raise ClosedResourceError there)."""
    async with stream_pair() as (guest, _back, _):
        await clog(guest)

        async def close_soon():
            await trio.testing.wait_all_tasks_blocked()
            await guest.aclose()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(close_soon)
            with pytest.raises(trio.ClosedResourceError):
                await guest.wait_send_all_might_not_block()
        with pytest.raises(trio.ClosedResourceError):
            await guest.wait_send_all_might_not_block()


async def test_wait_send_all_might_not_block_conflicts_with_other_senders():
    """trio.abc.SendStream: BusyResourceError if another task is in send_all,
    wait_send_all_might_not_block or send_eof. ConsoleStream's
    wait_send_all_might_not_block does not take the send lock (wrap its body in
    ``with self._send_conflict:``)."""
    async with stream_pair() as (_guest, back, _):
        await clog(back)
        with pytest.raises(BaseExceptionGroup) as caught:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(back.wait_send_all_might_not_block)
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(back.wait_send_all_might_not_block)
                await trio.testing.wait_all_tasks_blocked()
                nursery.cancel_scope.cancel()  # both waiting: nothing was refused
        assert busy(caught.value), caught.value
    async with stream_pair() as (_guest, back, _):
        await clog(back)
        with pytest.raises(BaseExceptionGroup) as caught:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(back.wait_send_all_might_not_block)
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(back.send_eof)
                await trio.testing.wait_all_tasks_blocked()
                nursery.cancel_scope.cancel()
        assert busy(caught.value), caught.value


# ------------------------------------------------------------------------ send_eof


async def test_send_eof_sends_ctrl_d_then_refuses_sends():
    async with stream_pair() as (guest, back, _):
        await guest.send_all(b"x")
        with assert_checkpoints():
            await guest.send_eof()
        # Xen's console has no EOF: what a terminal sends for end of input
        assert await back.receive_some(10) == b"x" + EOT
        with pytest.raises(trio.ClosedResourceError):
            await guest.send_all(b"y")
        # the other direction still works, and receiving on the EOF side too
        await back.send_all(b"x")
        await back.send_eof()
        assert await guest.receive_some(10) == b"x" + EOT


async def test_send_eof_again_is_a_checkpoint():
    """A repeated send_eof returns without a checkpoint (ConsoleStream.send_eof:
    ``await trio.lowlevel.checkpoint()`` when ``_eof_sent`` is already set)."""
    async with stream_pair() as (guest, _back, _):
        await guest.send_eof()
        with assert_checkpoints():
            await guest.send_eof()


async def test_send_eof_conflicts_with_a_blocked_send_all():
    async with stream_pair() as (guest, _back, _):
        await clog(guest)
        with pytest.raises(BaseExceptionGroup) as caught:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(guest.send_all, b"x")
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(guest.send_eof)
        assert busy(caught.value)


async def test_the_page_has_no_close_so_a_closed_reader_is_invisible_to_the_writer():
    """Why trio's generic "closing the receiver breaks the sender" check cannot
    hold: the writer just fills the ring and waits (the XenbusState handshake
    carries the close; ConsoleFront and ConsoleBackend close their streams)."""
    async with stream_pair() as (guest, back, _):
        await back.aclose()
        with trio.move_on_after(0.3) as waited:
            await guest.send_all(b"x" * (OUT_SIZE + 1))
        assert waited.cancelled_caught
        assert guest.tx.pending() == OUT_SIZE


# ------------------------------------------------------------ hostile indices


async def test_prod_far_ahead_breaks_the_stream_for_good():
    async with stream_pair() as (guest, back, page):
        await guest.send_all(b"fine")
        assert await back.receive_some() == b"fine"
        set_u32(page, OUT_PROD, get_u32(page, OUT_CONS) + OUT_SIZE + 1)
        guest.channel.notify()
        for _ in range(2):  # and it stays broken
            with pytest.raises(trio.BrokenResourceError) as caught:
                await back.receive_some()
            assert isinstance(caught.value.__cause__, RingBrokenError)
        assert back.rx.broken


async def test_a_full_ring_is_not_a_bogus_index():
    async with stream_pair() as (guest, back, page):
        set_u32(page, OUT_PROD, OUT_SIZE)  # exactly full: legal
        assert len(await back.receive_some()) == OUT_SIZE
        set_u32(page, IN_PROD, IN_SIZE)
        assert len(await guest.receive_some()) == IN_SIZE


async def test_cons_beyond_prod_breaks_the_writer():
    async with stream_pair() as (_guest, back, page):
        await back.send_all(b"abc")
        set_u32(page, IN_CONS, get_u32(page, IN_PROD) + 100)  # consumed the future
        with pytest.raises(trio.BrokenResourceError) as caught:
            await back.send_all(b"more")
        assert isinstance(caught.value.__cause__, RingBrokenError)


async def test_wait_send_all_might_not_block_reports_a_broken_ring_as_broken_resource():
    """It reads the indices through ByteRing.free() and lets RingBrokenError
    escape (ConsoleStream.wait_send_all_might_not_block: catch it and raise
    ``self._broken(exc)`` like send_all does)."""
    async with stream_pair() as (_guest, back, page):
        set_u32(page, IN_CONS, get_u32(page, IN_PROD) + 100)
        with pytest.raises(trio.BrokenResourceError):
            await back.wait_send_all_might_not_block()


# ------------------------------------------------------------------ rate limit


def _notify_flood(fd: int, seconds: float) -> int:
    """Raise an eventfd in a tight loop (a peer notifying with no data)."""
    n, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(100):
            os.eventfd_write(fd, 1)
        n += 100
    return n


async def test_notify_flood_without_data_is_throttled():
    seconds = 1.0
    async with stream_pair(rate_events=30, rate_window=0.2) as (guest, back, _):
        before = back.channel.received
        sent = await trio.to_thread.run_sync(_notify_flood, guest.channel.remote_fd, seconds)
        wakeups = back.channel.received - before
        assert sent > 10_000, "the flood was not a flood"
        assert back.throttled >= 3
        # at most 30 honoured per 200 ms window (plus one throttled per window)
        assert wakeups <= 2 * 31 * (seconds / 0.2 + 1), wakeups
        # and the stream still works
        await guest.send_all(b"still here")
        assert await back.receive_some() == b"still here"


async def test_bulk_transfer_is_not_throttled():
    data = random.Random(1).randbytes(MIB)
    async with stream_pair() as (guest, back, _):
        for sender, receiver in ((guest, back), (back, guest)):
            got = bytearray()
            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(sender.send_all, data)
                    while len(got) < len(data):
                        got += await receiver.receive_some()
            assert got == data
        assert guest.throttled == back.throttled == 0


async def test_a_reader_taking_small_pieces_does_not_throttle_the_writer():
    """The pump counts a wake-up as unproductive when *this* end moved fewer than
    PRODUCTIVE_BYTES since the last one, so a writer whose reader takes 100
    bytes at a time (each read publishes in_cons and notifies: real room) is
    throttled to ~30 x 100 bytes per 200 ms (~15 KB/s instead of several MB/s).
    hardening.md #7 / XSA-391 count wake-ups *with no work*; fix: count a
    wake-up as spurious only if the peer's indices (rx prod, tx cons) did not
    move since the previous one."""
    size = 256 * 1024
    data = random.Random(2).randbytes(size)
    async with stream_pair() as (guest, back, _):
        got = bytearray()
        with trio.move_on_after(2):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(back.send_all, data)
                while len(got) < size:
                    got += await guest.receive_some(100)
        assert len(got) == size, (f"{len(got)} of {size} bytes in 2 s; writer throttled "
                                  f"{back.throttled} times")
        assert got == data
        assert back.throttled == 0


async def test_regression_a_move_seen_before_its_notification_is_not_a_spurious_wake_up():
    """The peer publishes, then notifies. A pump woken by an earlier event that
    already sees the next move takes that move's own notification as a wake-up
    that moved nothing: counted spurious, once per such move, and a stream
    between two processes (pvio bench console: bulk both ways) was throttled to
    200 ms pauses tens of times in 10 s. A wake-up right after one that saw a
    move is not counted; a flood of events with no move still is."""
    guest, back, _, tables = make_pair(rate_events=30, rate_window=60)
    rounds = back.rate_events + 10
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(back.pump)
            received = back.channel.received
            for _ in range(rounds):
                guest.tx.write(b"a")
                guest.channel.notify()
                guest.tx.write(b"b")  # published before the pump runs, notified after
                await wait_all_tasks_blocked()  # the pump woke, saw both moves
                guest.channel.notify()  # b's own notification: nothing new to see
                await wait_all_tasks_blocked()
                assert back.rx.read() == b"ab"
            assert back.channel.received - received == 2 * rounds  # two wake-ups a round
            assert back.throttled == 0
            for _ in range(back.rate_events + 2):  # events without any move
                guest.channel.notify()
                await wait_all_tasks_blocked()
            assert back.throttled == 1  # the pump sleeps out the (long) window
            nursery.cancel_scope.cancel()
    finally:
        for table in tables:
            table.close_all()


async def test_regression_many_ring_fulls_between_two_wake_ups_are_a_move():
    """Between two wake-ups of a pump the peer may consume many ring-fulls (the
    sender refills as room appears, the pump task runs later). A first version
    of the back-and-forth check took an index more than one ring ahead of the
    last one seen for no move, never saw a move again, and throttled a 64 MiB
    paste from the pty (tests/backends/test_consoleback.py) to 0.2 MB/s."""
    guest, back, _, tables = make_pair(rate_events=30, rate_window=60)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(back.pump)
            for _ in range(back.rate_events + 10):
                for _ in range(3):  # three ring-fulls through, before the pump runs
                    assert back.tx.write(b"i" * IN_SIZE) == IN_SIZE
                    assert len(guest.rx.read()) == IN_SIZE
                guest.channel.notify()
                await wait_all_tasks_blocked()
            assert back.throttled == 0
            nursery.cancel_scope.cancel()
    finally:
        for table in tables:
            table.close_all()


@pytest.mark.parametrize("attack", ["empty events after each byte", "index set back and forth",
                                    "index run ahead of the data"])
async def test_a_peer_moving_no_data_still_runs_out_of_wake_ups(attack):
    """What a move excuses is bounded: one wake-up per byte-moving wake-up. A
    guest that sets its in_cons back and forth (both values legal), or runs it
    ahead of what the backend wrote (illegal, but no one reads the ring while
    nothing is sent), moves no data, so its notifications count (they used to
    buy one wake-up each)."""
    guest, back, page, tables = make_pair(rate_events=30, rate_window=60)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(back.pump)
            if attack != "empty events after each byte":
                await back.send_all(b"x")  # something for the guest to (pretend to) read
                prod = get_u32(page, IN_PROD)
            for i in range(back.rate_events + 5):
                if attack == "empty events after each byte":
                    guest.tx.write(b"a")
                    guest.channel.notify()
                    await wait_all_tasks_blocked()
                    back.rx.read()
                    for _ in range(3):
                        guest.channel.notify()
                        await wait_all_tasks_blocked()
                elif attack == "index set back and forth":
                    set_u32(page, IN_CONS, prod - 1 + i % 2)
                    guest.channel.notify()
                    await wait_all_tasks_blocked()
                else:  # in_cons past what the backend wrote, further each time
                    set_u32(page, IN_CONS, prod + 1 + i)
                    guest.channel.notify()
                    await wait_all_tasks_blocked()
            assert back.throttled >= 1
            nursery.cancel_scope.cancel()
    finally:
        for table in tables:
            table.close_all()


async def test_regression_bytes_taken_before_a_blocked_notify_are_still_returned():
    """receive_some takes the bytes, then notifies the writer; when that notify
    failed (the peer blocked it: EventChannelBlockedError) the bytes were lost,
    e.g. a hostile guest's last output never reached the console log. They are
    returned; the next call raises."""
    async with stream_pair() as (guest, back, _):
        back.channel.notify = blocked_send
        await guest.send_all(b"last words")
        got = b""
        while len(got) < 10:
            got += await back.receive_some()
        assert got == b"last words"
        with pytest.raises(trio.BrokenResourceError):
            await back.receive_some()


async def test_back_to_back_echo_of_small_messages_is_not_throttled():
    """An interactive peer (a REPL driven by a program, pexpect) exchanges small
    messages back to back; each round trip costs each pump about one wake-up
    that moved < PRODUCTIVE_BYTES, so after ~30 round trips per 200 ms the guest
    end sleeps out the window: p99 ~200 ms instead of < 1 ms (same cause and
    fix as the test above)."""
    async with stream_pair() as (guest, back, _), trio.open_nursery() as nursery:
        nursery.start_soon(echo_forever, guest)
        rtts = []
        for i in range(200):
            msg = b"%015d\n" % i
            t0 = time.perf_counter()
            await back.send_all(msg)
            got = b""
            while len(got) < len(msg):
                got += await back.receive_some()
            rtts.append(time.perf_counter() - t0)
            assert got == msg
        nursery.cancel_scope.cancel()
    rtts.sort()
    assert (guest.throttled, back.throttled) == (0, 0), \
        f"throttled guest {guest.throttled}, backend {back.throttled}; p99 " \
        f"{pct(rtts, 0.99) * 1e3:.1f} ms"
    assert pct(rtts, 0.99) < 0.05


# ---------------------------------------------------------------- HeadTailBuffer


def test_head_tail_buffer_under_the_limit_keeps_everything():
    buf = HeadTailBuffer(64)
    buf.append(b"a" * 40)
    buf.append(b"b" * 24)
    assert len(buf) == 64
    assert buf.take() == b"a" * 40 + b"b" * 24
    assert len(buf) == 0 and buf.take() == b""


def test_head_tail_buffer_keeps_head_and_tail_and_counts_the_drop():
    data = bytes(range(256)) * 4
    buf = HeadTailBuffer(100)
    buf.append(data)
    assert len(buf) == 100
    out = buf.take()
    assert out == data[:50] + b"\r\n[pvio: 924 bytes dropped]\r\n" + data[-50:]
    assert buf.total_dropped == 924
    buf.append(b"fresh")  # after a take it starts again from the head
    assert buf.take() == b"fresh"
    assert buf.total_dropped == 924


@settings(max_examples=60, deadline=None)
@given(limit=st.integers(64, 300), cuts=st.lists(st.integers(0, 2000), max_size=12),
       total=st.integers(0, 2000))
def test_head_tail_buffer_does_not_depend_on_how_the_data_was_cut(limit, cuts, total):
    data = bytes(random.Random(total).randbytes(total))
    buf = HeadTailBuffer(limit)
    start = 0
    for cut in [*sorted(c for c in cuts if c <= total), total]:
        buf.append(data[start:cut])
        start = cut
        assert len(buf) <= limit
    out = buf.take()
    if total <= limit:
        assert out == data
    else:
        half = limit // 2
        dropped = total - limit
        assert out == (data[:half] + f"\r\n[pvio: {dropped} bytes dropped]\r\n".encode()
                       + data[total - (limit - half):])
        assert buf.total_dropped == dropped


# ------------------------------------------------------------------ command line

PROMPT = "pvio-guest$ "
PROMPT_RE = re.escape(PROMPT)


@pytest.fixture(scope="module")
def serve():
    with serving() as serve:
        yield serve


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == pid:
                out.append(int(entry))
    return out


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _state(pid: int) -> str | None:
    """The process state letter of ``pid`` (Z: a zombie), None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None


def _stop(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)


def find_tty(serve, domain: str = "guest", timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return trio.run(_find_tty, serve.admin, domain, 0)[1]
        except LookupError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@contextlib.contextmanager
def guest_console(serve, *command: str, domain: str = "guest", wait_tty: bool = True):
    """``pvio guest-console`` running ``command`` (stderr in a pipe); yields
    (process, tty path or None). Stopped by pid (and its program, by pid) on exit."""
    env = clean_env(PS1=PROMPT, TERM="dumb", HOME="/tmp")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pvio", "guest-console", "--socket", serve.socket,
         "--domain", domain, "--", *command],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    children: list[int] = []
    try:
        tty = find_tty(serve, domain) if wait_tty else None
        children = _children(proc.pid)
        yield proc, tty
    finally:
        if proc.poll() is None:
            children = children or _children(proc.pid)
            _stop(proc.pid)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.stdout.close()
        proc.stderr.close()


def test_bash_on_a_guest_console_driven_through_the_backend_pty(serve):
    with guest_console(serve, "bash", "--norc", "--noprofile", "-i") as (proc, tty):
        fd = os.open(tty, os.O_RDWR | os.O_NOCTTY)
        try:
            term = pexpect.fdpexpect.fdspawn(fd, timeout=10, encoding="utf-8",
                                             codec_errors="replace")
            term.expect(PROMPT_RE)  # written before we opened the pty
            term.sendline("echo pid=$$")
            term.expect(r"pid=(\d+)")
            bash_pid = int(term.match.group(1))
            assert bash_pid in _children(proc.pid)
            term.expect(PROMPT_RE)
            term.sendline("echo the answer is $((6 * 7))")
            term.expect("the answer is 42")
            term.expect(PROMPT_RE)
            term.sendline("sleep 30; echo finished-$((2 + 3))")
            term.expect("sleep 30")  # the echo of the line: bash has read it
            # Wait until sleep really runs (and has the terminal): a Ctrl-C that
            # lands while bash is still forking can be lost to the race, on any tty.
            deadline = time.monotonic() + 10
            while not any(_comm(c) == "sleep" for c in _children(bash_pid)):
                assert time.monotonic() < deadline, "sleep never started"
                time.sleep(0.02)
            time.sleep(0.1)
            t0 = time.monotonic()
            term.send("\x03")  # Ctrl-C: the guest's tty sends SIGINT to sleep
            term.expect(PROMPT_RE)
            assert time.monotonic() - t0 < 5
            assert "finished-5" not in term.before
            term.sendline("echo rc=$?")
            term.expect("rc=130")
            term.expect(PROMPT_RE)
            term.sendline("exit 3")
            assert proc.wait(timeout=10) == 3, proc.stderr.read()
        finally:
            os.close(fd)
        assert _state(bash_pid) in (None, "Z"), "bash still runs after exit 3"
    log = os.path.join(serve.data_dir, "console", "guest-0.log")
    with open(log, "rb") as f:
        text = f.read()
    assert b"the answer is 42" in text


def test_guest_console_exits_with_the_program_status_and_nothing_on_stderr(serve):
    """``pvio guest-console`` logs "<SharedMemory 'pvio-guest-pool' ...>: still in
    use by views or rings" on every exit: _guest_console keeps the ConsoleStream
    (and its ByteRings, which pin the pool) in a local variable while
    open_session closes the pool (pvio/_console_cli.py _guest_console: do not
    hold ``stream`` past the session, or let ConsoleStream.aclose release the
    rings' pins)."""
    with guest_console(serve, "sh", "-c", "echo hello from sh; exit 7",
                       wait_tty=False) as (proc, _tty):
        assert proc.wait(timeout=10) == 7
        stderr = proc.stderr.read().decode()
    assert stderr == ""


def _wait_for_log(serve, needle: bytes, timeout: float = 5.0) -> bytes:
    path = os.path.join(serve.data_dir, "console", "guest-0.log")
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
            text = f.read()
            if needle in text or time.monotonic() > deadline:
                return text
        time.sleep(0.05)


def test_the_last_output_of_a_program_reaches_the_console_log(serve):
    """What a program writes just before it exits must not be lost: guest-console
    puts it on the ring and closes the device right away; the backend has to
    drain the ring before it lets the console go."""
    for i in range(3):
        with guest_console(serve, "sh", "-c", f"echo last words {i}; exit 0",
                           wait_tty=False) as (proc, _tty):
            assert proc.wait(timeout=10) == 0
        assert f"last words {i}".encode() in _wait_for_log(serve, f"last words {i}".encode())


def test_guest_console_reports_a_missing_program(serve):
    with guest_console(serve, "/nonexistent/program", wait_tty=False) as (proc, _tty):
        assert proc.wait(timeout=10) == 127
    assert b"cannot run /nonexistent/program" in _wait_for_log(serve, b"cannot run")


def test_guest_console_survives_the_daemon_going_away_without_a_traceback():
    """The daemon stops (or closes the console) while the program runs: the
    console stream is closed under guest-console, whose relay task lets
    trio.ClosedResourceError escape; it dies with a traceback and exit 1
    (pvio/_console_cli.py _guest_console: treat Closed/BrokenResourceError from
    the stream as the end of the console: hang up the program by closing the
    master, wait for it, one line on stderr)."""
    with serving() as own:
        with guest_console(own, "sleep", "30") as (proc, _tty):
            # The console's tty shows up in the store before guest-console
            # starts the program (it attaches first): wait for the program.
            deadline = time.monotonic() + 10
            while not (program := [c for c in _children(proc.pid) if _comm(c) == "sleep"]):
                assert time.monotonic() < deadline, "guest-console never started its program"
                time.sleep(0.02)
            own.stop()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pytest.fail("guest-console still running 10 s after the daemon stopped")
            stderr = proc.stderr.read().decode()
        assert "Traceback" not in stderr, stderr
        for pid in program:  # the program was hung up, not left behind
            assert _state(pid) in (None, "Z"), f"{pid} still runs"


def _between(text: str, start: str, end: str) -> str:
    return text.split(start, 1)[1].split(end, 1)[0].strip()


def test_pvio_console_attaches_detaches_on_ctrl_bracket_and_restores_the_terminal(serve):
    with guest_console(serve, "bash", "--norc", "--noprofile", "-i") as (proc, _tty):
        script = (f"echo ==BEFORE==; stty -a; echo ==END-BEFORE==; "
                  f"{sys.executable} -m pvio console --socket {serve.socket} guest; "
                  f"echo ==RC=$?==; stty -a; echo ==END-AFTER==")
        child = pexpect.spawn("bash", ["--norc", "--noprofile", "-c", script],
                              env=clean_env(), encoding="utf-8", timeout=10,
                              dimensions=(24, 80))
        transcript = []
        try:
            child.expect("Escape character is '\\^\\]'")
            transcript.append(child.before)
            child.expect(PROMPT_RE)  # what the guest wrote before anyone attached
            child.send("echo attached-$((40 + 2))\r")
            child.expect("attached-42")
            child.expect(PROMPT_RE)
            child.send("\x1d")  # Ctrl-]
            child.expect(r"\[detached\]")
            child.expect(r"==RC=(\d+)==")
            rc = child.match.group(1)
            child.expect("==END-AFTER==")
            transcript.append(child.before)
            child.expect(pexpect.EOF)
        finally:
            if child.isalive():
                child.kill(signal.SIGKILL)
            child.close()
        assert rc == "0"
        assert child.exitstatus == 0
        assert proc.poll() is None  # the guest's bash lives on after the detach
        before = _between(transcript[0], "==BEFORE==", "==END-BEFORE==")
        after = transcript[1].strip()
        assert " icanon" in before and " echo" in before  # a cooked terminal
        assert after == before, f"terminal mode not restored:\n{before}\n---\n{after}"
        # and it can attach again: the guest is still there
        with pexpect.spawn(sys.executable, ["-m", "pvio", "console", "--socket",
                                            serve.socket, "guest"], env=clean_env(),
                           encoding="utf-8", timeout=10) as again:
            again.expect("Escape character")
            again.send("echo again-$((1 + 1))\r")
            again.expect("again-2")
            again.send("\x1d")
            again.expect(pexpect.EOF)
        assert again.exitstatus == 0


def test_pvio_console_without_a_guest_fails_cleanly(serve):
    result = subprocess.run([sys.executable, "-m", "pvio", "console", "--socket",
                             serve.socket, "nobody"], capture_output=True, text=True,
                            timeout=30, env=clean_env(), check=False)
    assert result.returncode == 1
    assert "no domain named 'nobody'" in result.stderr
    assert "Traceback" not in result.stderr
