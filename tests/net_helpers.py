"""Shared helpers of the netback / netfront tests.

- Hand-built netif wire bytes, straight from the offsets in Xen's
  ``/usr/include/xen/io/netif.h`` (deliberately *not* from :mod:`pvio.netif`'s
  structs, so a layout mistake there shows), and the shared-ring header from
  ``io/ring.h`` (req_prod@0 req_event@4 rsp_prod@8 rsp_event@12, slots from 64).
- Frames: Ethernet/IPv4/IPv6/TCP builders and an independent Internet
  checksum (RFC 1071, plain Python) to verify what the backend computes.
- TOML configurations for in-process daemons with vifs.
- :class:`RawNetFront`: a frontend that attaches a vif with the generic
  transport driver (:class:`~pvio.xenbus.ringdev.RingFrontendDriver`, layout
  ``VIF``: handshake, ring pages, event channels, ``request-rx-copy`` and
  ``feature-rx-notify``), then drives both rings by hand, byte by byte, so a
  test can put any request on the ring, grant any page and read every response
  slot.
- :class:`Pair`: two well-behaved NetFronts ping-ponging frames (a co-tenant
  that must keep working while a hostile frontend does its worst).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import trio

from pvio.frontends.netfront import open_netfront
from pvio.testing._net import (  # noqa: F401 - re-exported for the tests
    EXTRA,
    EXTRA_FLAG_MORE,
    EXTRA_TYPE_GSO,
    EXTRA_TYPE_HASH,
    EXTRA_TYPE_MAX,
    EXTRA_TYPE_MCAST_ADD,
    EXTRA_TYPE_MCAST_DEL,
    EXTRA_TYPE_NONE,
    GSO_TYPE_NONE,
    GSO_TYPE_TCPV4,
    GSO_TYPE_TCPV6,
    MAX_TX_SIZE,
    NETRXF_CSUM_BLANK,
    NETRXF_DATA_VALIDATED,
    NETRXF_EXTRA_INFO,
    NETRXF_MORE_DATA,
    NETTXF_CSUM_BLANK,
    NETTXF_DATA_VALIDATED,
    NETTXF_EXTRA_INFO,
    NETTXF_MORE_DATA,
    NR_SLOTS_MIN,
    PAGE,
    RSP_DROPPED,
    RSP_ERROR,
    RSP_NULL,
    RSP_OKAY,
    RX_ENTS,
    RX_REQ,
    RX_RSP,
    RX_SLOT,
    SRING_HEADER,
    TX_ENTS,
    TX_REQ,
    TX_RSP,
    TX_SLOT,
    U32,
    ExtraSlot,
    RawNetFront,
    RawRing,
    RxPacketSeen,
    RxSlot,
    attach_raw,
    extra_slot,
    gso_slot,
    receive_matching,
    refused,
    ring_entries,
    rx_req,
    tx_req,
)
from pvio.xenbus.device import backend_path, frontend_path

# --- frames ------------------------------------------------------------------------------

BCAST = b"\xff" * 6


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def eth(dst: bytes | str, src: bytes | str, payload: bytes, ethertype: int = 0x88B5) -> bytes:
    """An Ethernet frame (0x88B5: IEEE local experimental ethertype)."""
    dst = mac_bytes(dst) if isinstance(dst, str) else dst
    src = mac_bytes(src) if isinstance(src, str) else src
    return dst + src + struct.pack("!H", ethertype) + payload


def inet_sum(data: bytes, start: int = 0) -> int:
    """RFC 1071 one's-complement sum of 16-bit big-endian words (not complemented)."""
    if len(data) % 2:
        data += b"\0"
    total = start + sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def inet_checksum(data: bytes, start: int = 0) -> int:
    return 0xFFFF ^ inet_sum(data, start)


def pseudo_sum(version: int, src: bytes, dst: bytes, proto: int, length: int) -> int:
    if version == 4:
        return inet_sum(src + dst + struct.pack("!BBH", 0, proto, length))
    return inet_sum(src + dst + struct.pack("!IxxxB", length, proto))


IP4_SRC, IP4_DST = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
IP6_SRC = bytes.fromhex("fd000000000000000000000000000001")
IP6_DST = bytes.fromhex("fd000000000000000000000000000002")


