"""netfront: the API end to end, and against a hostile backend.

- ``send``/``receive``/``send_many``/``receive_many``, ``async for``, the MAC,
  statistics, frame-size checks.
- Backpressure: while the backend does not consume the TX ring, ``send``
  waits (it does not fail) and everything goes out, in order, once the backend
  resumes; a program that stops calling ``receive`` makes netfront stop
  posting buffers, and the backend's bounded queue drops the excess (counted
  there) until the program reads again.
- :class:`BlockingNetFront` from plain code in a thread.
- Closing: later calls raise NetDeviceError, a blocked ``receive`` is woken
  with it, ``async for`` ends.
- Hostile backend (hardening.md #11): :func:`pvio.netif.parse_rx_responses`
  vectors built from netif.h offsets, and a NetFront whose rings the test
  answers itself (an offset+size beyond the page, an unknown extra, GSO that
  was not negotiated, a wrong id in a slot, a TX response for an id not in
  flight, an impossible ``rsp_prod``): the device goes to an error state and
  every waiter gets NetDeviceError.
"""

from __future__ import annotations

import contextlib
import struct
import types

import pytest
import trio
import trio.testing

from pvio.frontends.netfront import BlockingNetFront, NetDeviceError, NetFront, _Work
from pvio.frontends.session import open_session
from pvio.netif import Frame, Offload, RxProtocolError, parse_rx_responses
from pvio.ring import (
    NETIF_RX,
    NETIF_TX,
    BackRing,
    EventChannelTable,
    GrantTable,
    PagePool,
    SharedMemory,
)
from pvio.xenbus.ringdev import FrontQueue
from tests.evtchn_helpers import blocked_send
from tests.net_helpers import (
    EXTRA,
    EXTRA_FLAG_MORE,
    EXTRA_TYPE_GSO,
    EXTRA_TYPE_HASH,
    EXTRA_TYPE_MCAST_ADD,
    EXTRA_TYPE_NONE,
    GSO_TYPE_TCPV4,
    GSO_TYPE_TCPV6,
    NETRXF_CSUM_BLANK,
    NETRXF_DATA_VALIDATED,
    NETRXF_EXTRA_INFO,
    NETRXF_MORE_DATA,
    PAGE,
    RSP_ERROR,
    RX_REQ,
    RX_RSP,
    TX_RSP,
    attach_net,
    domain,
    eth,
    mac,
    netback,
    switch,
    tcp_frame,
    vif,
)
from tests.pvio_daemon import running_daemon, watchdog

CAPACITY = 512  # more than a whole TX ring (256) can burst at once
CONFIG = switch(queue_frames=CAPACITY) + "\n".join([
    domain("a", vif(0, mac(1))),
    domain("b", vif(0, mac(2))),
    domain("c", vif(0, mac(3))),
])


@pytest.fixture
async def daemon():
    async with watchdog(30, "netfront test"), running_daemon(CONFIG) as daemon:
        yield daemon


@contextlib.asynccontextmanager
async def nics(daemon, *names: str, **kwargs):
    async with contextlib.AsyncExitStack() as stack:
        out = []
        for name in names:
            session = await stack.enter_async_context(open_session(daemon.config.socket, name))
            out.append(await attach_net(session, **kwargs))
        yield out


BCASTISH = "ff:ff:ff:ff:ff:ff"


async def introduce(*nics_) -> None:
    """Each NIC broadcasts once (and every other one reads it): the switch then
    knows every MAC and nothing is flooded afterwards."""
    for nic in nics_:
        await nic.send(eth(BCASTISH, nic.mac, b"hello" + bytes(50)))
        for other in nics_:
            if other is not nic:
                assert (await other.receive()).data[6:12] == bytes.fromhex(
                    nic.mac.replace(":", ""))


def numbered(dst: str, src: str, k: int, size: int = 100) -> bytes:
    return eth(dst, src, k.to_bytes(4, "big") + bytes(size - 18))


def number(frame) -> int:
    return int.from_bytes(frame.data[14:18], "big")


# ---------------------------------------------------------------------- API


