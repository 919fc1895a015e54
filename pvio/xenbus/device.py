"""The device framework: node layout plus the XenbusState handshake, for both sides.

A device driver writes only its own feature negotiation and connect logic
(:class:`BackendDriver`, :class:`FrontendDriver`); :class:`BackendDevice` and
:class:`FrontendDevice` create the nodes Xen's toolstack creates, watch the
peer's ``state`` and run the tables of :mod:`pvio.xenbus.state`.

Node layout (as libxl writes it)::

    /local/domain/0/backend/<type>/<domid>/<devid>/    owner dom0, read: frontend
        frontend, frontend-id, online, state, <backend features and info>
    /local/domain/<domid>/device/<type>/<devid>/       owner the frontend, read: dom0
        backend, backend-id, state, <ring-ref*, event-channel, protocol, ...>
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import trio

from pvio._log import RateLimitedLogger
from pvio.layouts import XenbusState as S
from pvio.ring.errors import GrantError
from pvio.xenbus.state import BACKEND_TABLE, FRONTEND_TABLE, Action, parse_state, step
from pvio.xenbus.store import XenstoreError

log = logging.getLogger("pvio.device")
peer_log = RateLimitedLogger(log)


def backend_path(type_: str, domid: int, devid: int | str) -> str:
    return f"/local/domain/0/backend/{type_}/{domid}/{devid}"


def frontend_path(type_: str, domid: int, devid: int | str) -> str:
    return f"/local/domain/{domid}/device/{type_}/{devid}"


class DeviceError(Exception):
    """A device cannot connect (bad keys from the peer, missing resources)."""


class DeviceStalledError(DeviceError):
    """The peer stalled the daemon while the device connected: it blocked a
    notification (the send guard ended it). The device backs off
    (:class:`StallBackoff`) as after a stall while connected."""


class Store(Protocol):
    """What the framework needs from a store: the daemon's local access or a client."""

    async def read_or_none(self, path: str) -> bytes | None: ...
    async def write(self, path: str, value: bytes | str) -> None: ...


# ------------------------------------------------------------------ backend


class BackendDriver(Protocol):
    """What a backend device type implements (blkback, netback, consoleback)."""

    type: str

    def features(self) -> dict[str, str]:
        """Keys published before InitWait (``feature-*``, ``max-ring-page-order``...)."""

    async def connect(self, frontend: dict[str, bytes | None]) -> dict[str, str]:
        """Map rings, bind event channels, start serving. ``frontend`` holds the
        frontend's keys (read once, validated here). Returns keys to publish
        before Connected. Raise DeviceError to refuse."""

    async def disconnect(self) -> None:
        """Stop serving and release the rings (idempotent)."""


class StallBackoff:
    """Refuse a device's connects for a while after its frontend stalled the
    daemon (hardening.md #10: back off after a failed request).

    A frontend that blocks one of our notifications (its eventfd made blocking
    and saturated; :func:`pvio.ring.guard_sends`) holds the daemon's whole
    event loop for the guard's timeout before it loses the device. Losing it
    costs the frontend nothing, so without a back-off it could reconnect and
    do it again as fast as the handshake goes, and keep the daemon frozen most
    of the time. The first stall refuses connects for ``base`` seconds, each
    further one twice as long as the one before, up to ``limit``; ``forget``
    seconds without one start the count again. Kept per configured device by
    the daemon, so a new session does not reset it. ``base`` 0 turns it off.
    Other protocol violations only disconnect: they cost the daemon no more
    than a connect, and the conformance kit commits them back to back.
    Sans-I/O: the caller passes the time."""

    def __init__(self, base: float = 1.0, limit: float = 60.0, forget: float = 600.0) -> None:
        self.base, self.limit, self.forget = base, limit, forget
        self.count = 0
        self.reason = ""
        self._last = 0.0
        self._until = 0.0

    def strike(self, now: float, reason: str) -> float:
        """A stall at ``now``; returns how long connects are refused."""
        if self.count and now - self._last > self.forget:
            self.count = 0
        self.count += 1
        self._last, self.reason = now, reason
        pause = min(self.base * 2 ** (self.count - 1), self.limit) if self.base > 0 else 0.0
        self._until = now + pause
        return pause

    def refusal(self, now: float) -> str | None:
        """Why a connect at ``now`` is refused, or None."""
        if now >= self._until:
            return None
        return (f"refused for another {self._until - now:.1f} s: the frontend blocked our "
                f"notifications ({self.count} time(s); last: {self.reason})")


@dataclass
class DeviceStatus:
    state: S = S.Initialising
    peer_state: S = S.Unknown
    transitions: int = 0
    last_error: str = ""
    history: list[tuple[str, str]] = field(default_factory=list)


