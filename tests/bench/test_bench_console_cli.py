"""Smoke tests of ``pvio bench console``: it runs, and its report has the promised shape.

Durations are tiny and nothing here asserts on timings: numbers only have to be
positive. The real measurement is ``pvio bench console``.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from pvio.bench import console as bench

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = ["--seconds", "0.1", "--warmup", "0.02", "--slices", "1"]
RATIOS = {"out_vs_pty", "out_vs_socketpair", "in_vs_pty", "in_vs_socketpair",
          "echo_p50_vs_pty", "echo_p99_vs_pty", "echo_p50_vs_socketpair",
          "echo_p99_vs_socketpair", "out_mb_per_s", "in_mb_per_s", "echo_p50_us",
          "echo_p99_us"}


def test_cli_json_all_cases():
    cmd = [sys.executable, "-m", "pvio", "bench", "console", "--json", *TINY]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no progress lines (nor warnings) with --json
    report = json.loads(result.stdout)
    assert set(report) >= {"cases", "ratios", "machine", "config", "wall_s"}
    cases = report["cases"]
    assert [(c["workload"], c["transport"]) for c in cases] == [
        (w, t) for w in bench.WORKLOADS for t in bench.TRANSPORTS]
    for c in cases:
        assert c["requests"] > 0
        assert c["bytes"] > 0
        assert c["mb_per_s"] > 0
        assert c["cpu_host"] >= 0 and c["cpu_guest"] >= 0
        if c["transport"] == "pvio":
            assert c["cpu_daemon"] >= 0
            assert c["guest_throttled"] >= 0
        if c["workload"] == "echo":
            assert c["round_trips"] > 0
            assert 0 < c["p50_us"] <= c["p99_us"] <= c["max_us"]
    ratios = report["ratios"]
    assert set(ratios) >= RATIOS
    for key in RATIOS:
        assert ratios[key] > 0, key
    assert report["pvio_backend_statistics"]["bytes_from_guest"] > 0


def test_script_table_and_progress():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "console.py"), *TINY,
           "--workloads", "echo,out", "--transports", "pvio,socketpair", "--msg-size", "16"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "vs socketpair" in result.stdout
    assert result.stderr.count("MB/s") == 4  # one progress line per case


def test_without_pvio_there_are_no_ratios():
    report = bench.run_benchmark(seconds=0.05, warmup=0.01, slices=1, workloads=["echo"],
                                 transports=["pty", "socketpair"])
    assert [c["transport"] for c in report["cases"]] == ["pty", "socketpair"]
    assert report["ratios"]["echo_p99_vs_pty"] is None  # absent, not invented
    assert "echo" in bench.format_table(report)


@pytest.mark.parametrize("argv", [["--msg-size", "4096"], ["--seconds", "0"],
                                  ["--workloads", "fax"], ["--transports", "telnet"]])
def test_cli_rejects_bad_options(argv):
    cmd = [sys.executable, "-m", "pvio", "bench", "console", *argv]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
