"""pvio.pcap: the files PcapWriter writes are read by tshark (a third party) with the
right frames, lengths and timestamps, and read_pcap round-trips them."""

from __future__ import annotations

import io
import shutil
import struct
import subprocess

import pytest

from pvio.pcap import FILE_HEADER, LINKTYPE_ETHERNET, MAGIC, SNAPLEN, PcapWriter, read_pcap
from tests.test_l4 import ICMP, TCP, UDP, build, eth, ipv4

TSHARK = "tshark"  # installed by .ci/run

T0 = 1_764_000_000_123_456_789  # ns since the epoch


def sample_frames() -> list[bytes]:
    icmp = eth(0x0800, ipv4(ICMP, struct.pack("!BBHHH", 8, 0, 0, 1, 1) + b"ping"))
    return [bytes(build(4, TCP, b"GET / HTTP/1.0\r\n\r\n").frame),
            bytes(build(6, UDP, b"\x12\x34" * 20).frame),
            bytes(build(4, UDP, b"v", vlan=99).frame),
            icmp,
            eth(0x0806, bytes.fromhex("0001080006040001") + bytes(20)),
            bytes(build(4, TCP, bytes(9000)).frame)]


def write(frames, snaplen=SNAPLEN, step_ns=1_500_000, orig=None) -> bytes:
    buf = io.BytesIO()
    writer = PcapWriter(buf, snaplen)
    for k, frame in enumerate(frames):
        writer.write(frame, T0 + k * step_ns, None if orig is None else orig[k])
    assert writer.frames == len(frames)
    return buf.getvalue()


def tshark_fields(path, *fields: str) -> list[list[str]]:
    argv = [TSHARK, "-r", str(path), "-T", "fields", "-E", "occurrence=f"]
    for f in fields:
        argv += ["-e", f]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [line.split("\t") for line in out.stdout.splitlines()]


def test_file_header_is_classic_libpcap_ethernet():
    data = write([])
    assert len(data) == 24
    assert FILE_HEADER.unpack(data) == (MAGIC, 2, 4, 0, 0, SNAPLEN, LINKTYPE_ETHERNET)
    assert data[:4] == bytes.fromhex("d4c3b2a1")  # little-endian, microseconds


def test_record_header_fields():
    frame = bytes(range(100))
    data = write([frame], snaplen=60)
    sec, usec, incl, orig = struct.unpack_from("<IIII", data, 24)
    assert (sec, usec) == (T0 // 10**9, T0 % 10**9 // 1000)
    assert (incl, orig) == (60, 100)
    assert data[40:] == frame[:60]


def test_read_pcap_round_trips():
    frames = sample_frames()
    records = read_pcap(write(frames))
    assert [f for _, f in records] == frames
    assert [ts for ts, _ in records] == [(T0 + k * 1_500_000) // 1000 for k in range(len(frames))]


def test_read_pcap_refuses_other_files():
    with pytest.raises(ValueError):
        read_pcap(struct.pack("<IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, 65535, 1))  # nanosecond
    with pytest.raises(ValueError):
        read_pcap(struct.pack("<IHHiIII", MAGIC, 2, 4, 0, 0, 65535, 101))  # raw IP


def test_regression_read_pcap_stops_at_a_cut_record():
    # A file still being written (pvio net capture flushes per frame) can end inside a
    # record; that record is not a frame yet and must not come back shortened.
    frames = sample_frames()[:3]
    data = write(frames)
    for cut in range(len(data) - 1, len(data) - len(frames[-1]) - 16, -1):
        records = read_pcap(data[:cut])
        assert [f for _, f in records] == frames[:2], cut


def test_tshark_reads_the_frames(tmp_path):
    frames = sample_frames()
    path = tmp_path / "f.pcap"
    path.write_bytes(write(frames))
    rows = tshark_fields(path, "frame.len", "frame.cap_len", "frame.time_epoch",
                         "frame.protocols", "eth.src", "ip.proto", "udp.length",
                         "vlan.id", "http.request.method")
    assert len(rows) == len(frames)
    assert [int(r[0]) for r in rows] == [len(f) for f in frames]
    assert [int(r[1]) for r in rows] == [len(f) for f in frames]
    for k, row in enumerate(rows):
        want = (T0 + k * 1_500_000) // 1000
        assert round(float(row[2]) * 1_000_000) == want
        assert row[4] == "02:00:00:00:00:0a"
    protocols = [r[3].split(":") for r in rows]
    assert protocols[0][:4] == ["eth", "ethertype", "ip", "tcp"]
    assert rows[0][8] == "GET"
    assert protocols[1][:4] == ["eth", "ethertype", "ipv6", "udp"]
    assert rows[1][6] == str(8 + 40)
    assert "vlan" in protocols[2] and rows[2][7] == "99"
    assert "icmp" in protocols[3]
    assert "arp" in protocols[4]
    assert rows[5][5] == "6"


def test_tshark_sees_the_snaplen_and_the_original_length(tmp_path):
    frames = sample_frames()
    path = tmp_path / "cut.pcap"
    # The daemon truncates to the snaplen and passes the original length along.
    orig = [len(f) for f in frames]
    path.write_bytes(write([f[:64] for f in frames], snaplen=64, orig=orig))
    rows = tshark_fields(path, "frame.len", "frame.cap_len")
    assert [(int(a), int(b)) for a, b in rows] == [(n, min(n, 64)) for n in orig]
    info = subprocess.run([shutil.which("capinfos") or "capinfos", "-l", str(path)],
                          capture_output=True, text=True)
    if info.returncode == 0:
        assert "64" in info.stdout
