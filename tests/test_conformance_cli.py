"""``pvio conformance`` from the command line: reports, JUnit XML, exit status, and the
C example frontend (built from Xen's unmodified headers) passing the block run."""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET

from tests.blk_helpers import domain, vbd
from tests.pvio_daemon import ServeProcess, short_tmpdir
from tests.test_c_blkfront import c_blkfront  # noqa: F401 - the module-scoped build fixture


def pvio(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pvio", "conformance", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_list_names_every_check_with_its_section():
    out = pvio("block", "--list")
    assert out.returncode == 0, out.stderr
    assert "blkif.response-id" in out.stdout and "[blkif §2]" in out.stdout
    assert "ring.hostile-req-prod" in out.stdout


def test_block_backend_of_a_running_daemon_passes_with_junit(tmp_path):
    with short_tmpdir() as root:
        (root / "pvio.toml").write_text(domain("guest", vbd()))
        daemon = ServeProcess(root, "--config", str(root / "pvio.toml")).start()
        try:
            junit = tmp_path / "report.xml"
            out = pvio("block", "--socket", daemon.socket, "--junit", str(junit))
        finally:
            assert daemon.stop() == 0
    assert out.returncode == 0, out.stdout + out.stderr
    assert "PASS  blkif.write-read [blkif §3]" in out.stdout
    suite = ET.parse(junit).getroot()
    assert suite.tag == "testsuite" and suite.get("failures") == "0"
    assert len(suite.findall("testcase")) >= 15


def test_pvios_own_block_frontend_program_passes():
    out = pvio("block", "--frontend-cmd", f"{sys.executable} -m pvio.testing.block")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "9 passed, 0 failed" in out.stdout


def test_the_c_example_passes_the_block_conformance_run(c_blkfront, tmp_path):  # noqa: F811
    junit = tmp_path / "c.xml"
    out = pvio("block", "--frontend-cmd", str(c_blkfront), "--junit", str(junit))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 failed, 0 errors" in out.stdout
    assert ET.parse(junit).getroot().get("failures") == "0"


def test_a_failing_frontend_exits_1_and_names_the_rule(tmp_path):
    junit = tmp_path / "f.xml"
    out = pvio("block", "--frontend-cmd", "false", "--timeout", "10", "--junit", str(junit),
               "--checks", "frontend.*", "--checks", "xenbus.frontend-states")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "FAIL  frontend.completes [blkif §4]" in out.stdout
    assert "rule:" in out.stdout
    suite = ET.parse(junit).getroot()
    assert int(suite.get("failures")) >= 1


def test_ring_kit_runs_on_pvios_rings():
    out = pvio("ring")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "6 passed" in out.stdout


def test_no_daemon_is_a_clear_usage_error(tmp_path):
    out = pvio("block", "--socket", str(tmp_path / "nothing.sock"))
    assert out.returncode == 2
    assert "no daemon at" in out.stderr


def test_net_and_console_backends_of_the_default_daemon_pass():
    with short_tmpdir() as root:
        daemon = ServeProcess(root).start()  # the embedded default: vbd, console, vif
        try:
            net = pvio("net", "--socket", daemon.socket, "-q")
            console = pvio("console", "--socket", daemon.socket, "-q")
            block = pvio("block", "--socket", daemon.socket, "-q")
        finally:
            assert daemon.stop() == 0
    for out in (net, console, block):
        assert out.returncode == 0, out.stdout + out.stderr
        assert " 0 failed, 0 errors" in out.stdout
    assert "1 not applicable" in net.stdout  # rx-copy needs --peer-domain


def test_pvios_own_net_and_console_frontend_programs_pass():
    for kind in ("net", "console"):
        out = pvio(kind, "--frontend-cmd", f"{sys.executable} -m pvio.testing.{kind}", "-q")
        assert out.returncode == 0, kind + out.stdout + out.stderr
        assert " 0 failed, 0 errors" in out.stdout
