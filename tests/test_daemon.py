"""``pvio serve``, ``pvio status`` and ``pvio demo`` as an operator runs them.

Each test that starts ``pvio serve`` stops it by pid (SIGTERM) and checks the
exit code; see tests/pvio_daemon.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import uuid

import pytest
import trio

from pvio.daemon import Daemon
from pvio.frontends.session import open_session
from pvio.layouts import XenbusState as S
from pvio.xenbus.client import open_client
from pvio.xenbus.device import backend_path
from pvio.xenbus.store import XenstoreError
from tests.pvio_daemon import (
    GRACEFUL_LINES,
    ServeProcess,
    clean_env,
    serving,
    short_tmpdir,
    watchdog,
)

TEST_TIMEOUT = 90
DEVICES = {("vbd", 51712), ("console", 0), ("vif", 0)}


def pvio(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pvio", *args], capture_output=True,
                          text=True, timeout=timeout, env=clean_env(), stdin=subprocess.DEVNULL)


async def apvio(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    with trio.fail_after(timeout):
        result = await trio.run_process([sys.executable, "-m", "pvio", *args],
                                        capture_stdout=True, capture_stderr=True, check=False,
                                        env=clean_env(), stdin=subprocess.DEVNULL)
    return subprocess.CompletedProcess(result.args, result.returncode,
                                       result.stdout.decode(), result.stderr.decode())


@pytest.fixture
async def deadline():
    async with watchdog(TEST_TIMEOUT):
        yield


async def connect_all(session) -> list:
    devices = [await session.attach(session.driver_for(d), d.devid)
               for d in await session.devices()]
    with trio.fail_after(15):
        for device in devices:
            await device.connected.wait()
    return devices


# ------------------------------------------------------------------ status


def test_status_of_a_fresh_daemon_lists_dom0():
    with serving() as serve:
        result = pvio("status", "--socket", serve.socket)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[0] == "DOMAINS"
        assert lines[1].split() == ["dom0", "Domain-0"]
        assert "DEVICES" in lines
        assert lines[lines.index("DEVICES") + 1].strip() == "(none)"
        data = json.loads(pvio("status", "--json", "--socket", serve.socket).stdout)
        assert data["domains"] == [{"domid": "0", "name": "Domain-0"}]
        assert data["devices"] == []


def test_status_without_a_daemon_fails_clearly():
    with short_tmpdir() as root:
        result = pvio("status", "--socket", str(root / "nothing.sock"))
        assert result.returncode == 1
        assert "nothing.sock.admin" in result.stderr
        assert "Traceback" not in result.stderr


async def test_status_shows_a_claimed_domain_and_its_devices(deadline):
    with serving() as serve:
        async with open_session(serve.socket, "guest", pool_pages=256) as session:
            # Claimed, nothing attached: the backends wait for the frontend.
            rows = {}
            with trio.fail_after(10):
                while {(r["type"], int(r["devid"])) for r in rows.values()} != DEVICES or any(
                        r["backend_state"] != "InitWait(2)" for r in rows.values()):
                    result = await apvio("status", "--json", "--socket", serve.socket)
                    assert result.returncode == 0, result.stderr
                    data = json.loads(result.stdout)
                    rows = {(r["type"], r["devid"]): r for r in data["devices"]}
                    await trio.sleep(0.05)
            assert {"domid": str(session.domid), "name": "guest"} in data["domains"]
            for row in rows.values():
                assert row["domid"] == session.domid
                assert row["frontend_state"] == "Initialising(1)"
            assert rows["vif", "0"]["features"]["mac"] == "00:16:3e:00:00:01"

            await connect_all(session)
            result = await apvio("status", "--socket", serve.socket)
            assert result.returncode == 0, result.stderr
            text = result.stdout
            assert f"dom{session.domid}" in text and "guest" in text
            for type_, devid in sorted(DEVICES):
                line = f"{type_}/{session.domid}/{devid}: backend Connected(4), " \
                       "frontend Connected(4)"
                assert line in text, text
            assert "sectors=131072" in text  # 64M of 512-byte sectors
            assert "mac=00:16:3e:00:00:01" in text
            assert "ring-ref=" in text and "event-channel=" in text
        # After the session closed: both sides Closed, or the domain already gone.
        with trio.fail_after(10):
            while True:
                data = json.loads((await apvio("status", "--json", "--socket",
                                               serve.socket)).stdout)
                if all(r["backend_state"] == "Closed(6)" for r in data["devices"]):
                    break
                await trio.sleep(0.05)


# -------------------------------------------------------------------- demo


def test_demo_connects_every_device_and_exits_0():
    result = pvio("demo", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for dev in ("vbd/51712", "console/0", "vif/0"):
        assert f"{dev}: frontend Initialising -> Initialised -> Connected\n" in out, out
        assert f"{dev}: frontend Initialising -> Initialised -> Connected -> Closing -> " \
               "Closed" in out, out
    for type_, devid in DEVICES:
        assert f"{type_}/1/{devid}: backend Connected(4), frontend Connected(4)" in out, out
    assert "a frame back to the vif's MAC arrived: True" in out, out
    assert "read it back: identical" in out, out
    assert out.rstrip().endswith("done.")
    assert "Traceback" not in result.stderr


# ----------------------------------------------------------------- config


BAD_CONFIGS = [
    pytest.param('socket = "unterminated\n', ["line 1"], id="syntax-error"),
    pytest.param('[[domain]]\nname = "guest"\n[[domain]\n', ["line 3"], id="syntax-error-table"),
    pytest.param('sokcet = "/tmp/x.sock"\n', ["unknown key", "sokcet"], id="unknown-top-level"),
    pytest.param('[[domain]]\nname = "guest"\nuid = [1000]\n', ["unknown key", "uid"],
                 id="unknown-domain-key"),
    pytest.param('[[domain]]\nname = "guest"\n  [[domain.device]]\n  type = "vbd"\n'
                 '  devid = 51712\n  sise = "1G"\n', ["unknown key", "sise"],
                 id="unknown-device-key"),
    pytest.param('[[domain]]\nname = "guest"\n  [[domain.device]]\n  type = "floppy"\n',
                 ["domain[0].device[0]", "type must be one of"], id="unknown-device-type"),
    pytest.param('[[domain]]\nname = "bad name!"\n', ["domain[0]", "name"], id="bad-name"),
    pytest.param('admin_uids = "root"\n', ["admin_uids", "list of uids"], id="bad-uids"),
]


@pytest.mark.parametrize(("text", "expected"), BAD_CONFIGS)
def test_bad_config_is_a_clear_error_with_exit_code_2(text, expected):
    with short_tmpdir() as root:
        path = root / "pvio.toml"
        path.write_text(text)
        serve = ServeProcess(root, "--config", str(path))
        serve.start(wait=False)
        rc = serve.wait_refused(20)
        log = serve.log
        assert rc == 2, log
        first = log.strip().splitlines()
        assert len(first) == 1, log  # one line, no traceback
        assert first[0].startswith(f"pvio serve: {path}: "), log
        for piece in expected:
            assert piece in first[0], (piece, log)
        assert not os.path.exists(serve.socket)


def test_missing_config_file_is_exit_code_2():
    with short_tmpdir() as root:
        result = pvio("serve", "--config", str(root / "nope.toml"), "--socket",
                      str(root / "xb.sock"), "--data-dir", str(root / "data"), timeout=20)
        assert result.returncode == 2
        assert "cannot read config" in result.stderr and "nope.toml" in result.stderr
        assert "Traceback" not in result.stderr


def test_print_default_config_is_the_embedded_default_and_valid():
    result = pvio("serve", "--print-default-config")
    assert result.returncode == 0
    from pvio import config as cfg

    parsed = cfg.parse(result.stdout, socket="/tmp/x.sock", data_dir="/tmp/d")
    assert set(parsed.domains) == {"guest"}
    assert {(d.type, d.devid) for d in parsed.domains["guest"].devices} == DEVICES


# ------------------------------------------------------------ permissions


def test_socket_directory_is_0700_and_sockets_0600():
    with short_tmpdir() as root:
        run = root / "run"
        run.mkdir(mode=0o755)
        os.chmod(run, 0o755)  # too open: the daemon must tighten it
        serve = ServeProcess(root).start()
        try:
            assert stat.S_IMODE(os.stat(run).st_mode) == 0o700
            for path in (serve.socket, serve.admin):
                st = os.lstat(path)
                assert stat.S_ISSOCK(st.st_mode)
                assert stat.S_IMODE(st.st_mode) == 0o600, (path, oct(st.st_mode))
                assert st.st_uid == os.getuid()
            assert stat.S_IMODE(os.stat(serve.data_dir).st_mode) & 0o077 == 0
        finally:
            assert serve.stop() == 0
        serve.assert_graceful()
        assert not os.path.exists(serve.socket) and not os.path.exists(serve.admin)


def test_a_fresh_socket_directory_is_created_0700():
    with short_tmpdir() as root:
        serve = ServeProcess(root, socket=str(root / "a" / "b" / "xb.sock")).start()
        try:
            assert stat.S_IMODE(os.stat(root / "a" / "b").st_mode) == 0o700
        finally:
            assert serve.stop() == 0
        serve.assert_graceful()


# ----------------------------------------------------------------- systemd


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_sd_notify_ready_and_stopping(kind):
    with short_tmpdir() as root, \
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        if kind == "path":
            address = str(root / "notify")
            notify.bind(address)
            env_value = address
        else:
            name = f"pvio-test-{uuid.uuid4().hex}"
            notify.bind("\0" + name)
            env_value = "@" + name
        notify.settimeout(20)
        serve = ServeProcess(root, env=clean_env(NOTIFY_SOCKET=env_value))
        serve.start(wait=False)
        try:
            ready = notify.recv(4096).decode()
            assert "READY=1" in ready.split("\n"), ready
            # READY means serving: the sockets accept connections right away.
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.connect(serve.admin)
            serve.wait_ready()
            serve.signal(signal.SIGTERM)
            stopping = notify.recv(4096).decode()
            assert "STOPPING=1" in stopping.split("\n"), stopping
            assert serve.wait_exit(20) == 0
        finally:
            serve.kill()
        serve.assert_graceful()


def test_no_notify_socket_no_notification_errors():
    with serving() as serve:
        pass
    assert "cannot notify systemd" not in serve.log


# ---------------------------------------------------------------- shutdown


async def test_sigterm_closes_connected_devices_and_exits_0(deadline):
    with short_tmpdir() as root:
        serve = ServeProcess(root).start()
        try:
            async with open_session(serve.socket, "guest", pool_pages=256) as session:
                devices = await connect_all(session)
                serve.signal(signal.SIGTERM)
                with trio.fail_after(20):
                    for device in devices:
                        await device.closed.wait()
                seen = {f"{d.driver.type}/{d.devid}": (d.status.peer_state.name,
                                                       d.status.state.name)
                        for d in devices}
                rc = await serve.astop()
        finally:
            serve.kill()
        assert rc == 0, serve.log
        serve.assert_graceful()
        # Each frontend saw its backend close (Closing or Closed) and closed in turn,
        # rather than just losing the connection with the backend still Connected.
        for name, (peer, ours) in seen.items():
            assert peer in ("Closing", "Closed"), (name, peer, ours, serve.log)
            assert ours == "Closed", (name, peer, ours)


async def test_sigterm_closes_devices_as_seen_by_an_admin_watch(deadline):
    with short_tmpdir() as root:
        serve = ServeProcess(root).start()
        try:
            async with open_session(serve.socket, "guest", pool_pages=256) as session, \
                    open_client(serve.admin) as admin:
                await connect_all(session)
                be = backend_path("vbd", session.domid, 51712)
                states = []
                async with admin.watch(f"{be}/state") as events:
                    await events.receive()  # registration
                    serve.signal(signal.SIGTERM)
                    with trio.move_on_after(10):
                        async for _ in events:
                            try:
                                states.append(int(await admin.read(f"{be}/state")))
                            except (XenstoreError, OSError):
                                break
                rc = await serve.astop()
        finally:
            serve.kill()
        assert rc == 0, serve.log
        assert S.Closing in states or S.Closed in states, (states, serve.log)


async def test_sigterm_with_an_idle_session_exits_0(deadline):
    with short_tmpdir() as root:
        serve = ServeProcess(root).start()
        try:
            async with open_session(serve.socket, "guest", pool_pages=64) as session:
                assert session.domid >= 1
                serve.signal(signal.SIGTERM)
                rc = await serve.astop()
        finally:
            serve.kill()
        assert rc == 0, serve.log
        serve.assert_graceful()


def test_sigint_is_graceful_too():
    with short_tmpdir() as root:
        serve = ServeProcess(root).start()
        try:
            serve.signal(signal.SIGINT)
            rc = serve.wait_exit(20)
        finally:
            serve.kill()
        assert rc == 0, serve.log
        assert "SIGINT received: closing devices" in serve.log
        assert GRACEFUL_LINES[1] in serve.log


# -------------------------------------------------------- claim robustness


async def test_a_device_that_cannot_be_created_does_not_kill_the_daemon(deadline):
    # The vbd image's directory does not exist: creating the backend fails when
    # the guest claims the domain. The claim must fail; the daemon must go on.
    config = textwrap.dedent("""
        [[domain]]
        name = "broken"
          [[domain.device]]
          type = "vbd"
          image = "missing-dir/disk.img"
          size = "1M"

        [[domain]]
        name = "fine"
          [[domain.device]]
          type = "console"
    """)
    with short_tmpdir() as root:
        (root / "pvio.toml").write_text(config)
        serve = ServeProcess(root, "--config", str(root / "pvio.toml")).start()
        try:
            async with open_client(serve.socket) as xs:
                with pytest.raises((XenstoreError, OSError)) as info:
                    with trio.fail_after(10):
                        await xs.claim("broken")
                if not isinstance(info.value, XenstoreError):
                    with trio.move_on_after(3):
                        while serve.proc.poll() is None:
                            await trio.sleep(0.05)
                    raise AssertionError(
                        f"the claim got no reply ({info.value!r}); daemon exit code "
                        f"{serve.proc.poll()}:\n{serve.log}")
            assert serve.proc.poll() is None, serve.log
            async with open_session(serve.socket, "fine", pool_pages=64) as session:
                await connect_all(session)
            rc = await serve.astop()
        finally:
            serve.kill()
        assert rc == 0, serve.log
        serve.assert_graceful()


# ------------------------------------------------------------ vbd options


VBD_POLL = """
[[domain]]
name = "g"
  [[domain.device]]
  type = "vbd"
  devid = 51712
  size = "1M"
  busy_poll_us = {}
