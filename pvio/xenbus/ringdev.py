"""Shared-page devices: the transport half of every PV driver, both sides.

Every pvio device (vbd, vif, console) shares one or more granted areas and one
event channel, published by the frontend under its device directory with
Xen's key names. :class:`DeviceLayout` names those keys once per device type;
:class:`RingFrontendDriver` allocates, grants and publishes them, and
:class:`RingBackendDriver` reads, validates and maps them (through the
domain's grant table, so only granted pages are touched) and binds the event
channel. Device types subclass both and add their protocol in ``start``.

Keys (io/blkif.h, io/netif.h, io/console.h): a single-page area is
``<ref_key>``; a multi-page one is ``ring-page-order`` plus ``<ref_key>0..N-1``
(blkif's ``ring-ref0..``). The event channel is ``event-channel`` (``port``
for the console).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from pvio.ring import (
    EventChannel,
    EventChannelBlockedError,
    EventChannelTable,
    GrantError,
    GrantMapping,
    RemoteProtocolError,
)
from pvio.xenbus.device import DeviceError, DeviceStalledError
from pvio.xenbus.store import XenstoreError

log = logging.getLogger("pvio.device")

DOM0 = 0


@dataclass(frozen=True)
class SharedArea:
    ref_key: str
    multi_page: bool = False


@dataclass(frozen=True)
class DeviceLayout:
    type: str
    areas: tuple[SharedArea, ...]
    evtchn_key: str = "event-channel"
    max_ring_page_order: int = 0
    max_queues: int = 1  # > 1: multi-queue-num-queues and queue-N/ keys (blkif.h)
    extra_frontend_keys: tuple[str, ...] = ()  # device-specific (feature-* of the frontend)
    #: netif.h feature-split-event-channels: a frontend may publish these two
    #: ports (tx, rx) instead of ``evtchn_key``.
    split_evtchn_keys: tuple[str, str] | None = None
    #: keys every frontend of this type must publish (netif's request-rx-copy...)
    required_frontend_keys: tuple[tuple[str, str], ...] = ()

    @property
    def frontend_keys(self) -> tuple[str, ...]:
        keys = ["protocol", "ring-page-order", "multi-queue-num-queues",
                *self.extra_frontend_keys]
        prefixes = [""] + [f"queue-{q}/" for q in range(self.max_queues if
                                                          self.max_queues > 1 else 0)]
        for prefix in prefixes:
            keys.append(prefix + self.evtchn_key)
            keys += [prefix + k for k in self.split_evtchn_keys or ()]
            for area in self.areas:
                keys.append(prefix + area.ref_key)
                if area.multi_page:
                    keys += [f"{prefix}{area.ref_key}{i}"
                             for i in range(1 << self.max_ring_page_order)]
        return tuple(dict.fromkeys(keys))


def _uint(raw: bytes | None, what: str, limit: int) -> int:
    if raw is None:
        raise DeviceError(f"frontend did not publish {what}")
    text = raw.decode("ascii", "replace").strip()
    if not text.isdigit() or int(text) > limit:
        raise DeviceError(f"frontend published a bad {what}: {text[:32]!r}")
    return int(text)


@dataclass
class QueueConnection:
    """One queue of a connected device: its mapped areas and bound event channel(s).

    With split event channels ``channel`` is the tx one and ``rx_channel`` the
    rx one; otherwise both name the same channel.
    """

    mappings: list[GrantMapping]
    channel: EventChannel
    rx_channel: EventChannel | None = None

    def __post_init__(self) -> None:
        if self.rx_channel is None:
            self.rx_channel = self.channel

    def close(self) -> None:
        for mapping in self.mappings:
            mapping.close()
        self.channel.close()
        if self.rx_channel is not self.channel:
            self.rx_channel.close()


@dataclass
class BackendConnection:
    """What a connected backend holds: one :class:`QueueConnection` per queue."""

    queues: list[QueueConnection]
    ring_page_order: int = 0

    @property
    def mappings(self) -> list[GrantMapping]:
        return self.queues[0].mappings

    @property
    def channel(self) -> EventChannel:
        return self.queues[0].channel

    def close(self) -> None:
        for queue in self.queues:
            queue.close()


class RingBackendDriver:
    """Backend transport: validate the frontend's keys, map its areas, bind its port."""

    layout: DeviceLayout

    def __init__(self, domain, layout: DeviceLayout | None = None) -> None:
        self.domain = domain
        if layout is not None:
            self.layout = layout
        self.type = self.layout.type
        self.conn: BackendConnection | None = None
        self._evtchn = EventChannelTable(DOM0)
        # Set by the device framework: where services run, and how a service
        # that found the peer broken asks for the device to be closed.
        self.nursery = None
        self.on_failure = None

    def peer_failed(self, *errors: BaseException) -> None:
        """The peer broke this device (``errors`` say how): have the device
        framework disconnect it (in a new task: the caller is usually a service
        the disconnect stops). One that is, or was caused by, a notification
        the peer blocked (:class:`EventChannelBlockedError`) held the daemon:
        the framework then backs off the device's reconnects."""
        stalled = any(isinstance(e, EventChannelBlockedError)
                      or isinstance(e.__cause__, EventChannelBlockedError) for e in errors)
        if self.on_failure is not None:
            self.nursery.start_soon(self.on_failure, "; ".join(map(str, errors)), stalled)

    def features(self) -> dict[str, str]:
        feats = {}
        if any(a.multi_page for a in self.layout.areas):
            feats["max-ring-page-order"] = str(self.layout.max_ring_page_order)
        if self.layout.max_queues > 1:
            feats["multi-queue-max-queues"] = str(self.layout.max_queues)
        if self.layout.split_evtchn_keys:
            feats["feature-split-event-channels"] = "1"
        return feats

    async def connect(self, frontend: dict[str, bytes | None]) -> dict[str, str]:
        try:
            mapper = self.domain.mapper()
        except XenstoreError as exc:
            raise DeviceError(str(exc)) from exc
        nq = 1
        if self.layout.max_queues > 1 and frontend.get("multi-queue-num-queues") is not None:
            nq = _uint(frontend["multi-queue-num-queues"], "multi-queue-num-queues",
                       self.layout.max_queues)
            if nq == 0:
                raise DeviceError("frontend asked for 0 queues")
        order = 0
        if any(a.multi_page for a in self.layout.areas) and \
                frontend.get("ring-page-order") is not None:
            order = _uint(frontend["ring-page-order"], "ring-page-order",
                          self.layout.max_ring_page_order)
        queues: list[QueueConnection] = []
        try:
            for q in range(nq):
                queues.append(self._connect_queue(mapper, frontend,
                                                  "" if nq == 1 else f"queue-{q}/", order))
        except BaseException:
            for queue in queues:
                queue.close()
            raise
        self.conn = BackendConnection(queues, order)
        return await self.start(self.conn, frontend)

    def _connect_queue(self, mapper, frontend: dict, prefix: str, order: int) -> QueueConnection:
        mappings: list[GrantMapping] = []
        split = self.layout.split_evtchn_keys
        if split and frontend.get(prefix + split[0]) is not None:
            keys = [prefix + k for k in split]
        else:
            keys = [prefix + self.layout.evtchn_key]
        ports = [_uint(frontend.get(key), key, 4095) for key in keys]
        if len(set(ports)) != len(ports):
            raise DeviceError(f"{' and '.join(keys)} name the same port")
        taken: list[tuple[int, int]] = []
        channels: list[EventChannel] = []
        try:
            for port in ports:
                fds = self.domain.evtchn_fds.pop(port, None)
                if fds is None:
                    raise DeviceError(f"event channel port {port} was not handed over")
                taken.append(fds)
            for area in self.layout.areas:
                key = prefix + area.ref_key
                if area.multi_page and order:
                    refs = [_uint(frontend.get(f"{key}{i}"), f"{key}{i}", 0xFFFFFFFF)
                            for i in range(1 << order)]
                else:
                    refs = [_uint(frontend.get(key), key, 0xFFFFFFFF)]
                try:
                    mappings.append(mapper.map(refs, writable=True))
                except GrantError as exc:
                    raise DeviceError(f"cannot map {key}: {exc}") from exc
            while taken:
                fds = taken.pop(0)
                try:
                    channels.append(self._evtchn.bind_interdomain(
                        self.domain.domid, ports[len(channels)], fds))
                except EventChannelBlockedError as exc:  # it blocked the bind's own event
                    raise DeviceStalledError(f"cannot bind event channel: {exc}") from exc
                except RemoteProtocolError as exc:  # it closed the fds it was given
                    raise DeviceError(f"cannot bind event channel: {exc}") from exc
        except BaseException:
            for mapping in mappings:
                mapping.close()
            for channel in channels:
                channel.close()
            for fds in taken:  # a refused connect must not leave a port stuck
                for fd in fds:
                    os.close(fd)
            raise
        return QueueConnection(mappings, channels[0], channels[-1])

    async def start(self, conn: BackendConnection, frontend: dict[str, bytes | None]) -> dict:
        """Device hook: start serving; returns info keys to publish. Default: none."""
        return {}

    async def stop(self) -> None:
        """Device hook: stop serving before the areas are unmapped."""

    async def disconnect(self) -> None:
        """Stop serving and release the areas; safe to call again while a first
        call is still stopping (two queues or two event channels may find their
        rings broken at once, or the frontend may close meanwhile): the
        connection is claimed before anything awaits."""
        conn, self.conn = self.conn, None
        if conn is None:
            return
        try:
            await self.stop()
        except BaseException:
            if self.conn is None:  # interrupted: a later disconnect finishes the job
                self.conn = conn
            raise
        conn.close()


