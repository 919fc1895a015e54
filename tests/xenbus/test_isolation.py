"""Guest domains are isolated from each other and from the backend (dom0).

Two frontend sessions against one in-process daemon play two guests. Neither
may read or write the other's nodes, nor write the backend's nodes (hardening.md
#17: neither side can write the other's keys), nor attach the other's devices,
beyond what node permissions grant (specs/xenbus.md §3, §4). Claiming a domain
name is checked: unknown names, names already attached, names whose ``uids``
exclude the peer, and a second claim are refused (specs/xenbus.md §2.1).
"""

from __future__ import annotations

import os

import pytest
import trio

from pvio.frontends.session import OfferedDevice, open_session
from pvio.layouts import XenbusState as S
from pvio.xenbus.client import open_client
from pvio.xenbus.device import DeviceError, FrontendDevice, backend_path, frontend_path
from pvio.xenbus.store import XenstoreError
from tests.pvio_daemon import running_daemon, wait_state, watchdog

UID = os.getuid()
OTHER_UID = UID + 4242

CONFIG = f"""
[[domain]]
name = "a"
  [[domain.device]]
  type = "vbd"
  devid = 51712
  image = "a.img"
  size = "1M"
  [[domain.device]]
  type = "console"
  devid = 0

[[domain]]
name = "b"
  [[domain.device]]
  type = "vbd"
  devid = 51712
  image = "b.img"
  size = "1M"
  [[domain.device]]
  type = "vif"
  devid = 0

[[domain]]
name = "locked"
uids = [{OTHER_UID}]

[[domain]]
name = "mine"
uids = [{UID}, {OTHER_UID}]

[[domain]]
name = "spare"
"""

VBD = 51712
TEST_TIMEOUT = 30


@pytest.fixture
async def daemon():
    async with watchdog(TEST_TIMEOUT), running_daemon(CONFIG) as daemon:
        yield daemon


async def refused(coro, name: str = "EACCES") -> None:
    with pytest.raises(XenstoreError) as info:
        await coro
    assert info.value.name == name, info.value


async def connect_all(session) -> list[FrontendDevice]:
    devices = []
    for offered in await session.devices():
        devices.append(await session.attach(session.driver_for(offered), offered.devid))
    with trio.fail_after(10):
        for device in devices:
            await device.connected.wait()
    return devices


async def test_sessions_get_their_own_domains(daemon):
    async with open_session(daemon.config.socket, "a", pool_pages=64) as a, \
            open_session(daemon.config.socket, "b", pool_pages=64) as b:
        assert a.domid != b.domid
        assert {(d.type, d.devid) for d in await a.devices()} == {("vbd", VBD), ("console", 0)}
        assert {(d.type, d.devid) for d in await b.devices()} == {("vbd", VBD), ("vif", 0)}
        assert await a.xs.read("name") == b"a"
        assert await b.xs.read("name") == b"b"


async def test_guest_cannot_read_or_write_another_guests_nodes(daemon):
    async with open_session(daemon.config.socket, "a", pool_pages=64) as a, \
            open_session(daemon.config.socket, "b", pool_pages=64) as b:
        await connect_all(b)
        await b.xs.write("data/private", "b's secret")
        b_home = f"/local/domain/{b.domid}"
        b_fe = frontend_path("vbd", b.domid, VBD)
        before = {k: await b.xs.read(f"{b_fe}/{k}") for k in await b.xs.directory(b_fe)}

        for path in (b_home, f"{b_home}/data/private", f"{b_home}/data", b_fe,
                     f"{b_fe}/state", f"{b_fe}/ring-ref", f"{b_fe}/event-channel",
                     f"{b_home}/device/vif/0/tx-ring-ref", f"{b_home}/no-such-node"):
            await refused(a.xs.read(path))
            await refused(a.xs.directory(path))
            await refused(a.xs.get_perms(path))
        for path in (f"{b_fe}/state", f"{b_fe}/ring-ref", f"{b_fe}/new-key",
                     f"{b_home}/data/private", f"{b_home}/new"):
            await refused(a.xs.write(path, "6"))
        await refused(a.xs.mkdir(f"{b_home}/newdir"))
        await refused(a.xs.rm(b_fe))
        await refused(a.xs.rm(f"{b_home}/data/private"))
        await refused(a.xs.set_perms(b_fe, [f"b{a.domid}"]))
        await refused(a.xs.set_perms(f"{b_home}/data/private", [f"n{a.domid}"]))
        # The same inside a transaction: refused at the operation, nothing committed.
        tx = await a.xs.transaction_start()
        await refused(a.xs.write(f"{b_fe}/state", "5", tx))
        await refused(a.xs.read(f"{b_fe}/state", tx))
        await a.xs.transaction_end(tx)

        assert await b.xs.read("data/private") == b"b's secret"
        assert {k: await b.xs.read(f"{b_fe}/{k}") for k in await b.xs.directory(b_fe)} == before
        assert all(d.status.state == S.Connected for d in b.attached)


