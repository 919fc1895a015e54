"""The xenstore wire: ``xsd_sockmsg`` framing (io/xs_wire.h), sans-I/O.

Every message is a 16-byte header (``type``, ``req_id``, ``tx_id``, ``len``,
little-endian u32) followed by ``len`` payload bytes, at most
``XENSTORE_PAYLOAD_MAX`` (4096). Arguments are NUL-terminated strings; the
last argument of ``WRITE`` (the value) is not terminated. Replies echo
``req_id`` and ``tx_id``; errors are ``XS_ERROR`` with the errno name.

pvio adds three message types outside Xen's range (documented in
specs/xenbus.md): :data:`PVIO_SHARE_MEMORY` and :data:`PVIO_BIND_EVTCHN` carry
file descriptors with SCM_RIGHTS, :data:`PVIO_CLAIM` names the domain.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pvio import _cgen, layouts
from pvio.layouts import XENSTORE_PAYLOAD_MAX, XsdSockmsgType

HEADER = struct.Struct(_cgen.struct_format(layouts.xsd_sockmsg))

#: pvio extension: hand over a sealed memfd. Payload ``"pool\0"`` or
#: ``"gnttab\0"``; exactly one fd.
PVIO_SHARE_MEMORY = 0x70760001
#: pvio extension: hand over both eventfds of an unbound event-channel port.
#: Payload ``"<port>\0"``; exactly two fds (the daemon's end first).
PVIO_BIND_EVTCHN = 0x70760002
#: pvio extension: claim the configured domain ``name`` for this guest
#: connection (what Xen's toolstack decides by creating the domain). Payload
#: ``"<name>\0"``; no fds. Reply: ``"<domid>\0"``.
PVIO_CLAIM = 0x70760003
#: pvio extension, admin connections only: copy every frame a switch port
#: sends or receives to the SOCK_SEQPACKET socket passed as the one fd
#: (``pvio net capture``). Payload ``"<port>\0"`` or ``"<port>\0<snaplen>\0"``
#: (bytes kept per frame, default 262144). Each message: u64
#: CLOCK_REALTIME ns, u8 direction (0 into the switch, 1 out to the port),
#: u32 the frame's length, then its first snaplen bytes.
PVIO_CAPTURE = 0x70760004

_EXTENSION_NAMES = {
    PVIO_SHARE_MEMORY: "PVIO_SHARE_MEMORY",
    PVIO_BIND_EVTCHN: "PVIO_BIND_EVTCHN",
    PVIO_CLAIM: "PVIO_CLAIM",
    PVIO_CAPTURE: "PVIO_CAPTURE",
}

#: How many fds each message type must carry; every other type carries none.
FDS_EXPECTED = {PVIO_SHARE_MEMORY: 1, PVIO_BIND_EVTCHN: 2, PVIO_CAPTURE: 1}
#: The most fds any message may carry (sizes the ancillary buffer).
MAX_FDS = max(FDS_EXPECTED.values())


class WireError(Exception):
    """The byte stream cannot be framed any more; the connection must be dropped."""


@dataclass(frozen=True)
class Message:
    type: int
    req_id: int
    tx_id: int
    payload: bytes

    def encode(self) -> bytes:
        return HEADER.pack(self.type, self.req_id, self.tx_id, len(self.payload)) + self.payload

    @property
    def type_name(self) -> str:
        try:
            return XsdSockmsgType(self.type).name
        except ValueError:
            return _EXTENSION_NAMES.get(self.type, f"type {self.type:#x}")


class MessageReader:
    """Incremental framer: ``feed`` bytes, then iterate complete messages.

    A header announcing more than ``XENSTORE_PAYLOAD_MAX`` bytes is a
    :class:`WireError`: nothing after it can be trusted to be framed right.
    """

    def __init__(self, max_payload: int = XENSTORE_PAYLOAD_MAX) -> None:
        self._buf = bytearray()
        self.max_payload = max_payload

    def feed(self, data: bytes) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def next(self) -> Message | None:
        if len(self._buf) < HEADER.size:
            return None
        mtype, req_id, tx_id, length = HEADER.unpack_from(self._buf)
        if length > self.max_payload:
            raise WireError(f"payload of {length} bytes exceeds {self.max_payload}")
        end = HEADER.size + length
        if len(self._buf) < end:
            return None
        payload = bytes(self._buf[HEADER.size : end])
        del self._buf[:end]
        return Message(mtype, req_id, tx_id, payload)

    def __iter__(self):
        while (msg := self.next()) is not None:
            yield msg


def strings(payload: bytes, count: int | None = None, *, last_raw: bool = False) -> list:
    """Split a payload into its NUL-terminated arguments.

    With ``count``, exactly that many are required (EINVAL otherwise, raised as
    ``ValueError``). With ``last_raw`` the final argument is the unterminated
    rest of the payload (``WRITE``'s value), returned as bytes.
    """
    if last_raw:
        head, sep, rest = payload.partition(b"\0")
        if not sep:
            raise ValueError("missing NUL after the first argument")
        return [_decode(head), rest]
    if not payload.endswith(b"\0"):
        raise ValueError("arguments must be NUL-terminated")
    parts = [_decode(p) for p in payload[:-1].split(b"\0")]
    if count is not None and len(parts) != count:
        raise ValueError(f"expected {count} arguments, got {len(parts)}")
    return parts


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError as exc:
        raise ValueError("non-ASCII argument") from exc


def reply(req: Message, payload: bytes, mtype: int | None = None) -> Message:
    """A reply to ``req`` (same type unless ``mtype``), echoing req_id and tx_id."""
    return Message(req.type if mtype is None else mtype, req.req_id, req.tx_id, payload)


def ok(req: Message) -> Message:
    return reply(req, b"OK\0")


def error(req: Message, name: str) -> Message:
    return reply(req, name.encode() + b"\0", XsdSockmsgType.ERROR)


def join(items) -> bytes:
    """Encode arguments as NUL-terminated strings."""
    return b"".join((i.encode() if isinstance(i, str) else i) + b"\0" for i in items)


def watch_event(path: str, token: str) -> Message:
    return Message(XsdSockmsgType.WATCH_EVENT, 0, 0, join([path, token]))
