"""A normal (non-editable) install has every module: the wheel is checked against the tree."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_regression_the_wheel_carries_every_pvio_module(tmp_path):
    # pvio.xenbus (and later pvio.testing) were missing from a hand-written package list:
    # editable installs hid it, a wheel install could not import the daemon.
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                          "-w", str(tmp_path), str(ROOT)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = tmp_path.glob("pvio-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "pvio").rglob("*.py")}
    missing = sorted(modules - names)
    assert not missing, f"not in the wheel: {missing}"
    assert any(n.startswith("pvio/ring/_cring") and n.endswith(".so") for n in names)