async def test_guest_reads_but_cannot_write_its_backend(daemon):
    async with open_session(daemon.config.socket, "a", pool_pages=64) as a:
        await connect_all(a)
        be = backend_path("vbd", a.domid, VBD)
        # Readable (perms n0 r<domid>): the frontend needs the backend's keys.
        assert await a.xs.read(f"{be}/state") == str(int(S.Connected)).encode()
        assert await a.xs.read(f"{be}/frontend") == frontend_path("vbd", a.domid, VBD).encode()
        assert "sectors" in await a.xs.directory(be)
        assert await a.xs.get_perms(be) == ["n0", f"r{a.domid}"]
        # Not writable, not removable, perms not changeable, no new keys.
        for key in ("state", "sectors", "frontend", "mode", "new-key", "new/deeper"):
            await refused(a.xs.write(f"{be}/{key}", "1"))
        await refused(a.xs.rm(f"{be}/state"))
        await refused(a.xs.rm(be))
        await refused(a.xs.set_perms(be, [f"b{a.domid}"]))
        await refused(a.xs.mkdir(f"{be}/dir"))
        # dom0's other nodes: not even listable.
        for path in ("/local/domain/0", "/local/domain/0/backend",
                     "/local/domain/0/backend/vbd", "/", "/local/domain"):
            await refused(a.xs.directory(path))
        await refused(a.xs.read("/local/domain/0/name"))
        await refused(a.xs.write("/local/domain/0/backend/vbd/x", "1"))
        await refused(a.xs.write("/tool/x", "1"))
        assert await a.xs.read(f"{be}/state") == str(int(S.Connected)).encode()


async def test_guest_cannot_read_another_guests_backend(daemon):
    async with open_session(daemon.config.socket, "a", pool_pages=64) as a, \
            open_session(daemon.config.socket, "b", pool_pages=64) as b:
        await connect_all(b)
        be = backend_path("vbd", b.domid, VBD)
        for path in (be, f"{be}/state", f"{be}/sectors", f"{be}/params",
                     f"/local/domain/0/backend/vbd/{b.domid}", backend_path("vif", b.domid, 0)):
            await refused(a.xs.read(path))
            await refused(a.xs.directory(path))
        await refused(a.xs.write(f"{be}/state", str(int(S.Closing))))
        await refused(a.xs.rm(be))
        assert await b.xs.read(f"{be}/state") == str(int(S.Connected)).encode()


async def test_permissions_granted_by_the_owner_are_honoured(daemon):
    async with open_session(daemon.config.socket, "a", pool_pages=64) as a, \
            open_session(daemon.config.socket, "b", pool_pages=64) as b, \
            open_client(daemon.config.socket) as c:  # a third, unclaimed domain
        shared = f"/local/domain/{b.domid}/data/shared"
        await b.xs.write(shared, "for a")
        await b.xs.set_perms(shared, [f"n{b.domid}", f"r{a.domid}"])
        assert await a.xs.read(shared) == b"for a"
        await refused(a.xs.write(shared, "a was here"))
        await refused(a.xs.set_perms(shared, [f"b{a.domid}"]))
        await refused(c.read(shared))
        await b.xs.set_perms(shared, [f"n{b.domid}", f"b{a.domid}"])
        await a.xs.write(shared, "a was here")
        assert await b.xs.read(shared) == b"a was here"
        await refused(a.xs.set_perms(shared, [f"n{a.domid}"]))  # only the owner may
        await refused(c.write(shared, "c"))
        # A child a creates there is owned by a, with the rest of the parent's list
        # (as in C xenstored: b, not named in it, cannot read it).
        await a.xs.write(f"{shared}/child", "x")
        assert await a.xs.get_perms(f"{shared}/child") == [f"n{a.domid}", f"b{a.domid}"]
        await refused(b.xs.read(f"{shared}/child"))
        await refused(c.read(f"{shared}/child"))


