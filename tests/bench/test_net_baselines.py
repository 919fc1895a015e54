"""Smoke tests of the net benchmark's baselines: each runs for one second and returns
positive figures of the promised shape. Nothing here asserts on timings."""

from __future__ import annotations

import glob
import os
import subprocess
import tempfile

import pytest

from pvio.bench import _net_baselines as baselines


def our_namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if f"-{os.getpid()}-" in line]


def test_veth_tcp():
    result = baselines.veth_tcp(1)
    assert set(result) >= {"bits_per_second", "retransmits"}
    assert result["bits_per_second"] > 0
    assert result["retransmits"] >= 0
    assert result["bytes"] > 0 and result["seconds"] > 0
    assert our_namespaces() == []


def test_relay_small_frames():
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "pvio-relay-*")))
    result = baselines.relay_small_frames(1, frame_size=64, warmup=0.2)
    assert set(result) == {"frames_per_second", "frames", "seconds"}
    assert result["frames"] > 0
    assert result["seconds"] > 0
    assert result["frames_per_second"] == pytest.approx(result["frames"] / result["seconds"])
    after = set(glob.glob(os.path.join(tempfile.gettempdir(), "pvio-relay-*")))
    assert after <= before  # its socket directory is gone


def test_relay_rejects_bad_frame_size():
    with pytest.raises(ValueError):
        baselines.relay_small_frames(1, frame_size=0)
