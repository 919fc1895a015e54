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
