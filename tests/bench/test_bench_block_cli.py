"""Smoke tests of ``pvio bench block``: it runs, and its report has the promised shape.

Durations are tiny and nothing here asserts on timings: numbers only have to be
positive. The real measurement is ``pvio bench block``.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from pvio.bench import block as bench

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = ["--seconds", "0.1", "--warmup", "0.02", "--slices", "1", "--size", "4M"]
RATIOS = {"seq64k_read_vs_pread", "rand4k_qd32_vs_socket", "seq64k_read_vs_socket",
          "seq64k_write_vs_pwrite", "rand4k_qd1_vs_socket", "rand4k_qd1_p99_us"}


def test_cli_json_all_cases():
    cmd = [sys.executable, "-m", "pvio", "bench", "block", "--json", *TINY]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no progress lines with --json
    report = json.loads(result.stdout)
    assert set(report) >= {"cases", "ratios", "targets", "machine", "config"}
    cases = report["cases"]
    assert [(c["workload"], c["system"]) for c in cases] == [
        (w, s) for w in bench.WORKLOADS for s in bench.SYSTEMS]
    for c in cases:
        assert c["ops"] > 0
        assert c["ops_per_s"] > 0
        assert c["mb_per_s"] > 0
        assert c["cpu_client"] >= 0 and c["cpu_server"] >= 0
        if c["workload"].endswith("qd1"):
            assert 0 < c["p50_us"] <= c["p99_us"] <= c["max_us"]
        assert c["depth"] == (1 if c["system"] == "pread" else
                              {"rand4k_qd32": 32, "seq64k_read": 32, "seq64k_write": 32}
                              .get(c["workload"], 1))
    assert report["config"]["api"] == "batch"
    ratios = report["ratios"]
    assert set(ratios) >= RATIOS
    for key in RATIOS:
        assert ratios[key] > 0, key
    assert set(report["targets"]) == {"seq64k_read_vs_pread", "rand4k_qd32_vs_socket"}
    for target in report["targets"].values():
        assert set(target) == {"what", "value", "target", "met"}
        assert target["met"] in (True, False)


@pytest.mark.parametrize("api", ["batch", "tasks"])
def test_script_table_and_progress(api):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "block.py"), *TINY,
           "--workloads", "rand4k_qd1,seq64k_write", "--systems", "pvio,socket",
           "--seq-depth", "4", "--api", api]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "vs socket" in result.stdout
    assert "targets:" in result.stdout
    assert result.stderr.count("ops/s") == 4  # one progress line per case


@pytest.mark.parametrize("argv", [["--seq-depth", "64"], ["--size", "1000"],
                                  ["--workloads", "rand1m"], ["--systems", "nfs"],
                                  ["--seconds", "0"], ["--api", "threads"]])
def test_cli_rejects_bad_options(argv):
    cmd = [sys.executable, "-m", "pvio", "bench", "block", *argv]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2


def test_offsets_stay_on_the_disk():
    size = 1 << 20
    rand = bench._Offsets(size, 4096, True, seed=1)
    seq = bench._Offsets(size, 65536, False, seed=1)
    assert all(0 <= rand.next() <= size - 4096 and rand.i for _ in range(1000))
    assert [seq.next() for _ in range(18)] == [i % 16 * 65536 for i in range(18)]


async def test_socket_client_batches_round_trip(tmp_path):
    """The socket baseline's read_many/write_many move the right bytes (a wrong
    baseline would make every ratio meaningless)."""
    import random
    import socket

    import trio

    image = str(tmp_path / "img")
    bench.make_image(image, 1 << 20)
    server, path = bench._start_socket_server(str(tmp_path), image)
    try:
        sk = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sk.connect(path)
        client = bench.SocketBlockClient(sk)
        async with trio.open_nursery() as nursery:
            await nursery.start(client.run)
            rng = random.Random(2)
            items = [(k * 8192, rng.randbytes(4096)) for k in range(40)]
            await client.write_many(items)
            bufs = [bytearray(4096) for _ in items]
            await client.read_many([(o, b) for (o, _), b in zip(items, bufs, strict=True)])
            assert [bytes(b) for b in bufs] == [d for _, d in items]
            with open(image, "rb") as f:
                disk = f.read()
            assert all(disk[o:o + 4096] == d for o, d in items)
            nursery.cancel_scope.cancel()
        sk.close()
    finally:
        server.stop()
