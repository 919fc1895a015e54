"""The store server: xs_wire over Unix stream sockets, domains, fd hand-over (trio).

Two sockets, as on Xen:

* the **admin** socket is xenstored's own socket: every connection is domain 0,
  privileged (Xen's tools and ``pvio status`` use it);
* the **guest** socket plays ``/dev/xen/xenbus``: every connection *is* a new
  unprivileged domain with its own domid and home ``/local/domain/<domid>``
  (holding ``domid`` and ``name``), released when the connection closes.

Hardening (hardening.md #15, #16, #18, #19): sockets are 0600 in a 0700
directory; ``SO_PEERCRED`` is logged and checked against allowed uids;
``recvmsg`` uses ``MSG_CMSG_CLOEXEC``, a truncated ancillary buffer
(``MSG_CTRUNC``) drops the connection, a message gets exactly the fds its type
expects and all others are closed; each connection has a bounded outbound
queue (a client that does not read its watch events is dropped) and the
store's quotas.
"""

from __future__ import annotations

import array
import contextlib
import errno
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from pvio._log import RateLimitedLogger
from pvio.layouts import XENSTORE_PAYLOAD_MAX
from pvio.ring.errors import LocalProtocolError, SharedMemoryError
from pvio.ring.grant import GrantMapper
from pvio.ring.shm import SharedMemory
from pvio.xenbus import wire
from pvio.xenbus.dispatch import dispatch
from pvio.xenbus.store import DOM0, Connection, Store, WatchEvent, XenstoreError
from pvio.xenbus.wire import Message, WireError

log = logging.getLogger("pvio.store")
peer_log = RateLimitedLogger(log)

RECV_CHUNK = 65536
OUTBOUND_QUEUE = 256  # replies + watch events buffered per connection
FD_CMSG_SPACE = socket.CMSG_SPACE(wire.MAX_FDS * 4)


@dataclass(frozen=True)
class PeerCred:
    pid: int
    uid: int
    gid: int

    @classmethod
    def of(cls, sock) -> PeerCred:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return cls(*struct.unpack("3i", raw))


@dataclass(eq=False)
class Domain:
    """A guest domain: one guest-socket connection and what it handed over."""

    domid: int
    cred: PeerCred
    memory: dict[str, SharedMemory] = field(default_factory=dict)
    evtchn_fds: dict[int, tuple[int, int]] = field(default_factory=dict)
    name: str = ""
    claimed: bool = False
    _mapper: GrantMapper | None = None

    def mapper(self) -> GrantMapper:
        """The domain's grant mapper (one per domain, so pins are counted once).

        Raises XenstoreError(ENOENT) until the pool and grant table arrived.
        """
        if self._mapper is None:
            try:
                table, pool = self.memory["gnttab"], self.memory["pool"]
            except KeyError as exc:
                raise XenstoreError(
                    "ENOENT", f"dom{self.domid} has not handed over its {exc}"
                ) from exc
            self._mapper = GrantMapper(table, pool, DOM0)
        return self._mapper

    def close(self) -> None:
        if self._mapper is not None:
            self._mapper.close()
            self._mapper = None
        for kind, shm in self.memory.items():
            try:
                shm.close()
            except LocalProtocolError as exc:  # still referenced: leak it, keep serving
                log.error("dom%d: cannot unmap its %s yet: %s", self.domid, kind, exc)
        self.memory.clear()
        for fds in self.evtchn_fds.values():
            for fd in fds:
                os.close(fd)
        self.evtchn_fds.clear()


@dataclass(eq=False)
class LocalWatcher:
    """A watch owner inside the daemon (backends): events arrive on a channel."""

    name: str
    send: trio.MemorySendChannel
    receive: trio.MemoryReceiveChannel


