"""pvio.ring: Xen-exact shared memory, rings, grant tables and event channels.

No protocol knowledge lives here and no trio in the mechanics (only the
awaitable waits). Public API:

- :class:`SharedMemory`, :class:`PagePool`: sealed memfd regions, guest memory.
- :class:`RingSpec`, :class:`FrontRing`, :class:`BackRing`: io/ring.h rings.
- :class:`ByteRing`, :func:`console_rings`, :func:`flex_rings`: byte rings.
- :class:`GrantTable`, :class:`GrantMapper`: grant_table.h v1 semantics.
- :class:`EventChannelTable`, :class:`EventChannel`, :class:`BusyPoll`.
"""

from pvio.ring.bytering import ByteRing, console_rings, flex_queued, flex_rings
from pvio.ring.errors import (
    EventChannelBlockedError,
    GrantError,
    LocalProtocolError,
    PvioError,
    RemoteProtocolError,
    RingBrokenError,
    SharedMemoryError,
)
from pvio.ring.evtchn import (
    BusyPoll,
    EventChannel,
    EventChannelTable,
    UnboundPort,
    guard_sends,
    wait_for_work,
    wait_for_work_blocking,
)
from pvio.ring.grant import CopyOp, GrantEntry, GrantMapper, GrantMapping, GrantTable
from pvio.ring.ring import (
    BLKIF,
    NETIF_RX,
    NETIF_TX,
    BackRing,
    FrontRing,
    RingSpec,
    need_notify,
    request_cons_overflow,
    request_prod_overflow,
    response_prod_overflow,
    shared_ring_init,
)
from pvio.ring.shm import PAGE_SIZE, PagePool, SharedMemory

__all__ = [
    "BLKIF",
    "NETIF_RX",
    "NETIF_TX",
    "PAGE_SIZE",
    "BackRing",
    "BusyPoll",
    "ByteRing",
    "CopyOp",
    "EventChannel",
    "EventChannelBlockedError",
    "EventChannelTable",
    "FrontRing",
    "GrantEntry",
    "GrantError",
    "GrantMapper",
    "GrantMapping",
    "GrantTable",
    "LocalProtocolError",
    "PagePool",
    "PvioError",
    "RemoteProtocolError",
    "RingBrokenError",
    "RingSpec",
    "SharedMemory",
    "SharedMemoryError",
    "UnboundPort",
    "console_rings",
    "flex_queued",
    "flex_rings",
    "guard_sends",
    "need_notify",
    "request_cons_overflow",
    "request_prod_overflow",
    "response_prod_overflow",
    "shared_ring_init",
    "wait_for_work",
    "wait_for_work_blocking",
]
