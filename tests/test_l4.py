"""pvio._l4: header parsing, checksum completion, pseudo-header seeding, software TCP
segmentation.

Every checksum is checked against an independent RFC 1071 implementation written
here in plain Python (no pvio code), and the frames are also handed to ``tshark``
(a third party) with checksum validation switched on. Frames are built byte by byte
in this file, so the offsets ``parse`` must find are known independently too.
"""

from __future__ import annotations

import io
import struct
import subprocess
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pvio import _l4
from pvio.layouts import XEN_NETIF_GSO_TYPE_TCPV4, XEN_NETIF_GSO_TYPE_TCPV6
from pvio.pcap import PcapWriter

TCP, UDP, ICMP = 6, 17, 1
FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80
MAC_A, MAC_B = bytes.fromhex("02000000000a"), bytes.fromhex("02000000000b")
V4_A, V4_B = bytes([10, 1, 2, 3]), bytes([192, 168, 200, 201])
V6_A = bytes.fromhex("fd000000000000000000000000000001")
V6_B = bytes.fromhex("fd00000000000000abcdef0123456789")


# ------------------------------------------------------------ independent checksum


def ones_sum(data: bytes) -> int:
    """RFC 1071: the 16-bit one's-complement sum of ``data`` (odd length padded), folded."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def internet_checksum(data: bytes) -> int:
    return 0xFFFF ^ ones_sum(data)


def pseudo_header(version: int, src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    if version == 4:  # RFC 793 / 768
        return src + dst + struct.pack("!BBH", 0, proto, length)
    return src + dst + struct.pack("!I3xB", length, proto)  # RFC 8200 §8.1


# ------------------------------------------------------------ frame builders


@dataclass
class Built:
    frame: bytearray
    l3: int
    version: int
    l4: int
    proto: int
    src: bytes
    dst: bytes
    l4_len: int  # bytes of the L4 segment (header + payload), padding excluded

    @property
    def csum_at(self) -> int:
        return self.l4 + (16 if self.proto == TCP else 6)

    def l4_bytes(self) -> bytes:
        return bytes(self.frame[self.l4:self.l4 + self.l4_len])

    def l4_checksum_ok(self) -> bool:
        """Receiver's check: the sum over pseudo-header + segment is 0xFFFF."""
        pseudo = pseudo_header(self.version, self.src, self.dst, self.proto, self.l4_len)
        return ones_sum(pseudo + self.l4_bytes()) == 0xFFFF

    def expected_checksum(self) -> int:
        seg = bytearray(self.l4_bytes())
        seg[self.csum_at - self.l4:self.csum_at - self.l4 + 2] = b"\0\0"
        pseudo = pseudo_header(self.version, self.src, self.dst, self.proto, self.l4_len)
        value = internet_checksum(pseudo + bytes(seg))
        return 0xFFFF if self.proto == UDP and value == 0 else value

    def checksum_field(self) -> int:
        return struct.unpack_from("!H", self.frame, self.csum_at)[0]


def eth(ethertype: int, payload: bytes, vlan: int | None = None) -> bytes:
    head = MAC_B + MAC_A
    if vlan is not None:
        head += struct.pack("!HH", 0x8100, vlan)
    return head + struct.pack("!H", ethertype) + payload


def ipv4(proto: int, payload: bytes, *, ident: int = 0x1234, frag: int = 0x4000,
         options: bytes = b"", src: bytes = V4_A, dst: bytes = V4_B,
         total: int | None = None) -> bytes:
    ihl = 5 + len(options) // 4
    head = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, total or ihl * 4 + len(payload),
                       ident, frag, 64, proto, 0, src, dst) + options
    head = head[:10] + struct.pack("!H", internet_checksum(head)) + head[12:]
    return head + payload


