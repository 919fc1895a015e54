"""The XenbusState machine (io/xenbus.h), both sides, as data tables.

Each side reacts to the *peer's* state as observed through the store. A row
says: when the peer is in ``peer`` and we are in one of ``ours``, run
``action`` (a hook the device implements) and move to ``goto``. No matching row
means "nothing to do" (e.g. duplicate watch events). The tables follow the
Linux drivers (xen-blkback ``frontend_changed``, xen-blkfront
``blkback_changed``) and QEMU's xen-bus, and tolerate what hardening.md #14
lists: skipped states (a backend that goes straight to Connected, a frontend
that skips Initialised), duplicates, a frontend that jumps to Closed, a peer
that vanishes (``Unknown``: connection dropped or state node removed, treated
as Closed), and a frontend that re-initialises (the backend goes back to
InitWait).

:func:`render_mermaid` turns the tables into the diagram in specs/xenbus.md.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pvio.layouts import XenbusState as S

ANY = frozenset(S)


class Action(enum.Enum):
    """What a device driver must do on a transition (its hooks)."""

    NONE = "none"
    REINIT = "reinit"  # backend: forget the old connection, republish features
    CONNECT = "connect"  # backend: map rings, bind event channels, start serving
    PUBLISH = "publish"  # frontend: allocate rings, publish ring-ref/event-channel
    ATTACH = "attach"  # frontend: read the backend's info, start using the device
    PUBLISH_ATTACH = "publish+attach"  # frontend: backend skipped InitWait
    DISCONNECT = "disconnect"  # either: stop I/O, unmap, unbind (keep the node)
    RECONFIGURE = "reconfigure"


@dataclass(frozen=True)
class Row:
    peer: S
    ours: frozenset[S]
    action: Action
    goto: S | None  # None: stay


def _s(*states: S) -> frozenset[S]:
    return frozenset(states)


_CONNECTABLE_BACK = _s(S.Initialising, S.InitWait, S.Initialised)

BACKEND_TABLE: tuple[Row, ...] = (
    # A frontend (re)starting from scratch: after a close, go back to InitWait.
    Row(S.Initialising, _s(S.Closing, S.Closed), Action.REINIT, S.InitWait),
    Row(S.Initialising, _s(S.Connected), Action.DISCONNECT, S.InitWait),
    # Transport published (or frontend skipped Initialised and says Connected).
    Row(S.Initialised, _CONNECTABLE_BACK, Action.CONNECT, S.Connected),
    Row(S.Connected, _CONNECTABLE_BACK, Action.CONNECT, S.Connected),
    Row(S.Reconfiguring, _s(S.Connected), Action.RECONFIGURE, S.Reconfigured),
    Row(S.Reconfigured, _s(S.Reconfigured), Action.NONE, S.Connected),
    # Teardown, possibly abrupt.
    Row(S.Closing, ANY - _s(S.Closing, S.Closed), Action.DISCONNECT, S.Closing),
    Row(S.Closed, ANY - _s(S.Closed), Action.DISCONNECT, S.Closed),
    Row(S.Unknown, ANY - _s(S.Closed), Action.DISCONNECT, S.Closed),
)

FRONTEND_TABLE: tuple[Row, ...] = (
    Row(S.InitWait, _s(S.Initialising), Action.PUBLISH, S.Initialised),
    # Backend connected: attach (publishing first if it skipped InitWait).
    Row(S.Connected, _s(S.Initialising), Action.PUBLISH_ATTACH, S.Connected),
    Row(S.Connected, _s(S.InitWait, S.Initialised), Action.ATTACH, S.Connected),
    # A backend that restarted and went back to InitWait: publish again.
    Row(S.InitWait, _s(S.Connected), Action.DISCONNECT, S.Initialising),
    Row(S.Closing, ANY - _s(S.Closed), Action.DISCONNECT, S.Closed),
    Row(S.Closed, ANY - _s(S.Closed), Action.DISCONNECT, S.Closed),
    Row(S.Unknown, ANY - _s(S.Closed), Action.DISCONNECT, S.Closed),
)


def step(table: tuple[Row, ...], ours: S, peer: S) -> tuple[Action, S]:
    """What to do when the peer is seen in ``peer`` while we are in ``ours``."""
    for row in table:
        if row.peer == peer and ours in row.ours:
            return row.action, (row.goto if row.goto is not None else ours)
    return Action.NONE, ours


def parse_state(raw: bytes | None) -> S:
    """A state node's value; missing or malformed counts as ``Unknown``."""
    if raw is None:
        return S.Unknown
    try:
        value = int(raw.strip(b"\0").decode("ascii"))
        return S(value)
    except (ValueError, UnicodeDecodeError):
        return S.Unknown


def render_mermaid(table: tuple[Row, ...], title: str) -> str:
    """A mermaid state diagram of one side's table."""
    lines = [f"%% {title}", "stateDiagram-v2"]
    for row in table:
        label = f"peer={row.peer.name}" + (
            f" / {row.action.value}" if row.action is not Action.NONE else ""
        )
        for ours in sorted(row.ours, key=int):
            goto = row.goto if row.goto is not None else ours
            if goto == ours and row.action is Action.NONE:
                continue
            lines.append(f"    {ours.name} --> {goto.name}: {label}")
    return "\n".join(lines)
