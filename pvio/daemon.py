"""``pvio serve``: the daemon hosting the store and the backends.

It listens on the guest socket (frontends: each connection is a domain) and the
admin socket (Xen's tools, ``pvio status``). When a guest claims a configured
domain, the daemon does what Xen's toolstack does: it creates each device's
backend and frontend nodes, then runs the backend side of the XenbusState
handshake for it. SIGINT/SIGTERM close every device (Closing, then Closed) and
stop; with ``NOTIFY_SOCKET`` set it tells systemd when it is ready and when it
is stopping.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from dataclasses import dataclass, field

import trio

from pvio.backends.blkback import BlkBackend, ensure_image
from pvio.backends.consoleback import ConsoleBackend
from pvio.backends.netback import NetBackend
from pvio.capture import CaptureTap
from pvio.config import Config, DeviceConfig
from pvio.layouts import XenbusState as S
from pvio.netswitch import Switch
from pvio.ring import guard_sends
from pvio.xenbus.device import BackendDevice, StallBackoff, backend_path, frontend_path
from pvio.xenbus.server import Domain, LocalStore, XenstoreServer
from pvio.xenbus.state import parse_state
from pvio.xenbus.store import Connection, XenstoreError

log = logging.getLogger("pvio.daemon")


def sd_notify(state: str) -> bool:
    """systemd's sd_notify(3) without libsystemd: one datagram to ``NOTIFY_SOCKET``."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(path)
            sock.sendall(state.encode())
        except OSError as exc:
            log.warning("cannot notify systemd at %s: %s", path, exc)
            return False
    return True


@dataclass
class _Attached:
    domain: Domain
    devices: list[BackendDevice] = field(default_factory=list)
    stores: list[LocalStore] = field(default_factory=list)
    cancel: trio.CancelScope = field(default_factory=trio.CancelScope)


