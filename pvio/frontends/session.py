"""A guest-side domain session: connect to a pvio daemon and attach devices.

``async with open_session(socket, name="guest") as session:`` connects to the
daemon's guest socket (the connection *is* the domain), creates this process's
guest memory (a sealed page pool) and grant table, hands both over, claims the
configured domain ``name`` and learns its domid. ``session.devices()`` lists
what the daemon offers; ``session.attach(driver)`` runs a device's frontend
handshake in the session's nursery.

:class:`BlockingSession` is the same for plain (non-trio) code: it runs trio in
a background thread.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

import trio

from pvio._trio import unwrap_single
from pvio.ring import EventChannelTable, GrantTable, LocalProtocolError, PagePool, SharedMemory
from pvio.ring.shm import PAGE_SIZE
from pvio.xenbus.client import XsClient, open_client
from pvio.xenbus.device import FrontendDevice, FrontendDriver
from pvio.xenbus.ringdev import LAYOUTS, RingFrontendDriver
from pvio.xenbus.store import XenstoreError

log = logging.getLogger("pvio.session")


@dataclass(frozen=True)
class OfferedDevice:
    type: str
    devid: int
    backend: str


class DomainSession:
    """One domain: its store connection, guest memory, grants and event channels.

    With ``reconnect=True`` the session survives the daemon: when the store
    connection drops (the daemon died, even by kill -9), it reconnects with
    backoff, hands the *same* pool and grant table over again, claims the same
    name, and every attached device runs its handshake again (a blkfront then
    resubmits what was not answered). ``xs`` and ``domid`` always name the
    current connection.
    """

    def __init__(self, socket_path: str, name: str, pool: PagePool, gnttab: GrantTable,
                 nursery: trio.Nursery, *, reconnect: bool = False,
                 recovery_timeout: float = 30.0) -> None:
        self.socket_path = socket_path
        self.name = name
        self.pool = pool
        self.gnttab = gnttab
        self.reconnect = reconnect
        self.recovery_timeout = recovery_timeout
        self.xs: XsClient | None = None
        self.domid = -1
        self.generation = 0
        self.evtchn = EventChannelTable(0)
        self._nursery = nursery
        self._online = trio.Event()
        self._closing = False
        self.attached: list[FrontendDevice] = []

    async def _connect_once(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with open_client(self.socket_path) as xs:
            await xs.share_memory("pool", self.pool.shm.fileno())
            await xs.share_memory("gnttab", self.gnttab.shm.fileno())
            self.domid = await xs.claim(self.name)
            self.evtchn.domid = self.domid
            self.xs = xs
            self.generation += 1
            self._online.set()
            log.info("session %r: connected as dom%d (generation %d)", self.name, self.domid,
                     self.generation)
            task_status.started()
            await xs.lost.wait()
            self._online = trio.Event()
            log.warning("session %r: lost the store connection", self.name)

    async def _connection_loop(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        await self._connect_started(task_status)
        delay = 0.02
        while self.reconnect and not self._closing:
            try:
                await self._connect_once()
                delay = 0.02
            except (OSError, XenstoreError) as exc:
                log.info("session %r: reconnect failed (%s); retrying in %.2f s", self.name,
                         exc, delay)
                await trio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def _connect_started(self, task_status) -> None:
        # The first connection must succeed (errors go to open_session's caller);
        # its lifetime then continues in the loop's task.
        done = trio.Event()

        async def first(*, task_status=trio.TASK_STATUS_IGNORED):
            try:
                await self._connect_once(task_status=task_status)
            finally:
                done.set()

        await self._nursery.start(first)
        task_status.started()
        await done.wait()

    async def wait_online(self, after_generation: int) -> tuple[XsClient, int]:
        """Wait for a connection newer than ``after_generation`` (raises TooSlowError)."""
        with trio.fail_after(self.recovery_timeout):
            while self.generation <= after_generation or not self._online.is_set():
                await self._online.wait()
                if self.generation <= after_generation:
                    await trio.sleep(0.01)
        return self.xs, self.domid

    async def devices(self) -> list[OfferedDevice]:
        """The devices the daemon created for this domain (``device/<type>/<devid>``)."""
        offered = []
        for type_ in await _dir_or_empty(self.xs, "device"):
            for devid in await _dir_or_empty(self.xs, f"device/{type_}"):
                backend = await self.xs.read_or_none(f"device/{type_}/{devid}/backend")
                if backend is not None and devid.isdigit():
                    offered.append(OfferedDevice(type_, int(devid), backend.decode()))
        return offered

    def driver_for(self, device: OfferedDevice, **kwargs) -> RingFrontendDriver:
        """A transport-only frontend driver for a device type (handshake, rings)."""
        layout = LAYOUTS.get(device.type)
        if layout is None:
            raise ValueError(f"no frontend for device type {device.type!r}")
        return RingFrontendDriver(self, layout, **kwargs)

    async def attach(self, driver: FrontendDriver, devid: int,
                     backend_keys: tuple[str, ...] = ()) -> FrontendDevice:
        """Start the frontend handshake for ``driver``'s device; returns once it runs.

        Await ``device.connected.wait()`` for the Connected state.
        """
        device = FrontendDevice(self, driver, devid, backend_keys)
        await self._nursery.start(device.run)
        self.attached.append(device)
        return device

    async def aclose(self) -> None:
        self._closing = True
        for device in self.attached:
            if device.status.state.name != "Closed":
                with contextlib.suppress(Exception):
                    await device.close()


async def _dir_or_empty(xs: XsClient, path: str) -> list[str]:
    try:
        return await xs.directory(path)
    except XenstoreError:
        return []


@contextlib.asynccontextmanager
async def open_session(socket_path: str, name: str = "guest", *, pool_pages: int = 4096,
                       grant_entries: int = 4096, reconnect: bool = False,
                       recovery_timeout: float = 30.0) -> AsyncIterator[DomainSession]:
    """Connect to a daemon's guest socket as domain ``name`` (see module doc)."""
    pool = PagePool(SharedMemory.create(pool_pages * PAGE_SIZE, name=f"pvio-{name}-pool"))
    gnttab = GrantTable.create(grant_entries, name=f"pvio-{name}-gnttab")
    try:
        async with unwrap_single(), trio.open_nursery() as nursery:
            session = DomainSession(socket_path, name, pool, gnttab, nursery,
                                    reconnect=reconnect, recovery_timeout=recovery_timeout)
            await nursery.start(session._connection_loop)
            try:
                yield session
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    await session.aclose()
                nursery.cancel_scope.cancel()
    finally:
        for shm in (gnttab.shm, pool.shm):
            try:
                shm.close()
            except LocalProtocolError as exc:  # a device still holds it: leave it mapped
                log.warning("%s", exc)


class BlockingSession:
    """:func:`open_session` for plain code: a trio loop in a background thread.

    ``with BlockingSession(path, "guest") as s: s.call(some_async_fn, s.session)``.
    """

    def __init__(self, socket_path: str, name: str = "guest", **kwargs) -> None:
        self._args = (socket_path, name)
        self._kwargs = kwargs
        self._token: trio.lowlevel.TrioToken | None = None
        self._ready = threading.Event()
        self._stop: trio.Event | None = None
        self._error: BaseException | None = None
        self.session: DomainSession | None = None
        self._thread = threading.Thread(target=self._main, name="pvio-session", daemon=True)

    def _main(self) -> None:
        async def body() -> None:
            self._token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            try:
                async with open_session(*self._args, **self._kwargs) as session:
                    self.session = session
                    self._ready.set()
                    await self._stop.wait()
            except BaseException as exc:
                self._error = exc
                self._ready.set()

        trio.run(body)

    def __enter__(self) -> BlockingSession:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self

    def call(self, fn, *args):
        """Run ``await fn(*args)`` in the session's trio loop and return its result."""
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def __exit__(self, *exc: object) -> None:
        if self._stop is not None and self._token is not None and self._thread.is_alive():
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(timeout=10)