@dataclass
class FrontQueue:
    """One queue of a frontend device: its granted areas and its event channel."""

    areas: list[tuple[int, int, list[int]]]  # (first frame, pages, grant refs)
    channel: EventChannel | None = None
    rx_channel: EventChannel | None = None  # split event channels: the rx one


class RingFrontendDriver:
    """Frontend transport: allocate and grant the areas, hand over the ports, publish.

    ``queues`` > 1 asks for multi-queue (capped by the backend's
    ``multi-queue-max-queues``; one queue if it offers none).
    """

    layout: DeviceLayout

    def __init__(self, session, layout: DeviceLayout | None = None, *,
                 ring_page_order: int = 0, queues: int = 1,
                 split_event_channels: bool = False) -> None:
        self.session = session
        if layout is not None:
            self.layout = layout
        self.type = self.layout.type
        self.ring_page_order = ring_page_order
        self.requested_queues = queues
        self.split_event_channels = split_event_channels
        self.queues: list[FrontQueue] = []
        self.backend: dict[str, bytes | None] = {}

    @property
    def channel(self) -> EventChannel | None:
        """Queue 0's event channel."""
        return self.queues[0].channel if self.queues else None

    def area(self, i: int, queue: int = 0) -> memoryview:
        frame, pages, _ = self.queues[queue].areas[i]
        return self.session.pool.shm.page(frame, pages)

    @staticmethod
    async def _backend_int(xs, path: str, key: str, default: int) -> int:
        be = await xs.read_or_none(f"{path}/backend")
        raw = await xs.read_or_none(f"{be.decode()}/{key}") if be else None
        try:
            return max(default, int(raw.decode())) if raw else default
        except ValueError:
            return default

    async def publish(self, xs, path: str) -> None:
        self.release_transport()
        nq = 1
        if self.requested_queues > 1 and self.layout.max_queues > 1:
            nq = min(self.requested_queues,
                     await self._backend_int(xs, path, "multi-queue-max-queues", 1))
        split = bool(self.split_event_channels and self.layout.split_evtchn_keys and
                     await self._backend_int(xs, path, "feature-split-event-channels", 0))
        keys: dict[str, str] = {"protocol": "x86_64-abi", **self.frontend_features()}
        if nq > 1:
            keys["multi-queue-num-queues"] = str(nq)
        if self.ring_page_order and any(a.multi_page for a in self.layout.areas):
            keys["ring-page-order"] = str(self.ring_page_order)
        for q in range(nq):
            prefix = "" if nq == 1 else f"queue-{q}/"
            queue = FrontQueue([])
            self.queues.append(queue)
            for area in self.layout.areas:
                pages = 1 << self.ring_page_order if area.multi_page else 1
                frame = self.session.pool.alloc(pages)
                refs = [self.session.gnttab.grant_access(DOM0, frame + i) for i in range(pages)]
                queue.areas.append((frame, pages, refs))
                if area.multi_page and self.ring_page_order:
                    keys.update({f"{prefix}{area.ref_key}{i}": str(r)
                                 for i, r in enumerate(refs)})
                else:
                    keys[prefix + area.ref_key] = str(refs[0])
            for key in self.layout.split_evtchn_keys if split else (self.layout.evtchn_key,):
                unbound = self.session.evtchn.alloc_unbound(DOM0)
                await xs.hand_over_evtchn(unbound.port, unbound.peer_fds())
                queue.rx_channel = unbound.channel
                queue.channel = queue.channel or unbound.channel
                keys[prefix + key] = str(unbound.port)
        self.setup()
        tx = await xs.transaction_start()
        for key, value in keys.items():
            await xs.write(f"{path}/{key}", value, tx)
        await xs.transaction_end(tx)

    def setup(self) -> None:
        """Device hook: initialise the freshly allocated areas (e.g. FrontRing.init)."""

    def frontend_features(self) -> dict[str, str]:
        """Device hook: ``feature-*`` keys the frontend publishes with its transport."""
        return dict(self.layout.required_frontend_keys)

    async def attach(self, backend: dict[str, bytes | None]) -> None:
        self.backend = backend

    async def detach(self) -> None:
        """Stop using the device: release the transport (device types add their own)."""
        self.release_transport()

    def release_transport(self) -> None:
        """Revoke the areas' grants and free their pages (pages the backend still
        maps are quarantined, XSA-396), close the event channels."""
        for queue in self.queues:
            for frame, pages, refs in queue.areas:
                if not self.session.pool.revoke_and_free(frame, pages, self.session.gnttab,
                                                         refs):
                    log.warning("%s: backend still maps frames %d+%d; quarantined",
                                self.type, frame, pages)
            for channel in {queue.channel, queue.rx_channel} - {None}:
                self.session.evtchn.close(channel.port)
        self.queues = []


VBD = DeviceLayout("vbd", (SharedArea("ring-ref", multi_page=True),), max_ring_page_order=4,
                   max_queues=4, extra_frontend_keys=("feature-large-sector-size",))
VIF = DeviceLayout("vif", (SharedArea("tx-ring-ref"), SharedArea("rx-ring-ref")), max_queues=4,
                   split_evtchn_keys=("event-channel-tx", "event-channel-rx"),
                   extra_frontend_keys=("request-rx-copy", "feature-rx-notify", "feature-sg",
                                        "feature-gso-tcpv4", "feature-gso-tcpv6",
                                        "feature-no-csum-offload",
                                        "feature-ipv6-csum-offload"),
                   required_frontend_keys=(("request-rx-copy", "1"), ("feature-rx-notify", "1")))
CONSOLE = DeviceLayout("console", (SharedArea("ring-ref"),), evtchn_key="port")
LAYOUTS = {layout.type: layout for layout in (VBD, VIF, CONSOLE)}