def tcp_frame(dst: str | bytes, src: str | bytes, payload: bytes, *, version: int = 4,
              seq: int = 1000, ack: int = 77, flags: int = 0x18, ip_id: int = 0x1234,
              checksum: bool = True, ip_src: bytes | None = None,
              ip_dst: bytes | None = None, sport: int = 40000, dport: int = 5001) -> bytes:
    """An Ethernet + IPv4/IPv6 + TCP frame (20-byte headers, flags PSH|ACK by default).

    ``checksum=False`` leaves the TCP checksum field 0 (what NETTXF_csum_blank says).
    """
    tcp = bytearray(struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, 65535,
                                0, 0) + payload)
    if version == 4:
        s, d = ip_src or IP4_SRC, ip_dst or IP4_DST
        ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), ip_id, 0x4000, 64,
                                   6, 0, s, d))
        struct.pack_into("!H", ip, 10, inet_checksum(bytes(ip)))
        ethertype = 0x0800
    else:
        s, d = ip_src or IP6_SRC, ip_dst or IP6_DST
        ip = bytearray(struct.pack("!IHBB16s16s", 6 << 28, len(tcp), 6, 64, s, d))
        ethertype = 0x86DD
    if checksum:
        struct.pack_into("!H", tcp, 16, inet_checksum(bytes(tcp),
                                                      pseudo_sum(version, s, d, 6, len(tcp))))
    return eth(dst, src, bytes(ip + tcp), ethertype)


def udp_frame(dst, src, payload: bytes, *, version: int = 4, checksum: bool = True) -> bytes:
    udp = bytearray(struct.pack("!HHHH", 1234, 5678, 8 + len(payload), 0) + payload)
    if version == 4:
        s, d = IP4_SRC, IP4_DST
        ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                                   s, d))
        struct.pack_into("!H", ip, 10, inet_checksum(bytes(ip)))
        ethertype = 0x0800
    else:
        s, d = IP6_SRC, IP6_DST
        ip = bytearray(struct.pack("!IHBB16s16s", 6 << 28, len(udp), 17, 64, s, d))
        ethertype = 0x86DD
    if checksum:
        csum = inet_checksum(bytes(udp), pseudo_sum(version, s, d, 17, len(udp))) or 0xFFFF
        struct.pack_into("!H", udp, 6, csum)
    return eth(dst, src, bytes(ip + udp), ethertype)


@dataclass
class Parsed:
    """A TCP or UDP frame taken apart, with both checksums verified independently."""

    version: int
    ip_header: bytes
    l4_header: bytes
    payload: bytes
    ip_len_ok: bool
    ip_csum_ok: bool  # always True for IPv6 (no header checksum)
    l4_csum_ok: bool
    proto: int

    @property
    def seq(self) -> int:
        return struct.unpack_from("!I", self.l4_header, 4)[0]

    @property
    def tcp_flags(self) -> int:
        return self.l4_header[13]

    @property
    def ip_id(self) -> int:
        return struct.unpack_from("!H", self.ip_header, 4)[0]


def parse_l4(frame: bytes) -> Parsed:
    ethertype = struct.unpack_from("!H", frame, 12)[0]
    if ethertype == 0x0800:
        ihl = (frame[14] & 0xF) * 4
        ip = frame[14:14 + ihl]
        total = struct.unpack_from("!H", ip, 2)[0]
        proto, s, d = ip[9], ip[12:16], ip[16:20]
        l4 = frame[14 + ihl:]
        ip_len_ok = total == len(frame) - 14
        ip_csum_ok = inet_sum(ip) == 0xFFFF
        version = 4
    elif ethertype == 0x86DD:
        ip = frame[14:54]
        plen = struct.unpack_from("!H", ip, 4)[0]
        proto, s, d = ip[6], ip[8:24], ip[24:40]
        l4 = frame[54:]
        ip_len_ok = plen == len(frame) - 54
        ip_csum_ok = True
        version = 6
    else:
        raise AssertionError(f"not IP: ethertype {ethertype:#x}")
    hlen = (l4[12] >> 4) * 4 if proto == 6 else 8
    l4_ok = inet_sum(l4, pseudo_sum(version, s, d, proto, len(l4))) == 0xFFFF
    return Parsed(version, bytes(ip), bytes(l4[:hlen]), bytes(l4[hlen:]), ip_len_ok,
                  ip_csum_ok, l4_ok, proto)


