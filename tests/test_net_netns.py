"""The kernel's own network stack over pvio (issue: network devices end to end).

Two network namespaces, each with a TAP fed by ``pvio netfront-tap``, joined by
the daemon's switch (:func:`pvio.bench._netpair.pvio_pair`): ``ping`` both
ways, a 10 s ``iperf3`` TCP run with no stalled second, and a capture of a
switch port that ``tshark`` reads back with the ICMP and TCP traffic in it.
Every process is stopped by pid and every namespace deleted by the fixture.
"""

from __future__ import annotations

import signal
import subprocess

import pytest

from pvio._netns import stop_process
from pvio.bench._net_baselines import IPERF_PORT, iperf3_tcp
from pvio.bench._netpair import pvio_pair
from tests.pvio_daemon import READY_LINE


@pytest.fixture(scope="module")
def pair():
    with pvio_pair() as p:
        yield p


def test_ping_both_ways(pair):
    a_to_b = pair.ns_a.run("ping", "-c", "3", "-i", "0.2", "-W", "2", pair.addr_b, check=False)
    assert a_to_b.returncode == 0, a_to_b.stdout + a_to_b.stderr
    assert "3 received" in a_to_b.stdout
    b_to_a = pair.ns_b.run("ping", "-c", "3", "-i", "0.2", "-W", "2", pair.addr_a, check=False)
    assert b_to_a.returncode == 0, b_to_a.stdout + b_to_a.stderr
    assert "3 received" in b_to_a.stdout


def test_large_pings_cross_as_multi_slot_packets(pair):
    # 8000-byte ICMP payloads on a 1500-byte MTU are IP fragments; with -M dont on a
    # local MTU they would fail, so this checks reassembly of many frames per ping.
    out = pair.ns_a.run("ping", "-c", "2", "-s", "8000", "-W", "2", pair.addr_b, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_iperf3_tcp_10s_without_stalls(pair):
    result = iperf3_tcp(pair.ns_b, pair.ns_a, pair.addr_b, 10)
    assert result["seconds"] >= 9.5
    assert result["bytes"] > 0
    stalled = [i for i, rate in enumerate(result["intervals"]) if rate == 0]
    assert not stalled, f"no data moved in second(s) {stalled}: {result['intervals']}"


def test_capture_of_a_switch_port_reads_in_tshark(pair, tmp_path):
    pcap = tmp_path / "a.pcap"
    cap = pair.pvio("net", "capture", "a", str(pcap), "--socket", pair.socket,
                    "--snaplen", "128", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    text=True)
    try:
        # The CLI says "capturing ..." once the daemon accepted the capture (or exits).
        line = cap.stderr.readline()
        assert "capturing" in line, line + cap.stderr.read()
        ping = pair.ns_a.run("ping", "-c", "2", "-i", "0.2", "-W", "2", pair.addr_b,
                             check=False)
        assert ping.returncode == 0, ping.stdout
        iperf3_tcp(pair.ns_b, pair.ns_a, pair.addr_b, 1)
        cap.send_signal(signal.SIGINT)
        _, err = cap.communicate(timeout=10)
        assert cap.returncode == 0, err
        assert "frames written" in err
    finally:
        stop_process(cap)
    out = subprocess.run(["tshark", "-r", str(pcap), "-T", "fields", "-e", "frame.protocols",
                          "-e", "icmp.type", "-e", "tcp.dstport"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = [line.split("\t") for line in out.stdout.splitlines()]
    icmp_types = {r[1] for r in rows if "icmp" in r[0].split(":")}
    assert {"8", "0"} <= icmp_types, "echo request and reply both captured"
    tcp_to_iperf = [r for r in rows if "tcp" in r[0].split(":") and r[2] == str(IPERF_PORT)]
    assert tcp_to_iperf, "iperf3's TCP traffic captured"


def test_switch_uplink_tap_bridges_the_host_to_a_vif(tmp_path):
    """``[switch] tap``: the daemon's TAP in one namespace, a vif's netfront-tap in
    another; the host side pings the guest side through the switch."""
    import sys
    import time

    from pvio._netns import Netns

    config = tmp_path / "pvio.toml"
    config.write_text('[switch]\ntap = "pvup0"\n\n[[domain]]\nname = "guest"\n'
                      '  [[domain.device]]\n  type = "vif"\n  devid = 0\n')
    sock = str(tmp_path / "xb.sock")
    with Netns("pvio-host") as host, Netns("pvio-guest") as guest:
        with open(tmp_path / "daemon.log", "wb") as log:
            daemon = host.popen(sys.executable, "-m", "pvio", "serve", "--config", str(config),
                                "--socket", sock, "--data-dir", str(tmp_path / "data"),
                                stdout=log, stderr=subprocess.STDOUT)
        # Ready, not just listening: the admin socket exists before the TAP does.
        deadline = time.monotonic() + 20
        while READY_LINE not in (tmp_path / "daemon.log").read_text():
            assert daemon.poll() is None, (tmp_path / "daemon.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "daemon.log").read_text()
            time.sleep(0.05)
        host.run("ip", "addr", "add", "10.203.0.1/24", "dev", "pvup0")
        with open(tmp_path / "tap.log", "wb") as log:
            guest.popen(sys.executable, "-m", "pvio", "netfront-tap", "--socket", sock,
                        "--ifname", "pv0", "--address", "10.203.0.2/24", stdout=log,
                        stderr=subprocess.STDOUT)
        while " is vif " not in (tmp_path / "tap.log").read_text():
            assert time.monotonic() < deadline, (tmp_path / "tap.log").read_text()
            time.sleep(0.05)
        out = host.run("ping", "-c", "3", "-i", "0.2", "-W", "2", "10.203.0.2", check=False)
        assert out.returncode == 0, out.stdout + (tmp_path / "daemon.log").read_text()
        result = iperf3_tcp(guest, host, "10.203.0.2", 2)
        assert result["bytes"] > 0
