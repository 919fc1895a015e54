"""netback against a hostile frontend (hardening.md #1-8; Linux netback; XSA-423/432/448).

Every test runs while a well-behaved pair of NetFronts (domains ``a`` and
``b``) ping-pongs frames over the same switch, and checks that it still does
afterwards. The hostile domain ``evil`` drives its vif's rings by hand
(:class:`tests.net_helpers.RawNetFront`):

- one test per TX validation rule: each bad packet is answered
  ``XEN_NETIF_RSP_ERROR`` (-1) in every slot, ``XEN_NETIF_RSP_NULL`` (1) in its
  extra-info slots, nothing of it reaches the switch, and the same vif then
  delivers a good packet; zero-length fragments are legal and skipped;
- bad grant refs on TX (error status) and in RX requests (``rx_errors``);
- protocol violations of the ring (a chain past ``req_prod``, an impossible
  ``req_prod``) disconnect that vif only; a new session can attach again;
- an event-channel flood with no work, and random garbage slots.
"""

from __future__ import annotations

import random

import pytest
import trio

from pvio.frontends.session import open_session
from pvio.layouts import XenbusState as S
from tests.evtchn_helpers import blocked_send
from tests.net_helpers import (
    EXTRA_TYPE_HASH,
    EXTRA_TYPE_MAX,
    EXTRA_TYPE_MCAST_ADD,
    EXTRA_TYPE_NONE,
    GSO_TYPE_NONE,
    GSO_TYPE_TCPV4,
    GSO_TYPE_TCPV6,
    NETRXF_MORE_DATA,
    NETTXF_EXTRA_INFO,
    NETTXF_MORE_DATA,
    PAGE,
    RSP_ERROR,
    RSP_NULL,
    RSP_OKAY,
    U32,
    Pair,
    attach_net,
    attach_raw,
    backend_device,
    domain,
    eth,
    extra_slot,
    gso_slot,
    mac,
    mac_bytes,
    netback,
    paths,
    refused,
    tx_req,
    vif,
)
from tests.pvio_daemon import refused_while_backing_off, running_daemon, wait_state, watchdog

MORE, EXTRA = NETTXF_MORE_DATA, NETTXF_EXTRA_INFO

CONFIG = "\n".join([
    domain("a", vif(0, mac(1))),
    domain("b", vif(0, mac(2))),
    domain("evil", vif(0, mac(9)), vif(1, mac(10))),
    domain("bridge", vif(0, mac(11)) + "  spoof_check = false\n"),
])


@pytest.fixture
async def daemon():
    async with watchdog(40, "netback hostile test"), running_daemon(CONFIG) as daemon:
        yield daemon


@pytest.fixture
async def pair(daemon):
    async with open_session(daemon.config.socket, "a") as sa, \
            open_session(daemon.config.socket, "b") as sb:
        pair = Pair(await attach_net(sa), await attach_net(sb))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pair.run)
            await pair.progress(1)
            yield pair
            await pair.progress(2)
            nursery.cancel_scope.cancel()
    assert not pair.errors, pair.errors
    assert pair.ok >= 3


class Evil:
    def __init__(self, daemon, session, raw, device) -> None:
        self.daemon, self.session, self.raw, self.device = daemon, session, raw, device
        self._n = 0

    @property
    def backend(self):
        return backend_device(self.daemon, "evil")

    @property
    def stats(self) -> dict[str, int]:
        return self.backend.driver.statistics()

    def good_slots(self, dst: str, *, rid: int = 0x4000, **kwargs) -> tuple[list[bytes], bytes]:
        """A good 130-byte packet to ``dst`` with a unique 16-byte tag at offset 14:
        (its slots, its data)."""
        self._n += 1
        data = eth(dst, self.raw.mac, b"evil-good-%06d" % self._n + bytes(100))
        return self.raw.packet_slots(data, rid=rid, **kwargs), data

    async def still_delivers(self, pair: Pair) -> None:
        """The hostile vif still works: a good packet of its reaches b."""
        slots, data = self.good_slots(pair.b.mac)
        assert await self.raw.call(*slots) == [(0x4000, RSP_OKAY)]
        assert await pair.seen(data[14:30]) == data
        assert self.backend.status.state == S.Connected

    async def closed(self) -> None:
        """This vif is disconnected (Closing or Closed) and gone from the switch."""
        be, _ = paths(self.session)
        await wait_state(self.session.xs, f"{be}/state",
                         lambda st: st in (S.Closing, S.Closed))
        assert ("Connected", "Closing") in self.backend.status.history
        assert self.backend.driver.conn is None
        assert f"vif{self.session.domid}.0" not in self.daemon.switch.ports