"""


@pytest.mark.parametrize("value", ["0", "200", "12.5"])
def test_vbd_busy_poll_us_reaches_the_backend(value):
    from pvio import config as cfg
    from pvio.backends.blkback import BlkBackend

    parsed = cfg.parse(VBD_POLL.format(value), socket="/tmp/x.sock", data_dir="/tmp/d")
    (dev,) = parsed.domains["g"].devices
    assert dev.options["busy_poll_us"] == float(value)
    with short_tmpdir() as root:
        daemon = Daemon(cfg.parse(VBD_POLL.format(value), socket=str(root / "xb.sock"),
                                  data_dir=str(root)))
        driver = daemon._driver(None, "g", dev)
        assert isinstance(driver, BlkBackend) and driver.busy_poll_us == float(value)


@pytest.mark.parametrize("value", ["-1", "20000", '"fast"', "true"])
def test_vbd_busy_poll_us_is_checked(value):
    from pvio import config as cfg

    with pytest.raises(cfg.ConfigError, match="busy_poll_us"):
        cfg.parse(VBD_POLL.format(value), socket="/tmp/x.sock", data_dir="/tmp/d")
VIF_SPOOF = """
[[domain]]
name = "g"
  [[domain.device]]
  type = "vif"
  mac = "02:00:00:00:00:01"
{}"""


@pytest.mark.parametrize(("line", "expected"), [("", 1.0), ("stall_backoff = 0\n", 0.0),
                                                ("stall_backoff = 2.5\n", 2.5)])
def test_stall_backoff_reaches_every_device(line, expected):
    from pvio import config as cfg

    with short_tmpdir() as root:
        daemon = Daemon(cfg.parse(line + VIF_SPOOF.format(""), socket=str(root / "xb.sock"),
                                  data_dir=str(root)))
        (dev,) = daemon.config.domains["g"].devices
        assert daemon._backoff("g", dev).base == expected
        assert daemon._backoff("g", dev) is daemon._backoff("g", dev)  # outlives sessions


@pytest.mark.parametrize("value", ["-1", "61", '"1s"', "true"])
def test_stall_backoff_is_checked(value):
    from pvio import config as cfg

    with pytest.raises(cfg.ConfigError, match="stall_backoff: must be a number of seconds"):
        cfg.parse(f"stall_backoff = {value}\n", socket="/tmp/x.sock", data_dir="/tmp/d")


@pytest.mark.parametrize(("line", "expected"), [("", True), ("  spoof_check = true\n", True),
                                                ("  spoof_check = false\n", False)])
def test_vif_spoof_check_reaches_the_backend(line, expected):
    from pvio import config as cfg

    with short_tmpdir() as root:
        daemon = Daemon(cfg.parse(VIF_SPOOF.format(line), socket=str(root / "xb.sock"),
                                  data_dir=str(root)))
        (dev,) = daemon.config.domains["g"].devices
        assert daemon._driver(None, "g", dev).spoof_check is expected


@pytest.mark.parametrize("value", ["1", '"yes"'])
def test_vif_spoof_check_is_checked(value):
    from pvio import config as cfg

    with pytest.raises(cfg.ConfigError, match="spoof_check must be true or false"):
        cfg.parse(VIF_SPOOF.format(f"  spoof_check = {value}\n"), socket="/tmp/x.sock",
                  data_dir="/tmp/d")


