"""pvio.tap: virtio-net header <-> netif offload mapping, and real TAP devices.

The mapping functions (``Tap.from_vnet`` / ``Tap.to_vnet``) are checked on their own
first (they only use the object's counters and ``offloads``). Then real TAP devices,
each created inside a throwaway network namespace by a child process, talk to the
kernel's own network stack, a real peer:

* an ICMP echo request written into the TAP is answered by the kernel;
* two namespaces joined by a relay of two TAPs carry a TCP transfer whose bytes
  arrive intact: once passing the kernel's TSO super-packets and partial checksums
  through as netif GSO/csum_blank frames, once completing them in software
  (:func:`pvio._l4.segment` / :func:`complete_checksum`) for a TAP without offloads,
  where the receiving kernel verifies every checksum itself (``InCsumErrors`` stays 0).

Needs root, iproute2 and /dev/net/tun (.ci/run installs iproute2). Every namespace and
process is removed by pid in the test that made it; no interface may be left in the
test's own namespace.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys

import pytest

from pvio._netns import Netns, stop_process
from pvio.layouts import XEN_NETIF_GSO_TYPE_TCPV4, XEN_NETIF_GSO_TYPE_TCPV6
from pvio.netif import NO_OFFLOAD, Frame, Offload
from pvio.tap import (
    VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VNET_HDR,
    Tap,
    TapError,
)
from tests.test_l4 import (
    ACK,
    ICMP,
    PSH,
    TCP,
    UDP,
    build,
    eth,
    internet_checksum,
    ipv4,
    ones_sum,
    pseudo_header,
    tcp,
)

UDP_GSO = 5  # VIRTIO_NET_HDR_GSO_UDP_L4: nothing netif can carry


def fake_tap(offloads: bool = True) -> Tap:
    """A Tap without a device: from_vnet/to_vnet only use these attributes."""
    tap = object.__new__(Tap)
    tap.offloads, tap.dropped, tap.segmented = offloads, 0, 0
    return tap


def vnet(flags=0, gso=VIRTIO_NET_HDR_GSO_NONE, hdr_len=0, gso_size=0, start=0, offset=0):
    return VNET_HDR.pack(flags, gso, hdr_len, gso_size, start, offset)


def seeded(b) -> bytes:
    """The frame as the kernel hands over a CHECKSUM_PARTIAL packet (pseudo seed)."""
    frame = bytearray(b.frame)
    pseudo = pseudo_header(b.version, b.src, b.dst, b.proto, b.l4_len)
    struct.pack_into("!H", frame, b.csum_at, ones_sum(pseudo))
    return bytes(frame)


def finish(frame: bytes, start: int, offset: int) -> bytes:
    """What the kernel does with NEEDS_CSUM: sum from start to the end, complement."""
    frame = bytearray(frame)
    struct.pack_into("!H", frame, start + offset, internet_checksum(bytes(frame[start:])))
    return bytes(frame)


# ------------------------------------------------------------ from_vnet (kernel -> netif)


def test_plain_frame_has_no_offload():
    tap = fake_tap()
    b = build(4, TCP, b"x")
    (frame,) = tap.from_vnet(vnet() + bytes(b.frame))
    assert frame == Frame(bytes(b.frame), NO_OFFLOAD)


def test_data_valid_maps_to_data_validated():
    (frame,) = fake_tap().from_vnet(vnet(VIRTIO_NET_HDR_F_DATA_VALID) + bytes(build().frame))
    assert frame.offload == Offload(False, True)


@pytest.mark.parametrize("version,proto", [(4, TCP), (4, UDP), (6, TCP), (6, UDP)])
def test_needs_csum_at_the_parsed_offsets_maps_to_csum_blank(version, proto):
    b = build(version, proto, b"partial" * 30)
    raw = seeded(b)
    off = 16 if proto == TCP else 6
    (frame,) = fake_tap().from_vnet(vnet(VIRTIO_NET_HDR_F_NEEDS_CSUM, start=b.l4, offset=off)
                                    + raw)
    assert frame == Frame(raw, Offload(True, True))  # data untouched: netback finishes it


def test_needs_csum_that_netif_cannot_describe_is_finished_here():
    # An IPv4 fragment: _l4 does not parse it, so the checksum is completed now and the
    # frame goes on as "validated", with nothing left for netif to describe.
    b = build(4, UDP, b"odd one")
    raw = bytearray(seeded(b))
    struct.pack_into("!H", raw, 14 + 6, 0x2000)  # MF: a fragment
    struct.pack_into("!H", raw, 14 + 10, 0)
    struct.pack_into("!H", raw, 14 + 10, internet_checksum(bytes(raw[14:34])))
    tap = fake_tap()
    (frame,) = tap.from_vnet(vnet(VIRTIO_NET_HDR_F_NEEDS_CSUM, start=b.l4, offset=6)
                             + bytes(raw))
    assert frame.offload == Offload(False, True)
    assert frame.data == finish(bytes(raw), b.l4, 6)
    assert tap.from_vnet(vnet(VIRTIO_NET_HDR_F_NEEDS_CSUM, start=b.l4 + 200, offset=6)
                         + bytes(raw)) == []
    assert tap.dropped == 1


@pytest.mark.parametrize("version,virtio,netif", [
    (4, VIRTIO_NET_HDR_GSO_TCPV4, XEN_NETIF_GSO_TYPE_TCPV4),
    (4, VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_ECN, XEN_NETIF_GSO_TYPE_TCPV4),
    (6, VIRTIO_NET_HDR_GSO_TCPV6, XEN_NETIF_GSO_TYPE_TCPV6),
])
def test_tso_super_packet_maps_to_a_gso_extra(version, virtio, netif):
    b = build(version, TCP, bytes(20000), flags=ACK | PSH)
    raw = seeded(b)
    (frame,) = fake_tap().from_vnet(
        vnet(VIRTIO_NET_HDR_F_NEEDS_CSUM, virtio, b.l4 + 20, 1448, b.l4, 16) + raw)
    assert frame == Frame(raw, Offload(True, True, netif, 1448))


@pytest.mark.parametrize("version,virtio", [(6, VIRTIO_NET_HDR_GSO_TCPV4),
                                            (4, VIRTIO_NET_HDR_GSO_TCPV6), (4, UDP_GSO)])
def test_gso_that_does_not_match_the_frame_is_dropped(version, virtio):
    b = build(version, TCP, bytes(5000))
    tap = fake_tap()
    assert tap.from_vnet(vnet(VIRTIO_NET_HDR_F_NEEDS_CSUM, virtio, b.l4 + 20, 1448, b.l4, 16)
                         + seeded(b)) == []
    assert tap.dropped == 1


def test_runt_is_dropped():
    tap = fake_tap()
    assert tap.from_vnet(vnet() + bytes(13)) == []
    assert tap.from_vnet(b"\0" * 5) == []
    assert tap.dropped == 2


def test_super_packet_netif_cannot_carry_is_segmented_in_software():
    # IPv4 total length 65535: a 65549-byte frame, over XEN_NETIF_MAX_TX_SIZE.
    payload = bytes((i * 7) & 0xFF for i in range(65535 - 40))
    b = build(4, TCP, payload, flags=ACK | PSH, seq=5)
    assert len(b.frame) == 65549
    tap = fake_tap()
    frames = tap.from_vnet(vnet(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4,
                                b.l4 + 20, 1448, b.l4, 16) + seeded(b))
    assert tap.segmented == 1
    assert len(frames) == -(-len(payload) // 1448)
    assert all(f.offload == Offload(False, True) for f in frames)
    got = b""
    for f in frames:
        seg = build(4, TCP)  # only for the offsets
        seg.frame, seg.l4_len = bytearray(f.data), len(f.data) - seg.l4
        assert seg.l4_checksum_ok()
        got += f.data[seg.l4 + 20:]
    assert got == payload


def test_regression_frames_netif_cannot_carry_are_dropped_not_passed_on():
    # With a 65521-byte MTU (Linux netfront's max) a VLAN tag, or a full-size IPv4
    # datagram, makes frames over 65535 bytes; from_vnet passed them on and
    # send_many's ValueError ended pvio netfront-tap. Now they are dropped, counted.
    payload = bytes(65535 - 40)
    b = build(4, TCP, payload, flags=ACK)
    tap = fake_tap()
    assert len(b.frame) > 65535
    assert tap.from_vnet(vnet() + bytes(b.frame)) == []
    # a super-packet whose segments would each still be too big: nothing to send
    assert tap.from_vnet(vnet(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4,
                              b.l4 + 20, 65500, b.l4, 16) + seeded(b)) == []
    assert tap.dropped == 2


def test_regression_a_super_packet_is_not_sent_without_the_segments_that_do_not_fit():
    """Segments over netif's limit were filtered out one by one: with full
    segments just too big (e.g. a VLAN tag on a 65521-byte MTU) only the short
    tail went out, a hole in the stream, and nothing counted it as dropped."""
    payload = bytes((i * 5) & 0xFF for i in range(65535 - 40))
    b = build(4, TCP, payload, flags=ACK)
    tap = fake_tap()
    gso_size = 65490  # header + one full segment: 65544 bytes, the tail 59
    assert tap.from_vnet(vnet(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4,
                              b.l4 + 20, gso_size, b.l4, 16) + seeded(b)) == []
    assert tap.dropped == 1


# ------------------------------------------------------------ to_vnet (netif -> kernel)


def test_plain_and_validated_frames():
    tap = fake_tap()
    data = bytes(build().frame)
    assert tap.to_vnet(Frame(data)) == vnet() + data
    assert tap.to_vnet(Frame(data, Offload(False, True))) == \
        vnet(VIRTIO_NET_HDR_F_DATA_VALID) + data


@pytest.mark.parametrize("version,proto", [(4, TCP), (4, UDP), (6, TCP), (6, UDP)])
def test_csum_blank_becomes_needs_csum_with_a_fresh_seed(version, proto):
    b = build(version, proto, b"netif leaves the field to us" * 3)
    out = fake_tap().to_vnet(Frame(bytes(b.frame), Offload(True, True)))
    flags, gso, hdr_len, gso_size, start, offset = VNET_HDR.unpack_from(out)
    assert (flags, gso, hdr_len, gso_size) == (VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0)
    assert (start, offset) == (b.l4, 16 if proto == TCP else 6)
    data = out[VNET_HDR.size:]
    assert data == seeded(b)  # the garbage the builder left became the pseudo seed
    done = build(version, proto)
    done.frame, done.l4, done.l4_len = bytearray(finish(data, start, offset)), b.l4, b.l4_len
    assert done.l4_checksum_ok()


@pytest.mark.parametrize("version,netif,virtio", [
    (4, XEN_NETIF_GSO_TYPE_TCPV4, VIRTIO_NET_HDR_GSO_TCPV4),
    (6, XEN_NETIF_GSO_TYPE_TCPV6, VIRTIO_NET_HDR_GSO_TCPV6),
])
def test_gso_frame_becomes_a_tso_super_packet(version, netif, virtio):
    b = build(version, TCP, bytes(30000), options=bytes(12))
    out = fake_tap().to_vnet(Frame(bytes(b.frame), Offload(True, True, netif, 1436)))
    assert VNET_HDR.unpack_from(out) == (VIRTIO_NET_HDR_F_NEEDS_CSUM, virtio, b.l4 + 32, 1436,
                                         b.l4, 16)
    assert out[VNET_HDR.size:] == seeded(b)


def test_without_offloads_no_gso_reaches_the_kernel():
    b = build(4, TCP, bytes(3000))
    out = fake_tap(offloads=False).to_vnet(
        Frame(bytes(b.frame), Offload(True, True, XEN_NETIF_GSO_TYPE_TCPV4, 1448)))
    assert VNET_HDR.unpack_from(out)[:4] == (VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0)


@pytest.mark.parametrize("version,proto,offload,virtio", [
    (6, TCP, Offload(True, True, XEN_NETIF_GSO_TYPE_TCPV4, 1448), VIRTIO_NET_HDR_GSO_TCPV6),
    (4, TCP, Offload(True, True, XEN_NETIF_GSO_TYPE_TCPV6, 1448), VIRTIO_NET_HDR_GSO_TCPV4),
    (4, UDP, Offload(True, True, XEN_NETIF_GSO_TYPE_TCPV4, 1448), VIRTIO_NET_HDR_GSO_NONE),
    (4, TCP, Offload(True, True, XEN_NETIF_GSO_TYPE_TCPV4, 0), VIRTIO_NET_HDR_GSO_NONE),
], ids=["v6-says-v4", "v4-says-v6", "udp", "size-0"])
def test_regression_gso_header_follows_the_frame_not_the_flag(version, proto, offload, virtio):
    # A guest's GSO flag went to the host kernel as it was: an IPv6 packet flagged
    # TCPV4 reached the kernel as SKB_GSO_TCPV4 (the kernel accepted the write). The
    # header is now derived from the frame; what is not TCP gets no GSO at all.
    b = build(version, proto, bytes(6000))
    out = fake_tap().to_vnet(Frame(bytes(b.frame), offload))
    flags, gso, hdr_len, gso_size, start, _ = VNET_HDR.unpack_from(out)
    assert (flags, gso, start) == (VIRTIO_NET_HDR_F_NEEDS_CSUM, virtio, b.l4)
    if virtio == VIRTIO_NET_HDR_GSO_NONE:
        assert (hdr_len, gso_size) == (0, 0)


def test_csum_blank_on_what_cannot_be_parsed_passes_unchanged():
    data = eth(0x0800, ipv4(ICMP, bytes(40)))
    assert fake_tap().to_vnet(Frame(data, Offload(True, True))) == vnet() + data


@pytest.mark.parametrize("offload", [
    NO_OFFLOAD, Offload(False, True), Offload(True, True),
    Offload(True, True, XEN_NETIF_GSO_TYPE_TCPV4, 1000),
])
def test_round_trip_keeps_the_offload(offload):
    tap = fake_tap()
    b = build(4, TCP, bytes(4000))
    (back,) = tap.from_vnet(tap.to_vnet(Frame(bytes(b.frame), offload)))
    assert back.offload == offload


# ------------------------------------------------------------ real TAP devices

PREFIX = "pvio-tap"

# The child that owns the TAPs (a TAP lives in the namespace that created it).
CHILD = r"""
import json, select, signal, subprocess, sys, time
from pvio import _l4
from pvio.netif import NO_OFFLOAD, Frame
from pvio.tap import Tap

