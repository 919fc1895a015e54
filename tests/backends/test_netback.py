"""netback end to end: an in-process Daemon, NetFronts and raw frontends on its switch.

- Keys: what the backend publishes, what a frontend must publish.
- Data: frames between vifs byte for byte, single slot and multi-slot up to
  65535 bytes (feature-sg), TX chains with page offsets, 18 and 20 slots.
- Slots (netif.h): TX responses in request order with their ids,
  ``XEN_NETIF_RSP_NULL`` for extra-info slots; RX responses (and a GSO extra)
  in the slots of the requests they consumed, echoing those requests' ids.
- Offloads: GSO super-packets pass through to a GSO-capable frontend with
  their extra and ``csum_blank``; for a frontend without GSO they are cut into
  segments that the test checks as valid TCP with its own checksum code;
  checksums are completed for a frontend without checksum offload.
- Transport: split and shared event channels, two queues.
- Switching through real vifs: learning, unicast to the learned port only,
  flooding of unknown, broadcast and multicast destinations.
- A receiver that stops posting buffers loses frames, counted in
  ``rx_dropped``; its port queue never exceeds its capacity; others carry on.
"""

from __future__ import annotations

import random
import struct
import threading
from types import SimpleNamespace

import pytest
import trio
import trio.testing

from pvio.backends.netback import _Work
from pvio.daemon import Daemon
from pvio.frontends.netfront import NET_KEYS, NetFront
from pvio.frontends.session import open_session
from pvio.layouts import XenbusState as S
from pvio.netif import Frame, Offload
from pvio.xenbus.device import DeviceError
from tests.net_helpers import (
    BCAST,
    EXTRA_TYPE_GSO,
    EXTRA_TYPE_HASH,
    EXTRA_TYPE_MCAST_ADD,
    GSO_TYPE_TCPV4,
    GSO_TYPE_TCPV6,
    NETRXF_CSUM_BLANK,
    NETRXF_DATA_VALIDATED,
    NETRXF_EXTRA_INFO,
    NETRXF_MORE_DATA,
    NETTXF_CSUM_BLANK,
    NR_SLOTS_MIN,
    PAGE,
    RSP_NULL,
    RSP_OKAY,
    RawNetFront,
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
    parse_l4,
    paths,
    receive_matching,
    switch,
    tcp_frame,
    udp_frame,
    vif,
)
from tests.proc_helpers import open_fd_count
from tests.pvio_daemon import running_daemon, wait_state, watchdog

CAPACITY = 256
CONFIG = switch(queue_frames=CAPACITY) + "\n".join([
    domain("a", vif(0, mac(1))),
    domain("b", vif(0, mac(2))),
    domain("c", vif(0, mac(3))),
    domain("r", vif(0, mac(9)), vif(1, mac(10))),
])


@pytest.fixture
async def daemon():
    async with watchdog(30, "netback test"), running_daemon(CONFIG) as daemon:
        yield daemon


def payload(n: int, seed: int = 0) -> bytes:
    return random.Random(seed * 100003 + n).randbytes(n)


async def next_matching(nic, pred, limit: int = 10_000):
    """The next frame ``nic`` receives for which ``pred(frame)`` holds (others skipped)."""
    with trio.fail_after(5):
        for _ in range(limit):
            frame = await nic.receive()
            if pred(frame):
                return frame
    raise AssertionError("no matching frame")


# ---------------------------------------------------------------------- keys


async def test_backend_publishes_netif_keys(daemon):
    async with open_session(daemon.config.socket, "r") as s:
        raw, _ = await attach_raw(s)
        be, fe = paths(s)

        async def read(path):
            value = await s.xs.read_or_none(path)
            return None if value is None else value.decode()

        for key, want in {"feature-rx-copy": "1", "feature-rx-flip": "0", "feature-sg": "1",
                          "feature-gso-tcpv4": "1", "feature-gso-tcpv6": "1",
                          "feature-split-event-channels": "1", "multi-queue-max-queues": "4",
                          "mac": mac(9), "handle": "0"}.items():
            assert await read(f"{be}/{key}") == want, key
        assert await read(f"{fe}/mac") == mac(9)
        # what the transport driver published for the raw frontend (VIF's required keys)
        assert await read(f"{fe}/request-rx-copy") == "1"
        assert await read(f"{fe}/feature-rx-notify") == "1"
        assert await read(f"{fe}/tx-ring-ref") is not None
        assert await read(f"{fe}/rx-ring-ref") is not None
        assert raw.mac == mac(9)
        assert f"vif{s.domid}.0" in daemon.switch.ports


@pytest.mark.parametrize("key", ["request-rx-copy", "feature-rx-notify"])
async def test_frontend_without_a_mandatory_key_is_refused(daemon, key):
    async with open_session(daemon.config.socket, "r") as s:
        raw = RawNetFront(s, features={key: "0"})
        await s.attach(raw, 0, NET_KEYS)
        be, _ = paths(s)
        await wait_state(s.xs, f"{be}/state", lambda st: st in (S.Closing, S.Closed))
        assert key in backend_device(daemon, "r").status.last_error
        assert f"vif{s.domid}.0" not in daemon.switch.ports
        # the domain's other vif is unaffected
        await attach_raw(s, 1)
        assert backend_device(daemon, "r", 1).status.state == S.Connected


