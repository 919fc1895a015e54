"""``pvio net capture`` / PVIO_CAPTURE against an in-process daemon (no namespaces)."""

from __future__ import annotations

import os
import socket

import pytest
import trio

from pvio.capture import capture
from pvio.frontends.netfront import open_netfront
from pvio.frontends.session import open_session
from pvio.pcap import read_pcap
from pvio.xenbus.client import open_client
from pvio.xenbus.store import XenstoreError
from tests.pvio_daemon import running_daemon

VIF = ('[[domain]]\nname = "guest"\n  [[domain.device]]\n  type = "vif"\n  devid = 0\n'
       '  mac = "00:16:3e:00:00:42"\n')


async def test_capture_writes_the_frames_of_a_port_into_a_pcap(tmp_path):
    out = tmp_path / "guest.pcap"
    async with running_daemon(VIF) as daemon, open_session(daemon.config.socket) as s:
        nic = await open_netfront(s)
        mac = bytes.fromhex(nic.mac.replace(":", ""))
        frame = b"\xff" * 6 + mac + b"\x88\xb5" + b"captured" + bytes(38)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: capture(daemon.config.admin_socket, "guest", str(out),
                                               count=3, duration=10, snaplen=20, quiet=True))
            with trio.fail_after(5):
                while not daemon.switch.ports[f"vif{s.domid}.0"].taps:
                    await trio.sleep(0.01)
            for _ in range(3):
                await nic.send(frame)
    records = read_pcap(out.read_bytes())
    assert [data for _, data in records] == [frame[:20]] * 3
    assert b"\x00\x00\x00\x00" not in out.read_bytes()[24:28]  # a timestamp was written


@pytest.mark.parametrize("port", ["nosuch", "guest.7"])
async def test_regression_capturing_an_unknown_port_is_enoent_and_the_daemon_lives(port):
    # Daemon._capture closed the fd and the server closed it again: EBADF killed the daemon.
    async with running_daemon(VIF) as daemon:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with ours, theirs:
            async with open_client(daemon.config.admin_socket) as xs:
                with pytest.raises(XenstoreError) as err:
                    await xs.capture(port, theirs.fileno())
                assert err.value.name == "ENOENT"
                assert await xs.read("/local/domain/0/name") == b"Domain-0"  # still serving


async def test_regression_a_capture_fd_that_is_not_a_socket_is_einval_and_the_daemon_lives():
    # socket.socket(fileno=<a pipe>) raised ENOTSOCK out of the handler and killed the daemon.
    async with running_daemon(VIF) as daemon, open_session(daemon.config.socket) as s:
        await open_netfront(s)
        r, w = os.pipe()
        try:
            async with open_client(daemon.config.admin_socket) as xs:
                with pytest.raises(XenstoreError) as err:
                    await xs.capture("guest", w)
                assert err.value.name == "EINVAL"
                assert await xs.read("/local/domain/0/name") == b"Domain-0"
        finally:
            os.close(r)
            os.close(w)


async def test_a_guest_connection_may_not_capture():
    async with running_daemon(VIF) as daemon, open_session(daemon.config.socket) as s:
        await open_netfront(s)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with ours, theirs, pytest.raises(XenstoreError) as err:
            await s.xs.capture("guest", theirs.fileno())
        assert err.value.name == "EINVAL"
