"""Xen's own xenstore clients against a real ``pvio serve`` process.

Debian's ``xenstore-utils`` (the C ``xenstore-*`` tools over libxenstore) and
the PyPI client ``pyxs``, both unmodified, talk to the daemon through the
sockets ``XENSTORED_PATH`` / ``unix_socket_path`` name:

* the admin socket (``<socket>.admin``) is xenstored's socket: domain 0,
  privileged, may do anything;
* the guest socket plays ``/dev/xen/xenbus``: every connection is a new
  unprivileged domain, which owns its home ``/local/domain/<domid>`` and sees
  dom0's nodes only as their permissions allow (specs/xenbus.md §1, §3).

Each test starts its own daemon (``python -m pvio serve --socket ...
--data-dir ...``) and stops it by pid with SIGTERM, asserting exit code 0 and
the graceful-shutdown log lines.
"""

from __future__ import annotations

import errno
import os
import queue
import re
import signal
import subprocess
import threading
import time

import pytest
import pyxs
from pyxs._internal import Op

from tests.pvio_daemon import clean_env, serving

TOOL_TIMEOUT = 15


@pytest.fixture
def daemon():
    with serving() as serve:
        yield serve


def xs(serve, tool: str, *args: str, guest: bool = False,
       check: bool = False) -> subprocess.CompletedProcess:
    """Run ``xenstore-<tool>`` against the admin socket (or the guest socket)."""
    env = clean_env(XENSTORED_PATH=serve.socket if guest else serve.admin)
    result = subprocess.run([f"xenstore-{tool}", *args], env=env, capture_output=True,
                            text=True, timeout=TOOL_TIMEOUT)
    if check:
        assert result.returncode == 0, (tool, args, result.stdout, result.stderr)
    return result


def out(serve, tool: str, *args: str, guest: bool = False) -> str:
    return xs(serve, tool, *args, guest=guest, check=True).stdout


