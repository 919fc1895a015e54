"""Backend restart without harm: kill -9 the daemon under load, nothing acknowledged lost.

Issue acceptance "durability under fault": writes of verifiable patterns in
flight at queue depth 32; the daemon is killed with SIGKILL and restarted 20
times; the frontend reconnects, renegotiates and resubmits what was not
answered (blkfront's blkif_recover). Afterwards: zero application errors, and
the image holds exactly the last acknowledged pattern of every block. The same
code runs longer as ``pvio bench recovery --kills N``.
"""

import json
import subprocess
import sys

from pvio.bench.recovery import run_stress

KILLS = 20


def test_kill_9_the_daemon_20_times_under_qd32_loses_nothing_acknowledged(tmp_path):
    report = run_stress(kills=KILLS, writers=32, blocks_per_writer=64, directory=str(tmp_path))
    assert report["errors"] == []
    assert report["kills"] == report["reconnections"] == KILLS
    assert report["resubmitted"] > 0  # requests really were in flight at the kills
    assert report["blocks_written"] == report["blocks"] == 32 * 64
    assert report["lost_blocks"] == []
    assert report["ok"]


def test_stress_command_reports_and_exits_0(tmp_path):
    cmd = [sys.executable, "-m", "pvio", "bench", "recovery", "--kills", "2", "--writers", "4",
           "--dir", str(tmp_path), "--json"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] and report["kills"] == 2 and report["lost_blocks"] == []
    assert list(tmp_path.iterdir()) == []  # its daemon's socket and image are gone
