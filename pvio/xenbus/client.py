"""A trio xenstore client (xs_wire over a Unix socket), plus a blocking facade.

``async with open_client(path) as xs:`` connects and runs a reader task that
routes replies to callers by ``req_id`` and watch events to watch channels,
so many tasks can share one connection. Errors come back as
:class:`~pvio.xenbus.store.XenstoreError` with the errno name.

The pvio extension messages (fd hand-over with SCM_RIGHTS) are
:meth:`XsClient.share_memory` and :meth:`XsClient.hand_over_evtchn`.
"""

from __future__ import annotations

import array
import contextlib
import itertools
import socket
from collections.abc import AsyncIterator

import trio

from pvio._trio import unwrap_single
from pvio.layouts import XSD_ERRORS
from pvio.layouts import XsdSockmsgType as XS
from pvio.xenbus import wire
from pvio.xenbus.store import XenstoreError
from pvio.xenbus.wire import Message, MessageReader


class XsClient:
    """One connection to a pvio (or any xenstored) Unix socket."""

    def __init__(self, sock) -> None:
        self._sock = sock
        self._ids = itertools.count(1)
        self._pending: dict[int, trio.MemorySendChannel] = {}
        self._watches: dict[str, trio.MemorySendChannel] = {}
        self._send_lock = trio.Lock()
        self._closed: BaseException | None = None
        self._tokens = itertools.count(1)
        #: Set when the store connection is lost (not on an orderly close).
        self.lost = trio.Event()

    # -------------------------------------------------------------- plumbing

    async def _reader(self) -> None:
        reader = MessageReader()
        try:
            while True:
                data = await self._sock.recv(65536)
                if not data:
                    raise ConnectionResetError("store closed the connection")
                reader.feed(data)
                for msg in reader:
                    self._route(msg)
        except (OSError, wire.WireError) as exc:
            self._closed = exc
            self.lost.set()
        except trio.ClosedResourceError as exc:  # aclose() from inside the block
            self._closed = exc
        finally:
            for chan in list(self._pending.values()) + list(self._watches.values()):
                chan.close()
            self._pending.clear()

    def _route(self, msg: Message) -> None:
        if msg.type == XS.WATCH_EVENT:
            try:
                path, token = wire.strings(msg.payload, 2)
            except ValueError:
                return
            chan = self._watches.get(token)
            if chan is not None:
                with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError):
                    chan.send_nowait(path)
            return
        chan = self._pending.pop(msg.req_id, None)
        if chan is not None:
            chan.send_nowait(msg)

    async def request(self, mtype: int, payload: bytes, tx_id: int = 0,
                      fds: list[int] | None = None) -> bytes:
        """Send one request and wait for its reply payload (raises XenstoreError)."""
        if self._closed is not None:
            raise ConnectionResetError(f"store connection lost: {self._closed}")
        req_id = next(self._ids) & 0xFFFFFFFF
        send, receive = trio.open_memory_channel[Message](1)
        self._pending[req_id] = send
        data = Message(mtype, req_id, tx_id, payload).encode()
        async with self._send_lock:
            if fds:
                await self._sock.sendmsg(
                    [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, bytes(_ints(fds)))]
                )
            else:
                view = memoryview(data)
                while view:
                    view = view[await self._sock.send(view):]
        try:
            reply = await receive.receive()
        except trio.EndOfChannel:
            raise ConnectionResetError(f"store connection lost: {self._closed}") from None
        if reply.type == XS.ERROR:
            name = reply.payload.rstrip(b"\0").decode("ascii", "replace")
            raise XenstoreError(name if name in _ERRNAMES else "EIO", f"{name} from store")
        return reply.payload

    # ------------------------------------------------------------ operations

    async def read(self, path: str, tx_id: int = 0) -> bytes:
        return await self.request(XS.READ, wire.join([path]), tx_id)

    async def read_or_none(self, path: str, tx_id: int = 0) -> bytes | None:
        try:
            return await self.read(path, tx_id)
        except XenstoreError as exc:
            if exc.name == "ENOENT":
                return None
            raise

    async def write(self, path: str, value: bytes | str, tx_id: int = 0) -> None:
        raw = value.encode() if isinstance(value, str) else value
        await self.request(XS.WRITE, path.encode() + b"\0" + raw, tx_id)

    async def mkdir(self, path: str, tx_id: int = 0) -> None:
        await self.request(XS.MKDIR, wire.join([path]), tx_id)

    async def rm(self, path: str, tx_id: int = 0) -> None:
        await self.request(XS.RM, wire.join([path]), tx_id)

    async def directory(self, path: str, tx_id: int = 0) -> list[str]:
        payload = await self.request(XS.DIRECTORY, wire.join([path]), tx_id)
        return wire.strings(payload) if payload else []

    async def get_perms(self, path: str, tx_id: int = 0) -> list[str]:
        return wire.strings(await self.request(XS.GET_PERMS, wire.join([path]), tx_id))

    async def set_perms(self, path: str, perms: list[str], tx_id: int = 0) -> None:
        await self.request(XS.SET_PERMS, wire.join([path, *perms]), tx_id)

    async def get_domain_path(self, domid: int) -> str:
        payload = await self.request(XS.GET_DOMAIN_PATH, wire.join([str(domid)]))
        return wire.strings(payload, 1)[0]

    async def transaction_start(self) -> int:
        return int(wire.strings(await self.request(XS.TRANSACTION_START, b"\0"), 1)[0])

    async def transaction_end(self, tx_id: int, commit: bool = True) -> None:
        await self.request(XS.TRANSACTION_END, b"T\0" if commit else b"F\0", tx_id)

    @contextlib.asynccontextmanager
    async def watch(
        self, path: str, buffer: int = 256
    ) -> AsyncIterator[trio.MemoryReceiveChannel]:
        """Watch ``path``; yields a channel of changed paths (first: the registration).

        Events beyond ``buffer`` unread ones are dropped (a watch is a hint to
        re-read, so dropping duplicates is harmless).
        """
        token = f"pvio-{next(self._tokens)}"
        send, receive = trio.open_memory_channel[str](buffer)
        self._watches[token] = send
        try:
            await self.request(XS.WATCH, wire.join([path, token]))
            yield receive
        finally:
            self._watches.pop(token, None)
            if self._closed is None:
                with trio.CancelScope(shield=True), contextlib.suppress(
                    XenstoreError, OSError
                ):
                    await self.request(XS.UNWATCH, wire.join([path, token]))

    async def share_memory(self, kind: str, fd: int) -> None:
        """pvio extension: hand over a sealed memfd (``pool`` or ``gnttab``)."""
        await self.request(wire.PVIO_SHARE_MEMORY, wire.join([kind]), fds=[fd])

    async def hand_over_evtchn(self, port: int, fds: tuple[int, int]) -> None:
        """pvio extension: hand over an unbound port's eventfds (peer's local end first)."""
        await self.request(wire.PVIO_BIND_EVTCHN, wire.join([str(port)]), fds=list(fds))

    async def claim(self, name: str) -> int:
        """pvio extension: become the configured domain ``name``; returns our domid."""
        return int(wire.strings(await self.request(wire.PVIO_CLAIM, wire.join([name])), 1)[0])

    async def capture(self, port: str, fd: int, snaplen: int = 262144) -> None:
        """pvio extension (admin only): mirror switch port ``port`` to SEQPACKET ``fd``."""
        await self.request(wire.PVIO_CAPTURE, wire.join([port, str(snaplen)]), fds=[fd])

    async def aclose(self) -> None:
        self._sock.close()


def _ints(fds: list[int]) -> array.array:
    return array.array("i", fds)


_ERRNAMES = frozenset(XSD_ERRORS)


@contextlib.asynccontextmanager
async def open_client(path: str) -> AsyncIterator[XsClient]:
    """Connect to a store socket; the client lives as long as the block."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.connect(path)
    except OSError as exc:
        sock.close()
        raise ConnectionRefusedError(
            f"cannot connect to the pvio store at {path}: {exc.strerror} "
            "(is `pvio serve` running? pass --socket to point elsewhere)"
        ) from exc
    client = XsClient(sock)
    async with unwrap_single(), trio.open_nursery() as nursery:
        nursery.start_soon(client._reader)
        try:
            yield client
        finally:
            nursery.cancel_scope.cancel()
            sock.close()