# ---------------------------------------------------------------------- data


SIZES = [14, 15, 60, 1514, 4095, 4096, 4097, 8192, 9000, 12289, 32768, 65534, 65535]


async def test_frames_between_two_netfronts_byte_for_byte(daemon):
    async with open_session(daemon.config.socket, "a") as sa, \
            open_session(daemon.config.socket, "b") as sb:
        a, b = await attach_net(sa), await attach_net(sb)
        for i, size in enumerate(SIZES):
            there = eth(b.mac, a.mac, payload(size - 14, i))
            await a.send(there)
            assert (await b.receive()).data == there, size
            back = eth(a.mac, b.mac, payload(size - 14, i + 1000))
            await b.send(back)
            assert (await a.receive()).data == back, size
        stats_a = netback(daemon, "a").statistics()
        stats_b = netback(daemon, "b").statistics()
        total = sum(SIZES)
        assert stats_a["tx_packets"] == stats_b["rx_packets"] == len(SIZES)
        assert stats_a["tx_bytes"] == stats_b["rx_bytes"] == total
        assert stats_a["tx_errors"] == stats_b["rx_errors"] == stats_b["rx_dropped"] == 0


# (fragment sizes, offsets) of raw TX chains; the first size is the first fragment's own
LAYOUTS = [
    ([100], [3996]),  # one slot ending exactly at the page end
    ([96, 4096], [4000, 0]),  # a small first fragment at a high offset
    ([4096, 1, 4096, 7], [0, 4095, 0, 2000]),
    ([4095] + [4096] * 15, [1] + [0] * 15),  # 65535 bytes in 16 slots
    ([65535 - 17 * 3700] + [3700] * 17, [1461] + [396] * 17),  # 65535 bytes in 18 slots
    ([500] * NR_SLOTS_MIN, list(range(0, 18 * 50, 50))),  # XEN_NETIF_NR_SLOTS_MIN
    ([300] * 20, [3796 - k for k in range(20)]),  # max_slots (20) is accepted
    ([14, 3000], [4082, 1096]),  # just the Ethernet header in the first slot
    ([4, 10, 2000], [0, 100, 200]),  # the Ethernet header split over two slots
]


@pytest.mark.parametrize(("sizes", "offsets"), LAYOUTS)
async def test_raw_tx_chains_with_offsets_are_delivered(daemon, sizes, offsets):
    async with open_session(daemon.config.socket, "r") as s, \
            open_session(daemon.config.socket, "b") as sb:
        raw, _ = await attach_raw(s, features={"feature-sg": "1"})
        b = await attach_net(sb)
        total = sum(sizes)
        data = eth(b.mac, raw.mac, payload(total - 14, total))
        slots = raw.packet_slots(data, rid=1000, offsets=offsets, sizes=sizes)
        assert len(slots) == len(sizes)
        assert await raw.call(*slots) == [(1000 + k, RSP_OKAY) for k in range(len(sizes))]
        assert (await b.receive()).data == data
        assert netback(daemon, "r").statistics()["tx_packets"] == 1


async def test_tx_responses_in_request_order_with_null_for_extras(daemon):
    """Three packets in one push: ids echoed per slot, NULL in every extra slot."""
    async with open_session(daemon.config.socket, "r") as s, \
            open_session(daemon.config.socket, "b") as sb:
        raw, _ = await attach_raw(s, features={"feature-sg": "1"})
        b = await attach_net(sb, offloads=True)
        one = eth(b.mac, raw.mac, payload(100, 1))
        gso = tcp_frame(b.mac, raw.mac, payload(9000, 2), checksum=False)
        tagged = eth(b.mac, raw.mac, payload(5000, 3))
        hash_extra = extra_slot(EXTRA_TYPE_HASH, body=bytes([1, 1, 0xde, 0xad, 0xbe, 0xef]))
        mcast = extra_slot(EXTRA_TYPE_MCAST_ADD, flags=1, body=bytes.fromhex("01005e000001"))
        slots = [*raw.packet_slots(one, rid=7),
                 *raw.packet_slots(gso, rid=300, flags=NETTXF_CSUM_BLANK,
                                   extras=(gso_slot(1448, GSO_TYPE_TCPV4),)),
                 *raw.packet_slots(tagged, rid=0xFFFE, extras=(mcast, hash_extra))]
        got = await raw.call(*slots)
        # id of the extras' NULL responses: unspecified by netif.h, only the status counts
        assert len(gso) == 9054 and len(tagged) == 5014  # 3 and 2 fragments
        assert [st for _, st in got] == [RSP_OKAY,
                                         RSP_OKAY, RSP_NULL, RSP_OKAY, RSP_OKAY,
                                         RSP_OKAY, RSP_NULL, RSP_NULL, RSP_OKAY]
        ids = [rid for (rid, st) in got if st != RSP_NULL]
        assert ids == [7, 300, 301, 302, 0xFFFE, 0xFFFF]
        first = await b.receive()
        assert first.data == one
        second = await b.receive()
        assert second.data == gso
        assert second.offload.gso_type == GSO_TYPE_TCPV4 and second.offload.gso_size == 1448
        assert second.offload.csum_blank
        assert (await b.receive()).data == tagged