class _Client:
    def __init__(self, sock, conn: Connection, cred: PeerCred, domain: Domain | None) -> None:
        self.sock = sock
        self.conn = conn
        self.cred = cred
        self.domain = domain
        self.send, self.outbox = trio.open_memory_channel[Message](OUTBOUND_QUEUE)
        self.cancel = trio.CancelScope()
        self.fds: list[int] = []

    def __repr__(self) -> str:
        who = f"dom{self.conn.domid}"
        return f"{who} (pid {self.cred.pid}, uid {self.cred.uid})"


DomainHook = Callable[[Domain], Awaitable[None]]
ClaimHook = Callable[[Domain, str], Awaitable[None]]


class XenstoreServer:
    """Serves one :class:`Store` on an admin and a guest socket."""

    def __init__(self, store: Store | None = None, *, admin_uids: set[int] | None = None,
                 guest_uids: set[int] | None = None, max_domains: int = 1024) -> None:
        self.store = store or Store()
        self.admin_uids = admin_uids if admin_uids is not None else {0, os.getuid()}
        self.guest_uids = guest_uids  # None: anyone who can reach the socket
        self.max_domains = max_domains
        self.domains: dict[int, Domain] = {}
        self.on_claim: ClaimHook | None = None
        #: ``pvio net capture``: (port name, socket fd, snaplen) -> None; owns the fd or raises.
        self.on_capture: Callable[[str, int, int], None] | None = None
        self.on_domain_down: list[DomainHook] = []
        self._clients: set[_Client] = set()
        self.store.ensure("/local/domain/0/name", b"Domain-0")
        self.store.ensure("/local/domain/0/domid", b"0")

    # ------------------------------------------------------------ sockets

    @staticmethod
    async def _listen(path: str):
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, mode=0o700, exist_ok=True)
        st = os.stat(directory)
        if stat.S_IMODE(st.st_mode) & 0o077:
            os.chmod(directory, 0o700)
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
        except FileNotFoundError:
            pass
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            await sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        sock.listen(128)
        return sock

    async def serve(self, admin_path: str, guest_path: str, *,
                    task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Listen on both sockets until cancelled."""
        admin, guest = await self._listen(admin_path), await self._listen(guest_path)
        log.info("store listening: admin %s, guest %s", admin_path, guest_path)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._accept_loop, admin, True)
                nursery.start_soon(self._accept_loop, guest, False)
                task_status.started()
        finally:
            admin.close()
            guest.close()
            for path in (admin_path, guest_path):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)

    async def _accept_loop(self, listener, privileged: bool) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    sock, _ = await listener.accept()
                except OSError as exc:  # EMFILE and friends: back off, keep serving
                    log.warning("accept failed: %s", exc)
                    await trio.sleep(0.1)
                    continue
                nursery.start_soon(self._run_client, sock, privileged)

    # ------------------------------------------------------------ domains

    def _alloc_domid(self) -> int:
        for domid in range(1, self.max_domains + 1):
            if domid not in self.domains:
                return domid
        raise XenstoreError("ENOSPC", "no free domain id")

    async def _introduce(self, cred: PeerCred) -> Domain:
        domid = self._alloc_domid()
        domain = Domain(domid, cred, name=f"pvio-{domid}")
        self.domains[domid] = domain
        home = f"/local/domain/{domid}"
        self.apply(self.store.ensure(home, None, [f"n{domid}"]))
        self.apply(self.store.ensure(f"{home}/domid", str(domid).encode(), ["n0", f"r{domid}"]))
        self.apply(self.store.ensure(f"{home}/name", domain.name.encode(), ["n0", f"r{domid}"]))
        self.apply(self.store.fire_special("@introduceDomain"))
        log.info("dom%d introduced (pid %d, uid %d)", domid, cred.pid, cred.uid)
        return domain

    async def _release(self, domain: Domain) -> None:
        for hook in self.on_domain_down:
            try:
                await hook(domain)
            except Exception:  # a device's cleanup must not stop the others
                log.exception("dom%d: device cleanup failed", domain.domid)
        self.apply(self.store.remove_tree(f"/local/domain/{domain.domid}"))
        self.apply(self.store.fire_special("@releaseDomain"))
        domain.close()
        del self.domains[domain.domid]
        log.info("dom%d released", domain.domid)

    # -------------------------------------------------- local (dom0) access

    def apply(self, events: list[WatchEvent]) -> None:
        """Deliver watch events produced by a store operation."""
        for event in events:
            target = event.conn.owner
            if isinstance(target, _Client):
                self._queue(target, wire.watch_event(event.path, event.token))
            elif isinstance(target, LocalWatcher):
                try:
                    target.send.send_nowait((event.path, event.token))
                except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                    log.warning("local watcher %s is not keeping up", target.name)

    def local_store(self, name: str) -> LocalStore:
        """Privileged in-process store access for a backend, with its own watches."""
        return LocalStore(self, name)

    # ------------------------------------------------------------ clients

    def _queue(self, client: _Client, msg: Message) -> None:
        try:
            client.send.send_nowait(msg)
        except trio.WouldBlock:
            peer_log.warning(f"outbox:{client.conn.domid}",
                             "%s: not reading its replies/events; disconnecting", client)
            client.cancel.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def _run_client(self, sock, privileged: bool) -> None:
        with sock:
            try:
                cred = PeerCred.of(sock)
            except OSError:
                return
            allowed = self.admin_uids if privileged else self.guest_uids
            if allowed is not None and cred.uid not in allowed:
                peer_log.warning(f"uid:{cred.uid}", "refused %s connection from uid %d (pid %d)",
                                 "admin" if privileged else "guest", cred.uid, cred.pid)
                return
            domain = None
            if privileged:
                conn = Connection(DOM0, privileged=True, name=f"admin pid {cred.pid}")
                log.debug("admin connection from pid %d uid %d", cred.pid, cred.uid)
            else:
                try:
                    domain = await self._introduce(cred)
                except XenstoreError as exc:
                    log.warning("refused guest pid %d: %s", cred.pid, exc)
                    return
                conn = Connection(domain.domid, name=f"dom{domain.domid}")
            client = _Client(sock, conn, cred, domain)
            conn.owner = client
            self._clients.add(client)
            try:
                with client.cancel:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._writer, client)
                        await self._reader(client)
                        nursery.cancel_scope.cancel()
            finally:
                self._clients.discard(client)
                for fd in client.fds:
                    os.close(fd)
                client.fds.clear()
                self.store.release(conn)
                if domain is not None:
                    with trio.CancelScope(shield=True):
                        await self._release(domain)

    async def _writer(self, client: _Client) -> None:
        async for msg in client.outbox:
            try:
                await _sendall(client.sock, msg.encode())
            except OSError:
                client.cancel.cancel()
                return

    async def _recv_exact(self, client: _Client, n: int) -> bytes | None:
        """Read exactly ``n`` bytes (None at EOF), collecting fds that come with them.

        Reading one message at a time (header, then payload) ties each
        ``SCM_RIGHTS`` batch to the message whose first byte it came with, even
        when a client pipelines several messages.
        """
        buf = bytearray()
        while len(buf) < n:
            data, ancdata, flags, _ = await client.sock.recvmsg(
                n - len(buf), FD_CMSG_SPACE, socket.MSG_CMSG_CLOEXEC
            )
            client.fds.extend(_fds_from(ancdata))
            if flags & socket.MSG_CTRUNC:
                raise WireError("sent more fds than any message carries")
            if len(client.fds) > wire.MAX_FDS:
                raise WireError("sent more fds than its message takes")
            if not data:
                return None
            buf += data
        return bytes(buf)

    async def _reader(self, client: _Client) -> None:
        max_payload = XENSTORE_PAYLOAD_MAX
        while True:
            try:
                header = await self._recv_exact(client, wire.HEADER.size)
                if header is None:
                    return
                mtype, req_id, tx_id, length = wire.HEADER.unpack(header)
                if length > max_payload:
                    raise WireError(f"payload of {length} bytes exceeds {max_payload}")
                payload = await self._recv_exact(client, length) if length else b""
                if payload is None:
                    return
            except OSError:
                return
            except WireError as exc:
                peer_log.warning(f"wire:{client.conn.domid}", "%s: %s; disconnecting",
                                 client, exc)
                return
            await self._handle(client, Message(mtype, req_id, tx_id, payload))
            if client.fds:  # fds no message claimed
                self._close_fds(client, len(client.fds))

    def _close_fds(self, client: _Client, n: int) -> None:
        for fd in client.fds[:n]:
            os.close(fd)
        del client.fds[:n]

    async def _handle(self, client: _Client, msg: Message) -> None:
        expected = wire.FDS_EXPECTED.get(msg.type, 0)
        if msg.type == wire.PVIO_CLAIM and not client.fds:
            await self._claim(client, msg)
            return
        if expected == 0:
            if client.fds:
                self._close_fds(client, len(client.fds))
                self._queue(client, wire.error(msg, "EINVAL"))
                return
            reply, events = dispatch(self.store, client.conn, msg)
            self._queue(client, reply)
            self.apply(events)
            return
        if msg.type == wire.PVIO_CAPTURE and client.domain is None and \
                len(client.fds) == expected:
            fd = client.fds.pop(0)
            try:
                args = msg.payload.split(b"\0")[:-1]
                if len(args) not in (1, 2) or (len(args) == 2 and not args[1].isdigit()):
                    raise XenstoreError("EINVAL", "capture payload: port[, snaplen]")
                port = args[0].decode("utf-8", "replace")
                snaplen = int(args[1]) if len(args) == 2 else 262144
                if self.on_capture is None:
                    raise XenstoreError("ENOENT", "this store has no switch")
                self.on_capture(port, fd, snaplen)
            except (XenstoreError, ValueError) as exc:
                os.close(fd)
                name = exc.name if isinstance(exc, XenstoreError) else "EINVAL"
                self._queue(client, wire.error(msg, name))
                return
            self._queue(client, wire.ok(msg))
            return
        if len(client.fds) != expected or client.domain is None or \
                msg.type == wire.PVIO_CAPTURE:
            self._close_fds(client, len(client.fds))
            self._queue(client, wire.error(msg, "EINVAL"))
            return
        fds = client.fds[:expected]
        del client.fds[:expected]
        try:
            self._take_fds(client.domain, msg, fds)
        except XenstoreError as exc:
            self._queue(client, wire.error(msg, exc.name))
            return
        self._queue(client, wire.ok(msg))

    async def _claim(self, client: _Client, msg: Message) -> None:
        domain = client.domain
        try:
            if domain is None:
                raise XenstoreError("EINVAL", "admin connections are domain 0")
            try:
                (name,) = wire.strings(msg.payload, 1)
            except ValueError as exc:
                raise XenstoreError("EINVAL", str(exc)) from exc
            if domain.claimed:
                raise XenstoreError("EISCONN", f"dom{domain.domid} is already {domain.name}")
            if self.on_claim is None:
                raise XenstoreError("ENOENT", "this store has no configured domains")
            try:
                await self.on_claim(domain, name)
            except XenstoreError:
                raise
            except Exception as exc:  # a daemon bug must cost one claim, not the daemon
                log.exception("dom%d: claim of %r failed", domain.domid, name)
                raise XenstoreError("EIO", f"claim failed: {exc}") from exc
        except XenstoreError as exc:
            peer_log.info(f"claim:{client.cred.uid}", "%s: claim refused: %s", client, exc)
            self._queue(client, wire.error(msg, exc.name))
            return
        domain.claimed = True
        domain.name = name
        self.apply(self.store.ensure(f"/local/domain/{domain.domid}/name", name.encode(),
                                     ["n0", f"r{domain.domid}"]))
        self._queue(client, wire.reply(msg, f"{domain.domid}\0".encode()))

    def _take_fds(self, domain: Domain, msg: Message, fds: list[int]) -> None:
        """Adopt handed-over fds, or close them all and raise."""
        try:
            if msg.type == wire.PVIO_SHARE_MEMORY:
                (kind,) = wire.strings(msg.payload, 1)
                if kind not in ("pool", "gnttab"):
                    raise XenstoreError("EINVAL", f"unknown memory kind {kind!r}")
                if kind in domain.memory:
                    raise XenstoreError("EEXIST", f"{kind} already handed over")
                fd = fds.pop()
                try:
                    domain.memory[kind] = SharedMemory.from_fd(
                        fd, name=f"dom{domain.domid} {kind}"
                    )
                except SharedMemoryError as exc:
                    peer_log.warning(f"shm:{domain.domid}", "dom%d: %s", domain.domid, exc)
                    raise XenstoreError("EINVAL", str(exc)) from exc
            elif msg.type == wire.PVIO_BIND_EVTCHN:
                (port,) = wire.strings(msg.payload, 1)
                if not port.isdigit() or not 0 < int(port) < 4096:
                    raise XenstoreError("EINVAL", f"bad port {port!r}")
                old = domain.evtchn_fds.pop(int(port), None)
                if old is not None:  # the guest reused an unbound port: replace it
                    for fd in old:
                        os.close(fd)
                for fd in fds:
                    if not _is_eventfd(fd):
                        raise XenstoreError("EINVAL", "event channel fds must be eventfds")
                domain.evtchn_fds[int(port)] = (fds[0], fds[1])
                fds.clear()
        except ValueError as exc:
            raise XenstoreError("EINVAL", str(exc)) from exc
        finally:
            for fd in fds:
                os.close(fd)

    async def drain(self, timeout: float = 2.0) -> None:
        """Wait (bounded) until every client's queued replies and events are sent."""
        with trio.move_on_after(timeout):
            while any(c.send.statistics().current_buffer_used for c in self._clients):
                await trio.sleep(0.01)


def _fds_from(ancdata) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - (len(data) % arr.itemsize)])
            fds.extend(arr)
    return fds


