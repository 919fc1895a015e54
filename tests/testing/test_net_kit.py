"""The net frontend kit against pvio's netfront, and a frontend that breaks a rule."""

from __future__ import annotations

from pvio.testing.block import FrontendTarget
from pvio.testing.net import NET_FRONTEND_CHECKS, check_net_frontend, reference_net_frontend


async def test_pvios_netfront_passes_the_net_frontend_kit():
    report = await check_net_frontend(FrontendTarget(factory=reference_net_frontend))
    assert report.ok, report.format()
    assert len(report.results) == len(NET_FRONTEND_CHECKS)


async def test_a_frontend_sending_runt_packets_fails_the_tx_validity_check():
    from pvio.frontends.netfront import open_netfront
    from pvio.frontends.session import open_session
    from pvio.netif import Frame

    async def runts(socket_path: str, domain: str) -> None:
        async with open_session(socket_path, domain) as session:
            nic = await open_netfront(session)
            q = nic._q[0]
            q.backlog.append(Frame(b"\xff" * 10))  # 10 bytes: below an Ethernet header
            nic._wake_tx(q)
            import trio

            await trio.sleep(0.5)
            await nic.device.close()

    report = await check_net_frontend(FrontendTarget(factory=runts, timeout=15),
                                      select=lambda c: c.name == "netif.tx-valid")
    result = report.result("netif.tx-valid")
    assert result.outcome == "fail", report.format()
    assert "shorter than an Ethernet header" in result.message and "[netif §3]" in result.line


TWO_VIFS = ('[[domain]]\nname = "guest"\n  [[domain.device]]\n  type = "vif"\n  devid = 0\n'
            '[[domain]]\nname = "peer"\n  [[domain.device]]\n  type = "vif"\n  devid = 0\n'
            '  mac = "00:16:3e:00:00:02"\n')


async def test_pvios_daemon_passes_the_net_backend_kit():
    from pvio.testing.block import BackendTarget
    from pvio.testing.net import NET_BACKEND_CHECKS, check_net_backend
    from tests.pvio_daemon import running_daemon

    async with running_daemon(TWO_VIFS) as daemon:
        report = await check_net_backend(BackendTarget(daemon.config.socket),
                                         peer_domain="peer")
        alone = await check_net_backend(BackendTarget(daemon.config.socket),
                                        select=lambda c: c.name == "netif.rx-copy")
    assert report.ok, report.format()
    assert len(report.results) == len(NET_BACKEND_CHECKS)
    assert alone.result("netif.rx-copy").outcome == "skip"  # no peer domain: not applicable


async def test_a_netback_that_accepts_runts_fails_tx_validation():
    from pvio.backends.netback import NetBackend
    from pvio.testing.block import BackendTarget
    from pvio.testing.net import check_net_backend
    from tests.pvio_daemon import running_daemon

    class TrustingNetBackend(NetBackend):
        """Forgets the minimum packet size (an Ethernet header)."""

        min_tx_frame = 0

    async with running_daemon(TWO_VIFS, backend_classes={"vif": TrustingNetBackend}) as d:
        report = await check_net_backend(BackendTarget(d.config.socket),
                                         select=lambda c: c.name.startswith("netif.tx"))
    result = report.result("netif.tx-validation")
    assert result.outcome == "fail", report.format()
    assert "shorter than an Ethernet header" in result.message and "[netif §3]" in result.line
    assert report.result("netif.tx-ok").outcome == "pass"
