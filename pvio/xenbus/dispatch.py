"""Requests to store operations: one function per ``XS_*`` type, sans-I/O.

:func:`dispatch` takes a parsed :class:`~pvio.xenbus.wire.Message` from a
connection and returns the reply plus the watch events it fired. A malformed
request gets an ``XS_ERROR`` reply (``EINVAL``), an unknown type ``ENOSYS``,
a type only the toolstack may use ``EACCES``; nothing a client sends raises
out of here except :class:`~pvio.xenbus.wire.WireError` (which the caller
answers by dropping the connection).
"""

from __future__ import annotations

from collections.abc import Callable

from pvio.layouts import XENSTORE_PAYLOAD_MAX
from pvio.layouts import XsdSockmsgType as XS
from pvio.xenbus import wire
from pvio.xenbus.store import Connection, Store, WatchEvent, XenstoreError
from pvio.xenbus.wire import Message

Result = tuple[Message, list[WatchEvent]]


def _one(msg: Message) -> str:
    return wire.strings(msg.payload, 1)[0]


def _read(store: Store, conn: Connection, msg: Message) -> Result:
    return wire.reply(msg, store.read(conn, _one(msg), msg.tx_id)), []


def _write(store: Store, conn: Connection, msg: Message) -> Result:
    path, value = wire.strings(msg.payload, last_raw=True)
    return wire.ok(msg), store.write(conn, path, value, msg.tx_id)


def _mkdir(store: Store, conn: Connection, msg: Message) -> Result:
    return wire.ok(msg), store.mkdir(conn, _one(msg), msg.tx_id)


def _rm(store: Store, conn: Connection, msg: Message) -> Result:
    return wire.ok(msg), store.rm(conn, _one(msg), msg.tx_id)


def _directory(store: Store, conn: Connection, msg: Message) -> Result:
    return wire.reply(msg, wire.join(store.directory(conn, _one(msg), msg.tx_id))), []


def _directory_part(store: Store, conn: Connection, msg: Message) -> Result:
    """``XS_DIRECTORY_PART path\\0offset\\0``: generation, then children from offset."""
    path, offset = wire.strings(msg.payload, 2)
    if not offset.isdigit():
        raise ValueError("offset must be a decimal number")
    children = store.directory(conn, path, msg.tx_id)
    gen = store.nodes.get(store.canonical(conn, path))
    body, start = [], int(offset)
    used = 0
    for name in children[start:]:
        if used + len(name) + 1 > 4096 - 32:
            break
        body.append(name)
        used += len(name) + 1
    done = start + len(body) >= len(children)
    payload = wire.join([str(gen.gen if gen else 0), *body]) + (b"\0" if done else b"")
    return wire.reply(msg, payload), []


def _get_perms(store: Store, conn: Connection, msg: Message) -> Result:
    perms = store.get_perms(conn, _one(msg), msg.tx_id)
    return wire.reply(msg, wire.join(str(p) for p in perms)), []


def _set_perms(store: Store, conn: Connection, msg: Message) -> Result:
    path, *perms = wire.strings(msg.payload)
    return wire.ok(msg), store.set_perms(conn, path, perms, msg.tx_id)


def _watch(store: Store, conn: Connection, msg: Message) -> Result:
    path, token = wire.strings(msg.payload, 2)
    return wire.ok(msg), store.watch(conn, path, token)


def _unwatch(store: Store, conn: Connection, msg: Message) -> Result:
    path, token = wire.strings(msg.payload, 2)
    store.unwatch(conn, path, token)
    return wire.ok(msg), []


def _reset_watches(store: Store, conn: Connection, msg: Message) -> Result:
    store.reset_watches(conn)
    return wire.ok(msg), []


def _transaction_start(store: Store, conn: Connection, msg: Message) -> Result:
    if msg.tx_id:
        raise XenstoreError("EBUSY", "nested transactions are not supported")
    tx_id = store.transaction_start(conn)
    return wire.reply(msg, f"{tx_id}\0".encode()), []


def _transaction_end(store: Store, conn: Connection, msg: Message) -> Result:
    verdict = _one(msg)
    if verdict not in ("T", "F"):
        raise ValueError("TRANSACTION_END takes T or F")
    events = store.transaction_end(conn, msg.tx_id, verdict == "T")
    return wire.ok(msg), events


def _get_domain_path(store: Store, conn: Connection, msg: Message) -> Result:
    domid = _one(msg)
    if not domid.isdigit() or int(domid) > 0xFFFF:
        raise ValueError("bad domid")
    return wire.reply(msg, f"/local/domain/{int(domid)}\0".encode()), []


def _control(store: Store, conn: Connection, msg: Message) -> Result:
    if not conn.privileged:
        raise XenstoreError("EACCES", "XS_CONTROL is for domain 0")
    args = wire.strings(msg.payload) if msg.payload else []
    if args[:1] == ["print"]:
        return wire.ok(msg), []
    raise XenstoreError("EINVAL", "unsupported control command")


HANDLERS: dict[int, Callable[[Store, Connection, Message], Result]] = {
    XS.READ: _read,
    XS.WRITE: _write,
    XS.MKDIR: _mkdir,
    XS.RM: _rm,
    XS.DIRECTORY: _directory,
    XS.DIRECTORY_PART: _directory_part,
    XS.GET_PERMS: _get_perms,
    XS.SET_PERMS: _set_perms,
    XS.WATCH: _watch,
    XS.UNWATCH: _unwatch,
    XS.RESET_WATCHES: _reset_watches,
    XS.TRANSACTION_START: _transaction_start,
    XS.TRANSACTION_END: _transaction_end,
    XS.GET_DOMAIN_PATH: _get_domain_path,
    XS.CONTROL: _control,
}

#: Toolstack operations on real Xen; pvio's daemon does their work itself.
TOOLSTACK_ONLY = {XS.INTRODUCE, XS.RELEASE, XS.RESUME, XS.SET_TARGET,
                  XS.IS_DOMAIN_INTRODUCED}


def dispatch(store: Store, conn: Connection, msg: Message) -> Result:
    """Answer one request. Never raises for bad client input."""
    handler = HANDLERS.get(msg.type)
    try:
        if handler is None:
            if msg.type in TOOLSTACK_ONLY:
                raise XenstoreError("EACCES", f"{msg.type_name} is done by the pvio daemon")
            raise XenstoreError("ENOSYS", f"unknown message {msg.type_name}")
        reply, events = handler(store, conn, msg)
        if len(reply.payload) > XENSTORE_PAYLOAD_MAX:
            raise XenstoreError("E2BIG", "reply would exceed XENSTORE_PAYLOAD_MAX")
        return reply, events
    except XenstoreError as exc:
        return wire.error(msg, exc.name), []
    except ValueError:
        return wire.error(msg, "EINVAL"), []