def _is_eventfd(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise


async def _sendall(sock, data: bytes) -> None:
    view = memoryview(data)
    while view:
        sent = await sock.send(view)
        view = view[sent:]


class LocalStore:
    """Domain 0's in-process store access (the daemon's backends).

    Offers the async methods of :class:`~pvio.xenbus.client.XsClient` that
    device code uses, so a device runs the same against either; watch events
    are delivered through the server like any client's.
    """

    def __init__(self, server: XenstoreServer, name: str, buffer: int = 1024) -> None:
        self.server = server
        self.store = server.store
        self.send, self.events = trio.open_memory_channel[tuple[str, str]](buffer)
        self.watcher = LocalWatcher(name, self.send, self.events)
        self.conn = Connection(DOM0, privileged=True, name=name, owner=self.watcher)

    async def read_or_none(self, path: str) -> bytes | None:
        try:
            return self.store.read(self.conn, path)
        except XenstoreError as exc:
            if exc.name == "ENOENT":
                return None
            raise

    async def write(self, path: str, value: bytes | str) -> None:
        raw = value.encode() if isinstance(value, str) else value
        self.server.apply(self.store.write(self.conn, path, raw))

    async def set_perms(self, path: str, perms: list[str]) -> None:
        self.server.apply(self.store.set_perms(self.conn, path, perms))

    async def rm(self, path: str) -> None:
        self.server.apply(self.store.rm(self.conn, path))

    def watch(self, path: str, token: str) -> None:
        self.server.apply(self.store.watch(self.conn, path, token))

    def close(self) -> None:
        self.store.release(self.conn)
        self.send.close()