async def test_send_receive_mac_and_statistics(daemon):
    async with nics(daemon, "a", "b") as (a, b):
        assert (a.mac, b.mac) == (mac(1), mac(2))
        assert a.carrier and b.carrier
        sizes = [14, 60, 1514, 4096, 4097, 9000, 65535]
        for k, size in enumerate(sizes):
            frame = eth(b.mac, a.mac, bytes([k]) * (size - 14))
            await a.send(frame)
            got = await b.receive()
            assert isinstance(got, Frame) and got.data == frame
            assert got.offload == Offload()
        assert a.stats.tx_packets == b.stats.rx_packets == len(sizes)
        assert a.stats.tx_bytes == b.stats.rx_bytes == sum(sizes)
        assert a.stats.tx_errors == b.stats.rx_errors == 0


async def test_send_many_receive_many_and_async_for(daemon):
    async with nics(daemon, "a", "b") as (a, b):
        await a.send_many([numbered(b.mac, a.mac, k) for k in range(50)])
        await a.send_many([Frame(numbered(b.mac, a.mac, 50 + k)) for k in range(50)])
        got = []
        while len(got) < 60:
            batch = await b.receive_many(7)
            assert 1 <= len(batch) <= 7
            got += batch
        async for frame in b:
            got.append(frame)
            if len(got) == 100:
                break
        assert [number(f) for f in got] == list(range(100))


async def test_send_refuses_impossible_frames(daemon):
    async with nics(daemon, "a") as (a,):
        for size in (0, 13, 65536):
            with pytest.raises(ValueError):
                await a.send(bytes(size))
        gso = Frame(tcp_frame(BCASTISH, a.mac, bytes(3000)),
                    Offload(gso_type=GSO_TYPE_TCPV4, gso_size=1448))
        with pytest.raises(ValueError):
            await a.send(gso)  # GSO needs offloads=True
        assert a.stats.tx_packets == 0


async def test_offloads_pass_through_both_ways(daemon):
    async with nics(daemon, "a", "b", offloads=True) as (a, b):
        frame = tcp_frame(b.mac, a.mac, bytes(range(256)) * 40, version=6, checksum=False)
        off = Offload(csum_blank=True, data_validated=True, gso_type=GSO_TYPE_TCPV6,
                      gso_size=1400)
        await a.send(frame, off)
        got = await b.receive()
        assert got.data == frame
        assert got.offload == off


class GatedRing:
    """A backend TX ring that, while closed, shows the backend no requests at all."""

    def __init__(self, ring) -> None:
        self.ring = ring
        self.open = False

    def take_requests(self, *args):
        return self.ring.take_requests(*args) if self.open else memoryview(b"")

    def final_check_for_requests(self) -> int:
        return self.ring.final_check_for_requests() if self.open else 0

    def __getattr__(self, name):
        return getattr(self.ring, name)


async def test_send_waits_while_the_backend_does_not_consume(daemon):
    async with open_session(daemon.config.socket, "a") as sa, \
            open_session(daemon.config.socket, "b") as sb:
        a = await attach_net(sa, tx_backlog=4)
        b = await attach_net(sb)
        queue = netback(daemon, "a")._queues[0]
        gate = GatedRing(queue.tx)
        queue.tx = gate
        total = 300  # more than the TX ring (256 slots) plus the backlog
        progress = {"sent": 0}
        errors = []
        finished = trio.Event()

        async def sender():
            try:
                for k in range(total):
                    await a.send(numbered(b.mac, a.mac, k))
                    progress["sent"] += 1
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)
            finished.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            await trio.testing.wait_all_tasks_blocked()
            # the sender is waiting, not failed: the ring and the backlog are full
            assert not finished.is_set() and not errors
            assert 256 <= progress["sent"] < total
            assert a.stats.tx_packets == 256
            await trio.testing.wait_all_tasks_blocked()
            assert not finished.is_set()
            gate.open = True
            queue.channels[0].set_pending()  # the backend looks again
            got = [number(await b.receive()) for _ in range(total)]
            await finished.wait()
        assert not errors, errors
        assert got == list(range(total))
        assert a.stats.tx_packets == total and a.stats.tx_errors == 0


