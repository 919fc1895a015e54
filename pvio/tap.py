"""A Linux TAP device whose offloads map to netif's (``pvio netfront-tap``, switch bridging).

The TAP is opened with ``IFF_VNET_HDR``: every frame crosses the fd behind a
``struct virtio_net_hdr`` (Linux ``include/uapi/linux/virtio_net.h``)::

    u8 flags (NEEDS_CSUM 1, DATA_VALID 2)   u8 gso_type (TCPV4 1, TCPV6 4, ECN 0x80)
    u16 hdr_len   u16 gso_size   u16 csum_start   u16 csum_offset

and ``TUNSETOFFLOAD`` lets the kernel hand us checksum-partial and TSO
super-packets. They map onto netif (io/netif.h) as Linux netfront maps its
skbs: NEEDS_CSUM <-> ``csum_blank`` (+``data_validated``), DATA_VALID <->
``data_validated``, TCPV4/TCPV6 <-> a GSO extra of the same type and size.
netif carries no checksum offsets, so writing a ``csum_blank`` frame parses
its headers for ``csum_start``/``csum_offset`` (Linux's
``skb_checksum_setup``) and refreshes the pseudo-header seed the kernel
expects; a super-packet netif cannot carry (over 65535 bytes) is segmented
in software.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct

import trio

from pvio import _l4
from pvio.layouts import XEN_NETIF_GSO_TYPE_TCPV4, XEN_NETIF_GSO_TYPE_TCPV6, XEN_NETIF_MAX_TX_SIZE
from pvio.netif import NO_OFFLOAD, Frame, Offload

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6 = 0x01, 0x02, 0x04
SIOCGIFFLAGS, SIOCSIFFLAGS, SIOCSIFMTU, SIOCSIFHWADDR = 0x8913, 0x8914, 0x8922, 0x8924
IFF_UP = 0x1
ARPHRD_ETHER = 1

VNET_HDR = struct.Struct("<BBHHHH")
VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_F_DATA_VALID = 1, 2
VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4 = 0, 1
VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_HDR_GSO_ECN = 4, 0x80
_TO_NETIF = {VIRTIO_NET_HDR_GSO_TCPV4: XEN_NETIF_GSO_TYPE_TCPV4,
             VIRTIO_NET_HDR_GSO_TCPV6: XEN_NETIF_GSO_TYPE_TCPV6}
_TO_VIRTIO = {v: k for k, v in _TO_NETIF.items()}
MAX_READ = 65536 + VNET_HDR.size + 64


class TapError(OSError):
    """The TAP device cannot be created or configured."""


def _ifreq(name: str, payload: bytes = b"") -> bytes:
    return struct.pack("16s", name.encode()) + payload.ljust(24, b"\0")


class Tap:
    """A TAP interface in the caller's network namespace (needs CAP_NET_ADMIN)."""

    def __init__(self, name: str = "pvio%d", *, offloads: bool = True) -> None:
        if len(name.encode()) > 15:
            raise TapError(errno.EINVAL, f"interface name {name!r} is longer than 15 bytes")
        try:
            self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise TapError(exc.errno, f"cannot open /dev/net/tun: {exc.strerror}") from None
        try:
            mode = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
            ifr = fcntl.ioctl(self.fd, TUNSETIFF,
                              struct.pack("16sH", name.encode(), mode).ljust(40, b"\0"))
            self.name = ifr[:16].rstrip(b"\0").decode()
            fcntl.ioctl(self.fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR.size))
            self.offloads = offloads
            fcntl.ioctl(self.fd, TUNSETOFFLOAD,
                        TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 if offloads else 0)
        except OSError as exc:
            os.close(self.fd)
            raise TapError(exc.errno, f"cannot create TAP {name!r}: {exc.strerror} "
                           "(needs CAP_NET_ADMIN in this network namespace)") from None
        self.dropped = 0  # frames that could not be mapped between the two worlds
        self.segmented = 0
        self._ctl = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    # ------------------------------------------------------------ configuration

    def set_mac(self, mac: str) -> None:
        raw = bytes.fromhex(mac.replace(":", ""))
        fcntl.ioctl(self._ctl, SIOCSIFHWADDR, _ifreq(self.name, struct.pack("H", ARPHRD_ETHER)
                                                     + raw))

    def set_mtu(self, mtu: int) -> None:
        fcntl.ioctl(self._ctl, SIOCSIFMTU, _ifreq(self.name, struct.pack("i", mtu)))

    def set_up(self, up: bool = True) -> None:
        flags = struct.unpack_from("H", fcntl.ioctl(self._ctl, SIOCGIFFLAGS, _ifreq(self.name)),
                                   16)[0]
        flags = flags | IFF_UP if up else flags & ~IFF_UP
        fcntl.ioctl(self._ctl, SIOCSIFFLAGS, _ifreq(self.name, struct.pack("H", flags)))

    # ------------------------------------------------------------ frames

    def read_frames(self, limit: int = 64) -> list[Frame]:
        """Frames the kernel sent, without blocking (empty when none is waiting)."""
        out: list[Frame] = []
        while len(out) < limit:
            try:
                raw = os.read(self.fd, MAX_READ)
            except BlockingIOError:
                break
            out += self.from_vnet(raw)
        return out

    async def wait_readable(self) -> None:
        await trio.lowlevel.wait_readable(self.fd)

    def from_vnet(self, raw: bytes) -> list[Frame]:
        """A virtio-net-headed frame from the kernel as netif frames (usually one)."""
        if len(raw) < VNET_HDR.size + _l4.ETH_HLEN:
            self.dropped += 1
            return []
        flags, gso, _hdr_len, gso_size, csum_start, csum_offset = VNET_HDR.unpack_from(raw)
        data = raw[VNET_HDR.size:]
        gso &= ~VIRTIO_NET_HDR_GSO_ECN
        csum = bool(flags & VIRTIO_NET_HDR_F_NEEDS_CSUM)
        valid = bool(flags & VIRTIO_NET_HDR_F_DATA_VALID) or csum
        info = _l4.parse(data) if csum or gso else None
        if csum and (info is None or info.l4 != csum_start or info.csum_offset != csum_offset):
            # A partial checksum netif's header parsing would not find: finish it here.
            data = bytearray(data)
            end = csum_start + csum_offset
            if end + 2 > len(data):
                self.dropped += 1
                return []
            total = _l4._fold(_l4._sum(memoryview(data)[csum_start:]))
            struct.pack_into("!H", data, end, 0xFFFF ^ total or 0xFFFF)
            csum, info = False, None
        if gso == VIRTIO_NET_HDR_GSO_NONE:
            if len(data) > XEN_NETIF_MAX_TX_SIZE:  # e.g. a VLAN tag on a 65521-byte MTU
                self.dropped += 1
                return []
            return [Frame(bytes(data), Offload(csum, valid) if valid else NO_OFFLOAD)]
        gso_type = _TO_NETIF.get(gso)
        if gso_type is None or info is None or _l4.gso_type_of(info) != gso_type:
            self.dropped += 1
            return []
        if len(data) > XEN_NETIF_MAX_TX_SIZE:
            # Cut in software, all or nothing: with full segments over netif's
            # limit only the short tail would fit, and sending it alone leaves
            # a hole in the stream.
            if _l4.tcp_header_end(data, info) + gso_size > XEN_NETIF_MAX_TX_SIZE:
                self.dropped += 1
                return []
            self.segmented += 1
            segments = _l4.segment(data, gso_size)
            if not segments:
                self.dropped += 1
            return [Frame(bytes(s), Offload(False, True)) for s in segments]
        return [Frame(bytes(data), Offload(True, True, gso_type, gso_size))]

    def to_vnet(self, frame: Frame) -> bytes | bytearray:
        """The virtio-net header for a netif frame (and the frame, maybe adjusted)."""
        off = frame.offload
        data = frame.data
        if not (off.csum_blank or off.gso_type):
            flags = VIRTIO_NET_HDR_F_DATA_VALID if off.data_validated else 0
            return VNET_HDR.pack(flags, 0, 0, 0, 0, 0) + data
        info = _l4.parse(data)
        if info is None:  # nothing the kernel could finish: pass it as it is
            return VNET_HDR.pack(0, 0, 0, 0, 0, 0) + data
        out = bytearray(VNET_HDR.size) + data  # header room and the frame: one copy
        with memoryview(out)[VNET_HDR.size:] as frame_view:
            _l4.seed_pseudo(frame_view, info)
            # The GSO type the kernel sees is the frame's own (a guest's flag may lie).
            gso_type = _l4.gso_type_of(info) if off.gso_type and off.gso_size else 0
            gso = _TO_VIRTIO.get(gso_type, VIRTIO_NET_HDR_GSO_NONE) if self.offloads else 0
            hdr_len = _l4.tcp_header_end(frame_view, info) if gso else 0
        VNET_HDR.pack_into(out, 0, VIRTIO_NET_HDR_F_NEEDS_CSUM, gso, hdr_len,
                           off.gso_size if gso else 0, info.l4, info.csum_offset)
        return out

    def write_frame(self, frame: Frame) -> bool:
        """Give one frame to the kernel; False (and counted) if it refused it."""
        try:
            os.write(self.fd, self.to_vnet(frame))
        except BlockingIOError:
            self.dropped += 1
            return False
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.EIO, errno.EMSGSIZE):
                self.dropped += 1
                return False
            raise
        return True

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            self._ctl.close()

    def __enter__(self) -> Tap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