cfg = json.loads(sys.argv[1])

def ip(*args):
    subprocess.run(["ip", *args], check=True, capture_output=True)

def echo():
    tap = Tap("pvt%d")
    tap.set_mac(cfg["tap_mac"])
    tap.set_mtu(1500)
    tap.set_up()
    ip("addr", "add", cfg["kernel_addr"] + "/24", "dev", tap.name)
    ip("neigh", "add", cfg["peer_addr"], "lladdr", cfg["peer_mac"], "dev", tap.name,
       "nud", "permanent")
    for raw in cfg["frames"]:
        assert tap.write_frame(Frame(bytes.fromhex(raw)))
    seen, deadline = [], time.monotonic() + 10
    while time.monotonic() < deadline:
        select.select([tap.fd], [], [], 0.2)
        for f in tap.read_frames():
            seen.append([f.data.hex(), list(f.offload)])
            if f.data[12:14] == b"\x08\x00" and f.data[23] == 1:  # IPv4 ICMP
                deadline = 0
    print(json.dumps({"name": tap.name, "frames": seen}), flush=True)

def relay():
    a = Tap("pva%d")
    b = Tap("pvb%d", offloads=cfg["b_offloads"])
    ip("link", "set", b.name, "netns", cfg["ns_b"])
    nodad = ["nodad"] if ":" in cfg["addr_a"] else []
    a.set_up()
    ip("addr", "add", cfg["addr_a"], "dev", a.name, *nodad)
    ip("-n", cfg["ns_b"], "addr", "add", cfg["addr_b"], "dev", b.name, *nodad)
    ip("-n", cfg["ns_b"], "link", "set", b.name, "up")
    st = dict(a_frames=0, a_gso=0, a_csum_blank=0, a_max=0, b_frames=0, b_gso=0,
              b_csum_blank=0, written_segments=0, refused=0)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    print(json.dumps({"a": a.name, "b": b.name}), flush=True)
    while not stop:
        select.select([a.fd, b.fd], [], [], 0.2)
        for f in a.read_frames():
            st["a_frames"] += 1
            st["a_gso"] += bool(f.offload.gso_type)
            st["a_csum_blank"] += f.offload.csum_blank
            st["a_max"] = max(st["a_max"], len(f.data))
            if cfg["mode"] == "software":
                if f.offload.gso_type:
                    out = [Frame(bytes(s)) for s in _l4.segment(f.data, f.offload.gso_size)]
                    st["written_segments"] += len(out)
                elif f.offload.csum_blank:
                    data = bytearray(f.data)
                    _l4.complete_checksum(data)
                    out = [Frame(bytes(data))]
                else:
                    out = [Frame(f.data)]
            else:
                out = [f]
            for g in out:
                st["refused"] += not b.write_frame(g)
        for f in b.read_frames():
            st["b_frames"] += 1
            st["b_gso"] += bool(f.offload.gso_type)
            st["b_csum_blank"] += f.offload.csum_blank
            st["refused"] += not a.write_frame(f if cfg["mode"] == "pass" else Frame(f.data))
    st["dropped"] = a.dropped + b.dropped
    print(json.dumps(st), flush=True)