async def test_rx_responses_sit_in_their_requests_slots(daemon):
    async with open_session(daemon.config.socket, "r") as s, \
            open_session(daemon.config.socket, "a") as sa:
        raw, _ = await attach_raw(s, features={"feature-sg": "1"})
        a = await attach_net(sa)
        # ids deliberately unrelated to slot numbers; slot k <-> id 40000 + 7k
        reqs, views = [], []
        for k in range(12):
            _, ref, view = raw.page(fill=b"\xdd")
            reqs.append((40000 + 7 * k, ref))
            views.append(view)
        assert raw.post_rx(*reqs, views=views) == list(range(12))
        frames = [eth(raw.mac, a.mac, payload(n - 14, n)) for n in (100, 5000, 60, 12289, 4096)]
        for frame in frames:
            await a.send(frame)
        want_slots = [1, 2, 1, 4, 1]
        index = 0
        for frame, nslots in zip(frames, want_slots, strict=True):
            pkt = await raw.receive()  # checks each response's id against its slot's request
            assert pkt.data == frame
            assert [sl.index for sl in pkt.slots] == list(range(index, index + nslots))
            assert [sl.id for sl in pkt.slots] == [40000 + 7 * k
                                                   for k in range(index, index + nslots)]
            assert all(sl.offset == 0 for sl in pkt.slots)
            assert [bool(sl.flags & NETRXF_MORE_DATA) for sl in pkt.slots] == \
                [True] * (nslots - 1) + [False]
            assert sum(sl.status for sl in pkt.slots) == len(frame)
            assert all(sl.status <= PAGE for sl in pkt.slots)
            index += nslots
        stats = netback(daemon, "r").statistics()
        assert stats["rx_packets"] == len(frames) and stats["rx_errors"] == 0


async def test_frames_larger_than_a_page_are_dropped_for_a_frontend_without_sg(daemon):
    async with open_session(daemon.config.socket, "r") as s, \
            open_session(daemon.config.socket, "a") as sa:
        raw, _ = await attach_raw(s)  # no feature-sg
        a = await attach_net(sa)
        raw.post_rx_pages(8)
        frames = [eth(raw.mac, a.mac, payload(n - 14, n)) for n in (4096, 4097, 65535, 60)]
        await a.send_many(frames)
        assert (await raw.receive()).data == frames[0]
        assert (await raw.receive()).data == frames[3]
        stats = netback(daemon, "r").statistics()
        assert stats["rx_packets"] == 2 and stats["rx_dropped"] == 2


# ---------------------------------------------------------------------- offloads


