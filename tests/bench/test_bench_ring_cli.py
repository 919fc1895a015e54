"""Smoke tests of ``pvio bench ring``: it runs, and its report has the promised shape.

Durations are tiny and nothing here asserts on timings: numbers only have to be
positive. The real measurement is ``pvio bench ring`` (see benchmarks/README.md).
"""

from __future__ import annotations

import json
import pathlib
import struct
import subprocess
import sys

import pytest

from pvio.bench import ring as bench

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = {"seconds": 0.06, "warmup": 0.02, "slices": 2, "pages": 1}


def test_handle_batch_echoes_ids_and_checks_requests():
    reqs = bench.make_requests(4)[: 4 * bench.REQ_SIZE]
    reqs[bench.REQ_SIZE] = 9  # request id 1: an operation the backend does not serve
    out = bytearray(4 * bench.RSP_SIZE)
    assert bench.handle_batch(memoryview(reqs), out) == len(out)
    rsps = list(struct.iter_unpack("<QBxh4x", out))
    assert rsps == [(0, 0, 0), (1, 9, -1), (2, 0, 0), (3, 0, 0)]


def check_report(report: dict, depths: list[int], transports: list[str]) -> None:
    assert set(report) >= {"cases", "ratios", "targets", "machine", "config"}
    cases = report["cases"]
    assert [(c["transport"], c["depth"]) for c in cases] == [
        (t, d) for d in depths for t in transports
    ]
    for c in cases:
        assert c["requests"] > 0
        assert c["req_per_s"] > 0
        assert c["mean_us"] > 0
        assert c["frontend"]["cpu_s"] >= 0
        assert "backend" in c
        if c["depth"] == 1:
            assert 0 < c["p50_us"] <= c["p99_us"] <= c["max_us"]
        if c["transport"].startswith("pvio"):
            assert c["ring_slots"] >= c["depth"]
    ratios = report["ratios"]
    assert {"q256_vs_socketpair", "q1_p99_us", "q1_p99_us_nopoll",
            "q1_nopoll_vs_socketpair_p99", "q32_vs_socketpair"} <= set(ratios)
    assert ratios["q1_p99_us"] > 0
    for target in report["targets"].values():
        assert set(target) == {"what", "value", "target", "met"}


def test_run_benchmark_all_transports():
    report = bench.run_benchmark([1, 8], **TINY)
    check_report(report, [1, 8], list(bench.TRANSPORTS))
    ratios = report["ratios"]
    assert ratios["q1_nopoll_vs_socketpair_p99"] > 0
    assert ratios["q1_p99_us_nopoll"] > 0
    # depth 256 was not run: its ratio is absent, not invented
    assert report["ratios"]["q256_vs_socketpair"] is None
    assert "Q=256" in bench.format_table(report)  # the target line says n/a


def test_wake_ahead_is_on_for_pvio_nopoll_and_off_for_the_noahead_transport():
    """At depth 1 without busy-poll both ends sleep between round trips: the
    backend, woken with a request while the frontend waits for its response,
    kicks the frontend ahead of the response; the -noahead transport never does."""
    report = bench.run_benchmark([1], transports=["pvio-nopoll", "pvio-nopoll-noahead",
                                                  "socketpair"], **TINY)
    cases = {c["transport"]: c for c in report["cases"]}
    assert all(c["requests"] > 0 for c in cases.values())
    assert cases["pvio-nopoll"]["backend"]["wake_ahead_sent"] > 0
    off = cases["pvio-nopoll-noahead"]
    assert off["backend"]["wake_ahead_sent"] == off["frontend"]["wake_ahead_sent"] == 0
    assert "pvio-nopoll-noahead" in bench.format_table(report)


def test_cli_json(tmp_path):
    cmd = [sys.executable, "-m", "pvio", "bench", "ring", "--json", "--depths", "1,16",
           "--transports", "pvio,socketpair", "--seconds", "0.06", "--warmup", "0.02",
           "--slices", "2", "--pages", "1"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no progress lines with --json
    check_report(json.loads(result.stdout), [1, 16], ["pvio", "socketpair"])


def test_cli_table_and_progress():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "ring.py"), "--depths", "2",
           "--seconds", "0.05", "--warmup", "0.02", "--slices", "1", "--pages", "1",
           "--transports", "pvio-nopoll,socketpair,mp.Pipe"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert "vs socketpair" in result.stdout
    assert result.stderr.count("req/s") == 3


@pytest.mark.parametrize("argv", [["--depths", "64", "--pages", "1"],
                                  ["--depths", "0"], ["--transports", "carrier-pigeon"]])
def test_cli_rejects_bad_options(argv):
    cmd = [sys.executable, "-m", "pvio", "bench", "ring", *argv]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