class BackendDevice:
    """Runs one backend device instance against the daemon's store."""

    def __init__(self, store: Store, driver: BackendDriver, domid: int, devid: int,
                 frontend_keys: tuple[str, ...], backoff: StallBackoff | None = None) -> None:
        self.store = store
        self.driver = driver
        self.domid = domid
        self.devid = devid
        self.frontend_keys = frontend_keys
        self.be = backend_path(driver.type, domid, devid)
        self.fe = frontend_path(driver.type, domid, devid)
        self.status = DeviceStatus()
        self.backoff = backoff if backoff is not None else StallBackoff()
        driver.on_failure = self.fail

    def __repr__(self) -> str:
        return f"{self.driver.type}/{self.domid}/{self.devid}"

    async def fail(self, reason: str, stalled: bool = False) -> None:
        """The peer broke the device's protocol: disconnect this one device. If
        it ``stalled`` the daemon (blocked a notification), refuse its connects
        for a while (:class:`StallBackoff`)."""
        self.status.last_error = reason
        if stalled:
            self._stalled(reason)
        await self.driver.disconnect()
        if self.status.state not in (S.Closing, S.Closed):
            await self._set_state(S.Closing)

    def _stalled(self, reason: str) -> None:
        pause = self.backoff.strike(trio.current_time(), reason)
        if pause:
            peer_log.warning(f"backoff:{self}", "%s: connects refused for %.0f s (the "
                             "frontend stalled the daemon %d time(s))", self, pause,
                             self.backoff.count)

    async def _set_state(self, state: S) -> None:
        self.status.history.append((self.status.state.name, state.name))
        del self.status.history[:-32]
        self.status.state = state
        self.status.transitions += 1
        await self.store.write(f"{self.be}/state", str(int(state)))

    async def publish(self) -> None:
        """Publish the backend features and go to InitWait."""
        for key, value in self.driver.features().items():
            await self.store.write(f"{self.be}/{key}", value)
        await self._set_state(S.InitWait)

    async def frontend_changed(self) -> None:
        """React to the frontend's state (called on every watch event)."""
        peer = parse_state(await self.store.read_or_none(f"{self.fe}/state"))
        self.status.peer_state = peer
        action, goto = step(BACKEND_TABLE, self.status.state, peer)
        if action is Action.NONE and goto == self.status.state:
            return
        log.info("%s: frontend %s, backend %s -> %s (%s)", self, peer.name,
                 self.status.state.name, goto.name, action.value)
        try:
            if action is Action.CONNECT:
                refused = self.backoff.refusal(trio.current_time())
                if refused:
                    raise DeviceError(refused)
                keys = {k: await self.store.read_or_none(f"{self.fe}/{k}")
                        for k in self.frontend_keys}
                info = await self.driver.connect(keys)
                for key, value in info.items():
                    await self.store.write(f"{self.be}/{key}", value)
            elif action in (Action.DISCONNECT, Action.REINIT):
                await self.driver.disconnect()
                if action is Action.REINIT:
                    for key, value in self.driver.features().items():
                        await self.store.write(f"{self.be}/{key}", value)
        except (DeviceError, XenstoreError) as exc:
            self.status.last_error = str(exc)
            peer_log.warning(f"connect:{self}", "%s: cannot connect: %s", self, exc)
            if isinstance(exc, DeviceStalledError):
                self._stalled(str(exc))
            await self.driver.disconnect()
            await self._set_state(S.Closing)
            return
        await self._set_state(goto)

    async def shutdown(self) -> None:
        """Graceful close by the daemon: Closing, disconnect, Closed."""
        if self.status.state != S.Closed:
            await self._set_state(S.Closing)
        await self.driver.disconnect()
        await self._set_state(S.Closed)


# ----------------------------------------------------------------- frontend


class FrontendDriver(Protocol):
    """What a frontend device type implements (blkfront, netfront, console)."""

    type: str

    async def publish(self, xs, path: str) -> None:
        """Allocate rings, grant them, publish ``ring-ref``/``event-channel``...
        under ``path`` (the frontend's device directory)."""

    async def attach(self, backend: dict[str, bytes | None]) -> None:
        """Read the backend's info/features and start I/O."""

    async def detach(self) -> None:
        """Stop I/O; revoke grants (idempotent)."""


StateCallback = Callable[[S, S], Awaitable[None]]


