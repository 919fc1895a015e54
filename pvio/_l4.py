"""Ethernet/IP/TCP/UDP header facts that checksum and segmentation offloads need.

netif carries only "checksum blank" and "GSO type/size" (io/netif.h); the
offsets that a virtio-net header (Linux ``virtio_net.h``) or a software
checksum need are found here by parsing the frame, as Linux netfront's
``skb_checksum_setup`` does. :func:`segment` is software GSO for a receiver
that cannot take super-packets (what ``skb_gso_segment`` does for a device
without TSO).
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from pvio.layouts import XEN_NETIF_GSO_TYPE_TCPV4, XEN_NETIF_GSO_TYPE_TCPV6
from pvio.ring._lib import ffi, lib

ETH_HLEN = 14
ETH_P_IP, ETH_P_IPV6, ETH_P_8021Q = 0x0800, 0x86DD, 0x8100
IPPROTO_TCP, IPPROTO_UDP = 6, 17
_IPV6_EXT = {0, 43, 60}  # hop-by-hop, routing, destination options


class L4(NamedTuple):
    """Where a frame's layers start."""

    l3: int  # offset of the IP header
    version: int  # 4 or 6
    l4: int  # offset of the TCP/UDP header
    proto: int  # IPPROTO_*

    @property
    def csum_offset(self) -> int:
        """Offset of the checksum field within the L4 header."""
        return 16 if self.proto == IPPROTO_TCP else 6


def parse(frame) -> L4 | None:
    """The L3/L4 offsets of a TCP or UDP frame over IPv4/IPv6 (one VLAN tag allowed)."""
    if len(frame) < ETH_HLEN + 20:
        return None
    l3 = ETH_HLEN
    ethertype = int.from_bytes(frame[12:14], "big")
    if ethertype == ETH_P_8021Q:
        ethertype = int.from_bytes(frame[16:18], "big")
        l3 += 4
    if ethertype == ETH_P_IP:
        ihl = (frame[l3] & 0xF) * 4
        if frame[l3] >> 4 != 4 or ihl < 20 or len(frame) < l3 + ihl:
            return None
        if int.from_bytes(frame[l3 + 6:l3 + 8], "big") & 0x3FFF:  # a fragment
            return None
        proto, l4, version = frame[l3 + 9], l3 + ihl, 4
    elif ethertype == ETH_P_IPV6:
        if len(frame) < l3 + 40 or frame[l3] >> 4 != 6:
            return None
        proto, l4, version = frame[l3 + 6], l3 + 40, 6
        while proto in _IPV6_EXT and len(frame) >= l4 + 8:
            proto, l4 = frame[l4], l4 + (frame[l4 + 1] + 1) * 8
    else:
        return None
    need = 20 if proto == IPPROTO_TCP else 8
    if proto not in (IPPROTO_TCP, IPPROTO_UDP) or len(frame) < l4 + need:
        return None
    return L4(l3, version, l4, proto)


def _fold(total: int) -> int:
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _sum(data, start: int = 0) -> int:
    buf = ffi.from_buffer("uint8_t[]", data)
    return lib.pvio_csum_partial(buf, len(data), start)


def l4_end(frame, info: L4) -> int:
    """Where the IP packet ends: its header's length, not the frame's, since a short
    frame may carry Ethernet padding after it. The frame's length is used when the
    header's is 0 (IPv6 jumbogram, IPv4 BIG TCP) or does not fit the frame."""
    if info.version == 4:
        end = info.l3 + int.from_bytes(frame[info.l3 + 2:info.l3 + 4], "big")
    else:
        end = info.l3 + 40 + int.from_bytes(frame[info.l3 + 4:info.l3 + 6], "big")
    need = 20 if info.proto == IPPROTO_TCP else 8
    return end if info.l4 + need <= end <= len(frame) else len(frame)


def _pseudo(frame, info: L4, l4_len: int) -> int:
    if info.version == 4:
        addrs = frame[info.l3 + 12:info.l3 + 20]
    else:
        addrs = frame[info.l3 + 8:info.l3 + 40]
    return _sum(bytes(addrs), l4_len + info.proto)


def complete_checksum(frame: bytearray, info: L4 | None = None) -> bool:
    """Fill in the L4 checksum of a "checksum blank" frame; False if not TCP/UDP."""
    info = info or parse(frame)
    if info is None:
        return False
    at = info.l4 + info.csum_offset
    frame[at:at + 2] = b"\0\0"
    view = memoryview(frame)[info.l4:l4_end(frame, info)]
    csum = 0xFFFF ^ _fold(_sum(view, _pseudo(frame, info, len(view))))
    if info.proto == IPPROTO_UDP and csum == 0:
        csum = 0xFFFF
    struct.pack_into("!H", frame, at, csum)
    return True


def seed_pseudo(frame: bytearray, info: L4) -> None:
    """Put the folded pseudo-header sum in the checksum field (what a
    CHECKSUM_PARTIAL packet carries, and what the kernel finishes)."""
    at = info.l4 + info.csum_offset
    struct.pack_into("!H", frame, at, _fold(_pseudo(frame, info, l4_end(frame, info) - info.l4)))


def tcp_header_end(frame, info: L4) -> int:
    """Offset of the TCP payload (the virtio-net ``hdr_len``)."""
    return info.l4 + (frame[info.l4 + 12] >> 4) * 4


def gso_type_of(info: L4 | None) -> int:
    if info is None or info.proto != IPPROTO_TCP:
        return 0
    return XEN_NETIF_GSO_TYPE_TCPV4 if info.version == 4 else XEN_NETIF_GSO_TYPE_TCPV6


def segment(frame, gso_size: int) -> list[bytearray]:
    """Cut a TCP super-packet into frames of at most ``gso_size`` payload bytes,
    each with its own IP length/id, sequence number, flags and full checksums.

    Returns ``[]`` if the frame is not TCP over IPv4/IPv6 or ``gso_size`` is 0.
    """
    info = parse(frame)
    if info is None or info.proto != IPPROTO_TCP or gso_size <= 0:
        return []
    hdr_end = tcp_header_end(frame, info)
    header = bytearray(frame[:hdr_end])
    payload = memoryview(frame)[hdr_end:l4_end(frame, info)]
    seq = int.from_bytes(header[info.l4 + 4:info.l4 + 8], "big")
    flags = header[info.l4 + 13]
    ip_id = int.from_bytes(header[info.l3 + 4:info.l3 + 6], "big") if info.version == 4 else 0
    out = []
    count = max(1, -(-len(payload) // gso_size))
    for k in range(count):
        chunk = payload[k * gso_size:(k + 1) * gso_size]
        seg = header + chunk
        last = k == count - 1
        # FIN and PSH only on the last segment, CWR only on the first (RFC 3168 TSO rules).
        seg[info.l4 + 13] = flags & ~((0x09 if not last else 0) | (0x80 if k else 0))
        struct.pack_into("!I", seg, info.l4 + 4, (seq + k * gso_size) & 0xFFFFFFFF)
        if info.version == 4:
            struct.pack_into("!HH", seg, info.l3 + 2, len(seg) - info.l3, (ip_id + k) & 0xFFFF)
            seg[info.l3 + 10:info.l3 + 12] = b"\0\0"
            ihl = info.l4 - info.l3
            struct.pack_into("!H", seg, info.l3 + 10,
                             0xFFFF ^ _fold(_sum(bytes(seg[info.l3:info.l3 + ihl]))))
        else:
            struct.pack_into("!H", seg, info.l3 + 4, len(seg) - info.l3 - 40)
        complete_checksum(seg, info)
        out.append(seg)
    return out