@pytest.fixture
async def evil(daemon, pair):  # after the pair: its first frames flood before b is known
    async with open_session(daemon.config.socket, "evil") as s:
        raw, device = await attach_raw(s, features={"feature-sg": "1"})
        yield Evil(daemon, s, raw, device)


async def check_refused(evil: Evil, pair: Pair, cases: list[list[bytes]]) -> None:
    """Each case, pushed alone, is refused slot by slot; nothing reaches the switch;
    the pair carries on and the vif then delivers a good packet."""
    before = evil.stats
    for slots in cases:
        got = await evil.raw.call(*slots)
        assert [st for _, st in got] == refused(slots), slots
        ids = [int.from_bytes(slot[8:10], "little") for slot in slots]
        assert [rid for (rid, st), want in zip(got, ids, strict=True) if st != RSP_NULL] == \
            [want for (_, st), want in zip(got, ids, strict=True) if st != RSP_NULL]
    after = evil.stats
    assert after["tx_errors"] - before["tx_errors"] == len(cases)
    assert after["tx_packets"] == before["tx_packets"]
    port = evil.daemon.switch.ports[f"vif{evil.session.domid}.0"]
    await pair.progress()
    await evil.still_delivers(pair)
    assert port.stats.rx_frames == before["tx_packets"] + 1  # only the good one was switched


# ---------------------------------------------------------------------- TX validation


async def test_zero_length_fragments_are_skipped_not_fatal(evil, pair):
    """XSA-448: zero-length fragments anywhere in a chain (even the first: the
    header then lies in the next slot) are legal; the packet is the rest."""
    raw = evil.raw
    frame = eth(pair.b.mac, raw.mac, b"zero-length-frags" + bytes(200))
    cut = 60
    layouts = [  # (sizes of the fragments, the first one's being total - rest)
        [cut, 0, len(frame) - cut],
        [0, len(frame)],
        [len(frame), 0],
        [0, 0, cut, 0, 0, len(frame) - cut, 0],
    ]
    for n, sizes in enumerate(layouts):
        data = frame[:14] + bytes([n]) + frame[15:]
        slots = raw.packet_slots(data, rid=100 * n, sizes=sizes)
        assert await raw.call(*slots) == [(100 * n + k, RSP_OKAY) for k in range(len(sizes))]
        assert await pair.seen(data[14:]) == data
    await pair.progress()
    assert evil.stats["tx_errors"] == 0
    assert evil.stats["tx_packets"] == len(layouts)


async def test_fragment_crossing_its_page(evil, pair):
    raw = evil.raw
    _, ref, _ = raw.page(readonly=True, fill=b"x")
    await check_refused(evil, pair, [
        [tx_req(ref, 4000, 0, 1, 200)],
        [tx_req(ref, 4096, 0, 2, 60)],
        [tx_req(ref, 0xFFFF, 0, 3, 60)],
        [tx_req(ref, 0, 0, 4, 4097)],
        [tx_req(ref, 100, MORE, 5, 4100), tx_req(ref, 0, 0, 6, 100)],  # first: 4000 at 100
        [tx_req(ref, 0, MORE, 7, 200), tx_req(ref, 4095, 0, 8, 2)],
        [tx_req(ref, 0, MORE, 9, 9000), tx_req(ref, 0, MORE, 10, 4096),
         tx_req(ref, 1, 0, 11, 4096)],
    ])


