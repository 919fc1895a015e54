"""The console kits against pvio's daemon and console frontend."""

from __future__ import annotations

from pvio.testing.block import BackendTarget, FrontendTarget
from pvio.testing.console import (
    CONSOLE_BACKEND_CHECKS,
    CONSOLE_FRONTEND_CHECKS,
    check_console_backend,
    check_console_frontend,
    reference_console_frontend,
)
from tests.pvio_daemon import running_daemon

CONSOLE = '[[domain]]\nname = "guest"\n  [[domain.device]]\n  type = "console"\n  devid = 0\n'


async def test_pvios_daemon_passes_the_console_backend_kit():
    async with running_daemon(CONSOLE) as daemon:
        report = await check_console_backend(BackendTarget(daemon.config.socket))
    assert report.ok, report.format()
    assert len(report.results) == len(CONSOLE_BACKEND_CHECKS)


async def test_pvios_console_frontend_passes_the_console_frontend_kit():
    report = await check_console_frontend(FrontendTarget(factory=reference_console_frontend))
    assert report.ok, report.format()
    assert len(report.results) == len(CONSOLE_FRONTEND_CHECKS)


async def test_a_console_frontend_that_does_not_echo_fails_the_input_check():
    from pvio.frontends.console import open_console
    from pvio.frontends.session import open_session

    async def deaf(socket_path: str, domain: str) -> None:
        async with open_session(socket_path, domain, pool_pages=16) as session:
            front = await open_console(session)
            await front.stream.send_all(b"hello, I never listen\n")
            import trio

            await trio.sleep(2)  # ignores whatever arrives meanwhile
            await front.device.close()

    report = await check_console_frontend(
        FrontendTarget(factory=deaf, timeout=15),
        select=lambda c: c.name in ("console.frontend-input", "console.frontend-output"))
    assert report.result("console.frontend-output").outcome == "pass", report.format()
    result = report.result("console.frontend-input")
    assert result.outcome == "fail" and "[console §3]" in result.line
