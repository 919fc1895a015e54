"""The `pvio` console command."""

import subprocess
import sys

import pvio


def run(*args):
    return subprocess.run(
        [sys.executable, "-m", "pvio", *args], capture_output=True, text=True, timeout=60
    )


def test_version():
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"pvio {pvio.__version__}"


def test_help_teaches_the_commands():
    result = run("--help")
    assert result.returncode == 0
    assert "bench" in result.stdout
    assert "examples:" in result.stdout


def test_bench_ring_help_lists_its_options():
    result = run("bench", "ring", "--help")
    assert result.returncode == 0
    assert "--json" in result.stdout


def test_no_command_prints_help_and_fails():
    result = run()
    assert result.returncode == 2
    assert "usage: pvio" in result.stdout