async def test_first_slot_smaller_than_the_rest(evil, pair):
    raw = evil.raw
    _, ref, _ = raw.page(readonly=True, fill=b"x")
    await check_refused(evil, pair, [
        [tx_req(ref, 0, MORE, 1, 100), tx_req(ref, 0, 0, 2, 200)],
        [tx_req(ref, 0, MORE, 3, 100), tx_req(ref, 0, MORE, 4, 60), tx_req(ref, 0, 0, 5, 41)],
        [tx_req(ref, 0, EXTRA | MORE, 6, 100), gso_slot(1448),
         tx_req(ref, 0, 0, 7, 101)],
    ])


async def test_packet_size_out_of_range(evil, pair):
    """Over XEN_NETIF_MAX_TX_SIZE (the first slot's u16 cannot say it: the
    fragments then add up to more than it says) and under an Ethernet header."""
    raw = evil.raw
    _, ref, _ = raw.page(readonly=True, fill=b"x")
    rest = [tx_req(ref, 0, MORE if k < 15 else 0, 10 + k, PAGE) for k in range(16)]
    await check_refused(evil, pair, [
        [tx_req(ref, 0, MORE, 1, 0xFFFF), *rest],  # 4096 + 16 * 4096 bytes
        [tx_req(ref, 0, MORE, 2, (17 * PAGE) & 0xFFFF), *rest],  # the size wrapped at 64K
        [tx_req(ref, 0, 0, 3, 13)],
        [tx_req(ref, 0, 0, 4, 0)],
        [tx_req(ref, 0, MORE, 5, 10), tx_req(ref, 0, 0, 6, 5)],
        [tx_req(ref, 0, MORE, 7, 0), tx_req(ref, 0, 0, 8, 0)],
    ])


async def test_more_slots_than_allowed(evil, pair):
    """max_slots is 20: 21 or more data slots in a chain that ends are refused;
    20 are accepted (tests/backends/test_netback.py delivers them)."""
    raw = evil.raw
    _, ref, _ = raw.page(readonly=True, fill=b"x")

    def chain(n: int, rid: int) -> list[bytes]:
        return [tx_req(ref, 0, MORE if k < n - 1 else 0, rid + k, 100 * n if k == 0 else 100)
                for k in range(n)]

    assert netback(evil.daemon, "evil").max_slots == 20
    await check_refused(evil, pair, [chain(21, 0), chain(40, 100), chain(200, 1000)])
    slots, data = evil.good_slots(pair.b.mac, sizes=[16] + [6] * 19)
    assert len(slots) == 20  # 20 slots: accepted
    assert [st for _, st in await raw.call(*slots)] == [RSP_OKAY] * 20
    assert await pair.seen(data[14:30]) == data


async def test_bogus_extras(evil, pair):
    raw = evil.raw
    _, ref, _ = raw.page(readonly=True, fill=b"x")

    def with_extras(rid: int, *extras: bytes, more: bool = False) -> list[bytes]:
        first = tx_req(ref, 0, EXTRA | (MORE if more else 0), rid, 200)
        return [first, *extras] + ([tx_req(ref, 0, 0, rid + 1, 100)] if more else [])

    await check_refused(evil, pair, [
        with_extras(1, extra_slot(EXTRA_TYPE_NONE)),
        with_extras(2, extra_slot(EXTRA_TYPE_MAX)),
        with_extras(3, extra_slot(0xFF, body=bytes(6))),
        with_extras(4, gso_slot(1448, GSO_TYPE_NONE)),
        with_extras(5, gso_slot(1448, 3)),
        with_extras(6, gso_slot(1448, 0xFF)),
        with_extras(7, gso_slot(0, GSO_TYPE_TCPV4)),
        with_extras(8, gso_slot(0, GSO_TYPE_TCPV6), more=True),
        with_extras(10, gso_slot(1448, GSO_TYPE_TCPV4, more=True), extra_slot(EXTRA_TYPE_MAX)),
        with_extras(11, extra_slot(9, flags=1), gso_slot(1448)),
        with_extras(12, extra_slot(EXTRA_TYPE_HASH, flags=1), extra_slot(EXTRA_TYPE_NONE),
                    more=True),
    ])
    # well-formed extras are accepted (and answered NULL)
    slots, data = evil.good_slots(pair.b.mac, extras=(
        extra_slot(EXTRA_TYPE_MCAST_ADD, flags=1, body=bytes.fromhex("01005e0000fb")),
        extra_slot(EXTRA_TYPE_HASH, body=bytes(6))))
    assert [st for _, st in await raw.call(*slots)] == [RSP_OKAY, RSP_NULL, RSP_NULL]
    assert await pair.seen(data[14:30]) == data