echo() if cfg["mode"] == "echo" else relay()
"""

SERVER = r"""
import hashlib, socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
srv = socket.socket(family, socket.SOCK_STREAM)
srv.bind((sys.argv[1], int(sys.argv[2])))
srv.listen(1)
print("listening", flush=True)
conn, _ = srv.accept()
h, n = hashlib.sha256(), 0
while chunk := conn.recv(1 << 20):
    h.update(chunk)
    n += len(chunk)
print(n, h.hexdigest(), flush=True)
"""

CLIENT = r"""
import hashlib, random, socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
data = random.Random(1234).randbytes(int(sys.argv[3]))
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
s.sendall(data)
s.shutdown(socket.SHUT_WR)
s.recv(1)
print(len(data), hashlib.sha256(data).hexdigest(), flush=True)
"""


def interfaces_here() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True,
                         check=True).stdout
    return set(re.findall(r"^\d+: ([^:@]+)", out, re.M))


@pytest.fixture
def clean_host():
    """Nothing of ours is left in the test's namespace or in ``ip netns list``."""
    before = interfaces_here()
    yield
    assert interfaces_here() - before == set()
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"{PREFIX}-{os.getpid()}-" not in left


def snmp(ns: Netns, proto: str) -> dict[str, int]:
    lines = [line.split() for line in ns.run("cat", "/proc/net/snmp").stdout.splitlines()
             if line.startswith(proto + ":")]
    return dict(zip(lines[0][1:], map(int, lines[1][1:]), strict=True))


