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
from dataclasses import dataclass

from pvio.ring import EventChannel, EventChannelTable, GrantError, GrantMapping
from pvio.xenbus.device import DeviceError
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

    @property
    def frontend_keys(self) -> tuple[str, ...]:
        keys = [self.evtchn_key, "protocol"]
        for area in self.areas:
            keys.append(area.ref_key)
            if area.multi_page:
                keys += ["ring-page-order"]
                keys += [f"{area.ref_key}{i}" for i in range(1 << self.max_ring_page_order)]
        return tuple(dict.fromkeys(keys))


def _uint(raw: bytes | None, what: str, limit: int) -> int:
    if raw is None:
        raise DeviceError(f"frontend did not publish {what}")
    text = raw.decode("ascii", "replace").strip()
    if not text.isdigit() or int(text) > limit:
        raise DeviceError(f"frontend published a bad {what}: {text[:32]!r}")
    return int(text)


@dataclass
class BackendConnection:
    """What a connected backend holds: mapped areas and the bound event channel."""

    mappings: list[GrantMapping]
    channel: EventChannel
    pages: list[int]

    def close(self) -> None:
        for mapping in self.mappings:
            mapping.close()
        self.channel.close()


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

    def features(self) -> dict[str, str]:
        feats = {}
        if any(a.multi_page for a in self.layout.areas):
            feats["max-ring-page-order"] = str(self.layout.max_ring_page_order)
        return feats

    async def connect(self, frontend: dict[str, bytes | None]) -> dict[str, str]:
        try:
            mapper = self.domain.mapper()
        except XenstoreError as exc:
            raise DeviceError(str(exc)) from exc
        mappings: list[GrantMapping] = []
        pages: list[int] = []
        try:
            for area in self.layout.areas:
                if area.multi_page and frontend.get("ring-page-order") is not None:
                    order = _uint(frontend["ring-page-order"], "ring-page-order",
                                  self.layout.max_ring_page_order)
                    refs = [_uint(frontend.get(f"{area.ref_key}{i}"), f"{area.ref_key}{i}",
                                  0xFFFFFFFF) for i in range(1 << order)]
                else:
                    refs = [_uint(frontend.get(area.ref_key), area.ref_key, 0xFFFFFFFF)]
                try:
                    mappings.append(mapper.map(refs, writable=True))
                except GrantError as exc:
                    raise DeviceError(f"cannot map {area.ref_key}: {exc}") from exc
                pages.append(len(refs))
            port = _uint(frontend.get(self.layout.evtchn_key), self.layout.evtchn_key, 4095)
            fds = self.domain.evtchn_fds.pop(port, None)
            if fds is None:
                raise DeviceError(f"event channel port {port} was not handed over")
            channel = self._evtchn.bind_interdomain(self.domain.domid, port, fds)
        except BaseException:
            for mapping in mappings:
                mapping.close()
            raise
        self.conn = BackendConnection(mappings, channel, pages)
        return await self.start(self.conn, frontend)

    async def start(self, conn: BackendConnection, frontend: dict[str, bytes | None]) -> dict:
        """Device hook: start serving; returns info keys to publish. Default: none."""
        return {}

    async def stop(self) -> None:
        """Device hook: stop serving before the areas are unmapped."""

    async def disconnect(self) -> None:
        if self.conn is None:
            return
        await self.stop()
        self.conn.close()
        self.conn = None


class RingFrontendDriver:
    """Frontend transport: allocate and grant the areas, hand over the port, publish."""

    layout: DeviceLayout

    def __init__(self, session, layout: DeviceLayout | None = None, *,
                 ring_page_order: int = 0) -> None:
        self.session = session
        if layout is not None:
            self.layout = layout
        self.type = self.layout.type
        self.ring_page_order = ring_page_order
        self.areas: list[tuple[int, int, list[int]]] = []  # (frame, pages, refs)
        self.channel: EventChannel | None = None
        self.backend: dict[str, bytes | None] = {}

    def area(self, i: int) -> memoryview:
        frame, pages, _ = self.areas[i]
        return self.session.pool.shm.page(frame, pages)

    async def publish(self, xs, path: str) -> None:
        self.release_transport()
        keys: dict[str, str] = {"protocol": "x86_64-abi"}
        for area in self.layout.areas:
            pages = 1 << self.ring_page_order if area.multi_page else 1
            frame = self.session.pool.alloc(pages)
            refs = [self.session.gnttab.grant_access(DOM0, frame + i) for i in range(pages)]
            self.areas.append((frame, pages, refs))
            if area.multi_page and self.ring_page_order:
                keys["ring-page-order"] = str(self.ring_page_order)
                keys.update({f"{area.ref_key}{i}": str(r) for i, r in enumerate(refs)})
            else:
                keys[area.ref_key] = str(refs[0])
        self.setup()
        unbound = self.session.evtchn.alloc_unbound(DOM0)
        await xs.hand_over_evtchn(unbound.port, unbound.peer_fds())
        self.channel = unbound.channel
        keys[self.layout.evtchn_key] = str(unbound.port)
        tx = await xs.transaction_start()
        for key, value in keys.items():
            await xs.write(f"{path}/{key}", value, tx)
        await xs.transaction_end(tx)

    def setup(self) -> None:
        """Device hook: initialise the freshly allocated areas (e.g. FrontRing.init)."""

    async def attach(self, backend: dict[str, bytes | None]) -> None:
        self.backend = backend

    async def detach(self) -> None:
        """Stop using the device: release the transport (device types add their own)."""
        self.release_transport()

    def release_transport(self) -> None:
        """Revoke the areas' grants and free their pages (pages the backend still
        maps are quarantined, XSA-396), close the event channel."""
        for frame, pages, refs in self.areas:
            if all([self.session.gnttab.end_access(r) for r in refs]):
                self.session.pool.free(frame, pages)
            else:
                log.warning("%s: backend still maps frames %d+%d; quarantined",
                            self.type, frame, pages)
                self.session.pool.quarantine(frame, pages)
        self.areas.clear()
        if self.channel is not None:
            self.session.evtchn.close(self.channel.port)
            self.channel = None


VBD = DeviceLayout("vbd", (SharedArea("ring-ref", multi_page=True),), max_ring_page_order=4)
VIF = DeviceLayout("vif", (SharedArea("tx-ring-ref"), SharedArea("rx-ring-ref")))
CONSOLE = DeviceLayout("console", (SharedArea("ring-ref"),), evtchn_key="port")
LAYOUTS = {layout.type: layout for layout in (VBD, VIF, CONSOLE)}