def ipv6(nh: int, payload: bytes, *, ext: tuple[tuple[int, bytes], ...] = (),
         src: bytes = V6_A, dst: bytes = V6_B) -> bytes:
    """``ext``: (type, body) extension headers in order; each body padded to 8n-2 bytes."""
    chain = b""
    types = [t for t, _ in ext] + [nh]
    for k, (_, body) in enumerate(ext):
        body = body.ljust(max(6, -(-(len(body) + 2) // 8) * 8 - 2), b"\0")
        chain += struct.pack("!BB", types[k + 1], (len(body) + 2) // 8 - 1) + body
    first = types[0]
    rest = chain + payload
    return struct.pack("!IHBB16s16s", 6 << 28, len(rest), first, 64, src, dst) + rest


def tcp(payload: bytes = b"", *, seq: int = 1000, ack: int = 77, flags: int = ACK,
        options: bytes = b"", check: int = 0xDEAD, sport: int = 40000,
        dport: int = 5201) -> bytes:
    off = (20 + len(options)) // 4
    return struct.pack("!HHIIBBHHH", sport, dport, seq, ack, off << 4, flags, 4096, check,
                       0) + options + payload


def udp(payload: bytes = b"", *, check: int = 0xBEEF) -> bytes:
    return struct.pack("!HHHH", 5353, 53, 8 + len(payload), check) + payload


def build(version: int = 4, proto: int = TCP, payload: bytes = b"hello", *,
          vlan: int | None = None, pad_to: int = 0, v4_options: bytes = b"",
          ext: tuple[tuple[int, bytes], ...] = (), **l4kw) -> Built:
    seg = tcp(payload, **l4kw) if proto == TCP else udp(payload, **l4kw)
    l3 = 18 if vlan is not None else 14
    if version == 4:
        packet = ipv4(proto, seg, options=v4_options)
        frame = eth(0x0800, packet, vlan)
        l4 = l3 + 20 + len(v4_options)
        src, dst = V4_A, V4_B
    else:
        packet = ipv6(proto, seg, ext=ext)
        frame = eth(0x86DD, packet, vlan)
        l4 = len(frame) - len(seg)
        src, dst = V6_A, V6_B
    frame = bytearray(frame.ljust(pad_to, b"\0"))
    return Built(frame, l3, version, l4, proto, src, dst, len(seg))


SHAPES = {
    "v4-tcp": dict(version=4, proto=TCP),
    "v4-udp": dict(version=4, proto=UDP),
    "v4-tcp-options": dict(version=4, proto=TCP, v4_options=b"\x94\x04\x00\x00",
                           options=b"\x02\x04\x05\xb4\x01\x01\x04\x02"),
    "v4-vlan-udp": dict(version=4, proto=UDP, vlan=42),
    "v6-tcp": dict(version=6, proto=TCP),
    "v6-udp": dict(version=6, proto=UDP),
    "v6-vlan-tcp": dict(version=6, proto=TCP, vlan=7),
    "v6-ext-tcp": dict(version=6, proto=TCP, ext=((0, b"\x01\x04\0\0\0\0"),
                                                   (60, b"\x01\x0c" + bytes(12)))),
}


# ------------------------------------------------------------ parse


@pytest.mark.parametrize("shape", SHAPES)
def test_parse_finds_the_layers(shape):
    b = build(**SHAPES[shape])
    info = _l4.parse(b.frame)
    assert info == _l4.L4(b.l3, b.version, b.l4, b.proto)
    assert info.csum_offset == (16 if b.proto == TCP else 6)


def test_parse_ipv4_with_options_and_vlan():
    b = build(4, TCP, vlan=5, v4_options=bytes(8))
    assert _l4.parse(b.frame) == _l4.L4(18, 4, 18 + 28, TCP)


def test_parse_ipv6_extension_headers_are_walked():
    b = build(**SHAPES["v6-ext-tcp"])
    assert b.l4 == 14 + 40 + 8 + 16
    assert _l4.parse(b.frame).l4 == b.l4


@pytest.mark.parametrize("frame", [
    eth(0x0806, bytes(28)),  # ARP
    eth(0x88CC, bytes(40)),  # LLDP
    eth(0x0800, ipv4(ICMP, bytes(16))),  # IPv4, not TCP/UDP
    eth(0x86DD, ipv6(58, bytes(16))),  # ICMPv6
    eth(0x0800, ipv4(TCP, tcp(b"x"), frag=0x2000)),  # first fragment (MF)
    eth(0x0800, ipv4(TCP, tcp(b"x"), frag=0x0010)),  # later fragment (offset)
    eth(0x86DD, ipv6(44, bytes(8) + tcp(b"x"))),  # IPv6 fragment header: not walked
    eth(0x0800, b"\x35" + ipv4(TCP, tcp(b"x"))[1:]),  # version 3
    eth(0x0800, b"\x44" + ipv4(TCP, tcp(b"x"))[1:]),  # IHL 4 (< 20 bytes)
    eth(0x0800, b"\x65" + ipv4(TCP, tcp(b"x"))[1:]),  # version 6 in an IPv4 ethertype
    eth(0x86DD, b"\x40" + ipv6(TCP, tcp(b"x"))[1:]),  # version 4 in an IPv6 ethertype
    eth(0x88A8, bytes(4) + ipv4(TCP, tcp(b"x"))),  # QinQ outer tag: not parsed
], ids=["arp", "lldp", "icmp", "icmpv6", "v4-mf", "v4-offset", "v6-frag", "v4-version3",
        "v4-ihl4", "v4-says-6", "v6-says-4", "qinq"])
def test_parse_refuses_what_it_cannot_offload(frame):
    assert _l4.parse(bytearray(frame)) is None


def test_parse_accepts_df_only():
    assert _l4.parse(eth(0x0800, ipv4(TCP, tcp(b"x"), frag=0x4000))) is not None
    assert _l4.parse(eth(0x0800, ipv4(TCP, tcp(b"x"), frag=0))) is not None


@pytest.mark.parametrize("shape", SHAPES)
def test_parse_of_every_truncation_never_raises_and_needs_the_whole_l4_header(shape):
    b = build(**SHAPES[shape])
    need = b.l4 + (20 if b.proto == TCP else 8)
    for cut in range(len(b.frame)):
        info = _l4.parse(b.frame[:cut])
        if cut < need:
            assert info is None, cut
        else:
            assert info == _l4.L4(b.l3, b.version, b.l4, b.proto), cut


def test_parse_ipv6_extension_header_running_past_the_frame():
    frame = bytearray(eth(0x86DD, ipv6(TCP, tcp(), ext=((0, bytes(6)),))))
    frame[14 + 40 + 1] = 200  # hop-by-hop claims 1608 bytes
    assert _l4.parse(frame) is None


# ------------------------------------------------------------ checksums


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("size", [0, 1, 2, 3, 1000, 1459, 8999])
def test_complete_checksum_matches_rfc1071(shape, size):
    b = build(**SHAPES[shape], payload=bytes((7 * i + size) & 0xFF for i in range(size)))
    assert not b.l4_checksum_ok()  # the builder leaves garbage in the field
    before = bytes(b.frame)
    assert _l4.complete_checksum(b.frame) is True
    assert b.checksum_field() == b.expected_checksum()
    assert b.l4_checksum_ok()
    changed = [i for i in range(len(before)) if before[i] != b.frame[i]]
    assert set(changed) <= {b.csum_at, b.csum_at + 1}, "only the checksum field changes"


def test_complete_checksum_uses_a_given_parse():
    b = build(4, TCP, b"abc")
    assert _l4.complete_checksum(b.frame, _l4.parse(b.frame))
    assert b.l4_checksum_ok()


def test_complete_checksum_refuses_non_tcp_udp_and_leaves_the_frame():
    for frame in (eth(0x0800, ipv4(ICMP, bytes(30))), eth(0x0806, bytes(28))):
        frame = bytearray(frame)
        before = bytes(frame)
        assert _l4.complete_checksum(frame) is False
        assert frame == before


def _udp_payload_summing_to_zero_checksum(version: int) -> bytes:
    """Two payload bytes chosen so that the computed UDP checksum is 0x0000."""
    b = build(version, UDP, b"\0\0", check=0)
    pseudo = pseudo_header(version, b.src, b.dst, UDP, b.l4_len)
    partial = ones_sum(pseudo + b.l4_bytes())
    word = 0xFFFF - partial  # makes the one's-complement sum 0xFFFF: checksum 0
    return struct.pack("!H", word)


@pytest.mark.parametrize("version", [4, 6])
def test_udp_checksum_zero_is_sent_as_ffff(version):
    # RFC 768: a computed 0 is transmitted as all ones (0 means "no checksum").
    b = build(version, UDP, _udp_payload_summing_to_zero_checksum(version))
    assert _l4.complete_checksum(b.frame)
    assert b.checksum_field() == 0xFFFF
    assert b.l4_checksum_ok()


@pytest.mark.parametrize("shape", SHAPES)
def test_seed_pseudo_is_the_folded_pseudo_header_and_the_kernel_finishes_it(shape):
    b = build(**SHAPES[shape], payload=b"partial checksum" * 9)
    _l4.seed_pseudo(b.frame, _l4.parse(b.frame))
    pseudo = pseudo_header(b.version, b.src, b.dst, b.proto, b.l4_len)
    assert b.checksum_field() == ones_sum(pseudo)
    # What a NIC (or skb_checksum_help) does with CHECKSUM_PARTIAL: sum from
    # csum_start to the end, with the seed in place, and store the complement.
    finished = internet_checksum(b.l4_bytes())
    struct.pack_into("!H", b.frame, b.csum_at, finished)
    assert b.l4_checksum_ok()


def test_regression_ethernet_padding_not_summed():
    # A 54-byte TCP ACK padded to Ethernet's 60-byte minimum: the 6 trailer bytes are
    # not part of the IP packet (its total length says so) and must not enter the
    # TCP checksum or the pseudo-header length. The fix made _l4 use the IP length.
    for version, pad in ((4, b"\0"), (4, b"\xab"), (6, b"\xab")):
        b = build(version, TCP, b"", flags=ACK)
        b.frame += pad * 6
        assert _l4.complete_checksum(b.frame)
        assert b.checksum_field() == b.expected_checksum()
        assert b.l4_checksum_ok()
        b2 = build(version, TCP, b"", flags=ACK)
        b2.frame += pad * 6
        _l4.seed_pseudo(b2.frame, _l4.parse(b2.frame))
        pseudo = pseudo_header(version, b2.src, b2.dst, TCP, b2.l4_len)
        assert b2.checksum_field() == ones_sum(pseudo)


def test_an_ip_length_longer_than_the_frame_falls_back_to_the_frame():
    b = build(4, UDP, b"abcd")
    struct.pack_into("!H", b.frame, 14 + 2, 1400)  # claims more than is there
    assert _l4.complete_checksum(b.frame)
    assert b.checksum_field() == b.expected_checksum()


# ------------------------------------------------------------ segmentation


def _tcp_fields(frame: bytes, l4: int) -> dict:
    _sport, _dport, seq, ack, off, flags, win, check, _urg = struct.unpack_from(
        "!HHIIBBHHH", frame, l4)
    return dict(seq=seq, ack=ack, hdr=(off >> 4) * 4, flags=flags, win=win, check=check)


def check_segments(b: Built, segs: list[bytearray], gso_size: int, payload: bytes) -> None:
    th = _tcp_fields(b.frame, b.l4)
    hdr_end = b.l4 + th["hdr"]
    count = max(1, -(-len(payload) // gso_size))
    assert len(segs) == count
    got = b""
    for k, seg in enumerate(segs):
        seg = bytes(seg)
        last = k == count - 1
        body = seg[hdr_end:]
        assert len(body) == (gso_size if not last else len(payload) - gso_size * k)
        got += body
        # Everything before L3 is copied: MACs, VLAN tag, ethertype.
        assert seg[:b.l3] == bytes(b.frame[:b.l3])
        s = _tcp_fields(seg, b.l4)
        assert s["seq"] == (th["seq"] + k * gso_size) & 0xFFFFFFFF
        assert (s["ack"], s["hdr"], s["win"]) == (th["ack"], th["hdr"], th["win"])
        want = th["flags"]
        if not last:
            want &= ~(FIN | PSH)
        if k:
            want &= ~CWR
        assert s["flags"] == want, (k, hex(s["flags"]))
        assert seg[b.l4 + 20:hdr_end] == bytes(b.frame[b.l4 + 20:hdr_end])  # TCP options
        if b.version == 4:
            ihl = b.l4 - b.l3
            total, ident = struct.unpack_from("!2xHH", seg, b.l3)
            assert total == len(seg) - b.l3
            assert ident == (struct.unpack_from("!H", b.frame, b.l3 + 4)[0] + k) & 0xFFFF
            assert ones_sum(seg[b.l3:b.l3 + ihl]) == 0xFFFF, "IPv4 header checksum"
            # TTL, protocol, addresses, options unchanged
            assert seg[b.l3 + 8:b.l3 + 10] == bytes(b.frame[b.l3 + 8:b.l3 + 10])
            assert seg[b.l3 + 12:b.l4] == bytes(b.frame[b.l3 + 12:b.l4])
        else:
            plen = struct.unpack_from("!H", seg, b.l3 + 4)[0]
            assert plen == len(seg) - b.l3 - 40
            assert seg[b.l3 + 6:b.l4] == bytes(b.frame[b.l3 + 6:b.l4])
        sb = Built(bytearray(seg), b.l3, b.version, b.l4, TCP, b.src, b.dst, len(seg) - b.l4)
        assert sb.l4_checksum_ok(), f"segment {k} TCP checksum"
    assert got == payload, "the payload reassembles exactly"


@pytest.mark.parametrize("shape", ["v4-tcp", "v4-tcp-options", "v6-tcp", "v6-vlan-tcp",
                                   "v6-ext-tcp"])
@pytest.mark.parametrize("size,gso", [(4000, 1448), (4344, 1448), (1448, 1448), (100, 1448),
                                      (0, 1448), (65000, 1440), (5, 1)])
def test_segment(shape, size, gso):
    payload = bytes((i * 31 + 5) & 0xFF for i in range(size))
    b = build(**SHAPES[shape], payload=payload, flags=ACK | PSH | FIN | CWR | ECE)
    segs = _l4.segment(b.frame, gso)
    check_segments(b, segs, gso, payload)


@settings(max_examples=150, deadline=None)
@given(version=st.sampled_from([4, 6]), size=st.integers(0, 9000),
       gso=st.integers(1, 9000), seq=st.integers(0, 0xFFFFFFFF),
       ident=st.integers(0, 0xFFFF), flags=st.integers(0, 0xFF),
       vlan=st.sampled_from([None, 100]))
def test_segment_property(version, size, gso, seq, ident, flags, vlan):
    payload = bytes((i * 13 + size) & 0xFF for i in range(size))
    b = build(version, TCP, payload, seq=seq, flags=flags, vlan=vlan)
    if version == 4:
        struct.pack_into("!H", b.frame, b.l3 + 4, ident)
        struct.pack_into("!H", b.frame, b.l3 + 10, 0)
        struct.pack_into("!H", b.frame, b.l3 + 10,
                         internet_checksum(bytes(b.frame[b.l3:b.l3 + 20])))
    check_segments(b, _l4.segment(b.frame, gso), gso, payload)


def test_segment_wraps_sequence_and_ip_id():
    payload = bytes(3000)
    b = build(4, TCP, payload, seq=0xFFFFFC00)
    struct.pack_into("!H", b.frame, b.l3 + 4, 0xFFFF)
    segs = _l4.segment(b.frame, 1000)
    assert [_tcp_fields(s, b.l4)["seq"] for s in segs] == [0xFFFFFC00, 0xFFFFFFE8, 0x000003D0]
    assert [struct.unpack_from("!H", s, b.l3 + 4)[0] for s in segs] == [0xFFFF, 0, 1]


def test_segment_refuses_what_is_not_tcp():
    assert _l4.segment(build(4, UDP, bytes(3000)).frame, 1000) == []
    assert _l4.segment(eth(0x0806, bytes(28)), 1000) == []
    assert _l4.segment(build(4, TCP, bytes(3000)).frame, 0) == []


def test_regression_segment_drops_ethernet_padding():
    # The trailer after the IP packet is not TCP payload (see the padding regression).
    b = build(4, TCP, b"abc", flags=ACK | PSH)
    b.frame += b"\xee" * 20
    (seg,) = _l4.segment(b.frame, 1448)
    assert bytes(seg).endswith(b"abc")
    assert len(seg) == b.l4 + 20 + 3


def test_gso_type_and_header_end():
    b4 = build(4, TCP, b"x", options=bytes(12))
    b6 = build(6, TCP, b"x")
    assert _l4.gso_type_of(_l4.parse(b4.frame)) == XEN_NETIF_GSO_TYPE_TCPV4
    assert _l4.gso_type_of(_l4.parse(b6.frame)) == XEN_NETIF_GSO_TYPE_TCPV6
    assert _l4.gso_type_of(_l4.parse(build(4, UDP).frame)) == 0
    assert _l4.gso_type_of(None) == 0
    assert _l4.tcp_header_end(b4.frame, _l4.parse(b4.frame)) == b4.l4 + 32


# ------------------------------------------------------------ tshark (third party)


TSHARK = "tshark"  # installed by .ci/run


def tshark_checksums(frames: list[bytes], tmp_path) -> list[list[str]]:
    """tshark's verdict per frame: [ip.checksum.status, tcp/udp checksum status].

    Wireshark's enum: 0 bad, 1 good, 2 unverified (checksum checking off)."""
    buf = io.BytesIO()
    writer = PcapWriter(buf)
    for k, frame in enumerate(frames):
        writer.write(bytes(frame), k * 1000)
    path = tmp_path / "l4.pcap"
    path.write_bytes(buf.getvalue())
    out = subprocess.run(
        [TSHARK, "-r", str(path), "-o", "tcp.check_checksum:TRUE",
         "-o", "udp.check_checksum:TRUE", "-o", "ip.check_checksum:TRUE",
         "-T", "fields", "-E", "occurrence=f", "-e", "ip.checksum.status",
         "-e", "tcp.checksum.status", "-e", "udp.checksum.status"],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = [line.split("\t") for line in out.stdout.splitlines()]
    assert len(rows) == len(frames)
    return rows


GOOD, BAD = "1", "0"


def test_tshark_agrees_with_completed_checksums_and_segments(tmp_path):
    frames, kinds = [], []
    for name, shape in SHAPES.items():
        for size in (0, 1, 513, 1400):
            b = build(**shape, payload=bytes((i + size) & 0xFF for i in range(size)))
            _l4.complete_checksum(b.frame)
            frames.append(b.frame)
            kinds.append((name, b.version, b.proto))
    for shape in ("v4-tcp", "v4-tcp-options", "v6-tcp", "v6-ext-tcp", "v6-vlan-tcp"):
        b = build(**SHAPES[shape], payload=bytes(range(256)) * 20, flags=ACK | PSH)
        for seg in _l4.segment(b.frame, 1448):
            frames.append(seg)
            kinds.append((f"{shape} segment", b.version, TCP))
    padded = build(4, TCP, b"", flags=ACK)
    padded.frame += b"\xab" * 6
    _l4.complete_checksum(padded.frame)
    frames.append(padded.frame)
    kinds.append(("padded ACK", 4, TCP))
    bad = build(4, UDP, b"corrupt me")
    _l4.complete_checksum(bad.frame)
    bad.frame[-1] ^= 0xFF  # proves tshark really checks
    frames.append(bad.frame)
    rows = tshark_checksums(frames, tmp_path)
    for (name, version, proto), row in zip(kinds, rows[:-1], strict=True):
        ip_status, tcp_status, udp_status = row
        if version == 4:
            assert ip_status == GOOD, (name, row)
        assert (tcp_status if proto == TCP else udp_status) == GOOD, (name, row)
    assert rows[-1][2] == BAD, rows[-1]