class Watcher:
    """``xenstore-watch`` as a child process whose output lines we can await."""

    def __init__(self, serve, path: str, *, guest: bool = False) -> None:
        env = clean_env(XENSTORED_PATH=serve.socket if guest else serve.admin)
        self.proc = subprocess.Popen(["xenstore-watch", path], env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.lines: queue.Queue[str] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def next(self, timeout: float = 5.0) -> str:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"xenstore-watch printed nothing within {timeout} s "
                                 f"(exit {self.proc.poll()})") from None

    def wait_for(self, path: str, timeout: float = 5.0) -> list[str]:
        """Lines up to and including ``path`` (fails after ``timeout``)."""
        seen = []
        deadline = time.monotonic() + timeout
        while True:
            line = self.next(max(0.01, deadline - time.monotonic()))
            seen.append(line)
            if line == path:
                return seen

    def quiet_for(self, seconds: float) -> list[str]:
        """Whatever it prints within ``seconds`` (expected: nothing)."""
        got = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                got.append(self.lines.get(timeout=left))
            except queue.Empty:
                break
        return got

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=10)
        self._thread.join(timeout=10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def watchers():
    started: list[Watcher] = []
    yield lambda *a, **kw: started.append(Watcher(*a, **kw)) or started[-1]
    for watcher in started:
        watcher.stop()


# ------------------------------------------------------------ admin (dom0)


def test_write_then_read(daemon):
    xs(daemon, "write", "/pvio-test/a", "hello world", "/pvio-test/b", "", check=True)
    assert out(daemon, "read", "/pvio-test/a") == "hello world\n"
    assert out(daemon, "read", "/pvio-test/b") == "\n"
    # Nodes the daemon itself created are visible to dom0's tools.
    assert out(daemon, "read", "/local/domain/0/name") == "Domain-0\n"
    assert out(daemon, "read", "/local/domain/0/domid") == "0\n"


def test_read_of_a_missing_node_fails(daemon):
    result = xs(daemon, "read", "/no/such/node")
    assert result.returncode != 0
    assert "/no/such/node" in result.stderr


def test_list_and_ls(daemon):
    xs(daemon, "write", "/t/x/a", "1", "/t/x/b", "2", "/t/y", "why", check=True)
    assert out(daemon, "list", "/t/x").split() == ["a", "b"]
    assert sorted(out(daemon, "list", "/t").split()) == ["x", "y"]
    ls = out(daemon, "ls", "/t").splitlines()
    assert re.match(r'^x = ""', ls[0]), ls
    assert re.match(r'^ a = "1"', ls[1]), ls
    assert re.match(r'^ b = "2"', ls[2]), ls
    assert re.match(r'^y = "why"', ls[3]), ls
    everything = out(daemon, "ls", "/")
    assert re.search(r'^   name = "Domain-0"', everything, re.M), everything


def test_exists(daemon):
    xs(daemon, "write", "/t/here", "1", check=True)
    assert xs(daemon, "exists", "/t/here").returncode == 0
    assert xs(daemon, "exists", "/t").returncode == 0
    assert xs(daemon, "exists", "/t/nothere").returncode != 0


def test_rm_removes_a_subtree(daemon):
    xs(daemon, "write", "/t/sub/a", "1", "/t/sub/b/c", "2", "/t/keep", "3", check=True)
    xs(daemon, "rm", "/t/sub", check=True)
    assert xs(daemon, "exists", "/t/sub").returncode != 0
    assert xs(daemon, "exists", "/t/sub/b/c").returncode != 0
    assert xs(daemon, "read", "/t/sub/a").returncode != 0
    assert out(daemon, "list", "/t").split() == ["keep"]


def test_chmod_then_ls_p_shows_the_perms(daemon):
    xs(daemon, "write", "/t/node", "v", check=True)
    xs(daemon, "chmod", "/t/node", "n5", "r7", check=True)
    listing = out(daemon, "ls", "-p", "/t")
    assert re.search(r'^node = "v" .*\(n5,r7\)$', listing, re.M), listing
    # A new child inherits its parent's list (dom0 stays the creator-agnostic writer).
    xs(daemon, "write", "/t/node/child", "c", check=True)
    listing = out(daemon, "ls", "-p", "/t/node")
    assert re.search(r'^child = "c" .*\(n5,r7\)$', listing, re.M), listing
    # The admin socket is privileged: dom0 may still read and write it.
    assert out(daemon, "read", "/t/node") == "v\n"


def test_watch_sees_a_write_from_another_tool(daemon, watchers):
    xs(daemon, "write", "/t/w", "", check=True)
    watcher = watchers(daemon, "/t/w")
    assert watcher.next() == "/t/w"  # fires once on registration
    xs(daemon, "write", "/t/w/x", "1", check=True)
    watcher.wait_for("/t/w/x")
    xs(daemon, "write", "/unrelated", "1", check=True)
    xs(daemon, "write", "/t/w", "again", check=True)
    assert "/unrelated" not in watcher.wait_for("/t/w")


# ------------------------------------------------------- guest (unprivileged)


def test_guest_cannot_read_dom0_nodes(daemon):
    result = xs(daemon, "read", "/local/domain/0/name", guest=True)
    assert result.returncode != 0
    assert "couldn't read path /local/domain/0/name" in result.stderr
    result = xs(daemon, "ls", "/local/domain/0", guest=True)
    assert result.returncode != 0
    assert "Permission denied" in result.stderr, result.stderr
    # A node dom0 made readable by everybody is readable.
    xs(daemon, "write", "/t/public", "hi", "/t/secret", "s", check=True)
    xs(daemon, "chmod", "/t/public", "r0", check=True)
    assert out(daemon, "read", "/t/public", guest=True) == "hi\n"
    assert xs(daemon, "read", "/t/secret", guest=True).returncode != 0


def test_guest_cannot_write_rm_or_chmod_dom0_nodes(daemon):
    xs(daemon, "write", "/t/node", "dom0's", check=True)
    xs(daemon, "chmod", "/t/node", "n0", "r1", "r2", "r3", check=True)  # readable, not writable
    result = xs(daemon, "write", "/t/node", "mine", guest=True)
    assert result.returncode != 0 and "could not write" in result.stderr
    result = xs(daemon, "write", "/t/node/child", "x", guest=True)
    assert result.returncode != 0
    result = xs(daemon, "rm", "/t/node", guest=True)
    assert result.returncode != 0 and "could not remove" in result.stderr
    result = xs(daemon, "chmod", "/t/node", "b1", guest=True)
    assert result.returncode != 0
    assert "Permission denied" in result.stderr, result.stderr
    # Nothing changed.
    assert out(daemon, "read", "/t/node") == "dom0's\n"
    assert xs(daemon, "exists", "/t/node/child").returncode != 0
    assert "(n0,r1,r2,r3)" in out(daemon, "ls", "-p", "/t")


def test_guest_reads_its_domid_and_name(daemon):
    domid, name = out(daemon, "read", "domid", "name", guest=True).split()
    assert int(domid) >= 1
    assert name == f"pvio-{domid}"
    # The absolute form of the same node, and GET_DOMAIN_PATH agrees (pyxs).
    with pyxs.Client(unix_socket_path=daemon.socket) as c:
        mine = int(c.read(b"domid"))
        assert c.get_domain_path(mine) == f"/local/domain/{mine}".encode()
        assert c.read(f"/local/domain/{mine}/domid".encode()) == str(mine).encode()


def test_guest_writes_its_own_relative_path(daemon, watchers):
    # The guest's domain (and its home) vanish when the tool disconnects, so
    # watch from dom0 to see where the relative write landed.
    watcher = watchers(daemon, "/local/domain")
    assert watcher.next() == "/local/domain"
    xs(daemon, "write", "data/key", "value", guest=True, check=True)
    deadline = time.monotonic() + 5
    seen = []
    while not any(re.fullmatch(r"/local/domain/\d+/data/key", s) for s in seen):
        seen.append(watcher.next(max(0.01, deadline - time.monotonic())))
    assert not any(s.startswith("/local/domain/0/") for s in seen), seen


def test_guest_watch_sees_only_what_it_may_read(daemon, watchers):
    xs(daemon, "write", "/t/w", "", check=True)
    xs(daemon, "chmod", "/t/w", "r0", check=True)  # the directory itself is readable
    watcher = watchers(daemon, "/t/w", guest=True)
    assert watcher.next() == "/t/w"
    xs(daemon, "write", "/t/w/secret", "1", check=True)  # inherits r0, chmod below
    xs(daemon, "chmod", "/t/w/secret", "n0", check=True)
    xs(daemon, "write", "/t/w/secret", "2", check=True)  # unreadable: no event
    xs(daemon, "write", "/t/w/public", "1", check=True)  # readable: event
    lines = watcher.wait_for("/t/w/public")
    assert lines.count("/t/w/secret") <= 2  # the two changes made while it was readable
    xs(daemon, "write", "/t/w/secret", "3", check=True)
    assert watcher.quiet_for(0.5) == []


# -------------------------------------------------------------------- pyxs


def test_pyxs_read_write_list_rm(daemon):
    with pyxs.Client(unix_socket_path=daemon.admin) as c:
        c.write(b"/py/a", b"1")
        c[b"/py/b"] = b"two"
        c.mkdir(b"/py/dir")
        assert c.read(b"/py/a") == b"1"
        assert c[b"/py/b"] == b"two"
        assert sorted(c.list(b"/py")) == [b"a", b"b", b"dir"]
        assert c.exists(b"/py/dir")
        c.delete(b"/py/a")
        assert not c.exists(b"/py/a")
        assert c.read(b"/py/a", default=b"gone") == b"gone"
        with pytest.raises(pyxs.PyXSError) as info:
            c.read(b"/py/a")
        assert info.value.args[0] == errno.ENOENT
        c.set_perms(b"/py/b", [b"n3", b"r4"])
        assert c.get_perms(b"/py/b") == [b"n3", b"r4"]
        assert c.get_domain_path(7) == b"/local/domain/7"
        tree = {path: value for path, value, _ in c.walk(b"/py")}
        assert tree == {b"/py": b"", b"/py/b": b"two", b"/py/dir": b""}
    # Visible to another tool: one store.
    assert out(daemon, "read", "/py/b") == "two\n"


def test_pyxs_transaction_commits(daemon):
    with pyxs.Client(unix_socket_path=daemon.admin) as c, \
            pyxs.Client(unix_socket_path=daemon.admin) as other:
        c.write(b"/tx/counter", b"1")
        c.transaction()
        value = int(c.read(b"/tx/counter"))
        c.write(b"/tx/counter", str(value + 1).encode())
        c.write(b"/tx/new", b"created in tx")
        # Not visible outside the transaction before the commit.
        assert other.read(b"/tx/counter") == b"1"
        assert not other.exists(b"/tx/new")
        assert c.commit() is True
        assert other.read(b"/tx/counter") == b"2"
        assert other.read(b"/tx/new") == b"created in tx"


def test_pyxs_rollback_applies_nothing(daemon):
    with pyxs.Client(unix_socket_path=daemon.admin) as c:
        c.write(b"/tx/k", b"before")
        c.transaction()
        c.write(b"/tx/k", b"during")
        c.delete(b"/tx/k")
        c.rollback()
        assert c.read(b"/tx/k") == b"before"


def test_pyxs_conflicting_transaction_fails_with_eagain(daemon):
    with pyxs.Client(unix_socket_path=daemon.admin) as c, \
            pyxs.Client(unix_socket_path=daemon.admin) as other:
        c.write(b"/tx/k", b"0")
        # pyxs turns EAGAIN into commit() == False.
        c.transaction()
        c.read(b"/tx/k")
        other.write(b"/tx/k", b"other")
        c.write(b"/tx/k", b"mine")
        assert c.commit() is False
        assert other.read(b"/tx/k") == b"other"
        # The raw TRANSACTION_END reply is XS_ERROR "EAGAIN".
        c.transaction()
        c.write(b"/tx/k", b"mine again")
        other.write(b"/tx/k", b"other again")
        try:
            with pytest.raises(pyxs.PyXSError) as info:
                c.execute_command(Op.TRANSACTION_END, b"T\x00")
        finally:
            c.tx_id = 0
        assert info.value.args[0] == errno.EAGAIN
        assert other.read(b"/tx/k") == b"other again"
        # A retry succeeds.
        c.transaction()
        c.write(b"/tx/k", b"retried")
        assert c.commit() is True
        assert other.read(b"/tx/k") == b"retried"


def test_pyxs_watch(daemon):
    with pyxs.Client(unix_socket_path=daemon.admin) as c, \
            pyxs.Client(unix_socket_path=daemon.admin) as writer:
        c.mkdir(b"/mon")
        monitor = c.monitor()
        monitor.watch(b"/mon", b"tok")
        assert monitor.events.get(timeout=5) == (b"/mon", b"tok")
        writer.write(b"/mon/x", b"1")
        assert monitor.events.get(timeout=5) == (b"/mon/x", b"tok")
        monitor.unwatch(b"/mon", b"tok")
        writer.write(b"/mon/y", b"1")
        with pytest.raises(queue.Empty):
            monitor.events.get(timeout=0.3)


def test_pyxs_as_an_unprivileged_guest(daemon):
    with pyxs.Client(unix_socket_path=daemon.admin) as admin:
        admin.write(b"/secret", b"s")
    with pyxs.Client(unix_socket_path=daemon.socket) as c:
        domid = int(c.read(b"domid"))
        for path in (b"/secret", b"/local/domain/0/name"):
            with pytest.raises(pyxs.PyXSError) as info:
                c.read(path)
            assert info.value.args[0] == errno.EACCES
        # A missing node under an unreadable parent is EACCES, not ENOENT.
        with pytest.raises(pyxs.PyXSError) as info:
            c.read(b"/local/domain/0/missing")
        assert info.value.args[0] == errno.EACCES
        for op in (lambda: c.write(b"/secret", b"x"), lambda: c.delete(b"/secret"),
                   lambda: c.set_perms(b"/secret", [b"b%d" % domid]),
                   lambda: c.write(b"/new-top-level", b"x")):
            with pytest.raises(pyxs.PyXSError) as info:
                op()
            assert info.value.args[0] == errno.EACCES
        # Its home is its own: relative paths, perms, transactions.
        c.write(b"data/x", b"1")
        assert c.read(b"data/x") == b"1"
        assert c.read(f"/local/domain/{domid}/data/x".encode()) == b"1"
        assert c.get_perms(b"data/x")[0] == b"n%d" % domid
        c.transaction()
        c.write(b"data/y", b"2")
        assert c.commit() is True
        assert sorted(c.list(f"/local/domain/{domid}/data".encode())) == [b"x", b"y"]
        c.delete(b"data")
        assert not c.exists(b"data/x")
        # dom0's tools see the guest's nodes (dom0 may read anything).
        c.write(b"data/z", b"3")
        assert out(daemon, "read", f"/local/domain/{domid}/data/z") == "3\n"
    with pyxs.Client(unix_socket_path=daemon.admin) as admin:
        assert admin.read(b"/secret") == b"s"


def test_guest_home_is_removed_when_it_disconnects(daemon):
    with pyxs.Client(unix_socket_path=daemon.socket) as c:
        domid = int(c.read(b"domid"))
        c.write(b"data/x", b"1")
        assert xs(daemon, "exists", f"/local/domain/{domid}/data/x").returncode == 0
    deadline = time.monotonic() + 5
    while xs(daemon, "exists", f"/local/domain/{domid}").returncode == 0:
        assert time.monotonic() < deadline, "the guest's home outlived its connection"
        time.sleep(0.05)


# ------------------------------------------------------------ the daemon


def test_sigterm_stops_the_daemon_gracefully(daemon):
    xs(daemon, "write", "/t/x", "1", check=True)
    assert daemon.stop() == 0
    daemon.assert_graceful()
    assert not os.path.exists(daemon.socket)
    assert not os.path.exists(daemon.admin)