async def test_bad_grant_refs_on_tx(evil, pair):
    raw, s = evil.raw, evil.session
    gnt = s.gnttab
    _, good, _ = raw.page(readonly=True, fill=b"g")
    _, other_dom, _ = raw.page(domid=7, fill=b"o")
    bad_frame = gnt.grant_access(0, s.pool.shm.pages + 10)
    not_granted = gnt.nr_entries - 1
    assert gnt.entry(not_granted).flags == 0
    _, revoked, _ = raw.page()
    assert gnt.end_access(revoked)
    bad = [gnt.nr_entries, 10**6, U32, not_granted, 0, other_dom, bad_frame, revoked]
    cases = [[tx_req(ref, 0, 0, k, 100)] for k, ref in enumerate(bad)]
    cases += [[tx_req(good, 0, MORE, 50 + k, 200), tx_req(ref, 0, 0, 60 + k, 100)]
              for k, ref in enumerate(bad)]
    cases += [[tx_req(ref, 0, MORE | EXTRA, 70 + k, 200), gso_slot(1448),
               tx_req(good, 0, 0, 80 + k, 100)] for k, ref in enumerate(bad)]
    await check_refused(evil, pair, cases)
    # nothing stayed pinned on the error paths
    for ref in (good, other_dom, bad_frame):
        assert gnt.end_access(ref), f"grant {ref} still pinned by the backend"


async def test_bad_grant_refs_in_rx_requests(evil, pair):
    raw, s = evil.raw, evil.session
    gnt = s.gnttab
    await evil.still_delivers(pair)  # the switch learns evil's MAC
    _, readonly, _ = raw.page(readonly=True)
    _, other_dom, _ = raw.page(domid=7)
    bad_frame = gnt.grant_access(0, s.pool.shm.pages + 10)
    not_granted = gnt.nr_entries - 1
    _, revoked, _ = raw.page()
    assert gnt.end_access(revoked)
    bad = [gnt.nr_entries, U32, not_granted, 0, readonly, other_dom, bad_frame, revoked]
    ids = [1000 + 3 * k for k in range(len(bad))]
    first = raw.post_rx(*zip(ids, bad, strict=True))
    for k in range(len(bad)):
        await pair.a.send(eth(raw.mac, pair.a.mac, b"to-evil-%d" % k + bytes(80)))
    got = await raw.rx_responses(len(bad))
    assert [(sl.index, sl.id, sl.status) for sl in got] == \
        [(first[k], ids[k], RSP_ERROR) for k in range(len(bad))]
    assert evil.stats["rx_errors"] == len(bad)
    assert evil.stats["rx_packets"] == 0
    for idx in first:
        raw.rx_posted[0].pop(idx)
    # a two-slot frame whose second page is bad: both slots say ERROR
    _, good, view = raw.page()
    raw.post_rx((7, good), (8, not_granted), views=[view, None])
    await pair.a.send(eth(raw.mac, pair.a.mac, b"big" + bytes(6000)))
    one, two = await raw.rx_responses(2)
    assert (one.id, one.status, two.id, two.status) == (7, RSP_ERROR, 8, RSP_ERROR)
    assert one.flags & NETRXF_MORE_DATA and not two.flags & NETRXF_MORE_DATA
    raw.rx_posted[0].pop(one.index)
    raw.rx_posted[0].pop(two.index)
    assert evil.stats["rx_errors"] == len(bad) + 1
    await pair.progress()
    # good buffers work again, on the same ring
    raw.post_rx_pages(2)
    frame = eth(raw.mac, pair.a.mac, b"fine" + bytes(6000))
    await pair.a.send(frame)
    assert (await raw.receive()).data == frame
    assert evil.backend.status.state == S.Connected
    for ref in (readonly, other_dom, bad_frame, good):
        assert gnt.end_access(ref), f"grant {ref} still pinned by the backend"