async def test_a_program_that_stops_receiving_loses_frames_at_the_backend(daemon):
    async with nics(daemon, "a", "b", "c") as (a, b, c):
        await introduce(a, b, c)
        base = netback(daemon, "b").statistics()
        b.rx_backlog = 8  # b's program reads nothing for a while
        sent = 1000
        # a 1-slot frame first, then 2-slot ones: the ring fills with an odd slot left
        await a.send(numbered(b.mac, a.mac, 0))
        for start in range(1, sent, 50):
            await a.send_many([numbered(b.mac, a.mac, k, 6000)
                               for k in range(start, min(start + 50, sent))])
            # c keeps hearing from a meanwhile
            ping = numbered(c.mac, a.mac, 10_000 + start)
            await a.send(ping)
            assert (await c.receive()).data == ping
        await trio.testing.wait_all_tasks_blocked()
        stats = netback(daemon, "b").statistics()
        stats["rx_packets"] -= base["rx_packets"]
        assert base["rx_dropped"] == base["rx_queued"] == 0
        assert stats["rx_dropped"] > 0
        assert stats["rx_queued"] <= CAPACITY
        assert stats["rx_packets"] + stats["rx_queued"] + stats["rx_dropped"] == sent
        # reading again: everything that was not dropped, in order
        seen = []
        while len(seen) < stats["rx_packets"] + stats["rx_queued"]:
            seen += [number(f) for f in await b.receive_many(64)]
        assert seen == sorted(seen) and len(set(seen)) == len(seen)
        assert seen[0] == 0
        assert len(seen) == sent - stats["rx_dropped"]
        # and b works normally afterwards
        await a.send(numbered(b.mac, a.mac, 99_999))
        assert number(await b.receive()) == 99_999


async def test_blocking_netfront_from_plain_code(daemon):
    async with nics(daemon, "a") as (a,):

        def plain() -> tuple[str, bytes, bool]:
            with BlockingNetFront(daemon.config.socket, "b") as nic:
                nic.send(eth(a.mac, nic.mac, b"from-thread" + bytes(50)))
                frame = nic.receive(timeout=5)
                try:
                    nic.receive(timeout=0.05)
                    timed_out = False
                except TimeoutError:
                    timed_out = True
                return nic.mac, frame.data, timed_out

        async def echo():
            frame = await a.receive()
            assert frame.data[14:25] == b"from-thread"
            await a.send(eth(frame.data[6:12], a.mac, b"echo" + frame.data[14:]))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(echo)
            nic_mac, data, timed_out = await trio.to_thread.run_sync(plain)
        assert nic_mac == mac(2)
        assert data[14:18] == b"echo" and data[18:29] == b"from-thread"
        assert timed_out


async def test_closing_fails_calls_and_wakes_a_blocked_receive(daemon):
    async with nics(daemon, "a", "b") as (a, b):
        outcome = []

        async def blocked_receive():
            try:
                await b.receive()
                outcome.append("frame")
            except NetDeviceError:
                outcome.append("error")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(blocked_receive)
            await trio.testing.wait_all_tasks_blocked()
            await b.device.close()
        assert outcome == ["error"]
        assert not b.carrier
        with pytest.raises(NetDeviceError):
            await b.send(eth(a.mac, b.mac, bytes(50)))
        with pytest.raises(NetDeviceError):
            await b.receive()
        assert [f async for f in b] == []
        # the other NIC is unaffected
        await a.send(eth(BCASTISH, a.mac, bytes(50)))


# ---------------------------------------------------------------------- parsing


def rsp(rid: int, offset: int, flags: int, status: int) -> bytes:
    return RX_RSP.pack(rid, offset, flags, status)


def extra(etype: int, *, size: int = 1448, gso_type: int = GSO_TYPE_TCPV4,
          more: bool = False) -> bytes:
    return EXTRA.pack(etype, EXTRA_FLAG_MORE if more else 0, size, gso_type, 0, 0)


def parse(*slots: bytes, gso_ok: bool = False, first: int = 0):
    return parse_rx_responses(memoryview(b"".join(slots)), first, gso_ok=gso_ok)


MORE, XTRA = NETRXF_MORE_DATA, NETRXF_EXTRA_INFO


