"""pvio._netns: namespaces are made and removed, veth pairs carry traffic, processes
started in a namespace are stopped when it closes, and failures carry the stderr.

Needs root and iproute2 (skipped otherwise). Every test ends by checking that no
namespace of this process is left in ``ip netns list``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from pvio import _netns
from pvio._netns import Netns, available, veth_pair

PREFIX = "pvio-t"


def namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                         check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def ours() -> list[str]:
    return [n for n in namespaces() if n.startswith(f"{PREFIX}-{os.getpid()}-")]


@pytest.fixture(autouse=True)
def no_namespace_left():
    assert ours() == []
    yield
    assert ours() == []


def netns_inode(pid: int | str) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


def test_available_here():
    assert available() is None


def test_available_without_ip(monkeypatch):
    monkeypatch.setattr(_netns.shutil, "which", lambda name: None)
    assert "ip" in available()


def test_namespace_created_with_lo_up_and_removed():
    with Netns(PREFIX) as ns:
        assert re.fullmatch(rf"{PREFIX}-{os.getpid()}-\d+", ns.name)
        assert ns.exec_prefix == ["ip", "netns", "exec", ns.name]
        assert ours() == [ns.name]
        lo = ns.run("ip", "-o", "link", "show", "lo").stdout
        assert re.search(r"<[^>]*\bUP\b[^>]*>", lo), lo
        # only lo: a fresh namespace, not ours
        links = ns.run("ip", "-o", "link", "show").stdout.splitlines()
        assert [line.split(":")[1].strip() for line in links] == ["lo"]
        inside = ns.run("readlink", "/proc/self/ns/net").stdout.strip()
        assert inside != netns_inode("self")
    assert ns.closed
    assert ns.name not in namespaces()


def test_names_are_unique():
    with Netns(PREFIX) as a, Netns(PREFIX) as b:
        assert a.name != b.name
        assert sorted(ours()) == sorted([a.name, b.name])


def test_close_is_idempotent_and_run_after_close_fails():
    ns = Netns(PREFIX)
    ns.close()
    assert ns.name not in namespaces()
    ns.close()
    with ns:
        pass
    with pytest.raises(RuntimeError, match="closed"):
        ns.run("true")
    with pytest.raises(RuntimeError, match="closed"):
        ns.popen("true")


def test_veth_pair_ping_both_ways():
    with Netns(PREFIX) as a, Netns(PREFIX) as b:
        veth_pair(a, b, "10.9.0.1/24", "10.9.0.2/24")
        veth_pair(a, b, "10.9.1.1/24", "10.9.1.2/24", name="averylongprefix")
        for ns in (a, b):
            names = [line.split(":")[1].strip().split("@")[0]
                     for line in ns.run("ip", "-o", "link", "show", "type", "veth")
                     .stdout.splitlines()]
            assert len(names) == 2 and len(set(names)) == 2, names
            assert all(len(n) <= 15 for n in names), names
        a.run("ping", "-c", "1", "-W", "2", "10.9.0.2")
        b.run("ping", "-c", "1", "-W", "2", "10.9.0.1")
        a.run("ping", "-c", "1", "-W", "2", "10.9.1.2")
        # nothing of it reaches this (root) namespace
        root = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
        assert "10.9.0." not in root and "10.9.1." not in root
        # and namespaces not joined see nothing
        with Netns(PREFIX) as c:
            lonely = c.run("ping", "-c", "1", "-W", "1", "10.9.0.2", check=False)
            assert lonely.returncode != 0


def test_veth_pair_failure_carries_stderr_and_leaves_no_link():
    with Netns(PREFIX) as a, Netns(PREFIX) as b:
        with pytest.raises(RuntimeError) as info:
            veth_pair(a, b, "10.9.0.1/24", "not-an-address")
        assert "not-an-address" in str(info.value)
        assert "ip -n" in str(info.value)
        for ns in (a, b):
            assert ns.run("ip", "-o", "link", "show", "type", "veth").stdout == ""


def test_run_errors_carry_command_and_stderr():
    with Netns(PREFIX) as ns:
        with pytest.raises(RuntimeError) as info:
            ns.run("sh", "-c", "echo to-stdout; echo boom-on-stderr >&2; exit 3")
        message = str(info.value)
        assert "boom-on-stderr" in message
        assert "exit 3" in message
        assert ns.name in message and "sh -c" in message
        with pytest.raises(RuntimeError, match="Cannot find device"):
            ns.run("ip", "link", "set", "nosuchdev0", "up")
        result = ns.run("sh", "-c", "echo out; echo err >&2; exit 5", check=False)
        assert (result.returncode, result.stdout, result.stderr) == (5, "out\n", "err\n")
        with pytest.raises(RuntimeError, match="timed out"):
            ns.run("sleep", "10", timeout=0.3)


def test_popen_runs_inside_and_is_stopped_on_close():
    ns = Netns(PREFIX)
    proc = ns.popen("sh", "-c", "echo ready; exec sleep 60", stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        # ip netns exec execs the program: the pid is its own, inside the namespace
        assert netns_inode(proc.pid) == ns.run("readlink", "/proc/self/ns/net").stdout.strip()
        assert netns_inode(proc.pid) != netns_inode("self")
        done = ns.popen("true")
        done.wait(5)
        ns.close()
        assert proc.returncode == -signal.SIGTERM
        assert done.returncode == 0
    finally:
        ns.close()
        proc.stdout.close()
    assert ns.name not in namespaces()


def test_close_kills_a_process_that_ignores_sigterm():
    code = ("import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ready', flush=True); time.sleep(60)")
    with Netns(PREFIX) as ns:
        ns.stop_timeout = 0.5
        proc = ns.popen(sys.executable, "-c", code, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline() == "ready\n"
        start = time.monotonic()
    assert proc.returncode == -signal.SIGKILL
    assert 0.4 < time.monotonic() - start < 5
    proc.stdout.close()
