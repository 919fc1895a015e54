"""1,000 connect/attach/detach/disconnect cycles leave fds and memory flat.

Issue acceptance for the daemon: each cycle opens a domain session on the guest
socket (handing over guest memory and a grant table), claims the domain,
attaches its console through the full XenbusState handshake (the backend maps
the page, binds the event channel, opens a pty), closes it again (both sides to
Closed, grants revoked) and disconnects. Afterwards the process's open-fd
count is what it was, RSS has not grown beyond noise, and the store holds no
trace of the domain.
"""

import trio

from pvio.frontends.console import ConsoleFront
from pvio.frontends.session import open_session
from tests.proc_helpers import open_fd_count, rss_bytes
from tests.pvio_daemon import running_daemon

TOML = """
[[domain]]
name = "churn"
  [[domain.device]]
  type = "console"
  devid = 0
"""
CYCLES = 1000


async def test_1000_connect_attach_detach_disconnect_cycles_leave_no_trace():
    async with running_daemon(TOML) as daemon:
        store = daemon.server.store

        async def cycle() -> None:
            async with open_session(daemon.config.socket, "churn", pool_pages=16,
                                    grant_entries=64) as session:
                front = ConsoleFront(session)
                device = await session.attach(front, 0)
                with trio.fail_after(10):
                    await device.connected.wait()
                await front.stream.send_all(b"x")
                await device.close()
                assert device.status.state.name == "Closed"
            with trio.fail_after(10):  # the daemon notices the disconnect
                while daemon.server.domains:
                    await trio.sleep(0.005)

        for _ in range(20):  # warm up caches, logs, allocator pools
            await cycle()
        fds, rss, nodes = open_fd_count(), rss_bytes(), len(store.nodes)
        for _ in range(CYCLES):
            await cycle()
        assert open_fd_count() == fds
        assert len(store.nodes) == nodes
        assert "1" not in store.directory(daemon._root, "/local/domain")
        growth = rss_bytes() - rss
        assert growth < 16 << 20, f"RSS grew by {growth >> 10} KiB over {CYCLES} cycles"