async def test_a_mixed_batch_is_answered_packet_by_packet(evil, pair):
    raw = evil.raw
    _, ref, _ = raw.page(readonly=True, fill=b"x")
    good = [evil.good_slots(pair.b.mac, rid=500 + 10 * k) for k in range(3)]
    bad = [[tx_req(ref, 4000, 0, 600, 200)],
           [tx_req(ref, 0, EXTRA, 601, 100), extra_slot(EXTRA_TYPE_NONE)],
           [tx_req(ref, 0, MORE if k < 24 else 0, 610 + k, 2500 if k == 0 else 100)
            for k in range(25)]]
    batch = [*good[0][0], *bad[0], *good[1][0], *bad[1], *bad[2], *good[2][0]]
    want = [RSP_OKAY, *refused(bad[0]), RSP_OKAY, *refused(bad[1]), *refused(bad[2]),
            RSP_OKAY]
    assert [st for _, st in await raw.call(*batch)] == want
    for _, data in good:
        assert await pair.seen(data[14:30]) == data
    assert evil.stats["tx_errors"] == 3
    await pair.progress()


async def test_random_garbage_slots(evil, pair):
    """Thousands of random slots (grant refs plausible half the time), each push
    ending with two flag-free slots so that every chain ends: every slot is
    answered exactly once, the vif stays up, the pair keeps going."""
    raw = evil.raw
    rng = random.Random(448)
    _, ref, _ = raw.page(readonly=True, fill=b"r")
    answered = 0
    for _ in range(60):
        slots = []
        for _ in range(rng.randrange(1, 60)):
            body = bytearray(rng.randbytes(12))
            if rng.random() < 0.5:
                body[0:4] = ref.to_bytes(4, "little")
            if rng.random() < 0.5:  # plausible offsets and sizes too
                body[4:6] = rng.randrange(0, 4096).to_bytes(2, "little")
                body[10:12] = rng.randrange(0, 4096).to_bytes(2, "little")
            slots.append(bytes(body))
        # terminators: gref 0 makes byte 1 (an extra's flags) 0 as well
        slots += [tx_req(0, 0, 0, 1, 60), tx_req(0, 0, 0, 2, 60)]
        got = await raw.call(*slots)
        assert len(got) == len(slots)
        assert all(st in (RSP_OKAY, RSP_ERROR, RSP_NULL) for _, st in got)
        assert got[-1] == (2, RSP_ERROR)  # a data slot either way; gref 0 is never granted
        answered += len(got)
    assert evil.backend.status.state == S.Connected
    assert evil.raw.tx[0].rsp_cons == answered
    await pair.progress()
    await evil.still_delivers(pair)


# ---------------------------------------------------------------------- broken rings


@pytest.mark.parametrize("case", ["more_data", "extra_more", "extra_then_more_data"])
async def test_chain_running_past_req_prod_disconnects_only_that_vif(daemon, pair, case):
    async with open_session(daemon.config.socket, "evil") as s:
        raw, _ = await attach_raw(s, features={"feature-sg": "1"})
        other = await attach_net(s, 1)  # the same domain's second vif
        evil = Evil(daemon, s, raw, None)
        _, ref, _ = raw.page(readonly=True, fill=b"x")
        if case == "more_data":
            slots = [tx_req(ref, 0, MORE, 1, 200), tx_req(ref, 0, MORE, 2, 100)]
        elif case == "extra_more":
            slots = [tx_req(ref, 0, EXTRA, 1, 200), gso_slot(1448, more=True)]
        else:
            slots = [tx_req(ref, 0, EXTRA | MORE, 1, 200), gso_slot(1448)]
        raw.send(*slots)
        await evil.closed()
        assert "past" in evil.backend.status.last_error
        await pair.progress(5)
        frame = eth(pair.b.mac, other.mac, b"other-vif" + bytes(60))
        await other.send(frame)
        assert await pair.seen(b"other-vif") == frame
        assert backend_device(daemon, "evil", 1).status.state == S.Connected