async def test_watches_do_not_leak_other_domains_changes(daemon):
    async with open_session(daemon.config.socket, "a", pool_pages=64) as a, \
            open_session(daemon.config.socket, "b", pool_pages=64) as b:
        paths = [f"/local/domain/{b.domid}", f"/local/domain/0/backend/vbd/{b.domid}",
                 "/local/domain/0/backend", "/local/domain"]
        async with a.xs.watch(paths[0]) as w0, a.xs.watch(paths[1]) as w1, \
                a.xs.watch(paths[2]) as w2, a.xs.watch(paths[3]) as w3, \
                a.xs.watch("data") as mine:
            await connect_all(b)
            await b.xs.write("data/x", "1")
            await a.xs.write("data/y", "1")
            # A round trip on a's connection: every event queued for a before
            # this reply has been routed by now.
            await a.xs.read("domid")
            b_paths = (f"/local/domain/{b.domid}", f"/local/domain/0/backend/vbd/{b.domid}",
                       f"/local/domain/0/backend/vif/{b.domid}")
            for path, chan in zip(paths, (w0, w1, w2, w3), strict=True):
                events = _drain(chan)
                assert events[0] == path  # the registration
                leaked = [e for e in events[1:]
                          if any(e == p or e.startswith(p + "/") for p in b_paths)]
                assert leaked == [], (path, leaked)
            # a's own relative watch: registration, then "data" created and "data/y".
            assert _drain(mine) == ["data", "data", "data/y"]


