"""``xsd_sockmsg`` framing and argument parsing (:mod:`pvio.xenbus.wire`).

The reader must frame any byte stream however the transport splits it, refuse
a header announcing more than ``XENSTORE_PAYLOAD_MAX`` (4096) bytes as soon as
it sees it (hardening.md #16, #19: frame messages by length), and
:func:`wire.strings` must apply xs_wire's argument rules exactly.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pvio.layouts import XENSTORE_PAYLOAD_MAX, XsdSockmsgType
from pvio.xenbus import wire
from pvio.xenbus.wire import Message, MessageReader, WireError

U32 = st.integers(0, 0xFFFFFFFF)
messages = st.builds(
    Message,
    type=U32,
    req_id=U32,
    tx_id=U32,
    payload=st.binary(max_size=XENSTORE_PAYLOAD_MAX),
)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks, start = [], 0
    for p in [*points, len(data)]:
        chunks.append(data[start:p])
        start = p
    return chunks


def frame(chunks) -> list[Message]:
    reader = MessageReader()
    out = []
    for chunk in chunks:
        reader.feed(chunk)
        out.extend(reader)
    assert reader.buffered == 0
    return out


# ------------------------------------------------------------------ header


def test_header_is_xsd_sockmsg_16_bytes_little_endian():
    assert wire.HEADER.size == 16
    msg = Message(XsdSockmsgType.WRITE, 0x01020304, 0x0A0B0C0D, b"p\0v")
    raw = msg.encode()
    assert raw[:16] == struct.pack("<IIII", 11, 0x01020304, 0x0A0B0C0D, 3)
    assert raw[16:] == b"p\0v"


def test_reply_echoes_req_id_and_tx_id():
    req = Message(XsdSockmsgType.READ, 77, 5, b"/a\0")
    rep = wire.reply(req, b"value")
    assert (rep.type, rep.req_id, rep.tx_id, rep.payload) == (2, 77, 5, b"value")
    ok = wire.ok(req)
    assert (ok.type, ok.req_id, ok.tx_id, ok.payload) == (2, 77, 5, b"OK\0")
    err = wire.error(req, "ENOENT")
    assert (err.type, err.req_id, err.tx_id, err.payload) == (16, 77, 5, b"ENOENT\0")


def test_watch_event_payload_is_path_nul_token_nul():
    ev = wire.watch_event("/local/domain/1/device", "tok")
    assert ev.type == XsdSockmsgType.WATCH_EVENT == 15
    assert ev.payload == b"/local/domain/1/device\0tok\0"


def test_type_names():
    assert Message(2, 0, 0, b"").type_name == "READ"
    assert Message(wire.PVIO_SHARE_MEMORY, 0, 0, b"").type_name == "PVIO_SHARE_MEMORY"
    assert Message(wire.PVIO_BIND_EVTCHN, 0, 0, b"").type_name == "PVIO_BIND_EVTCHN"
    assert Message(wire.PVIO_CLAIM, 0, 0, b"").type_name == "PVIO_CLAIM"
    assert Message(0xDEAD, 0, 0, b"").type_name == "type 0xdead"


def test_extension_types_are_outside_xens_range_and_fd_counts():
    for t in (wire.PVIO_SHARE_MEMORY, wire.PVIO_BIND_EVTCHN, wire.PVIO_CLAIM,
              wire.PVIO_CAPTURE):
        assert t > XsdSockmsgType.TYPE_COUNT and t != XsdSockmsgType.INVALID
    assert wire.FDS_EXPECTED == {wire.PVIO_SHARE_MEMORY: 1, wire.PVIO_BIND_EVTCHN: 2,
                                 wire.PVIO_CAPTURE: 1}
    assert wire.MAX_FDS == 2


# ----------------------------------------------------------------- framing


@settings(max_examples=300, deadline=None)
@given(msgs=st.lists(messages, max_size=8), cuts=st.lists(st.integers(0, 10**6), max_size=40))
def test_framing_survives_arbitrary_chunk_splits(msgs, cuts):
    data = b"".join(m.encode() for m in msgs)
    assert frame(split_at(data, cuts)) == msgs


@settings(max_examples=50, deadline=None)
@given(msgs=st.lists(messages, min_size=1, max_size=4))
def test_framing_byte_by_byte(msgs):
    data = b"".join(m.encode() for m in msgs)
    assert frame(data[i : i + 1] for i in range(len(data))) == msgs


def test_nothing_is_returned_until_a_message_is_complete():
    raw = Message(2, 1, 0, b"/a\0").encode()
    reader = MessageReader()
    for i in range(len(raw) - 1):
        reader.feed(raw[i : i + 1])
        assert reader.next() is None
        assert reader.buffered == i + 1
    reader.feed(raw[-1:])
    assert reader.next() == Message(2, 1, 0, b"/a\0")
    assert reader.next() is None
    assert reader.buffered == 0


def test_payload_of_exactly_4096_is_accepted():
    msg = Message(11, 1, 0, b"x\0" + b"v" * (XENSTORE_PAYLOAD_MAX - 2))
    assert len(msg.payload) == 4096
    assert frame([msg.encode()]) == [msg]


@pytest.mark.parametrize("length", [XENSTORE_PAYLOAD_MAX + 1, 65536, 0xFFFFFFFF])
def test_header_announcing_more_than_4096_is_a_wire_error_at_once(length):
    reader = MessageReader()
    good = Message(2, 1, 0, b"/a\0").encode()
    reader.feed(good + struct.pack("<IIII", 2, 2, 0, length))
    assert reader.next() == Message(2, 1, 0, b"/a\0")
    # the header alone is enough: no need to wait for (or buffer) the payload
    with pytest.raises(WireError):
        reader.next()
    with pytest.raises(WireError):
        list(reader)


@settings(max_examples=100, deadline=None)
@given(
    prefix=st.lists(messages, max_size=3),
    length=st.integers(XENSTORE_PAYLOAD_MAX + 1, 0xFFFFFFFF),
    cuts=st.lists(st.integers(0, 10**5), max_size=10),
)
def test_oversized_header_after_good_messages_under_any_split(prefix, length, cuts):
    data = b"".join(m.encode() for m in prefix) + struct.pack("<IIII", 1, 2, 3, length)
    reader = MessageReader()
    got: list[Message] = []
    with pytest.raises(WireError):  # the error may come with any chunk
        for chunk in split_at(data, cuts):
            reader.feed(chunk)
            while (msg := reader.next()) is not None:
                got.append(msg)
    assert got == prefix


def test_custom_max_payload():
    reader = MessageReader(max_payload=8)
    reader.feed(Message(2, 0, 0, b"12345678").encode())
    assert reader.next().payload == b"12345678"
    reader.feed(Message(2, 0, 0, b"123456789").encode())
    with pytest.raises(WireError):
        reader.next()


# ----------------------------------------------------------------- strings


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"\0", [""]),
        (b"a\0", ["a"]),
        (b"a\0b\0", ["a", "b"]),
        (b"a\0\0", ["a", ""]),
        (b"\0\0\0", ["", "", ""]),
        (b"/local/domain/1\0tok-1\0", ["/local/domain/1", "tok-1"]),
    ],
)
def test_strings_splits_nul_terminated_arguments(payload, expected):
    assert wire.strings(payload) == expected
    assert wire.strings(payload, len(expected)) == expected


@pytest.mark.parametrize("payload", [b"", b"a", b"a\0b", b"\0a"])
def test_strings_requires_the_final_nul(payload):
    with pytest.raises(ValueError):
        wire.strings(payload)


@pytest.mark.parametrize(("payload", "count"), [(b"a\0", 2), (b"a\0b\0", 1), (b"\0", 0),
                                               (b"a\0b\0c\0", 2)])
def test_strings_count_must_match_exactly(payload, count):
    with pytest.raises(ValueError):
        wire.strings(payload, count)


@pytest.mark.parametrize("payload", [b"\xff\0", b"caf\xc3\xa9\0", b"a\0\x80\0"])
def test_strings_rejects_non_ascii(payload):
    with pytest.raises(ValueError):
        wire.strings(payload)


def test_strings_last_raw_is_writes_value():
    assert wire.strings(b"p\0value", last_raw=True) == ["p", b"value"]
    assert wire.strings(b"p\0", last_raw=True) == ["p", b""]
    assert wire.strings(b"p\0a\0b\0", last_raw=True) == ["p", b"a\0b\0"]  # NULs in a value
    assert wire.strings(b"p\0\xff\xfe", last_raw=True) == ["p", b"\xff\xfe"]  # any bytes
    assert wire.strings(b"\0v", last_raw=True) == ["", b"v"]
    for bad in (b"", b"path-without-nul", b"\xff\0v"):
        with pytest.raises(ValueError):
            wire.strings(bad, last_raw=True)


_ascii_no_nul = st.text(st.characters(min_codepoint=1, max_codepoint=127), max_size=20)


@given(items=st.lists(_ascii_no_nul, min_size=1, max_size=10))
def test_join_and_strings_round_trip(items):
    assert wire.strings(wire.join(items)) == items
    assert wire.strings(wire.join(items), len(items)) == items


@given(payload=st.binary(max_size=300), count=st.none() | st.integers(0, 5),
       last_raw=st.booleans())
def test_strings_raises_only_valueerror(payload, count, last_raw):
    try:
        out = wire.strings(payload, count, last_raw=last_raw)
    except ValueError:
        return
    assert isinstance(out, list)
