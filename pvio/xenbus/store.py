"""The store: a tree of nodes with xenstore semantics (docs/misc/xenstore.txt).

Sans-I/O: :class:`Store` holds the tree, the watches and the transactions, and
every operation returns its result plus the watch events it fired; sockets and
fds live in :mod:`pvio.xenbus.server`. Errors are :class:`XenstoreError`
carrying the errno *name* that goes on the wire (``xsd_errors[]`` of
io/xs_wire.h).

Semantics follow C xenstored:

* Paths are absolute (``/local/domain/3/device``) or relative to the
  connection's home ``/local/domain/<domid>``; characters are alphanumerics and
  ``-/_@``; at most 3072 bytes absolute (2048 relative); no ``//``, no trailing
  ``/``. Watches may also name the special paths ``@introduceDomain`` and
  ``@releaseDomain``.
* Each node has a permission list: the first entry names the **owner** and the
  access everybody else gets (``n`` none, ``r`` read, ``w`` write, ``b``
  both); later entries grant access to specific domains. The owner and the
  privileged domain 0 always have full access. A new node inherits its
  parent's permissions, with an unprivileged creator becoming the owner.
* ``WRITE`` creates missing parents; ``RM`` removes a subtree (removing a node
  that does not exist succeeds if its parent exists); ``MKDIR`` of an existing
  node succeeds.
* A watch fires once when registered, then for every change of its path or a
  descendant, to connections allowed to read the changed node.
* Transactions see a snapshot; at commit, if any node they read or wrote was
  changed by someone else meanwhile, the commit fails with ``EAGAIN`` and
  nothing is applied.
* Quotas per domain: nodes owned, watches, open transactions; values and
  payloads are bounded by ``XENSTORE_PAYLOAD_MAX``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from pvio.layouts import (
    XENSTORE_ABS_PATH_MAX,
    XENSTORE_PAYLOAD_MAX,
    XENSTORE_REL_PATH_MAX,
    XSD_ERRORS,
)

DOM0 = 0
SPECIAL_WATCH_PATHS = ("@introduceDomain", "@releaseDomain")
_VALID = re.compile(r"^[A-Za-z0-9\-/_@]+$")
_PERM_LETTERS = {"n": (False, False), "r": (True, False), "w": (False, True), "b": (True, True)}


class XenstoreError(Exception):
    """An operation failed; ``name`` is the errno name sent as the ``XS_ERROR`` payload."""

    def __init__(self, name: str, detail: str = "") -> None:
        if name not in XSD_ERRORS:
            raise ValueError(f"{name} is not in xsd_errors[]")
        super().__init__(f"{name}: {detail}" if detail else name)
        self.name = name
        self.detail = detail


@dataclass(frozen=True)
class Perm:
    """One entry of a node's permission list (``n5``, ``r0``, ``b3``...)."""

    domid: int
    read: bool = False
    write: bool = False

    @classmethod
    def parse(cls, text: str) -> Perm:
        if len(text) < 2 or text[0] not in _PERM_LETTERS or not text[1:].isdigit():
            raise XenstoreError("EINVAL", f"bad permission {text!r}")
        domid = int(text[1:])
        if domid > 0xFFFF:
            raise XenstoreError("EINVAL", f"bad domid in permission {text!r}")
        read, write = _PERM_LETTERS[text[0]]
        return cls(domid, read, write)

    def __str__(self) -> str:
        letter = next(k for k, v in _PERM_LETTERS.items() if v == (self.read, self.write))
        return f"{letter}{self.domid}"


@dataclass(frozen=True)
class Node:
    """A node: value, permissions, children names, and the generation of its last change."""

    value: bytes = b""
    perms: tuple[Perm, ...] = (Perm(DOM0),)
    children: tuple[str, ...] = ()
    gen: int = 0

    @property
    def owner(self) -> int:
        return self.perms[0].domid


@dataclass(frozen=True)
class WatchEvent:
    """A ``XS_WATCH_EVENT`` to deliver to connection ``conn``: ``path\\0token\\0``."""

    conn: object
    path: str
    token: str