async def _working_evil_vif(daemon, session, pair):
    """A raw vif that has delivered a good packet: (raw, Evil, its backend queue 0)."""
    raw, device = await attach_raw(session, features={"feature-sg": "1"})
    evil = Evil(daemon, session, raw, device)
    await evil.still_delivers(pair)
    return raw, evil, evil.backend.driver.conn.queues[0]


async def test_a_guest_sending_with_another_guest_s_mac_is_dropped_and_not_learned(
        daemon, pair):
    """MAC anti-spoofing: frames a guest sends with b's MAC as their source are
    dropped and counted (tx_spoofed). Without it the switch learned b's MAC on
    the guest's port, and a's frames to b went to the guest instead."""
    async with open_session(daemon.config.socket, "evil") as s:
        nic = await attach_net(s)
        for k in range(5):
            await nic.send(eth(pair.a.mac, pair.b.mac, b"i-am-b-%d" % k + bytes(80)))
        evil = netback(daemon, "evil")
        with trio.fail_after(5):
            while evil.statistics()["tx_spoofed"] < 5:
                await trio.sleep(0.01)
        assert daemon.switch.fdb()[pair.b.mac] == netback(daemon, "b").port_name
        await pair.progress(5)  # a still reaches b, and hears only b as b
        await nic.send(eth(pair.b.mac, nic.mac, b"evil-own" + bytes(80)))
        assert (await pair.seen(b"evil-own"))[6:12] == mac_bytes(nic.mac)
        assert evil.statistics()["tx_spoofed"] == 5


async def test_a_vif_without_spoof_check_may_send_with_any_source_mac(daemon, pair):
    """spoof_check = false (a guest that bridges): its frames go out with any
    source MAC, and the switch learns them on its port."""
    async with open_session(daemon.config.socket, "bridge") as s:
        nic = await attach_net(s)
        await nic.send(eth(pair.b.mac, mac(20), b"bridged" + bytes(80)))
        assert (await pair.seen(b"bridged"))[6:12] == mac_bytes(mac(20))
        assert daemon.switch.fdb()[mac(20)] == netback(daemon, "bridge").port_name
        assert netback(daemon, "bridge").statistics()["tx_spoofed"] == 0


@pytest.mark.parametrize("ring", ["tx", "rx"])
async def test_a_frontend_that_blocks_our_notification_loses_only_that_vif(daemon, pair, ring):
    """A notification the guest blocked (its eventfd made blocking and saturated
    between our poll and our write) raises under the send guard. On RX it is
    raised while another vif's frames are delivered, in that vif's task: the
    sender must keep working and only the blocking vif be disconnected."""
    async with open_session(daemon.config.socket, "evil") as s:
        raw, evil, queue = await _working_evil_vif(daemon, s, pair)
        for channel in {queue.channel, queue.rx_channel}:
            channel.notify = blocked_send
        if ring == "tx":
            raw.tx[0].arm()  # the guest waits for the answer: the backend notifies
            slots, _ = evil.good_slots(pair.b.mac)
            raw.send(*slots)
        else:
            raw.post_rx_pages(2)
            raw.rx[0].arm()
            await pair.a.send(eth(raw.mac, pair.a.mac, b"to-evil" + bytes(80)))
        await evil.closed()
        assert "waited" in evil.backend.status.last_error
        await pair.progress(5)
    async with open_session(daemon.config.socket, "evil") as s:  # it stalled us: backs off
        await refused_while_backing_off(daemon, s, attach_net, "evil", "vif", 0)


async def test_a_blocked_wake_up_outside_a_batch_disconnects_the_vif_not_the_sender(
        daemon, pair):
    """A frame forwarded outside a switch batch (switch.forward, as the demo and
    host-side helpers do) wakes the vif's RX task with set_pending, on the
    guest's eventfd, in the forwarder's call: a blocked send there must end at
    the vif, not raise into whoever forwarded."""
    async with open_session(daemon.config.socket, "evil") as s:
        raw, evil, queue = await _working_evil_vif(daemon, s, pair)
        queue.rx_channel.set_pending = blocked_send
        host = daemon.switch.add_port("host-test")
        try:
            daemon.switch.forward(host, eth(raw.mac, "02:00:00:00:00:99", b"to-evil" + bytes(80)))
            await evil.closed()
            assert "waited" in evil.backend.status.last_error
        finally:
            daemon.switch.remove_port(host)
        await pair.progress(5)