def test_parse_well_formed_responses():
    packets, used = parse(rsp(0, 0, 0, 100), first=10)
    assert used == 1 and len(packets) == 1
    (chunk,) = packets[0].chunks
    assert (chunk.slot, chunk.offset, chunk.length, chunk.id) == (10, 0, 100, 0)

    packets, used = parse(rsp(0, 0, MORE | NETRXF_DATA_VALIDATED, PAGE),
                          rsp(1, 96, 0, 4000))
    assert used == 2 and [(c.offset, c.length) for c in packets[0].chunks] == \
        [(0, PAGE), (96, 4000)]
    assert packets[0].offload.data_validated and not packets[0].offload.csum_blank

    packets, used = parse(rsp(0, 0, MORE | XTRA | NETRXF_CSUM_BLANK | NETRXF_DATA_VALIDATED,
                              PAGE), extra(EXTRA_TYPE_GSO, size=1448),
                          rsp(2, 0, 0, 100), gso_ok=True)
    assert used == 3 and packets[0].slots == 3
    off = packets[0].offload
    assert (off.gso_type, off.gso_size, off.csum_blank) == (GSO_TYPE_TCPV4, 1448, True)
    assert [c.slot for c in packets[0].chunks] == [0, 2]

    packets, used = parse(rsp(0, 0, 0, RSP_ERROR), rsp(1, 0, 0, 60))
    assert used == 2 and packets[0].error == RSP_ERROR and packets[1].error == 0

    # a chain the backend has not finished publishing is left for later
    assert parse(rsp(0, 0, MORE, PAGE)) == ([], 0)
    assert parse(rsp(0, 0, XTRA, 100), gso_ok=True) == ([], 0)
    packets, used = parse(rsp(0, 0, 0, 60), rsp(1, 0, MORE, PAGE))
    assert used == 1 and len(packets) == 1

    # a 64 KiB packet in 17 fragments with its GSO extra: 18 slots
    chain = [rsp(0, 0, MORE | XTRA, PAGE), extra(EXTRA_TYPE_GSO)]
    chain += [rsp(k, 0, MORE, PAGE) for k in range(2, 16)]
    chain += [rsp(16, 0, MORE, 2048), rsp(17, 0, 0, 2047)]
    packets, used = parse(*chain, gso_ok=True)
    assert used == 18 and sum(c.length for c in packets[0].chunks) == 65535


@pytest.mark.parametrize(("slots", "gso_ok"), [
    # offset + size beyond the page
    ((rsp(0, 4000, 0, 200),), False),
    ((rsp(0, PAGE, 0, 1),), False),
    ((rsp(0, 0xFFFF, 0, 1),), False),
    ((rsp(0, 0, 0, 0x7FFF),), False),
    ((rsp(0, 0, MORE, PAGE), rsp(1, 1, 0, PAGE)), False),
    # unknown or invalid extras
    ((rsp(0, 0, XTRA, 100), extra(EXTRA_TYPE_NONE)), True),
    ((rsp(0, 0, XTRA, 100), extra(EXTRA_TYPE_MCAST_ADD)), True),
    ((rsp(0, 0, XTRA, 100), extra(EXTRA_TYPE_HASH)), True),
    ((rsp(0, 0, XTRA, 100), extra(5)), True),
    ((rsp(0, 0, XTRA, 100), extra(0xFF)), True),
    ((rsp(0, 0, XTRA, 100), extra(EXTRA_TYPE_GSO, more=True), extra(EXTRA_TYPE_NONE)), True),
    ((rsp(0, 0, XTRA, 100), extra(EXTRA_TYPE_GSO, gso_type=0)), True),
    ((rsp(0, 0, XTRA, 100), extra(EXTRA_TYPE_GSO, gso_type=3)), True),
    ((rsp(0, 0, XTRA, 100), extra(EXTRA_TYPE_GSO, size=0)), True),
    # GSO the frontend did not negotiate
    ((rsp(0, 0, XTRA, 100), extra(EXTRA_TYPE_GSO)), False),
    ((rsp(0, 0, XTRA | MORE, PAGE), extra(EXTRA_TYPE_GSO, gso_type=GSO_TYPE_TCPV6),
      rsp(2, 0, 0, 10)), False),
    # a chain longer than any packet needs
    ((*(rsp(k, 0, MORE, 100) for k in range(19)), rsp(19, 0, 0, 100)), False),
    (tuple(rsp(k, 0, MORE, 100) for k in range(200)), False),
])
def test_parse_hostile_responses(slots, gso_ok):
    with pytest.raises(RxProtocolError):
        parse(*slots, gso_ok=gso_ok)


# ---------------------------------------------------------------------- hostile backend