class FrontendDevice:
    """Runs one frontend device against a domain session (inside the guest process).

    If the session reconnects after losing the daemon, the device runs the
    handshake again on the new connection; the driver's ``connection_lost``
    hook (if any) is told first, so it can keep its in-flight requests.
    """

    def __init__(self, session, driver: FrontendDriver, devid: int,
                 backend_keys: tuple[str, ...] = ()) -> None:
        self.session = session
        self.driver = driver
        self.devid = devid
        self.backend_keys = backend_keys
        self.be: str | None = None
        self.status = DeviceStatus()
        self.connected = trio.Event()
        self.closed = trio.Event()
        self.reconnections = 0

    @property
    def xs(self):
        return self.session.xs

    @property
    def fe(self) -> str:
        return frontend_path(self.driver.type, self.session.domid, self.devid)

    async def _set_state(self, state: S) -> None:
        self.status.history.append((self.status.state.name, state.name))
        del self.status.history[:-32]
        self.status.state = state
        self.status.transitions += 1
        await self.xs.write(f"{self.fe}/state", str(int(state)))

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Drive the handshake until the device is closed (or we are cancelled)."""
        started = False

        def mark_started() -> None:
            nonlocal started
            if not started:
                started = True
                task_status.started()

        while True:
            generation = self.session.generation
            try:
                await self._run_on_connection(mark_started)
            except (OSError, trio.BrokenResourceError):
                pass  # the store connection died under us
            except (DeviceError, XenstoreError) as exc:
                if not started:
                    raise  # attach() fails with the reason
                # This device cannot go on; the session and its other devices can.
                log.warning("%s/%d: %s", self.driver.type, self.devid, exc)
                self.status.last_error = str(exc)
                await self.driver.detach()
                self.status.state = S.Closed
                break
            if self.status.state == S.Closed:
                break
            if not self.session.reconnect:
                # The daemon is gone and we will not wait for it: fail what is
                # pending instead of leaving callers waiting forever.
                fail = getattr(self.driver, "fail", None)
                if fail is not None:
                    fail("lost the connection to the pvio daemon")
                self.status.last_error = "lost the connection to the pvio daemon"
                await self.driver.detach()
                self.status.state = S.Closed
                break
            # Connection lost: keep what the driver needs to resume.
            self.connected = trio.Event()
            self.status.state = S.Unknown
            lost = getattr(self.driver, "connection_lost", None)
            if lost is not None:
                await lost()
            try:
                await self.session.wait_online(generation)
            except trio.TooSlowError:
                log.error("%s/%d: the daemon did not come back within %.0f s",
                          self.driver.type, self.devid, self.session.recovery_timeout)
                await self.driver.detach()
                self.status.state = S.Closed
                break
            self.reconnections += 1
        self.closed.set()

    async def _run_on_connection(self, started) -> None:
        raw = await self.xs.read_or_none(f"{self.fe}/backend")
        if raw is None:
            raise DeviceError(f"{self.fe}: no backend node (device not offered?)")
        self.be = raw.decode()
        await self._set_state(S.Initialising)
        async with self.xs.watch(f"{self.be}/state") as events:
            started()
            async for _ in events:
                await self.backend_changed()
                if self.status.state == S.Closed:
                    return
        if self.xs.lost.is_set():
            raise ConnectionResetError("store connection lost")

    async def wait_connected(self, timeout: float = math.inf) -> None:
        """Until the device is Connected. :class:`DeviceError` if it closes
        first (the backend refused the connect, e.g. while it backs off after the
        frontend stalled it, or closed the device: the daemon's log says why);
        ``trio.TooSlowError`` after ``timeout`` seconds."""
        connected = self.connected
        with trio.fail_after(timeout):
            async with trio.open_nursery() as nursery:
                async def closed() -> None:
                    await self.closed.wait()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(closed)
                await connected.wait()
                nursery.cancel_scope.cancel()
        if not connected.is_set():
            why = self.status.last_error or f"the backend went {self.status.peer_state.name}"
            raise DeviceError(f"{self.driver.type}/{self.devid} closed before it connected "
                              f"({why}; the daemon's log says why)")

    async def backend_changed(self) -> None:
        peer = parse_state(await self.xs.read_or_none(f"{self.be}/state"))
        self.status.peer_state = peer
        action, goto = step(FRONTEND_TABLE, self.status.state, peer)
        if action is Action.NONE and goto == self.status.state:
            return
        log.info("%s/%d: backend %s, frontend %s -> %s (%s)", self.driver.type, self.devid,
                 peer.name, self.status.state.name, goto.name, action.value)
        try:
            if action in (Action.PUBLISH, Action.PUBLISH_ATTACH):
                await self.driver.publish(self.xs, self.fe)
            if action in (Action.ATTACH, Action.PUBLISH_ATTACH):
                keys = {k: await self.xs.read_or_none(f"{self.be}/{k}") for k in self.backend_keys}
                await self.driver.attach(keys)
            if action is Action.DISCONNECT:
                await self.driver.detach()
                self.connected = trio.Event()
        except (DeviceError, XenstoreError, GrantError, MemoryError, OSError) as exc:
            self.status.last_error = str(exc)
            log.warning("%s/%d: %s", self.driver.type, self.devid, exc)
            await self.driver.detach()
            await self._set_state(S.Closed)
            return
        await self._set_state(goto)
        if goto == S.Connected:
            self.connected.set()
        if goto == S.Initialising and peer == S.InitWait:
            # The backend restarted: publish afresh straight away.
            await self.backend_changed()

    async def close(self, timeout: float = 5.0) -> None:
        """Orderly close: Closing; the backend unmaps and closes; then we revoke
        and go Closed. If the backend does not answer within ``timeout``, the
        pages it may still map are quarantined by ``detach``."""
        if self.status.state == S.Closed:
            return
        await self._set_state(S.Closing)
        with trio.move_on_after(timeout):
            await self.closed.wait()
        if self.status.state != S.Closed:
            log.warning("%s/%d: backend did not close within %.0f s", self.driver.type,
                        self.devid, timeout)
            await self.driver.detach()
            await self._set_state(S.Closed)
            self.closed.set()