@dataclass
class Quota:
    """Per-domain limits (C xenstored's defaults)."""

    nodes: int = 1000
    watches: int = 128
    transactions: int = 10
    value_bytes: int = XENSTORE_PAYLOAD_MAX


@dataclass
class _Watch:
    conn: object
    path: str  # as registered (relative or absolute)
    abs_path: str
    token: str


@dataclass
class Transaction:
    tx_id: int
    domid: int
    conn: object
    nodes: dict[str, Node]
    touched: dict[str, int | None] = field(default_factory=dict)  # path -> gen seen (None: absent)
    written: set[str] = field(default_factory=set)


@dataclass(eq=False)
class Connection:
    """What the store knows about one client. Compared by identity: it also
    names the owner of watches and transactions. ``owner`` is free for the
    transport (the server puts its client object there)."""

    domid: int
    privileged: bool = False
    name: str = ""
    owner: object = None

    @property
    def home(self) -> str:
        return f"/local/domain/{self.domid}"


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] or "/"


def _basename(path: str) -> str:
    return path.rsplit("/", 1)[1]


def _is_under(path: str, top: str) -> bool:
    return path == top or top == "/" or path.startswith(top + "/")


class Store:
    """The node tree, watches and transactions of one xenstore."""

    def __init__(self, quota: Quota | None = None) -> None:
        self.quota = quota or Quota()
        self._gen = 1
        self.nodes: dict[str, Node] = {"/": Node(perms=(Perm(DOM0),))}
        self._watches: list[_Watch] = []
        self._transactions: dict[int, Transaction] = {}
        self._next_tx = 1
        self._owned: dict[int, int] = {DOM0: 1}

    # ------------------------------------------------------------ helpers

    def _next_gen(self) -> int:
        self._gen += 1
        return self._gen

    def canonical(self, conn: Connection, path: str, *, watch: bool = False) -> str:
        """Validate ``path`` and make it absolute (relative paths hang off the home)."""
        if watch and path in SPECIAL_WATCH_PATHS:
            return path
        if not path or not _VALID.fullmatch(path) or "//" in path:
            raise XenstoreError("EINVAL", f"invalid path {path!r}")
        if path.startswith("/"):
            if len(path) > XENSTORE_ABS_PATH_MAX:
                raise XenstoreError("EINVAL", "path too long")
            if path != "/" and path.endswith("/"):
                raise XenstoreError("EINVAL", f"trailing slash in {path!r}")
            return path
        if len(path) > XENSTORE_REL_PATH_MAX or path.endswith("/"):
            raise XenstoreError("EINVAL", f"invalid relative path {path!r}")
        return f"{conn.home}/{path}"

    def _can(self, conn: Connection, node: Node, *, write: bool) -> bool:
        if conn.privileged or node.owner == conn.domid:
            return True
        for perm in node.perms[1:]:
            if perm.domid == conn.domid:
                return perm.write if write else perm.read
        default = node.perms[0]
        return default.write if write else default.read

    def _view(self, tx: Transaction | None) -> dict[str, Node]:
        return tx.nodes if tx is not None else self.nodes

    def _touch(self, tx: Transaction | None, path: str) -> None:
        """Record, before a transaction first reads or changes ``path``, the
        generation its snapshot saw; commit compares it with the live tree."""
        if tx is not None and path not in tx.touched:
            node = tx.nodes.get(path)
            tx.touched[path] = node.gen if node is not None else None

    def _get(self, conn: Connection, tx: Transaction | None, path: str, *,
             write: bool = False) -> Node:
        self._touch(tx, path)
        view = self._view(tx)
        node = view.get(path)
        if node is None:
            # Whoever cannot read the deepest existing ancestor may not even
            # learn that the node is missing (C xenstored's ask_parents).
            ancestor = _parent(path)
            while ancestor not in view:
                ancestor = _parent(ancestor)
            if not self._can(conn, view[ancestor], write=False):
                raise XenstoreError("EACCES", path)
            raise XenstoreError("ENOENT", path)
        if not self._can(conn, node, write=write):
            raise XenstoreError("EACCES", path)
        return node

    def _tx(self, conn: Connection, tx_id: int) -> Transaction | None:
        if tx_id == 0:
            return None
        tx = self._transactions.get(tx_id)
        if tx is None or tx.conn is not conn:
            raise XenstoreError("ENOENT", f"no transaction {tx_id}")
        return tx

    def _charge(self, domid: int, delta: int, conn: Connection,
                tx: Transaction | None) -> None:
        if tx is not None:  # counted again when the transaction commits
            return
        count = self._owned.get(domid, 0) + delta
        if delta > 0 and not conn.privileged and count > self.quota.nodes:
            raise XenstoreError("ENOSPC", f"dom{domid} owns too many nodes")
        self._owned[domid] = count

    # --------------------------------------------------------- operations

    def read(self, conn: Connection, path: str, tx_id: int = 0) -> bytes:
        return self._get(conn, self._tx(conn, tx_id), self.canonical(conn, path)).value

    def directory(self, conn: Connection, path: str, tx_id: int = 0) -> list[str]:
        return list(self._get(conn, self._tx(conn, tx_id), self.canonical(conn, path)).children)

    def get_perms(self, conn: Connection, path: str, tx_id: int = 0) -> list[Perm]:
        return list(self._get(conn, self._tx(conn, tx_id), self.canonical(conn, path)).perms)

    def _create(self, conn: Connection, tx: Transaction | None, path: str,
                events: list[str]) -> None:
        """Create ``path`` and any missing ancestors (write access to the deepest existing one)."""
        view = self._view(tx)
        missing = []
        p = path
        while True:
            self._touch(tx, p)
            if p in view:
                break
            missing.append(p)
            p = _parent(p)
        parent = view[p]
        if not self._can(conn, parent, write=True):
            raise XenstoreError("EACCES", p)
        owner = parent.owner if conn.privileged else conn.domid
        if (tx is None and not conn.privileged
                and self._owned.get(owner, 0) + len(missing) > self.quota.nodes):
            raise XenstoreError("ENOSPC", f"dom{owner} owns too many nodes")
        for p in reversed(missing):
            parent = view[_parent(p)]
            perms = parent.perms
            if not conn.privileged:
                perms = (replace(perms[0], domid=conn.domid), *perms[1:])
            self._charge(perms[0].domid, 1, conn, tx)
            gen = self._next_gen()
            view[p] = Node(perms=perms, gen=gen)
            view[_parent(p)] = replace(parent, children=(*parent.children, _basename(p)),
                                       gen=gen)
            self._written(tx, p, _parent(p))
            events.append(p)

    def _written(self, tx: Transaction | None, *paths: str) -> None:
        if tx is not None:
            tx.written.update(paths)

    def write(self, conn: Connection, path: str, value: bytes, tx_id: int = 0) -> list[WatchEvent]:
        if len(value) > self.quota.value_bytes:
            raise XenstoreError("E2BIG", "value too large")
        tx = self._tx(conn, tx_id)
        path = self.canonical(conn, path)
        events: list[str] = []
        view = self._view(tx)
        self._touch(tx, path)
        if path not in view:
            self._create(conn, tx, path, events)
        node = self._get(conn, tx, path, write=True)
        view[path] = replace(node, value=bytes(value), gen=self._next_gen())
        self._written(tx, path)
        events.append(path)
        return self._fire(events) if tx is None else []

    def mkdir(self, conn: Connection, path: str, tx_id: int = 0) -> list[WatchEvent]:
        tx = self._tx(conn, tx_id)
        path = self.canonical(conn, path)
        self._touch(tx, path)
        if path in self._view(tx):
            self._get(conn, tx, path, write=True)  # as C's do_mkdir: EACCES without write
            return []
        events: list[str] = []
        self._create(conn, tx, path, events)
        return self._fire(events) if tx is None else []

    def rm(self, conn: Connection, path: str, tx_id: int = 0) -> list[WatchEvent]:
        tx = self._tx(conn, tx_id)
        path = self.canonical(conn, path)
        if path == "/":
            raise XenstoreError("EINVAL", "cannot remove /")
        view = self._view(tx)
        self._touch(tx, path)
        parent_path = _parent(path)
        self._touch(tx, parent_path)
        if path not in view:
            if parent_path in view:
                # "Removing" a missing node succeeds, but only for whoever may
                # learn it is missing (C's do_rm).
                if not self._can(conn, view[parent_path], write=False):
                    raise XenstoreError("EACCES", path)
                return []
            self._get(conn, tx, path)  # ENOENT, or EACCES under an unreadable ancestor
        self._get(conn, tx, path, write=True)
        removed = {p: view[p] for p in view if _is_under(p, path)}
        for p, node in removed.items():
            self._touch(tx, p)
            self._charge(node.owner, -1, conn, tx)
            del view[p]
        parent = view[parent_path]
        name = _basename(path)
        view[parent_path] = replace(
            parent, children=tuple(c for c in parent.children if c != name), gen=self._next_gen()
        )
        self._written(tx, parent_path, *removed)
        return self._fire([path], removed=removed) if tx is None else []

    def set_perms(self, conn: Connection, path: str, perms: Iterable[str | Perm],
                  tx_id: int = 0) -> list[WatchEvent]:
        tx = self._tx(conn, tx_id)
        path = self.canonical(conn, path)
        parsed = tuple(p if isinstance(p, Perm) else Perm.parse(p) for p in perms)
        if not parsed:
            raise XenstoreError("EINVAL", "empty permission list")
        node = self._get(conn, tx, path, write=True)
        if not (conn.privileged or node.owner == conn.domid):
            raise XenstoreError("EACCES", f"only the owner may change permissions of {path}")
        if parsed[0].domid != node.owner:
            self._charge(parsed[0].domid, 1, conn, tx)
            self._charge(node.owner, -1, conn, tx)
        self._view(tx)[path] = replace(node, perms=parsed, gen=self._next_gen())
        self._written(tx, path)
        return self._fire([path]) if tx is None else []

    # ------------------------------------------------------------ watches

    def watch(self, conn: Connection, path: str, token: str) -> list[WatchEvent]:
        """Register a watch; returns the event it fires on registration."""
        abs_path = self.canonical(conn, path, watch=True)
        mine = [w for w in self._watches if w.conn is conn]
        if any(w.path == path and w.token == token for w in mine):
            raise XenstoreError("EEXIST", f"watch {path} {token}")
        if not conn.privileged and len(mine) >= self.quota.watches:
            raise XenstoreError("E2BIG", "too many watches")
        self._watches.append(_Watch(conn, path, abs_path, token))
        return [WatchEvent(conn, path, token)]

    def unwatch(self, conn: Connection, path: str, token: str) -> None:
        self.canonical(conn, path, watch=True)
        for i, w in enumerate(self._watches):
            if w.conn is conn and w.path == path and w.token == token:
                del self._watches[i]
                return
        raise XenstoreError("ENOENT", f"no watch {path} {token}")

    def reset_watches(self, conn: Connection) -> None:
        self._watches = [w for w in self._watches if w.conn is not conn]

    def watch_count(self, conn: Connection) -> int:
        return sum(1 for w in self._watches if w.conn is conn)

    def _fire(self, changed: Iterable[str],
              removed: dict[str, Node] | None = None) -> list[WatchEvent]:
        """Watch events for changed paths, to watchers that may read the node.

        ``removed`` (the nodes a removal deleted, by path) marks a removal: it
        also fires the watches set *below* the removed node, with the watched
        path (as C xenstored does, so a watcher of ``.../state`` learns that its
        node went away); permissions are then those of the removed nodes.
        Special paths (``@introduceDomain``...) go to privileged watchers of
        exactly that path.
        """
        events: list[WatchEvent] = []
        gone = removed or {}
        for changed_path in dict.fromkeys(changed):  # each path once, in order
            for w in self._watches:
                wconn = w.conn
                if changed_path.startswith("@") or w.abs_path.startswith("@"):
                    if w.abs_path == changed_path and wconn.privileged:
                        events.append(WatchEvent(wconn, changed_path, w.token))
                    continue
                if _is_under(changed_path, w.abs_path):
                    path = changed_path
                elif removed is not None and _is_under(w.abs_path, changed_path):
                    path = w.abs_path
                else:
                    continue
                node = gone.get(path) or self.nodes.get(path) or gone.get(changed_path)
                if node is None:
                    if not wconn.privileged:
                        continue
                elif not self._can(wconn, node, write=False):
                    continue
                shown = path
                if not w.path.startswith("/") and path.startswith(wconn.home + "/"):
                    shown = path[len(wconn.home) + 1 :]
                events.append(WatchEvent(wconn, shown, w.token))
        return events

    def fire_special(self, name: str) -> list[WatchEvent]:
        """Fire ``@introduceDomain`` / ``@releaseDomain``."""
        return self._fire([name])

    # ------------------------------------------------------- transactions

    def transaction_start(self, conn: Connection) -> int:
        mine = sum(1 for t in self._transactions.values() if t.conn is conn)
        if not conn.privileged and mine >= self.quota.transactions:
            raise XenstoreError("ENOSPC", "too many open transactions")
        tx_id = self._next_tx
        self._next_tx = (self._next_tx % 0xFFFFFFFF) + 1
        self._transactions[tx_id] = Transaction(tx_id, conn.domid, conn, dict(self.nodes))
        return tx_id

    def transaction_end(self, conn: Connection, tx_id: int, commit: bool) -> list[WatchEvent]:
        tx = self._tx(conn, tx_id)
        if tx is None:
            raise XenstoreError("ENOENT", "TRANSACTION_END needs a transaction id")
        del self._transactions[tx_id]
        if not commit:
            return []
        for path, gen in tx.touched.items():
            node = self.nodes.get(path)
            if (node.gen if node is not None else None) != gen:
                raise XenstoreError("EAGAIN", f"{path} changed during the transaction")
        owned = self._count_owned(
            {p: n for p, n in self.nodes.items() if p not in tx.written}
            | {p: tx.nodes[p] for p in tx.written if p in tx.nodes}
        )
        if not conn.privileged and owned.get(conn.domid, 0) > self.quota.nodes:
            raise XenstoreError("ENOSPC", f"dom{conn.domid} would own too many nodes")
        removed = {p: self.nodes[p] for p in tx.written
                   if p not in tx.nodes and p in self.nodes}
        for path in tx.written:
            if path in tx.nodes:
                self.nodes[path] = tx.nodes[path]
            else:
                self.nodes.pop(path, None)
        self._owned = owned
        return self._fire(sorted(p for p in tx.written if p in tx.nodes)) + self._fire(
            sorted(removed), removed=removed
        )

    @staticmethod
    def _count_owned(nodes: dict[str, Node]) -> dict[int, int]:
        owned: dict[int, int] = {}
        for node in nodes.values():
            owned[node.owner] = owned.get(node.owner, 0) + 1
        return owned

    def open_transactions(self, conn: Connection) -> int:
        return sum(1 for t in self._transactions.values() if t.conn is conn)

    def release(self, conn: Connection) -> None:
        """Forget a connection: its watches and open transactions."""
        self.reset_watches(conn)
        for tx_id in [t for t, tx in self._transactions.items() if tx.conn is conn]:
            del self._transactions[tx_id]

    # ---------------------------------------------------------- privileged

    def ensure(self, path: str, value: bytes | None = None,
               perms: Iterable[str] | None = None) -> list[WatchEvent]:
        """As domain 0: create/overwrite ``path`` and optionally set its permissions."""
        root = Connection(DOM0, privileged=True)
        events = self.write(root, path, value or b"") if value is not None else self.mkdir(
            root, path
        )
        if perms is not None:
            events += self.set_perms(root, path, list(perms))
        return events

    def remove_tree(self, path: str) -> list[WatchEvent]:
        """As domain 0: remove ``path`` if it exists."""
        return self.rm(Connection(DOM0, privileged=True), path)