class TestBackend:
    """The backend end of a NetFront's rings, driven by the test (no daemon)."""

    __test__ = False

    def __init__(self, front: NetFront, channel, pool: PagePool, gnttab: GrantTable) -> None:
        self.front, self.channel, self.pool, self.gnttab = front, channel, pool, gnttab
        self.tx = BackRing.attach(NETIF_TX, front.area(0))
        self.rx = BackRing.attach(NETIF_RX, front.area(1))
        self.rx_area = front.area(1)

    def rx_requests(self) -> list[tuple[int, int]]:
        raw = bytes(self.rx.take_requests())
        return [RX_REQ.unpack_from(raw, k)[::2] for k in range(0, len(raw), RX_REQ.size)]

    def fill(self, gref: int, data: bytes, offset: int = 0) -> None:
        """Write into the granted page (what a grant copy would do)."""
        frame = self.gnttab.entry(gref).frame
        self.pool.shm.page(frame)[offset:offset + len(data)] = data

    def respond_rx(self, *slots: bytes) -> None:
        self.rx.produce(b"".join(slots))
        self.channel.notify()

    def respond_tx(self, *pairs: tuple[int, int]) -> None:
        self.tx.produce(b"".join(TX_RSP.pack(*p) for p in pairs))
        self.channel.notify()


@contextlib.asynccontextmanager
async def hostile_backend(*, offloads: bool = False, notify=None):
    """A NetFront set up exactly as on a real attach (its own ``setup`` and
    ``attach``), over a fake session, with the test as its backend; ``notify``
    replaces the NetFront channel's ``notify`` from the start."""
    pool = PagePool(SharedMemory.create(1024 * PAGE, name="test-netfront-pool"))
    gnttab = GrantTable.create(2048, name="test-netfront-gnttab")
    fe_table, be_table = EventChannelTable(1), EventChannelTable(0)
    unbound = fe_table.alloc_unbound(0)
    be_channel = be_table.bind_interdomain(1, unbound.port, unbound.peer_fds())
    be_channel.consume()
    if notify is not None:
        unbound.channel.notify = notify
    try:
        async with trio.open_nursery() as nursery:
            session = types.SimpleNamespace(pool=pool, gnttab=gnttab, _nursery=nursery)
            front = NetFront(session, offloads=offloads)
            areas = []
            for _ in range(2):
                frame = pool.alloc(1)
                areas.append((frame, 1, [gnttab.grant_access(0, frame)]))
            front.queues = [FrontQueue(areas, unbound.channel, unbound.channel)]
            front.setup()
            await front.attach({"feature-rx-copy": b"1"})
            yield front, TestBackend(front, be_channel, pool, gnttab)
            nursery.cancel_scope.cancel()
    finally:
        fe_table.close_all()  # (both ends' eventfds: be_table's channel shares them)


async def expect_device_error(front: NetFront, match: str) -> None:
    """The device failed: a receive already waiting and later calls get NetDeviceError."""
    with trio.fail_after(5), pytest.raises(NetDeviceError, match=match):
        await front.receive()
    assert not front.carrier
    with pytest.raises(NetDeviceError):
        await front.send(bytes(60))
    assert [f async for f in front] == []


async def test_fake_backend_delivers_a_well_formed_frame():
    """The harness itself: a correct response gives the frame; an error status is
    counted and skipped."""
    async with hostile_backend() as (front, back):
        reqs = back.rx_requests()
        assert [rid for rid, _ in reqs] == list(range(256))
        frame = eth("02:00:00:00:00:01", "02:00:00:00:00:02", b"hello" * 20)
        back.fill(reqs[1][1], frame, offset=10)
        back.respond_rx(rsp(0, 0, 0, RSP_ERROR), rsp(1, 10, 0, len(frame)))
        with trio.fail_after(5):
            got = await front.receive()
        assert got.data == frame
        assert front.stats.rx_errors == 1 and front.stats.rx_packets == 1
        assert front.carrier


@pytest.mark.parametrize(("responses", "offloads", "match"), [
    ([rsp(0, 4000, 0, 200)], False, "leaves its page"),
    ([rsp(0, 0, MORE, PAGE), rsp(1, 100, 0, PAGE)], False, "leaves its page"),
    ([rsp(0, 0, XTRA, 100), extra(EXTRA_TYPE_MCAST_ADD)], True, "bad extra"),
    ([rsp(0, 0, XTRA, 100), extra(EXTRA_TYPE_GSO)], False, "bad extra"),
    ([rsp(5, 0, 0, 100)], False, "id 5"),
    ([rsp(0, 0, MORE, PAGE), rsp(0, 0, 0, 100)], False, "id 0"),
    ([rsp(k, 0, MORE, 10) for k in range(30)], False, "more than"),
])
async def test_hostile_rx_responses_put_the_device_in_error(responses, offloads, match):
    async with hostile_backend(offloads=offloads) as (front, back):
        back.rx_requests()
        waiter_result = []

        async def waiter():
            try:
                await front.receive()
                waiter_result.append("frame")
            except NetDeviceError:
                waiter_result.append("error")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            back.respond_rx(*responses)
        assert waiter_result == ["error"]
        await expect_device_error(front, match)
        assert front.stats.rx_packets == 0