@pytest.mark.parametrize("version", [4, 6])
async def test_gso_passes_through_to_a_gso_frontend(daemon, version):
    gso_type = GSO_TYPE_TCPV4 if version == 4 else GSO_TYPE_TCPV6
    async with open_session(daemon.config.socket, "a") as sa, \
            open_session(daemon.config.socket, "b") as sb, \
            open_session(daemon.config.socket, "r") as s:
        a, b = await attach_net(sa, offloads=True), await attach_net(sb, offloads=True)
        raw, _ = await attach_raw(s, features={"feature-sg": "1", "feature-gso-tcpv4": "1",
                                               "feature-gso-tcpv6": "1",
                                               "feature-ipv6-csum-offload": "1"})
        # NetFront -> NetFront: data and offload state unchanged
        super_packet = tcp_frame(b.mac, a.mac, payload(30000, version), version=version,
                                 checksum=False)
        off = Offload(csum_blank=True, data_validated=True, gso_type=gso_type, gso_size=1448)
        await a.send(Frame(super_packet, off))
        got = await b.receive()
        assert got.data == super_packet
        assert (got.offload.gso_type, got.offload.gso_size) == (gso_type, 1448)
        assert got.offload.csum_blank
        # NetFront -> raw frontend: the exact RX slots
        raw.post_rx_pages(20)
        to_raw = tcp_frame(raw.mac, a.mac, payload(10000, 7), version=version, checksum=False)
        await a.send(Frame(to_raw, off._replace(gso_size=1000)))
        # (b had not sent anything yet: the first super-packet was flooded to raw too)
        pkt = await receive_matching(raw, lambda d: d[:6] == mac_bytes(raw.mac))
        assert pkt.data == to_raw
        first = pkt.first
        assert first.flags & NETRXF_CSUM_BLANK and first.flags & NETRXF_DATA_VALIDATED
        assert first.flags & NETRXF_EXTRA_INFO and first.flags & NETRXF_MORE_DATA
        assert pkt.slots[1].index == first.index + 1  # the extra sits in the next slot
        etype, eflags, size, gtype, _pad, _feat = struct.unpack("<BBHBBH", pkt.extras[0])
        assert (etype, eflags, size, gtype) == (EXTRA_TYPE_GSO, 0, 1000, gso_type)
        assert len(pkt.slots) == 1 + -(-len(to_raw) // PAGE)
        # raw frontend -> NetFront: a GSO extra on TX
        from_raw = tcp_frame(b.mac, raw.mac, payload(20000, 8), version=version,
                             checksum=False)
        slots = raw.packet_slots(from_raw, rid=1, flags=NETTXF_CSUM_BLANK,
                                 extras=(gso_slot(536, gso_type),))
        assert [st for _, st in await raw.call(*slots)] == [RSP_OKAY, RSP_NULL] + \
            [RSP_OKAY] * (len(slots) - 2)
        got = await next_matching(b, lambda f: f.data[6:12] == mac_bytes(raw.mac))
        assert got.data == from_raw
        assert (got.offload.gso_type, got.offload.gso_size) == (gso_type, 536)
        for name in ("a", "b"):
            assert netback(daemon, name).statistics()["gso_segmented"] == 0


def check_segments(segments: list[bytes], original: bytes, mss: int) -> None:
    """``segments`` are a correct software segmentation of the super-packet ``original``."""
    orig = parse_l4(original)
    assert len(segments) == -(-len(orig.payload) // mss)
    data = b""
    for k, seg in enumerate(segments):
        p = parse_l4(seg)
        last = k == len(segments) - 1
        assert seg[:14] == original[:14]
        assert p.version == orig.version and p.proto == 6
        assert p.ip_len_ok, f"segment {k}: IP length field"
        assert p.ip_csum_ok, f"segment {k}: IPv4 header checksum"
        assert p.l4_csum_ok, f"segment {k}: TCP checksum"
        assert len(p.payload) == (mss if not last else len(orig.payload) - k * mss)
        assert p.seq == (orig.seq + k * mss) & 0xFFFFFFFF
        assert p.l4_header[:4] == orig.l4_header[:4]  # ports
        assert p.l4_header[8:12] == orig.l4_header[8:12]  # ack
        assert p.l4_header[14:16] == orig.l4_header[14:16]  # window
        fin_psh = orig.tcp_flags & 0x09
        assert p.tcp_flags & 0x09 == (fin_psh if last else 0), f"segment {k}: flags"
        assert p.tcp_flags & ~0x89 & 0xFF == orig.tcp_flags & ~0x89 & 0xFF
        if orig.version == 4:
            assert p.ip_id == (orig.ip_id + k) & 0xFFFF
            assert p.ip_header[8:10] == orig.ip_header[8:10]  # ttl, proto
            assert p.ip_header[12:20] == orig.ip_header[12:20]  # addresses
        else:
            assert p.ip_header[6:8] == orig.ip_header[6:8]
            assert p.ip_header[8:40] == orig.ip_header[8:40]
        data += p.payload
    assert data == orig.payload


@pytest.mark.parametrize(("version", "size", "mss", "flags"), [
    (4, 30000, 1448, 0x18),  # PSH|ACK: PSH only on the last segment
    (4, 14480, 1448, 0x19),  # an exact multiple, FIN|PSH|ACK
    (6, 20000, 1000, 0x10),
    (6, 3000, 1440, 0x18),
    (4, 1000, 1448, 0x18),  # fits one segment
])
async def test_gso_is_segmented_for_a_frontend_without_gso(daemon, version, size, mss, flags):
    gso_type = GSO_TYPE_TCPV4 if version == 4 else GSO_TYPE_TCPV6
    async with open_session(daemon.config.socket, "a") as sa, \
            open_session(daemon.config.socket, "b") as sb:
        a, b = await attach_net(sa, offloads=True), await attach_net(sb, offloads=False)
        originals = []
        for k in range(3):
            frame = tcp_frame(b.mac, a.mac, payload(size, k), version=version, flags=flags,
                              seq=0xFFFFF000 + k, ip_id=0xFFFE, checksum=False)
            originals.append(frame)
            await a.send(Frame(frame, Offload(csum_blank=True, data_validated=True,
                                              gso_type=gso_type, gso_size=mss)))
        marker = eth(b.mac, a.mac, b"marker" * 10)
        await a.send(marker)
        for original in originals:
            count = -(-(len(original) - 14 - (20 if version == 4 else 40) - 20) // mss)
            segments = [await b.receive() for _ in range(count)]
            assert all(not f.offload.csum_blank and not f.offload.gso_type for f in segments)
            check_segments([f.data for f in segments], original, mss)
        assert (await b.receive()).data == marker  # nothing duplicated, nothing left over
        if size > mss:
            assert netback(daemon, "b").statistics()["gso_segmented"] == 3


async def test_checksums_are_completed_for_a_frontend_without_csum_offload(daemon):
    async with open_session(daemon.config.socket, "a") as sa, \
            open_session(daemon.config.socket, "b") as sb, \
            open_session(daemon.config.socket, "c") as sc:
        a = await attach_net(sa, offloads=True)
        b = await attach_net(sb, offloads=False)  # feature-no-csum-offload=1
        c = await attach_net(sc, offloads=True)
        blank = [tcp_frame(BCAST, a.mac, payload(500, 1), checksum=False),
                 tcp_frame(BCAST, a.mac, payload(7000, 2), version=6, checksum=False),
                 udp_frame(BCAST, a.mac, payload(300, 3), checksum=False),
                 udp_frame(BCAST, a.mac, payload(301, 4), version=6, checksum=False)]
        for frame in blank:
            await a.send(Frame(frame, Offload(csum_blank=True, data_validated=True)))
        for frame in blank:
            got_b, got_c = await b.receive(), await c.receive()
            p = parse_l4(got_b.data)
            assert p.l4_csum_ok and p.ip_csum_ok and p.ip_len_ok
            assert got_b.data[:14] == frame[:14] and len(got_b.data) == len(frame)
            assert parse_l4(frame).payload == p.payload
            assert not got_b.offload.csum_blank and got_b.offload.data_validated
            # the offload-capable frontend gets the frame as sent, flagged csum_blank
            assert got_c.data == frame and got_c.offload.csum_blank


async def test_regression_ipv6_csum_offload_defaults_off_for_a_frontend(daemon):
    """netif.h: feature-ipv6-csum-offload "If it is missing then the feature is
    assumed to be off" (while IPv4 checksum offload is on unless
    feature-no-csum-offload). A frontend that published neither key must get
    IPv6 frames with their checksums completed, IPv4 ones may stay blank."""
    async with open_session(daemon.config.socket, "a") as sa, \
            open_session(daemon.config.socket, "r") as s:
        a = await attach_net(sa, offloads=True)
        raw, _ = await attach_raw(s, features={"feature-sg": "1"})
        raw.post_rx_pages(8)
        v4 = tcp_frame(raw.mac, a.mac, payload(200, 1), checksum=False)
        v6 = tcp_frame(raw.mac, a.mac, payload(200, 2), version=6, checksum=False)
        for frame in (v4, v6):
            await a.send(Frame(frame, Offload(csum_blank=True, data_validated=True)))
        pkt4, pkt6 = await raw.receive(), await raw.receive()
        assert pkt4.data == v4 and pkt4.first.flags & NETRXF_CSUM_BLANK
        assert not pkt6.first.flags & NETRXF_CSUM_BLANK
        assert parse_l4(pkt6.data).l4_csum_ok
        assert parse_l4(pkt6.data).payload == parse_l4(v6).payload


# ---------------------------------------------------------------------- transport


@pytest.mark.parametrize("split", [True, False])
async def test_split_and_shared_event_channels(daemon, split):
    async with open_session(daemon.config.socket, "a") as sa, \
            open_session(daemon.config.socket, "r") as s:
        a = await attach_net(sa, split_event_channels=split)
        raw, _ = await attach_raw(s, split_event_channels=split)
        for sess in (sa, s):
            _, fe = paths(sess)
            keys = {k: await sess.xs.read_or_none(f"{fe}/{k}") is not None
                    for k in ("event-channel", "event-channel-tx", "event-channel-rx")}
            assert keys == {"event-channel": not split, "event-channel-tx": split,
                            "event-channel-rx": split}
        for name in ("a", "r"):
            q = netback(daemon, name).conn.queues[0]
            assert (q.channel is not q.rx_channel) == split
        assert (raw.tx_channel() is not raw.rx_channel()) == split
        raw.post_rx_pages(64)
        for k in range(40):  # both directions interleaved, many wake-ups
            to_raw = eth(raw.mac, a.mac, payload(100 + k, k))
            await a.send(to_raw)
            assert (await raw.receive()).data == to_raw
            from_raw = eth(a.mac, raw.mac, payload(200 + k, k))
            assert await raw.call(*raw.packet_slots(from_raw, rid=k)) == [(k, RSP_OKAY)]
            assert (await a.receive()).data == from_raw


async def test_two_queues(daemon):
    async with open_session(daemon.config.socket, "a") as sa, \
            open_session(daemon.config.socket, "b") as sb:
        a, b = await attach_net(sa, queues=2), await attach_net(sb, queues=2)
        _, fe = paths(sa)
        assert await sa.xs.read_or_none(f"{fe}/multi-queue-num-queues") == b"2"
        assert await sa.xs.read_or_none(f"{fe}/tx-ring-ref") is None
        for q in range(2):
            for key in ("tx-ring-ref", "rx-ring-ref", "event-channel-tx", "event-channel-rx"):
                assert await sa.xs.read_or_none(f"{fe}/queue-{q}/{key}") is not None
        assert netback(daemon, "a").statistics()["queues"] == 2
        # 64 flows (distinct IP address pairs), 3 frames each
        frames = []
        for n in range(3):
            for flow in range(64):
                frames.append(tcp_frame(b.mac, a.mac, payload(100, flow * 10 + n),
                                        ip_src=bytes([10, 1, flow, 1]), seq=n))
        await a.send_many(frames)
        got = [(await b.receive()).data for _ in frames]
        assert sorted(got) == sorted(frames)
        for flow in range(64):  # a flow stays on one queue: its frames keep their order
            seqs = [parse_l4(f).seq for f in got if f[26:30] == bytes([10, 1, flow, 1])]
            assert seqs == [0, 1, 2]
        for name, ring in (("a", "tx"), ("b", "rx")):
            used = [getattr(q, ring).req_cons for q in netback(daemon, name)._queues]
            assert len(used) == 2 and all(used), (name, used)  # both queues carried frames
        # and the way back
        await b.send_many([eth(a.mac, b.mac, payload(60, k)) for k in range(10)])
        assert len([await a.receive() for _ in range(10)]) == 10


# ---------------------------------------------------------------------- switching


async def test_learning_and_flooding_through_vifs(daemon):
    async with open_session(daemon.config.socket, "a") as sa, \
            open_session(daemon.config.socket, "b") as sb, \
            open_session(daemon.config.socket, "c") as sc:
        a, b, c = (await attach_net(sa), await attach_net(sb), await attach_net(sc))
        port = {n: f"vif{sess.domid}.0" for n, sess in (("a", sa), ("b", sb), ("c", sc))}
        assert set(port.values()) <= set(daemon.switch.ports)

        # b is unknown yet: flooded to b and c (not back to a)
        f1 = eth(b.mac, a.mac, b"one" * 20)
        await a.send(f1)
        assert (await b.receive()).data == f1
        assert (await c.receive()).data == f1
        assert daemon.switch.fdb() == {a.mac: port["a"]}

        # a was learned: b's answer goes to a only
        f2 = eth(a.mac, b.mac, b"two" * 20)
        await b.send(f2)
        assert (await a.receive()).data == f2
        assert daemon.switch.fdb() == {a.mac: port["a"], b.mac: port["b"]}
        # and now b is known too: unicast to b only
        f3 = eth(b.mac, a.mac, b"three" * 20)
        await a.send(f3)
        assert (await b.receive()).data == f3
        # c got neither: the next thing c sees is this broadcast from b
        bcast = eth(BCAST, b.mac, b"bcast" * 20)
        await b.send(bcast)
        assert (await c.receive()).data == bcast
        assert (await a.receive()).data == bcast
        # multicast floods too and is never learned as a source
        mcast = eth("01:00:5e:00:00:fb", c.mac, b"mcast" * 20)
        await c.send(mcast)
        assert (await a.receive()).data == mcast
        assert (await b.receive()).data == mcast
        assert daemon.switch.fdb() == {a.mac: port["a"], b.mac: port["b"], c.mac: port["c"]}
        # the sender never gets its own flood: b's next frame is a's later unicast
        f4 = eth(b.mac, a.mac, b"four" * 20)
        await a.send(f4)
        assert (await b.receive()).data == f4

        # a vif that goes away is forgotten; its MAC floods again
        await b.device.close()
        assert port["b"] not in daemon.switch.ports
        assert b.mac not in daemon.switch.fdb()
        f5 = eth(b.mac, a.mac, b"five" * 20)
        await a.send(f5)
        assert (await c.receive()).data == f5


# ---------------------------------------------------------------------- stalled receiver


async def test_a_receiver_that_stops_posting_buffers_loses_counted_frames(daemon):
    async with open_session(daemon.config.socket, "a") as sa, \
            open_session(daemon.config.socket, "b") as sb, \
            open_session(daemon.config.socket, "r") as s:
        a, b = await attach_net(sa), await attach_net(sb)
        # b makes itself known before the stalled frontend comes up (no floods to it)
        hi = eth(a.mac, b.mac, b"hi" * 30)
        await b.send(hi)
        assert (await a.receive()).data == hi
        raw, _ = await attach_raw(s)
        port = daemon.switch.ports[f"vif{s.domid}.0"]
        peak = []
        port.taps.append(lambda direction, frame: peak.append(port.queued))
        # the stalled frontend announces itself, posts 4 buffers and then nothing more
        hello = eth(b.mac, raw.mac, b"hello" * 12)
        assert await raw.call(*raw.packet_slots(hello)) == [(0, RSP_OKAY)]
        assert (await b.receive()).data == hello
        raw.post_rx_pages(4)
        sent = 1000
        for start in range(0, sent, 100):
            await a.send_many([eth(raw.mac, a.mac, k.to_bytes(4, "big") + bytes(56))
                               for k in range(start, start + 100)])
            # meanwhile a and b keep talking
            ping = eth(b.mac, a.mac, b"ping" + start.to_bytes(4, "big") + bytes(50))
            await a.send(ping)
            assert (await next_matching(b, lambda f, p=ping: f.data == p)).data == ping
        stats = netback(daemon, "r").statistics()
        assert stats["rx_packets"] == 4
        assert stats["rx_queued"] == CAPACITY
        assert stats["rx_dropped"] == sent - 4 - CAPACITY
        assert max(peak) <= CAPACITY
        assert port.queued <= CAPACITY
        assert netback(daemon, "a").statistics()["tx_packets"] == sent + 10
        # the first four frames sit in the posted pages
        got = [await raw.receive() for _ in range(4)]
        assert [int.from_bytes(p.data[14:18], "big") for p in got] == [0, 1, 2, 3]
        # posting again delivers what was queued, oldest first, then new traffic
        seen = []
        while len(seen) < CAPACITY:
            raw.post_rx_pages(64, first_id=len(seen))
            seen += [int.from_bytes((await raw.receive()).data[14:18], "big")
                     for _ in range(64)]
        assert seen == list(range(4, 4 + CAPACITY))
        raw.post_rx_pages(1)
        fresh = eth(raw.mac, a.mac, b"fresh" * 12)
        await a.send(fresh)
        assert (await raw.receive()).data == fresh
        assert netback(daemon, "r").statistics()["rx_dropped"] == sent - 4 - CAPACITY


async def test_regression_software_gso_delivers_each_segment_once(daemon):
    """Software GSO used to leave the super-packet in the port queue behind its
    segments and hand out the wrong head: segment 1 was lost, and the
    super-packet was segmented again and again (an endless stream)."""
    async with open_session(daemon.config.socket, "a") as sa, \
            open_session(daemon.config.socket, "r") as s:
        a = await attach_net(sa, offloads=True)
        raw, _ = await attach_raw(s)  # no GSO, no sg
        raw.post_rx_pages(16)
        frame = tcp_frame(raw.mac, a.mac, payload(2500, 1), checksum=False)
        await a.send(Frame(frame, Offload(csum_blank=True, data_validated=True,
                                          gso_type=GSO_TYPE_TCPV4, gso_size=1000)))
        marker = eth(raw.mac, a.mac, b"marker" * 10)
        await a.send(marker)
        got = [(await raw.receive()).data for _ in range(4)]
        check_segments(got[:3], frame, 1000)
        assert got[3] == marker
        stats = netback(daemon, "r").statistics()
        assert stats["gso_segmented"] == 1 and stats["rx_packets"] == 4


async def test_regression_gso_segments_respect_the_port_capacity(daemon):
    """Software GSO for a frontend without GSO must not grow the port queue past
    its capacity (a 60 KB super-packet with gso_size 100 is 600 segments): while
    that frontend does not drain, such a super-packet is dropped and counted."""
    async with open_session(daemon.config.socket, "a") as sa, \
            open_session(daemon.config.socket, "b") as sb, \
            open_session(daemon.config.socket, "r") as s:
        a, b = await attach_net(sa, offloads=True), await attach_net(sb)
        hi = eth(a.mac, b.mac, b"hi" * 30)
        await b.send(hi)
        assert (await a.receive()).data == hi
        raw, _ = await attach_raw(s)  # no feature-gso-*: gets segments; posts nothing yet
        port = daemon.switch.ports[f"vif{s.domid}.0"]
        gso = Offload(csum_blank=True, data_validated=True, gso_type=GSO_TYPE_TCPV4,
                      gso_size=100)
        for k in range(4):
            frame = tcp_frame(raw.mac, a.mac, payload(60000, k), checksum=False)
            await a.send(Frame(frame, gso))
            ping = eth(b.mac, a.mac, b"ping" * 20)
            await a.send(ping)
            await next_matching(b, lambda f, p=ping: f.data == p)
            await trio.testing.wait_all_tasks_blocked()
            assert port.queued <= CAPACITY
            assert netback(daemon, "r").statistics()["rx_queued"] <= CAPACITY
        assert netback(daemon, "r").statistics()["rx_dropped"] >= 4
        # a super-packet whose segments fit is still delivered whole, once, in order
        small = tcp_frame(raw.mac, a.mac, payload(2000, 9), checksum=False)
        await a.send(Frame(small, gso))
        marker = eth(raw.mac, a.mac, b"marker" * 10)
        await a.send(marker)
        raw.post_rx_pages(32)
        got = [(await raw.receive()).data for _ in range(21)]
        check_segments(got[:20], small, 100)
        assert got[20] == marker


async def test_regression_rx_frame_needing_more_slots_than_posted_does_not_freeze(daemon):
    """A frame needing two RX slots while the frontend has posted one: the RX
    task saw "work" (an unconsumed request) that it could not do and looped
    without ever yielding, freezing the whole daemon. (A thread rescues a
    frozen loop by posting the missing buffer, and the test then fails.)"""
    async with open_session(daemon.config.socket, "a") as sa, \
            open_session(daemon.config.socket, "b") as sb, \
            open_session(daemon.config.socket, "r") as s:
        a, b = await attach_net(sa), await attach_net(sb)
        hi = eth(a.mac, b.mac, b"hi" * 30)
        await b.send(hi)
        assert (await a.receive()).data == hi
        raw, _ = await attach_raw(s, features={"feature-sg": "1"})
        _, ref1, view1 = raw.page()
        _, ref2, view2 = raw.page()
        rescued = threading.Event()
        done = threading.Event()

        def rescue():  # runs only if the trio loop stops making progress
            if not done.wait(15):
                rescued.set()
                raw.post_rx((2, ref2), views=[view2])

        thread = threading.Thread(target=rescue, daemon=True)
        thread.start()
        try:
            raw.post_rx((1, ref1), views=[view1])
            big = eth(raw.mac, a.mac, payload(6000, 1))
            await a.send(big)
            await trio.testing.wait_all_tasks_blocked()
            for k in range(20):  # the daemon keeps switching meanwhile
                ping = eth(b.mac, a.mac, b"ping" + bytes([k]) * 60)
                await a.send(ping)  # (big was flooded to b too: raw's MAC is unknown)
                await next_matching(b, lambda f, p=ping: f.data == p)
            assert not rescued.is_set(), "the daemon froze (rescued by the watchdog thread)"
            raw.post_rx((2, ref2), views=[view2])
        finally:
            done.set()
            thread.join()
        pkt = await raw.receive()
        assert pkt.data == big
        assert [(sl.index, sl.id) for sl in pkt.slots] == [(0, 1), (1, 2)]
        assert not rescued.is_set()


class _PostsWhileWeLook:
    """A BackRing whose frontend posts more RX buffers right after the backend
    counted the unconsumed ones (what a frontend in another process can do)."""

    def __init__(self, ring, post) -> None:
        self._ring, self._post = ring, post

    @property
    def unconsumed_requests(self) -> int:
        n = self._ring.unconsumed_requests
        if self._post is not None:
            post, self._post = self._post, None
            post()
        return n

    def __getattr__(self, name):
        return getattr(self._ring, name)


async def test_regression_rx_buffers_posted_while_counting_are_not_all_held(daemon):
    """netback counted 1 posted RX buffer (too few for a 2-slot frame), the frontend
    posted more meanwhile, and the backend then held *every* buffer: with all of
    them held the frontend had nothing left to post, nobody woke the backend and
    the vif stalled for good (seen as an iperf3 run hanging under load)."""
    async with open_session(daemon.config.socket, "a") as sa, \
            open_session(daemon.config.socket, "r") as s:
        a = await attach_net(sa)
        raw, _ = await attach_raw(s, features={"feature-sg": "1"})
        queue = netback(daemon, "r")._queues[0]
        raw.post_rx_pages(1, first_id=1)
        queue.rx = _PostsWhileWeLook(queue.rx, lambda: raw.post_rx_pages(3, first_id=2))
        big = eth(raw.mac, a.mac, payload(6000, 1))
        await a.send(big)
        pkt = await raw.receive(timeout=5)
        assert pkt.data == big


async def test_vif_churn_leaks_no_fds_and_no_ports(daemon):
    """Attach, use and close a two-queue vif 30 times, every other time by breaking
    its TX ring (the disconnect path): the process's fd count and the switch's
    ports come back to where they were (hardening.md: survive churn, no leaks)."""
    async with open_session(daemon.config.socket, "a") as sa:
        a = await attach_net(sa)
        counts = []
        for i in range(30):
            async with open_session(daemon.config.socket, "r") as s:
                if i % 2:
                    raw, device = await attach_raw(s, queues=2, split_event_channels=True)
                    raw.tx[1].set_req_prod(raw.tx[1].req_prod + 999)
                    raw.tx_channel(1).notify()
                    with trio.fail_after(5):
                        await device.closed.wait()
                else:
                    r = await attach_net(s, queues=2)
                    frame = eth(r.mac, a.mac, payload(100, i))
                    await a.send(frame)
                    assert (await r.receive()).data == frame
                    await r.device.close()
            await trio.testing.wait_all_tasks_blocked()
            counts.append((open_fd_count(), sorted(daemon.switch.ports)))
        assert counts[-1] == counts[-2] == counts[1], counts
        assert counts[-1][1] == [f"vif{sa.domid}.0"]


async def test_regression_statistics_do_not_read_a_vif_s_unmapped_rings(monkeypatch):
    """A frontend that gives up between the backend's Connected and its own
    (here: its attach fails) makes the daemon unmap the vif's rings while the
    device is still listed: the statistics task then read the rings' indices
    from the unmapped pages, a segfault of the daemon (seen with blkback)."""
    monkeypatch.setattr(Daemon, "STATISTICS_INTERVAL", 0.02)

    async def gives_up(self, backend):
        raise DeviceError("this frontend gives up")

    async with running_daemon(CONFIG) as daemon, \
            open_session(daemon.config.socket, "a") as sa:
        monkeypatch.setattr(NetFront, "attach", gives_up)
        front = NetFront(sa)
        device = await sa.attach(front, 0, NET_KEYS)
        with trio.fail_after(10):
            while device.status.state != S.Closed:
                await trio.sleep(0.01)
        await trio.sleep(0.2)  # the statistics task runs ten times meanwhile
        monkeypatch.undo()
        async with open_session(daemon.config.socket, "b") as sb:
            a, b = await attach_net(sa), await attach_net(sb)
            frame = eth(b.mac, a.mac, payload(100))
            await a.send(frame)
            assert (await b.receive()).data == frame  # the daemon still serves


@pytest.mark.parametrize(("tx", "rx", "want"), [(True, False, (7, None)),
                                               (False, True, (None, 9)),
                                               (True, True, (7, 9))])
def test_regression_a_service_task_s_progress_is_only_the_rings_it_waits_on(tx, rx, want):
    """With split event channels each task waits on one ring. Its progress (what
    excuses idle wake-ups from the spurious budget) included the other ring's:
    RX requests consumed for other vifs' frames reset the TX channel's count, so
    a guest could flood its TX channel unthrottled while it received traffic."""
    queue = SimpleNamespace(tx=SimpleNamespace(progress=7), rx=SimpleNamespace(progress=9))
    assert _Work(queue, tx, rx).progress == want