# --- configurations ----------------------------------------------------------------------


def mac(i: int) -> str:
    return f"00:16:3e:00:01:{i:02x}"


def vif(devid: int = 0, mac_addr: str | None = None) -> str:
    return (f'  [[domain.device]]\n  type = "vif"\n  devid = {devid}\n'
            f'  mac = "{mac_addr or mac(devid)}"\n')


def domain(name: str, *devices: str) -> str:
    return f'[[domain]]\nname = "{name}"\n' + "".join(devices)


def switch(queue_frames: int | None = None, aging: float | None = None) -> str:
    lines = ["[switch]"]
    if queue_frames is not None:
        lines.append(f"queue_frames = {queue_frames}")
    if aging is not None:
        lines.append(f"aging = {aging}")
    return "\n".join(lines) + "\n"


# --- daemon-side introspection -------------------------------------------------------------


def backend_device(daemon, name: str, devid: int = 0):
    """The daemon's BackendDevice of ``name``'s vif ``devid`` (driver: a NetBackend)."""
    for device in daemon._claimed[name].devices:
        if device.driver.type == "vif" and device.devid == devid:
            return device
    raise KeyError((name, devid))


def netback(daemon, name: str, devid: int = 0):
    return backend_device(daemon, name, devid).driver


def paths(session, devid: int = 0) -> tuple[str, str]:
    """(backend dir, frontend dir) of ``session``'s vif ``devid``."""
    return backend_path("vif", session.domid, devid), frontend_path("vif", session.domid, devid)


async def attach_net(session, devid: int = 0, **kwargs):
    """A connected NetFront (open_netfront with a test timeout)."""
    return await open_netfront(session, devid, timeout=5.0, **kwargs)


# --- a well-behaved co-tenant ----------------------------------------------------------------


class Pair:
    """Two NetFronts (``a``, ``b``) in lock-step: a sends a numbered frame to b, b
    answers it; one round each. Frames from anyone else that reach b are kept in
    ``foreign`` (so a test can see a hostile vif's good packet arrive)."""

    def __init__(self, a, b) -> None:
        self.a, self.b = a, b
        self.ok = 0
        self.errors: list[BaseException] = []
        self.foreign: list[bytes] = []
        self._progress = trio.Event()
        self._foreign = trio.Event()

    async def _next_from(self, nic, src: str, keep: bool) -> bytes:
        while True:
            frame = await nic.receive()
            if frame.data[6:12] == mac_bytes(src) and frame.data[12:14] == b"\x88\xb5":
                return frame.data
            if keep:
                self.foreign.append(frame.data)
                self._foreign.set()

    async def run(self) -> None:
        k = 0
        try:
            while True:
                ping = eth(self.b.mac, self.a.mac, b"ping" + k.to_bytes(4, "big") + bytes(80))
                await self.a.send(ping)
                with trio.fail_after(5):
                    got = await self._next_from(self.b, self.a.mac, keep=True)
                assert got == ping, "co-tenant: b got a different frame"
                pong = eth(self.a.mac, self.b.mac, b"pong" + k.to_bytes(4, "big") + bytes(80))
                await self.b.send(pong)
                with trio.fail_after(5):
                    got = await self._next_from(self.a, self.b.mac, keep=False)
                assert got == pong, "co-tenant: a got a different frame"
                k += 1
                self.ok += 1
                self._progress.set()
                await trio.sleep(0.001)
        except Exception as exc:  # recorded, asserted by the fixture and progress()
            self.errors.append(exc)

    async def progress(self, rounds: int = 3, timeout: float = 10.0) -> None:
        """Until the pair completed ``rounds`` more ping-pong rounds."""
        with trio.fail_after(timeout):
            for _ in range(rounds):
                assert not self.errors, self.errors
                self._progress = trio.Event()
                await self._progress.wait()
        assert not self.errors, self.errors

    async def seen(self, payload: bytes, timeout: float = 5.0) -> bytes:
        """Until b received a frame (from someone other than a) containing ``payload``."""
        with trio.fail_after(timeout):
            while True:
                for frame in self.foreign:
                    if payload in frame:
                        return frame
                self._foreign = trio.Event()
                await self._foreign.wait()
