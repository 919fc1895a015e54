"""The block kits against pvio's own daemon and blkfront, and against deliberately
broken implementations that must fail the checks meant to catch them."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from pvio.testing.block import (
    BLOCK_BACKEND_CHECKS,
    BLOCK_FRONTEND_CHECKS,
    BackendTarget,
    FrontendTarget,
    check_block_backend,
    check_block_frontend,
    reference_block_frontend,
)
from tests.blk_helpers import domain, vbd
from tests.pvio_daemon import running_daemon
from tests.testing.broken import RefusingBlkBackend, WrongIdBlkBackend, skip_states_frontend


async def test_pvios_daemon_passes_the_block_backend_kit():
    async with running_daemon(domain("guest", vbd())) as daemon:
        report = await check_block_backend(BackendTarget(daemon.config.socket))
    assert report.ok, report.format()
    assert [r.outcome for r in report.results] == ["pass"] * len(BLOCK_BACKEND_CHECKS)


async def test_a_read_only_disk_reports_flush_and_discard_as_not_applicable():
    async with running_daemon(domain("guest", vbd(mode="r"))) as daemon:
        report = await check_block_backend(
            BackendTarget(daemon.config.socket),
            select=lambda c: c.name in ("blkif.flush", "blkif.discard", "blkif.response-id"))
    assert report.result("blkif.flush").outcome == "skip"
    assert report.result("blkif.discard").outcome == "skip"
    assert report.result("blkif.response-id").outcome == "pass"


async def test_a_backend_answering_with_wrong_ids_fails_the_response_id_check():
    async with running_daemon(domain("guest", vbd()),
                              backend_classes={"vbd": WrongIdBlkBackend}) as daemon:
        report = await check_block_backend(
            BackendTarget(daemon.config.socket),
            select=lambda c: c.name in ("blkif.response-id", "xenbus.backend-connects"))
    result = report.result("blkif.response-id")
    assert result.outcome == "fail", report.format()
    assert "[blkif §2]" in result.line and "answered once, with its id" in result.line
    assert report.result("xenbus.backend-connects").outcome == "pass"
    junit = ET.fromstring(report.junit_xml())
    assert junit.get("failures") == "1"
    failure = junit.find("testcase[@name='blkif.response-id']/failure")
    assert failure is not None and "blkif §2" in failure.text


async def test_regression_a_backend_that_refuses_to_connect_fails_the_kit():
    """A backend that refuses the device is the implementation's failure
    ("fail"), not the kit's ("error", which says the kit could not run the
    check): since attaching stopped waiting out its timeout on a refused
    device, the DeviceError escaped as an error. (Review finding.)"""
    async with running_daemon(domain("guest", vbd()),
                              backend_classes={"vbd": RefusingBlkBackend}) as daemon:
        report = await check_block_backend(
            BackendTarget(daemon.config.socket),
            select=lambda c: c.name == "xenbus.backend-connects")
    result = report.result("xenbus.backend-connects")
    assert result.outcome == "fail", report.format()
    assert "closed the device before it connected" in result.line


async def test_pvios_blkfront_passes_the_block_frontend_kit():
    report = await check_block_frontend(FrontendTarget(factory=reference_block_frontend))
    assert report.ok, report.format()
    assert len(report.results) == len(BLOCK_FRONTEND_CHECKS)


async def test_a_frontend_that_skips_xenbus_states_fails_the_state_check():
    report = await check_block_frontend(
        FrontendTarget(factory=skip_states_frontend, timeout=15),
        select=lambda c: c.name in ("xenbus.frontend-states", "blkif.frontend-keys"))
    result = report.result("xenbus.frontend-states")
    assert result.outcome == "fail", report.format()
    assert "without passing Initialised" in result.message
    assert "[xenbus §5]" in result.line
    assert report.result("blkif.frontend-keys").outcome == "pass"


async def test_a_frontend_that_never_answers_times_out_as_a_failure():
    async def hangs(socket_path: str, domain_name: str) -> None:
        import trio

        await trio.sleep_forever()

    report = await check_block_frontend(FrontendTarget(factory=hangs, timeout=1),
                                        select=lambda c: c.name == "frontend.completes")
    result = report.result("frontend.completes")
    assert result.outcome == "fail" and "still running after the timeout" in result.message