class Daemon:
    """The daemon. ``backend_classes`` replaces the backend of a device type
    (``"vbd"``, ``"vif"``, ``"console"``), e.g. the conformance kit's instrumented ones."""

    def __init__(self, config: Config, *, backend_classes: dict | None = None) -> None:
        self.config = config
        self.backend_classes = {"vbd": BlkBackend, "console": ConsoleBackend, "vif": NetBackend,
                                **(backend_classes or {})}
        self.server = XenstoreServer(admin_uids=config.admin_uids, guest_uids=config.guest_uids)
        self.server.on_claim = self._claim
        self.server.on_domain_down.append(self._release)
        self._claimed: dict[str, _Attached] = {}
        self._backoffs: dict[tuple[str, str, int], StallBackoff] = {}
        self._root = Connection(0, privileged=True, name="daemon")
        self._nursery: trio.Nursery | None = None
        self.ready = trio.Event()
        self.switch = Switch(aging=config.switch.aging, queue_frames=config.switch.queue_frames)
        self.server.on_capture = self._capture

    # ------------------------------------------------------------------ run

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        os.makedirs(self.config.data_dir, mode=0o700, exist_ok=True)
        # A frontend that blocks a notification (its eventfd made blocking and
        # saturated under our send) loses its device instead of freezing the
        # daemon (pvio.ring.guard_sends).
        guard_sends()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.server.serve, self.config.admin_socket, self.config.socket)
            if self.config.switch.tap:
                from pvio.backends.tapport import serve_tap_port

                await nursery.start(serve_tap_port, self.switch, self.config.switch.tap)
            log.info("pvio daemon ready (config: %s; guest socket %s; admin socket %s; data %s)",
                     self.config.source, self.config.socket, self.config.admin_socket,
                     self.config.data_dir)
            sd_notify(f"READY=1\nSTATUS=serving {len(self.config.domains)} domain(s)")
            self.ready.set()
            task_status.started(self)
            await trio.sleep_forever()

    async def serve_until_signal(self) -> None:
        """Run until SIGINT/SIGTERM, then shut down gracefully."""
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.run)
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        self.reopen_logs()
                        continue
                    log.info("%s received: closing devices", signal.Signals(signum).name)
                    break
                sd_notify("STOPPING=1")
                await self.shutdown()
                nursery.cancel_scope.cancel()

    def reopen_logs(self) -> None:
        """SIGHUP: every console reopens its log file (logrotate's usual contract)."""
        for device in self._all_devices():
            reopen = getattr(device.driver, "reopen_log", None)
            if reopen is not None:
                reopen()
        log.info("SIGHUP: console logs reopened")

    async def shutdown(self, frontend_timeout: float = 5.0) -> None:
        """Close every device: backend Closing, stop I/O, Closed; then give the
        frontends up to ``frontend_timeout`` seconds to see it and close too."""
        devices = self._all_devices()
        for device in devices:
            try:
                await device.shutdown()
            except Exception:
                log.exception("%s: shutdown failed", device)
        with trio.move_on_after(frontend_timeout) as waited:
            for device in devices:
                while True:
                    state = parse_state(await self._peek(f"{device.fe}/state"))
                    if state in (S.Closed, S.Unknown):
                        break
                    await trio.sleep(0.02)
            await self.server.drain()
        if waited.cancelled_caught:
            log.warning("some frontends did not close within %.0f s", frontend_timeout)
        log.info("all devices closed")

    async def _peek(self, path: str) -> bytes | None:
        try:
            return self.server.store.read(self._root, path)
        except XenstoreError:
            return None

    # -------------------------------------------------------------- domains

    def _driver(self, domain: Domain, name: str, dev: DeviceConfig):
        if dev.type == "vbd":
            image = os.path.join(self.config.data_dir, dev.options["image"])
            ensure_image(image, dev.options["size"])
            return self.backend_classes["vbd"](domain, image, dev.options["mode"],
                                               sector_size=dev.options["sector_size"],
                                               busy_poll_us=dev.options["busy_poll_us"])
        if dev.type == "console":
            log_dir = os.path.join(self.config.data_dir, "console")
            os.makedirs(log_dir, mode=0o700, exist_ok=True)
            log_path = dev.options.get("log") or os.path.join(
                log_dir, f"{name}-{dev.devid}.log")
            return self.backend_classes["console"](domain, log_path=log_path,
                                                   limit=dev.options.get("limit", 1 << 20))
        return self.backend_classes["vif"](domain, dev.options["mac"], self.switch,
                                           devid=dev.devid,
                                           queue_frames=self.config.switch.queue_frames,
                                           spoof_check=dev.options.get("spoof_check", True))

    def _backoff(self, name: str, dev) -> StallBackoff:
        """The stall record of a configured device: it outlives sessions."""
        key = (name, dev.type, dev.devid)
        if key not in self._backoffs:
            self._backoffs[key] = StallBackoff(self.config.stall_backoff)
        return self._backoffs[key]

    async def _claim(self, domain: Domain, name: str) -> None:
        dom_cfg = self.config.domains.get(name)
        if dom_cfg is None:
            raise XenstoreError("ENOENT", f"no domain {name!r} in {self.config.source}")
        if dom_cfg.uids is not None and domain.cred.uid not in dom_cfg.uids:
            raise XenstoreError("EACCES", f"uid {domain.cred.uid} may not claim {name!r}")
        if name in self._claimed:
            raise XenstoreError("EBUSY", f"{name!r} is attached as "
                                f"dom{self._claimed[name].domain.domid}")
        attached = _Attached(domain)
        log.info("dom%d claims domain %r (%d device(s))", domain.domid, name,
                 len(dom_cfg.devices))
        try:
            for dev in dom_cfg.devices:
                store = self.server.local_store(f"{dev.type}/{domain.domid}/{dev.devid}")
                attached.stores.append(store)
                driver = self._driver(domain, name, dev)
                device = BackendDevice(store, driver, domain.domid, dev.devid,
                                       driver.layout.frontend_keys,
                                       self._backoff(name, dev))
                await self._create_nodes(store, device, driver)
                attached.devices.append(device)
        except (OSError, XenstoreError) as exc:
            log.error("dom%d: cannot create the devices of %r: %s", domain.domid, name, exc)
            self._remove_nodes(attached)
            raise XenstoreError("EIO", f"cannot create the devices of {name!r}: {exc}") from exc
        self._claimed[name] = attached
        assert self._nursery is not None
        self._nursery.start_soon(self._run_domain, attached)

    async def _create_nodes(self, store: LocalStore, device: BackendDevice, driver) -> None:
        """What libxl does for a new device: both directories, perms, initial keys."""
        domid = device.domid
        be, fe = device.be, device.fe
        await store.write(be, "")
        await store.set_perms(be, ["n0", f"r{domid}"])
        for key, value in {"frontend": fe, "frontend-id": str(domid), "online": "1",
                           "state": str(int(S.Initialising)),
                           **driver.toolstack_keys()}.items():
            await store.write(f"{be}/{key}", value)
        await store.write(fe, "")
        await store.set_perms(fe, [f"n{domid}", "r0"])
        for key, value in {"backend": be, "backend-id": "0",
                           "state": str(int(S.Initialising))}.items():
            await store.write(f"{fe}/{key}", value)
        if driver.type == "vif":
            await store.write(f"{fe}/mac", driver.mac)

    async def _run_domain(self, attached: _Attached) -> None:
        with attached.cancel:
            async with trio.open_nursery() as nursery:
                for device, store in zip(attached.devices, attached.stores, strict=True):
                    device.driver.nursery = nursery
                    nursery.start_soon(self._run_device, device, store)

    async def _run_device(self, device: BackendDevice, store: LocalStore) -> None:
        store.watch(f"{device.fe}/state", "fe-state")
        await device.publish()
        if hasattr(device.driver, "statistics"):
            assert self._nursery is not None
            self._nursery.start_soon(self._publish_statistics, device, store)
        async for _path, _token in store.events:
            try:
                await device.frontend_changed()
            except Exception as exc:  # a device bug must not take the daemon down
                log.exception("%s: handshake failed; closing it", device)
                await device.fail(f"internal error: {exc}")
                return

    STATISTICS_INTERVAL = 1.0

    async def _publish_statistics(self, device: BackendDevice, store: LocalStore) -> None:
        """Write the device's counters under ``<backend>/statistics/`` when they change."""
        last: dict[str, int] = {}
        while device in self._all_devices():
            current = device.driver.statistics()
            for key, value in current.items():
                if last.get(key) != value:
                    await store.write(f"{device.be}/statistics/{key}", str(value))
            last = current
            await trio.sleep(self.STATISTICS_INTERVAL)

    def _switch_port(self, name: str):
        """A switch port by name: ``vif<domid>.<devid>``, a domain name (its vif 0),
        ``<domain>.<devid>``, or ``tap:<ifname>``."""
        port = self.switch.ports.get(name)
        if port is None:
            dom, _, devid = name.partition(".")
            attached = self._claimed.get(dom)
            if attached is not None and (devid or "0").isdigit():
                port = self.switch.ports.get(f"vif{attached.domain.domid}.{int(devid or 0)}")
        if port is None:
            known = ", ".join(sorted(self.switch.ports)) or "none"
            raise XenstoreError("ENOENT", f"no switch port {name!r} (ports: {known})")
        return port

    def _capture(self, name: str, fd: int, snaplen: int) -> None:
        """PVIO_CAPTURE: the server owns ``fd`` until we return; on an error it closes it."""
        port = self._switch_port(name)
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:  # not a socket at all
            raise XenstoreError("EINVAL", f"capture fd: {exc.strerror}") from exc
        try:
            CaptureTap(sock, port, snaplen)
        except ValueError as exc:
            sock.detach()
            raise XenstoreError("EINVAL", str(exc)) from exc
        log.info("capture of %s started", port.name)

    def _all_devices(self) -> list[BackendDevice]:
        return [d for a in self._claimed.values() for d in a.devices]

    def _remove_nodes(self, attached: _Attached) -> None:
        domid = attached.domain.domid
        for store in attached.stores:
            store.close()
        for device in attached.devices:
            self.server.apply(self.server.store.remove_tree(
                backend_path(device.driver.type, domid, device.devid)))
            self.server.apply(self.server.store.remove_tree(device.fe))
        for type_ in {d.driver.type for d in attached.devices}:
            self.server.apply(self.server.store.remove_tree(
                f"/local/domain/0/backend/{type_}/{domid}"))

    async def _release(self, domain: Domain) -> None:
        for name, attached in list(self._claimed.items()):
            if attached.domain is not domain:
                continue
            attached.cancel.cancel()
            for device in attached.devices:
                await device.driver.disconnect()
            self._remove_nodes(attached)
            del self._claimed[name]
            log.info("dom%d (%s) gone: %d device(s) disconnected", domain.domid, name,
                     len(attached.devices))


__all__ = ["Daemon", "frontend_path", "sd_notify"]