def test_interface_name_too_long():
    with pytest.raises(TapError):
        Tap("x" * 16)


def test_the_kernel_answers_an_icmp_echo_written_into_the_tap(clean_host):
    tap_mac, peer_mac = "02:00:00:00:77:01", "02:00:00:00:77:02"
    kernel, peer = bytes([10, 77, 0, 1]), bytes([10, 77, 0, 2])
    body = b"pvio tap echo " * 4
    icmp = bytearray(struct.pack("!BBHHH", 8, 0, 0, 0x4242, 7) + body)
    struct.pack_into("!H", icmp, 2, internet_checksum(bytes(icmp)))
    macs = bytes.fromhex(tap_mac.replace(":", "")) + bytes.fromhex(peer_mac.replace(":", ""))
    request = macs + b"\x08\x00" + ipv4(ICMP, bytes(icmp), src=peer, dst=kernel, frag=0)
    # A negative control first: a SYN whose checksum is wrong by one. Written without
    # virtio-net flags, it must be verified (and refused) by the kernel itself, which
    # is what the "software" TCP test below relies on.
    syn = bytearray(tcp(flags=0x02, seq=1, ack=0))
    pseudo = pseudo_header(4, peer, kernel, TCP, len(syn))
    struct.pack_into("!H", syn, 16, internet_checksum(pseudo + bytes(syn[:16]) + b"\0\0"
                                                      + bytes(syn[18:])) ^ 1)
    bad_syn = macs + b"\x08\x00" + ipv4(TCP, bytes(syn), src=peer, dst=kernel, frag=0)
    cfg = dict(mode="echo", tap_mac=tap_mac, peer_mac=peer_mac, kernel_addr="10.77.0.1",
               peer_addr="10.77.0.2", frames=[bad_syn.hex(), request.hex()])
    with Netns(PREFIX) as ns:
        child = ns.popen(sys.executable, "-c", CHILD, json.dumps(cfg),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = child.communicate(timeout=30)
        finally:
            stop_process(child)
        assert child.returncode == 0, err
        assert snmp(ns, "Tcp")["InCsumErrors"] == 1, "the kernel checked the SYN's checksum"
    result = json.loads(out)
    replies = [bytes.fromhex(d) for d, _ in result["frames"]
               if bytes.fromhex(d)[12:14] == b"\x08\x00" and bytes.fromhex(d)[23] == ICMP]
    assert replies, f"no ICMP from the kernel; saw {result['frames']}"
    reply = replies[0]
    assert reply[:6] == bytes.fromhex(peer_mac.replace(":", ""))
    assert reply[6:12] == bytes.fromhex(tap_mac.replace(":", ""))
    ip_hdr = reply[14:34]
    assert ones_sum(ip_hdr) == 0xFFFF
    assert ip_hdr[12:16] == kernel and ip_hdr[16:20] == peer
    typ, code, _, ident, seq = struct.unpack_from("!BBHHH", reply, 34)
    assert (typ, code, ident, seq) == (0, 0, 0x4242, 7)
    assert reply[42:] == body
    assert ones_sum(reply[34:]) == 0xFFFF, "ICMP checksum"


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
@pytest.mark.parametrize("mode", ["pass", "software"])
def test_tcp_through_two_taps(clean_host, family, mode):
    """pass: B has offloads, super-packets and partial checksums cross as they are.
    software: B has none; the relay segments and completes checksums with _l4 and
    kernel B verifies every one of them."""
    if family == "ipv4":
        addr_a, addr_b, cidr = "10.78.0.1", "10.78.0.2", "/24"
    else:
        addr_a, addr_b, cidr = "fd78::1", "fd78::2", "/64"
    size = 8 << 20
    with Netns(PREFIX) as ns_b, Netns(PREFIX) as ns_a:  # ns_a (with the relay) closes first
        cfg = dict(mode=mode, b_offloads=mode == "pass", ns_b=ns_b.name,
                   addr_a=addr_a + cidr, addr_b=addr_b + cidr)
        relay = ns_a.popen(sys.executable, "-c", CHILD, json.dumps(cfg),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            names = relay.stdout.readline()
            assert names, relay.stderr.read()
            server = ns_b.popen(sys.executable, "-c", SERVER, addr_b, "5201",
                                stdout=subprocess.PIPE, text=True)
            assert server.stdout.readline().strip() == "listening"
            client = ns_a.run(sys.executable, "-c", CLIENT, addr_b, "5201", str(size),
                              timeout=120, check=False)
            if client.returncode != 0:
                stop_process(relay)
                pytest.fail(f"client: {client.stderr}\nrelay: {relay.stderr.read()}")
            sent = client.stdout.split()
            received = server.communicate(timeout=30)[0].split()
            relay.terminate()
            stats = json.loads(relay.communicate(timeout=10)[0].splitlines()[-1])
        finally:
            stop_process(relay)
        tcp_b, tcp_a = snmp(ns_b, "Tcp"), snmp(ns_a, "Tcp")
    assert received == sent == [str(size), received[1]], (sent, received)
    assert stats["dropped"] == 0 and stats["refused"] == 0, stats
    # Kernel A offloads to its TAP: TSO super-packets with partial checksums.
    assert stats["a_gso"] > 0 and stats["a_max"] > 1514, stats
    assert stats["a_csum_blank"] >= stats["a_gso"], stats
    assert tcp_b["InCsumErrors"] == 0 and tcp_a["InCsumErrors"] == 0
    if mode == "software":
        # Nearly everything crossed as software segments (a few frames were not TSO).
        plain = stats["a_frames"] - stats["a_gso"]
        assert stats["written_segments"] >= size // 1448 - plain, stats
        assert stats["b_gso"] == 0 and stats["b_csum_blank"] == 0, stats


# ------------------------------------------------------------ the C path: TAP fd -> TX pages


def _vnet_reader(nr: int = 64):
    """netfront's C TX state over private pages, and a SOCK_SEQPACKET pair standing
    in for a TAP fd (one message per read, as a TAP gives one frame per read)."""
    import socket

    from pvio.ring._lib import ffi, lib

    pages = bytearray(nr * 4096)
    keep = {"refs": ffi.new("uint32_t[]", [1000 + i for i in range(nr)]),
            "free": ffi.new("uint16_t[]", nr), "flight": ffi.new("uint8_t[]", nr),
            "tx": ffi.new("pvio_netfront_tx *"), "nreq": ffi.new("uint32_t *"),
            "nbytes": ffi.new("uint64_t *"), "slow_len": ffi.new("uint32_t *"),
            "why": ffi.new("uint32_t *"), "req": bytearray(12 * nr),
            "slow": bytearray(lib.PVIO_VNET_READ_MAX)}
    lib.pvio_netfront_tx_init(keep["tx"], nr, keep["free"], keep["flight"],
                              ffi.from_buffer(pages), keep["refs"])
    r, w = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r.setblocking(False)
    for s in (r, w):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)

    def call(limit=64, free_slots=nr, gso_ok=True, fd=None):
        sent = lib.pvio_netfront_tx_from_vnet_fd(
            keep["tx"], r.fileno() if fd is None else fd, limit, free_slots, gso_ok,
            ffi.from_buffer(keep["req"]), keep["nreq"], keep["nbytes"],
            ffi.from_buffer(keep["slow"]), len(keep["slow"]), keep["slow_len"], keep["why"])
        slow = bytes(keep["slow"][:keep["slow_len"][0]]) if keep["why"][0] == lib.PVIO_VNET_SLOW \
            else None
        return sent, keep["why"][0], bytes(keep["req"][:12 * keep["nreq"][0]]), slow, \
            keep["nbytes"][0]

    return keep, pages, r, w, call


def _offload_meta(off: Offload) -> tuple[int, int, int]:
    flags = 3 if off.csum_blank else 2 if off.data_validated else 0
    return flags, off.gso_type, off.gso_size if off.gso_type else 0


def _from_vnet_cases():
    big = bytes(range(256)) * 250  # 64000 payload bytes
    tcp4, tcp6 = build(4, TCP, big), build(6, TCP, big)
    udp4 = build(4, UDP, b"x" * 100)
    vlan = build(4, TCP, b"y" * 3000, vlan=7)
    ext6 = build(6, TCP, b"z" * 500, ext=((0, b"\0" * 6), (60, b"\0" * 14)))
    # (name, raw, fast): fast = the C path must take it itself
    yield "plain", vnet() + eth(0x88B5, b"\0" * 50), True
    yield "data_valid", vnet(VIRTIO_NET_HDR_F_DATA_VALID) + udp4.frame, True
    for name, b in (("tcp4", tcp4), ("tcp6", tcp6), ("udp4", udp4), ("vlan", vlan),
                    ("ext6", ext6)):
        yield f"csum_{name}", vnet(VIRTIO_NET_HDR_F_NEEDS_CSUM, start=b.l4,
                                   offset=b.csum_at - b.l4) + seeded(b), True
        yield f"csum_elsewhere_{name}", vnet(VIRTIO_NET_HDR_F_NEEDS_CSUM, start=b.l4 - 2,
                                             offset=b.csum_at - b.l4 + 2) + seeded(b), False
    for version, b, virtio in ((4, tcp4, VIRTIO_NET_HDR_GSO_TCPV4),
                               (6, tcp6, VIRTIO_NET_HDR_GSO_TCPV6)):
        other = VIRTIO_NET_HDR_GSO_TCPV6 if version == 4 else VIRTIO_NET_HDR_GSO_TCPV4
        hdr = dict(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, start=b.l4, offset=16, gso_size=1448)
        yield f"tso{version}", vnet(gso=virtio, **hdr) + seeded(b), True
        yield f"tso{version}_ecn", vnet(gso=virtio | VIRTIO_NET_HDR_GSO_ECN, **hdr) + seeded(b), \
            True
        yield f"tso{version}_wrong_version", vnet(gso=other, **hdr) + seeded(b), False
        yield f"tso{version}_udp_gso", vnet(gso=UDP_GSO, **hdr) + seeded(b), False
        yield f"tso{version}_size0", vnet(gso=virtio, **{**hdr, "gso_size": 0}) + seeded(b), \
            False
    yield "tso_of_udp", vnet(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, start=udp4.l4,
                             offset=6, gso_size=1448) + seeded(udp4), False
    yield "runt", vnet() + b"\0" * 13, False
    yield "short_header", b"\0" * 7, False
    yield "icmp_csum", vnet(VIRTIO_NET_HDR_F_NEEDS_CSUM, start=34, offset=2) + \
        eth(0x0800, ipv4(ICMP, b"\0" * 40)), False
    # netfront's slow buffer was 256 bytes short of what one read can take, and
    # cut such a frame silently; PVIO_VNET_READ_MAX now sizes both
    yield "read_max", vnet() + b"r" * (69898 - 10), False
    huge = build(4, TCP, b"h" * 65495)  # IP length 65535: a 65549-byte frame
    yield "over_65535", vnet(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4,
                             start=huge.l4, offset=16, gso_size=1448) + seeded(huge), False


@pytest.mark.parametrize("name, raw, fast", list(_from_vnet_cases()),
                         ids=[c[0] for c in _from_vnet_cases()])
def test_c_tap_reader_places_what_from_vnet_would_send(name, raw, fast):
    """pvio_netfront_tx_from_vnet_fd against the Python path it shortcuts
    (Tap.from_vnet, then netfront's TX fill): same requests, same page bytes;
    a frame it leaves to Python comes back byte for byte, its ids untouched."""
    from pvio.ring._lib import lib
    from tests.test_netif_c import _tx_put_reference

    keep, pages, _r, w, call = _vnet_reader()
    w.send(raw)
    sent, why, req, slow, nbytes = call()
    if not fast:
        assert (sent, why, req, slow) == (0, lib.PVIO_VNET_SLOW, b"",
                                          raw[:lib.PVIO_VNET_READ_MAX])
        assert keep["tx"].nfree == 64
        return
    frames = fake_tap().from_vnet(raw)
    assert len(frames) == 1
    assert (sent, why) == (1, lib.PVIO_VNET_EMPTY)
    want_sent, want_req, want_pages = _tx_put_reference(
        list(range(63, -1, -1)), [(frames[0].data, *_offload_meta(frames[0].offload))], 64)
    assert (want_sent, req, nbytes) == (1, want_req, len(frames[0].data))
    for rid, piece in want_pages.items():
        assert pages[rid * 4096:rid * 4096 + len(piece)] == piece
    assert {i for i in range(64) if keep["flight"][i]} == set(want_pages)


def test_c_tap_reader_batches_stops_at_limits_and_leaves_frames_it_cannot_place():
    from pvio.ring._lib import lib
    from tests.test_netif_c import _tx_put_reference

    keep, _pages, _r, w, call = _vnet_reader(nr=40)
    b = build(4, TCP, b"q" * 20000)  # 5 pages each
    raws = [vnet(VIRTIO_NET_HDR_F_DATA_VALID) + bytes(b.frame[:-1]) + bytes([i])
            for i in range(6)]
    for raw in raws:
        w.send(raw)
    sent, why, req, _, _ = call(limit=2)
    assert (sent, why) == (2, lib.PVIO_VNET_LIMIT)
    free = list(range(39, -1, -1))
    want = _tx_put_reference(free, [(raw[10:], 2, 0, 0) for raw in raws[:2]], 40)
    assert req == want[1]
    # a read needs 17 free ids (the largest frame): 30 left take three more frames
    sent, why, req, _, _ = call()
    assert (sent, why) == (3, lib.PVIO_VNET_FULL)
    assert req == _tx_put_reference(free, [(raw[10:], 2, 0, 0) for raw in raws[2:5]], 40)[1]
    assert keep["tx"].nfree == 15
    assert call()[:2] == (0, lib.PVIO_VNET_FULL)
    # the backend answers them all; with too few free slots nothing is read
    from pvio import netif
    from pvio.ring._lib import ffi

    answered = [rid for rid in range(40) if keep["flight"][rid]]
    rsp = b"".join(netif.TX_RSP.pack(rid, 0) for rid in answered)
    errors, bad_id = ffi.new("uint32_t *"), ffi.new("uint32_t *")
    assert lib.pvio_netfront_tx_done(keep["tx"], rsp, len(rsp) // 4, errors, bad_id) == 25
    free.extend(answered)
    assert call(free_slots=17)[:2] == (0, lib.PVIO_VNET_FULL)
    sent, why, req, _, nbytes = call()
    assert (sent, why, nbytes) == (1, lib.PVIO_VNET_EMPTY, len(b.frame))
    assert req == _tx_put_reference(free, [(raws[5][10:], 2, 0, 0)], 40)[1]
    # a read error is reported with its errno, nothing placed
    sent, why, _, _, _ = call(fd=-1)
    assert (sent, why, keep["slow_len"][0]) == (0, lib.PVIO_VNET_ERROR, 9)  # EBADF