def xenstore_error(exc: BaseException) -> XenstoreError:
    """The XenstoreError inside ``exc`` (open_session raises it inside trio's
    exception groups)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    assert isinstance(exc, XenstoreError), repr(exc)
    return exc


def _drain(chan) -> list[str]:
    got = []
    while True:
        try:
            got.append(chan.receive_nowait())
        except trio.WouldBlock:
            return got


async def test_guest_cannot_attach_another_domains_device(daemon):
    async with open_session(daemon.config.socket, "a", pool_pages=64) as a, \
            open_session(daemon.config.socket, "b", pool_pages=64) as b:
        b_fe = frontend_path("vbd", b.domid, VBD)
        b_be = backend_path("vbd", b.domid, VBD)
        # What a frontend does first: read the device's backend node, write
        # Initialising. Both refused on b's device.
        await refused(a.xs.read(f"{b_fe}/backend"))
        await refused(a.xs.write(f"{b_fe}/state", str(int(S.Initialising))))
        # A device type b has and a lacks: a has no such device.
        with pytest.raises(DeviceError, match="no backend node"):
            await a.attach(a.driver_for(OfferedDevice("vif", 0, "")), 0)
        # Publishing transport keys into b's frontend directory is refused (the
        # keys are written in one transaction; check none landed).
        for key, value in (("ring-ref", "8"), ("event-channel", "1"), ("protocol", "x")):
            await refused(a.xs.write(f"{b_fe}/{key}", value))
        assert "ring-ref" not in await b.xs.directory(b_fe)
        # Pointing a's own device at b's backend gains nothing: b's backend is
        # unreadable to a, and b's backend only watches b's frontend.
        fake = frontend_path("vbd", a.domid, 99)
        await a.xs.write(f"{fake}/backend", b_be)
        await a.xs.write(f"{fake}/state", str(int(S.Initialised)))
        await refused(a.xs.read(f"{b_be}/state"))
        # b's backend never moved; b connects normally afterwards, and so does a.
        assert await b.xs.read(f"{b_be}/state") == str(int(S.InitWait)).encode()
        await a.xs.rm(fake)
        await connect_all(b)
        assert await b.xs.read(f"{b_be}/state") == str(int(S.Connected)).encode()
        await connect_all(a)


async def test_frontend_keys_of_one_domain_do_not_reach_anothers_backend(daemon):
    # a publishes a valid transport for its own vbd and stops before Initialised;
    # b copies the numbers (grant refs, port) into its own vbd and says
    # Initialised. b's backend maps through b's grant table and b's ports only.
    async with open_session(daemon.config.socket, "a", pool_pages=64) as a, \
            open_session(daemon.config.socket, "b", pool_pages=64) as b:
        a_fe = frontend_path("vbd", a.domid, VBD)
        a_driver = a.driver_for(OfferedDevice("vbd", VBD, ""))
        await a_driver.publish(a.xs, a_fe)
        keys = {k: await a.xs.read(f"{a_fe}/{k}") for k in ("ring-ref", "event-channel")}
        b_fe = frontend_path("vbd", b.domid, VBD)
        for key, value in keys.items():
            await b.xs.write(f"{b_fe}/{key}", value)
        await b.xs.write(f"{b_fe}/state", str(int(S.Initialised)))
        b_be = backend_path("vbd", b.domid, VBD)
        assert await wait_state(b.xs, f"{b_be}/state", S.Closing) == S.Closing
        a_be = backend_path("vbd", a.domid, VBD)
        assert await a.xs.read(f"{a_be}/state") == str(int(S.InitWait)).encode()
        await a.xs.write(f"{a_fe}/state", str(int(S.Initialised)))
        assert await wait_state(a.xs, f"{a_be}/state", S.Connected) == S.Connected


# ------------------------------------------------------------------ claims


async def test_claim_of_an_unknown_name_is_enoent(daemon):
    async with open_client(daemon.config.socket) as xs:
        await refused(xs.claim("nobody"), "ENOENT")
        await refused(xs.claim("../a"), "ENOENT")
        await refused(xs.claim(""), "ENOENT")
        assert await xs.claim("a") >= 1  # a refused claim does not poison the connection


async def test_claim_of_an_attached_name_is_ebusy(daemon):
    async with open_session(daemon.config.socket, "a", pool_pages=64) as a, \
            open_client(daemon.config.socket) as xs:
        await refused(xs.claim("a"), "EBUSY")
        with pytest.raises(BaseException) as info:  # unwrapped below
            async with open_session(daemon.config.socket, "a", pool_pages=64):
                pass
        assert xenstore_error(info.value).name == "EBUSY"
        assert a.domid != int(await xs.read("domid"))
        # The refused guest did not get a's devices.
        await refused(xs.directory("device"), "ENOENT")
        await refused(xs.read(backend_path("vbd", a.domid, VBD) + "/state"))
        assert await xs.claim("b") >= 1


async def test_name_is_claimable_again_after_its_guest_left(daemon):
    async with open_session(daemon.config.socket, "a", pool_pages=64) as a:
        first = a.domid
        await connect_all(a)
    with trio.fail_after(5):
        while True:
            try:
                async with open_session(daemon.config.socket, "a", pool_pages=64) as again:
                    await connect_all(again)
                    assert {(d.type, d.devid) for d in await again.devices()} == {
                        ("vbd", VBD), ("console", 0)}
                    break
            except XenstoreError as exc:  # the old domain is still being released
                assert exc.name == "EBUSY"
                await trio.sleep(0.05)
    assert first >= 1


async def test_claim_restricted_to_other_uids_is_eacces(daemon):
    async with open_client(daemon.config.socket) as xs:
        await refused(xs.claim("locked"), "EACCES")
        assert await xs.claim("mine") >= 1  # our uid is listed there


async def test_second_claim_on_one_connection_is_eisconn(daemon):
    async with open_client(daemon.config.socket) as xs:
        domid = await xs.claim("spare")
        await refused(xs.claim("a"), "EISCONN")
        await refused(xs.claim("spare"), "EISCONN")
        assert int(await xs.read("domid")) == domid
        assert await xs.read("name") == b"spare"
    async with open_session(daemon.config.socket, "a", pool_pages=64) as a:
        assert await a.xs.read("name") == b"a"  # "a" was not taken by the refused claim


async def test_admin_connection_cannot_claim(daemon):
    async with open_client(daemon.config.admin_socket) as xs:
        await refused(xs.claim("a"), "EINVAL")
    async with open_session(daemon.config.socket, "a", pool_pages=64):
        pass


async def test_guest_cannot_rewrite_its_domid_or_name(daemon):
    # On Xen, libxl creates /local/domain/<domid>/{domid,name} owned by dom0 and
    # readable by the domain only ("n0 r<domid>"): the guest cannot change the
    # identity the toolstack (here: `pvio status`) shows for it.
    async with open_session(daemon.config.socket, "a", pool_pages=64) as a:
        await refused(a.xs.write("name", "Domain-0"))
        await refused(a.xs.write("domid", "0"))
        await refused(a.xs.rm("name"))
        await refused(a.xs.set_perms("name", [f"b{a.domid}"]))
        assert await a.xs.read("name") == b"a"
        assert await a.xs.read("domid") == str(a.domid).encode()


async def test_guest_cannot_read_another_guests_domid_or_name(daemon):
    async with open_session(daemon.config.socket, "a", pool_pages=64) as a, \
            open_session(daemon.config.socket, "b", pool_pages=64) as b:
        await refused(a.xs.read(f"/local/domain/{b.domid}/name"))
        await refused(a.xs.read(f"/local/domain/{b.domid}/domid"))