async def test_impossible_rsp_prod_puts_the_device_in_error():
    async with hostile_backend() as (front, back):
        back.rx_requests()
        struct.pack_into("<I", back.rx_area, 8, 1000)  # rsp_prod far beyond the requests
        back.channel.notify()
        await expect_device_error(front, "overflow")


async def test_tx_response_for_an_id_not_in_flight_puts_the_device_in_error():
    async with hostile_backend() as (front, back):
        await front.send(bytes(60))
        await trio.testing.wait_all_tasks_blocked()  # the frame went out on the ring
        raw = bytes(back.tx.take_requests())
        assert len(raw) == 12
        rid = struct.unpack_from("<H", raw, 8)[0]
        assert rid in front._q[0].in_flight
        back.respond_tx((rid ^ 1, 0))  # answered with an id that was never sent
        await expect_device_error(front, "not in flight")


@pytest.mark.parametrize("ring", ["tx", "rx"])
async def test_a_backend_that_blocks_our_notification_puts_the_device_in_error(ring):
    """Under the send guard, a notification the backend blocked (its eventfd
    made blocking and saturated between our poll and our write) raises
    EventChannelBlockedError: on TX in the sender's call, on RX in the queue
    task that reposts buffers. It escaped from send() and ended the queue task
    with the device still up; now the device is in error, as for a broken ring."""
    async with hostile_backend() as (front, back):
        reqs = back.rx_requests()
        channel = front._q[0].channels[0]
        channel.notify = blocked_send
        if ring == "tx":
            await front.send(bytes(60))  # on the ring; the notification fails
        else:
            back.rx.final_check_for_requests()  # armed: the repost notifies
            frame = eth("02:00:00:00:00:01", "02:00:00:00:00:02", b"x" * 60)
            back.fill(reqs[0][1], frame)
            back.respond_rx(rsp(0, 0, 0, len(frame)))
            with trio.fail_after(5):
                assert (await front.receive()).data == frame
        await expect_device_error(front, "waited")


async def test_a_backend_that_blocks_the_first_rx_notification_fails_the_attach():
    with pytest.RaisesGroup(pytest.RaisesExc(NetDeviceError, match="waited")):
        async with hostile_backend(notify=blocked_send):
            pass


async def test_regression_receive_many_is_a_checkpoint_even_when_frames_wait():
    # A consumer looping on receive_many never yielded while frames were queued, so
    # the other tasks of its program (netfront-tap's TAP reader) could starve.
    from pvio.testing.fixtures import net_pair

    async with net_pair() as (a, b, _daemon):
        dst, src = (bytes.fromhex(m.replace(":", "")) for m in (b.mac, a.mac))
        await a.send_many([dst + src + b"\x88\xb5" + bytes(46)] * 4)
        with trio.fail_after(5):
            while len(b._rx_frames) < 4:
                await trio.sleep(0.01)
        with trio.CancelScope() as scope:
            scope.cancel()
            with pytest.raises(trio.Cancelled):
                await b.receive_many(1)  # frames are waiting, yet it must be a cancel point
        assert len(b._rx_frames) == 4  # the cancelled call took nothing


@pytest.mark.parametrize(("tx", "rx", "want"), [(True, False, (7, None)),
                                               (False, True, (None, 9))])
def test_regression_a_queue_task_s_progress_is_only_the_rings_it_waits_on(tx, rx, want):
    """The frontend side of the netback regression test of the same name: TX
    completions reclaimed by the application's sends must not excuse idle
    wake-ups on the RX channel."""
    queue = types.SimpleNamespace(tx=types.SimpleNamespace(progress=7),
                                  rx=types.SimpleNamespace(progress=9))
    assert _Work(None, queue, tx, rx).progress == want
