"""Classic libpcap files (what tcpdump, tshark and Wireshark read), Ethernet link type.

File header: magic ``0xa1b2c3d4`` (microsecond timestamps), version 2.4,
thiszone 0, sigfigs 0, snaplen, network ``LINKTYPE_ETHERNET`` (1); then per
frame: ts_sec, ts_usec, incl_len, orig_len and the bytes
(https://wiki.wireshark.org/Development/LibpcapFileFormat).
"""

from __future__ import annotations

import struct
from typing import BinaryIO

MAGIC = 0xA1B2C3D4
LINKTYPE_ETHERNET = 1
SNAPLEN = 262144
FILE_HEADER = struct.Struct("<IHHiIII")
RECORD_HEADER = struct.Struct("<IIII")


class PcapWriter:
    """Append Ethernet frames to a pcap stream."""

    def __init__(self, out: BinaryIO, snaplen: int = SNAPLEN) -> None:
        self.out = out
        self.snaplen = snaplen
        self.frames = 0
        out.write(FILE_HEADER.pack(MAGIC, 2, 4, 0, 0, snaplen, LINKTYPE_ETHERNET))

    def write(self, frame: bytes, ts_ns: int, orig_len: int | None = None) -> None:
        """One record; ``orig_len`` is the frame's length before truncation (if cut)."""
        data = frame[:self.snaplen]
        sec, ns = divmod(ts_ns, 1_000_000_000)
        self.out.write(RECORD_HEADER.pack(sec, ns // 1000, len(data),
                                          max(len(frame), orig_len or 0)))
        self.out.write(data)
        self.frames += 1


def read_pcap(data: bytes) -> list[tuple[int, bytes]]:
    """(timestamp in µs, frame) of every record of a pcap written by :class:`PcapWriter`."""
    magic, _, _, _, _, _, link = FILE_HEADER.unpack_from(data)
    if magic != MAGIC or link != LINKTYPE_ETHERNET:
        raise ValueError("not a microsecond Ethernet pcap")
    out, pos = [], FILE_HEADER.size
    while pos + RECORD_HEADER.size <= len(data):
        sec, usec, incl, _ = RECORD_HEADER.unpack_from(data, pos)
        pos += RECORD_HEADER.size
        if pos + incl > len(data):  # the file ends inside this record (still being written)
            break
        out.append((sec * 1_000_000 + usec, data[pos:pos + incl]))
        pos += incl
    return out