@pytest.mark.parametrize(("ring", "delta"), [("tx", 257), ("tx", -1), ("tx", 1 << 31),
                                             ("rx", 1000)])
async def test_impossible_req_prod_disconnects_the_vif(daemon, pair, ring, delta):
    async with open_session(daemon.config.socket, "evil") as s:
        raw, device = await attach_raw(s, features={"feature-sg": "1"})
        other = await attach_net(s, 1)
        evil = Evil(daemon, s, raw, device)
        await evil.still_delivers(pair)
        target = raw.tx[0] if ring == "tx" else raw.rx[0]
        target.set_req_prod(target.req_prod + delta)
        if ring == "tx":
            raw.tx_channel().notify()
        else:  # the RX ring is looked at when there is something to deliver
            raw.rx_channel().notify()
            await pair.a.send(eth(raw.mac, pair.a.mac, b"to-evil" + bytes(80)))
        await evil.closed()
        assert "overflow" in evil.backend.status.last_error.lower()
        with trio.fail_after(5):
            await device.closed.wait()
        await pair.progress(5)
        frame = eth(pair.b.mac, other.mac, b"other-vif" + bytes(60))
        await other.send(frame)
        assert await pair.seen(b"other-vif") == frame
    # and a new session of the offending domain can attach that vif again
    async with open_session(daemon.config.socket, "evil") as s:
        raw, device = await attach_raw(s)
        evil = Evil(daemon, s, raw, device)
        await evil.still_delivers(pair)


async def test_regression_both_rings_broken_at_once_closes_the_vif_once(daemon, pair):
    """Two service tasks of one vif (split event channels: TX and RX; or two
    queues) that find their rings broken in the same moment each asked for the
    device to be failed; the second disconnect ran into the first one's
    (``conn`` already None: an AttributeError in the daemon's nursery)."""
    for _ in range(3):
        async with open_session(daemon.config.socket, "evil") as s:
            raw, device = await attach_raw(s, split_event_channels=True, queues=2)
            evil = Evil(daemon, s, raw, device)
            assert len(raw.queues) == 2
            await evil.still_delivers(pair)
            for ring in (*raw.tx, *raw.rx):
                ring.set_req_prod(ring.req_prod + 5000)
            for q in range(2):
                raw.tx_channel(q).notify()
                raw.rx_channel(q).notify()
            # frames for both RX queues (the queue is picked from bytes 26..37)
            await pair.a.send_many([eth(raw.mac, pair.a.mac, bytes(12) + bytes([k]) * 12
                                        + bytes(60)) for k in range(16)])
            await evil.closed()
            assert "overflow" in evil.backend.status.last_error.lower()
            with trio.fail_after(5):
                await device.closed.wait()
            await pair.progress(3)


# ---------------------------------------------------------------------- event flood


async def test_event_channel_flood_without_work(daemon, pair):
    async with open_session(daemon.config.socket, "evil") as s:
        raw, device = await attach_raw(s, split_event_channels=True)
        evil = Evil(daemon, s, raw, device)
        await evil.still_delivers(pair)
        conn = evil.backend.driver.conn.queues[0]
        before = conn.channel.spurious + conn.rx_channel.spurious
        for _ in range(400):
            raw.tx_channel().notify()
            raw.rx_channel().notify()
            await trio.sleep(0)
        await pair.progress(5)
        woke = conn.channel.spurious + conn.rx_channel.spurious - before
        assert woke > 30, woke  # the backend did wake up for nothing, and counted it
        assert conn.channel.throttled + conn.rx_channel.throttled > 0
        await evil.still_delivers(pair)
        assert evil.stats["tx_errors"] == 0
