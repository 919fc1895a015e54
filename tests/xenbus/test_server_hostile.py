"""The trio store server against hostile peers (hardening.md #8, #15, #16, #18, #19).

An in-process :class:`XenstoreServer` is hammered through raw Unix sockets on
both the admin (dom0) and the guest socket: bad lengths, oversized payloads,
malformed paths, unknown types, never-ended transactions, random bytes, fds
where none belong, too many fds (``MSG_CTRUNC``), missing fds, unsealed
memfds, non-eventfds. Meanwhile well-behaved :class:`XsClient` s keep doing
write/read round trips; afterwards the process's fd count is back where it
started and the server still serves. Also: socket modes, ``SO_PEERCRED`` uid
restrictions, cleanup of a domain's nodes on disconnect, and churn (fds, store
nodes and RSS stay flat over 1,000 guest connections).

Replies are checked strictly: each request's reply comes back in order,
echoing its ``req_id``, with the errno the request deserves.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import math
import os
import random
import socket
import stat
import struct
import tempfile
from dataclasses import dataclass, field

import pytest
import trio

from pvio.layouts import XsdSockmsgType as XS
from pvio.xenbus import wire
from pvio.xenbus.client import open_client
from pvio.xenbus.server import XenstoreServer
from pvio.xenbus.store import Connection, XenstoreError
from pvio.xenbus.wire import Message, MessageReader
from tests.proc_helpers import open_fd_count, rss_bytes

SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
HOSTILE_MESSAGES = 10_000


# ------------------------------------------------------------------ helpers


async def wait_until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.02)
        return
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def settle_fds(baseline: int, timeout: float = 10.0) -> int:
    """Give the server time to finish closing; return the final fd count."""
    with trio.move_on_after(timeout):
        while open_fd_count() != baseline:
            await trio.sleep(0.02)
    return open_fd_count()


@pytest.fixture
def sock_paths(tmp_path):
    base = tmp_path
    if len(str(base)) > 70:  # sun_path is 108 bytes
        base = tempfile.mkdtemp(prefix="pvxs")
    run = os.path.join(base, "run")
    return os.path.join(run, "xs.admin"), os.path.join(run, "xs.sock")


async def start_server(nursery, sock_paths, **kwargs) -> XenstoreServer:
    server = XenstoreServer(**kwargs)
    await nursery.start(server.serve, *sock_paths)
    return server


def memfd(size: int = 4096, seals: int = SEALS) -> int:
    fd = os.memfd_create("pvio-test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def pipe_fd() -> int:
    r, w = os.pipe()
    os.close(w)
    return r


def msg(mtype: int, payload: bytes = b"", req_id: int = 1, tx_id: int = 0) -> bytes:
    return Message(int(mtype), req_id, tx_id, payload).encode()


def kind(reply: Message) -> str:
    if reply.type == XS.ERROR:
        return reply.payload.rstrip(b"\0").decode("ascii", "replace")
    return "OK" if reply.payload == b"OK\0" else "REPLY"


class Raw:
    """A raw xs_wire peer. A background task drains everything the server
    sends (so it is never dropped for not reading): replies go to a channel,
    watch events are counted."""

    def __init__(self, std: socket.socket) -> None:
        self.std = std  # non-blocking once trio wraps it: for sends that must not yield
        self.sock = trio.socket.from_stdlib_socket(std)
        self._send_replies, self.replies = trio.open_memory_channel[Message](math.inf)
        self.eof = trio.Event()
        self.events = 0
        self.oversized: list[int] = []

    @classmethod
    async def connect(cls, path: str, nursery) -> Raw:
        raw = cls(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        try:
            await raw.sock.connect(path)
        except BaseException:
            raw.sock.close()
            raise
        nursery.start_soon(raw._drain)
        return raw

    async def _drain(self) -> None:
        reader = MessageReader(max_payload=1 << 20)  # be lenient; checked below
        try:
            while True:
                data = await self.sock.recv(65536)
                if not data:
                    break
                reader.feed(data)
                for m in reader:
                    if len(m.payload) > 4096:
                        self.oversized.append(len(m.payload))
                    if m.type == XS.WATCH_EVENT:
                        self.events += 1
                    else:
                        self._send_replies.send_nowait(m)
        except (OSError, trio.ClosedResourceError):
            pass
        finally:
            self.eof.set()
            self._send_replies.close()

    async def send(self, data: bytes, fds=()) -> None:
        if fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
            sent = await self.sock.sendmsg([data], anc)
        else:
            sent = 0
        view = memoryview(data)[sent:]
        while view:
            view = view[await self.sock.send(view) :]

    async def reply(self, timeout: float = 10.0) -> Message | None:
        """The next reply, or None once the server has closed the connection."""
        with trio.fail_after(timeout):
            try:
                return await self.replies.receive()
            except trio.EndOfChannel:
                return None

    async def request(self, mtype: int, payload: bytes = b"", tx_id: int = 0, fds=(),
                      req_id: int = 7) -> Message | None:
        await self.send(msg(mtype, payload, req_id, tx_id), fds)
        reply = await self.reply()
        if reply is not None:
            assert reply.req_id == req_id
        return reply

    async def dropped(self, timeout: float = 5.0) -> bool:
        with trio.move_on_after(timeout):
            await self.eof.wait()
        return self.eof.is_set()

    def close(self) -> None:
        self.sock.close()


# ----------------------------------------------------------- the hammer


@dataclass
class Step:
    """One hostile message: what to send and what the server must answer."""

    label: str
    data: bytes
    fds: list[int] = field(default_factory=list)
    split: int | None = None  # send data[:split] with the fds, then the rest
    expect: frozenset[str] | None = None  # allowed reply kinds; None: anything
    terminal: str | None = None  # "eof": the server must drop us; "close": we hang up


MALFORMED_PATHS = [
    b"", b"/a/", b"a/", b"//", b"/a//b", b"/a b", b"/a.b", b"/\xc3\xa9", b"/a\tb",
    b"/" + b"a" * 3072, b"r" * 2049,
]
GUEST_PATHS = [
    "x", "a/b", "a/b/c", "device/vif/0/state", "data/" + "y" * 1500, "/local/domain/0/name",
    "/local/domain/1/x", "/local/domain/2", "/local/domain", "/", "/hostile/a",
    "/local/domain/0/backend", "domid", "name",
]
ADMIN_PATHS = ["/hostile/a", "/hostile/a/b", "/hostile/c/d/e", "/hostile",
               "/hostile/" + "z" * 1500, "/hostile/w"]
PATH_TYPES = [XS.READ, XS.MKDIR, XS.RM, XS.DIRECTORY, XS.GET_PERMS]
HANDLED = {XS.READ, XS.WRITE, XS.MKDIR, XS.RM, XS.DIRECTORY, XS.DIRECTORY_PART, XS.GET_PERMS,
           XS.SET_PERMS, XS.WATCH, XS.UNWATCH, XS.RESET_WATCHES, XS.TRANSACTION_START,
           XS.TRANSACTION_END, XS.GET_DOMAIN_PATH, XS.CONTROL}
TOOLSTACK = [XS.INTRODUCE, XS.RELEASE, XS.RESUME, XS.SET_TARGET, XS.IS_DOMAIN_INTRODUCED]
EXTENSIONS = {wire.PVIO_SHARE_MEMORY, wire.PVIO_BIND_EVTCHN, wire.PVIO_CLAIM}


class Hostile:
    """Generates hostile steps for one connection."""

    def __init__(self, rng: random.Random, privileged: bool) -> None:
        self.rng = rng
        self.privileged = privileged
        self.paths = ADMIN_PATHS if privileged else GUEST_PATHS
        self.req_id = rng.randrange(1 << 20)

    def next_id(self) -> int:
        self.req_id = (self.req_id + 1) & 0xFFFFFFFF
        return self.req_id

    def m(self, mtype: int, payload: bytes = b"", tx_id: int = 0) -> bytes:
        return msg(mtype, payload, self.next_id(), tx_id)

    # plain steps (no fds), several per burst
    def plain(self) -> Step:
        r, priv = self.rng, self.privileged
        choice = r.randrange(100)
        if choice < 30:
            return self.valid_op()
        if choice < 45:
            mtype = r.choice([*PATH_TYPES, XS.WRITE])
            path = r.choice(MALFORMED_PATHS)
            if mtype == XS.WRITE:
                payload = r.choice([path + b"\0value", path])
            else:
                payload = r.choice([path + b"\0", path + b"\0" + b"extra\0"])
            return Step("malformed path", self.m(mtype, payload), expect=frozenset({"EINVAL"}))
        if choice < 55:
            while True:
                mtype = r.choice([XS.WATCH_EVENT, XS.ERROR, XS.TYPE_COUNT, XS.INVALID, 20,
                                  r.randrange(24, 1 << 32)])
                if mtype not in HANDLED and mtype not in EXTENSIONS:
                    break
            return Step("unknown type", self.m(mtype, r.randbytes(r.randrange(8))),
                        expect=frozenset({"ENOSYS"}))
        if choice < 60:
            return Step("toolstack type", self.m(r.choice(TOOLSTACK), b"1\0"),
                        expect=frozenset({"EACCES"}))
        if choice < 68:
            return Step("never-ended transaction", self.m(XS.TRANSACTION_START, b"\0"),
                        expect=frozenset({"REPLY"} if priv else {"REPLY", "ENOSPC"}))
        if choice < 73:
            tx_id = r.randrange(1 << 31, 1 << 32)
            return Step("unknown transaction", self.m(XS.READ, b"/\0", tx_id),
                        expect=frozenset({"ENOENT"}))
        if choice < 78:
            name = r.choice([b"guest\0", b"dom0\0", b"Domain-0\0"])
            bad = r.choice([b"", b"x", b"a\0b\0", b"\xff\0"])
            if r.random() < 0.5:
                return Step("claim", self.m(wire.PVIO_CLAIM, name),
                            expect=frozenset({"EINVAL"} if priv else {"ENOENT"}))
            return Step("malformed claim", self.m(wire.PVIO_CLAIM, bad),
                        expect=frozenset({"EINVAL"}))
        if choice < 85:
            mtype = r.choice([wire.PVIO_SHARE_MEMORY, wire.PVIO_BIND_EVTCHN])
            payload = b"pool\0" if mtype == wire.PVIO_SHARE_MEMORY else b"5\0"
            return Step("missing fds", self.m(mtype, payload), expect=frozenset({"EINVAL"}))
        if choice < 92:
            # a legal maximum-size message
            if priv:
                payload = b"/hostile/big\0" + r.randbytes(4096 - 13)
            else:
                payload = b"big\0" + r.randbytes(4096 - 4)
            return Step("4096-byte write", self.m(XS.WRITE, payload))
        return self.valid_op()

    def valid_op(self) -> Step:
        r = self.rng
        path = r.choice(self.paths).encode()
        tx_id = 0 if r.random() < 0.8 else r.randrange(1, 64)
        mtype = r.choice(sorted(HANDLED))
        payloads = {
            XS.WRITE: path + b"\0" + r.randbytes(r.randrange(64)),
            XS.DIRECTORY_PART: path + b"\0" + str(r.randrange(4)).encode() + b"\0",
            XS.SET_PERMS: path + b"\0" + b"".join(
                f"{r.choice('nrwb')}{r.randrange(4)}\0".encode() for _ in range(r.randrange(4))
            ),
            XS.WATCH: path + b"\0" + f"t{r.randrange(8)}\0".encode(),
            XS.UNWATCH: path + b"\0" + f"t{r.randrange(8)}\0".encode(),
            XS.RESET_WATCHES: b"",
            XS.TRANSACTION_START: b"\0",
            XS.TRANSACTION_END: r.choice([b"T\0", b"F\0"]),
            XS.GET_DOMAIN_PATH: str(r.randrange(70000)).encode() + b"\0",
            XS.CONTROL: b"print\0hostile\0",
        }
        if mtype == XS.TRANSACTION_START:
            tx_id = 0
        return Step(f"valid {XS(mtype).name}", self.m(mtype, payloads.get(mtype, path + b"\0"),
                                                      tx_id))

    # steps carrying fds: one per burst, first in it (fds travel with the
    # sendmsg that carries the message's first byte; nothing is pending before)
    def with_fds(self) -> Step:
        r, priv = self.rng, self.privileged
        einval = frozenset({"EINVAL"})
        accepted = einval if priv else frozenset({"OK", "EEXIST"})
        # a guest that already handed over that kind/port may get EEXIST first
        refused = einval if priv else frozenset({"EINVAL", "EEXIST"})
        choice = r.randrange(12)
        if choice == 0:
            fds = [r.choice([pipe_fd, eventfd, memfd])() for _ in range(r.randint(1, 2))]
            return Step("fds on a normal message", self.m(XS.READ, b"x\0"), fds, expect=einval)
        if choice == 1:
            data = self.m(r.choice([XS.WRITE, XS.READ]), b"x\0")
            return Step("fds on a split normal message", data, [pipe_fd()],
                        split=r.randint(1, len(data) - 1), expect=einval)
        if choice == 2:
            return Step("unsealed memfd", self.m(wire.PVIO_SHARE_MEMORY, b"pool\0"),
                        [memfd(seals=r.choice([0, fcntl.F_SEAL_SHRINK,
                                               fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK]))],
                        expect=refused)
        if choice == 3:
            return Step("memfd of a bad size", self.m(wire.PVIO_SHARE_MEMORY, b"gnttab\0"),
                        [memfd(size=r.choice([0, 100, 4097]))], expect=refused)
        if choice == 4:
            return Step("pipe as memory", self.m(wire.PVIO_SHARE_MEMORY, b"pool\0"),
                        [pipe_fd()], expect=refused)
        if choice == 5:
            kind_ = r.choice([b"pool\0", b"gnttab\0"])
            return Step("sealed memfd", self.m(wire.PVIO_SHARE_MEMORY, kind_), [memfd()],
                        expect=accepted)
        if choice == 6:
            payload = r.choice([b"bogus\0", b"pool", b"", b"pool\0gnttab\0"])
            return Step("memfd, bad kind", self.m(wire.PVIO_SHARE_MEMORY, payload), [memfd()],
                        expect=einval)
        if choice == 7:
            makers = r.choice([(pipe_fd, pipe_fd), (eventfd, pipe_fd), (pipe_fd, eventfd),
                               (memfd, eventfd)])
            fds = [make() for make in makers]
            return Step("non-eventfd evtchn", self.m(wire.PVIO_BIND_EVTCHN, b"9\0"), fds,
                        expect=refused)
        if choice == 8:
            port = str(r.randint(1, 4095)).encode() + b"\0"
            return Step("eventfds", self.m(wire.PVIO_BIND_EVTCHN, port), [eventfd(), eventfd()],
                        expect=accepted)
        if choice == 9:
            port = r.choice([b"0\0", b"4096\0", b"x\0", b"\0", b"1", b"-1\0", b"99999999\0"])
            return Step("eventfds, bad port", self.m(wire.PVIO_BIND_EVTCHN, port),
                        [eventfd(), eventfd()], expect=einval)
        if choice == 10:
            return Step("one eventfd", self.m(wire.PVIO_BIND_EVTCHN, b"3\0"), [eventfd()],
                        expect=einval)
        return Step("claim with an fd", self.m(wire.PVIO_CLAIM, b"guest\0"), [pipe_fd()],
                    expect=einval)

    def terminal(self) -> Step:
        r = self.rng
        choice = r.randrange(6)
        if choice == 0:
            length = r.choice([4097, 8192, 65536, 0xFFFFFFFF, r.randrange(4097, 1 << 32)])
            data = struct.pack("<IIII", r.choice([XS.WRITE, XS.READ, 99]), 1, 0, length)
            return Step("payload > 4096", data + r.randbytes(r.randrange(64)), terminal="eof")
        if choice == 1:
            n = r.randint(3, 64)
            return Step("too many fds", self.m(XS.READ, b"x\0"), [pipe_fd()] * n,
                        terminal="eof")
        if choice == 2:
            return Step("random bytes", r.randbytes(r.randint(1, 3000)), terminal="close")
        if choice == 3:
            payload = b"/hostile/a\0"
            data = struct.pack("<IIII", XS.READ, 1, 0, len(payload) + r.randint(1, 100))
            return Step("length longer than sent", data + payload, terminal="close")
        if choice == 4:
            # the header claims less than follows: the rest is misframed garbage
            payload = b"/hostile/a\0" + r.randbytes(40)
            data = struct.pack("<IIII", XS.READ, 1, 0, r.randint(0, 8)) + payload
            return Step("length shorter than sent", data, terminal="close")
        return Step("half a header", self.m(XS.READ, b"x\0")[: r.randint(1, 15)],
                    terminal="close")


@dataclass
class Budget:
    remaining: int
    by_label: dict[str, int] = field(default_factory=dict)

    def take(self, step: Step) -> None:
        self.remaining -= 1
        self.by_label[step.label] = self.by_label.get(step.label, 0) + 1


async def hostile_worker(path: str, privileged: bool, seed: int, budget: Budget,
                         problems: list[str]) -> None:
    rng = random.Random(seed)
    who = f"{'admin' if privileged else 'guest'} worker seed={seed}"
    while budget.remaining > 0:
        async with trio.open_nursery() as nursery:
            raw = await Raw.connect(path, nursery)
            try:
                await hostile_session(raw, Hostile(rng, privileged), rng, budget, problems, who)
            finally:
                raw.close()
            if raw.oversized:
                problems.append(f"{who}: replies over 4096 bytes: {raw.oversized[:5]}")


async def hostile_session(raw: Raw, gen: Hostile, rng: random.Random, budget: Budget,
                          problems: list[str], who: str) -> None:
    while budget.remaining > 0:
        roll = rng.random()
        if roll < 0.03:
            step = gen.terminal()
            budget.take(step)
            try:
                await raw.send(step.data[: step.split] if step.split else step.data, step.fds)
            except OSError:
                pass
            finally:
                for fd in set(step.fds):
                    os.close(fd)
            if step.terminal == "eof" and not await raw.dropped():
                problems.append(f"{who}: not disconnected after {step.label}")
            return
        burst = [gen.with_fds()] if roll < 0.15 else []
        burst += [gen.plain() for _ in range(rng.randint(0 if burst else 1, 12))]
        for step in burst:
            budget.take(step)
            try:
                if step.split is not None:
                    await raw.send(step.data[: step.split], step.fds)
                    await trio.sleep(0.001)  # let the server read the first part alone
                    await raw.send(step.data[step.split :])
                else:
                    await raw.send(step.data, step.fds)
            except OSError as exc:
                problems.append(f"{who}: send of {step.label} failed: {exc!r}")
                return
            finally:
                for fd in set(step.fds):
                    os.close(fd)
        for step in burst:
            req_id = struct.unpack_from("<IIII", step.data)[1]
            try:
                reply = await raw.reply()
            except trio.TooSlowError:
                problems.append(f"{who}: no reply to {step.label} within 10s")
                return
            if reply is None:
                problems.append(f"{who}: dropped while waiting for the reply to {step.label}")
                return
            if reply.req_id != req_id:
                problems.append(f"{who}: {step.label}: reply req_id {reply.req_id} != {req_id}")
                return
            if step.expect is not None and kind(reply) not in step.expect:
                problems.append(f"{who}: {step.label}: got {kind(reply)} "
                                f"({reply.payload[:40]!r}), expected {sorted(step.expect)}")


@dataclass
class GoodStats:
    round_trips: int = 0
    max_latency: float = 0.0
    errors: list[str] = field(default_factory=list)


async def good_client(path: str, key: str, stop: trio.Event, stats: GoodStats,
                      watch: str | None = None) -> None:
    async with open_client(path) as xs:
        i = 0
        if watch is None:
            while not stop.is_set():
                await _round_trip(xs, key, i, stats)
                i += 1
            return
        async with xs.watch(watch) as events:
            assert await events.receive() == watch
            while not stop.is_set():
                await _round_trip(xs, key, i, stats)
                with trio.fail_after(10):
                    while (await events.receive()) != key:
                        pass
                i += 1


async def _round_trip(xs, key: str, i: int, stats: GoodStats) -> None:
    value = f"good-{i}-".encode() + bytes(range(256))
    start = trio.current_time()
    with trio.fail_after(10):
        await xs.write(key, value)
        got = await xs.read(key)
    stats.max_latency = max(stats.max_latency, trio.current_time() - start)
    if got != value:
        stats.errors.append(f"{key}: read back {got[:20]!r}")
    stats.round_trips += 1
    await trio.sleep(0.001)


@pytest.mark.slow
async def test_hostile_hammer_on_both_sockets(nursery, sock_paths):
    admin_path, guest_path = sock_paths
    server = await start_server(nursery, sock_paths)
    baseline_fds = open_fd_count()

    budget = Budget(HOSTILE_MESSAGES)
    problems: list[str] = []
    stop = trio.Event()
    good = {"guest": GoodStats(), "admin": GoodStats()}
    async with trio.open_nursery() as clients:
        clients.start_soon(good_client, guest_path, "good/key", stop, good["guest"], "good")
        clients.start_soon(good_client, admin_path, "/good/key", stop, good["admin"])
        async with trio.open_nursery() as hammer:
            for seed in range(3):
                hammer.start_soon(hostile_worker, guest_path, False, 1000 + seed, budget,
                                  problems)
            for seed in range(2):
                hammer.start_soon(hostile_worker, admin_path, True, 2000 + seed, budget,
                                  problems)
        stop.set()

    sent = sum(budget.by_label.values())
    assert sent >= HOSTILE_MESSAGES
    assert problems == [], f"{len(problems)} problems, first: {problems[:15]}"
    for name, stats in good.items():
        assert stats.errors == [], name
        assert stats.round_trips >= 20, (name, stats.round_trips)
        assert stats.max_latency < 5.0, (name, stats.max_latency)
    # every kind of hostility was exercised
    for label in ("payload > 4096", "too many fds", "random bytes", "unsealed memfd",
                  "non-eventfd evtchn", "missing fds", "fds on a normal message",
                  "never-ended transaction", "unknown type", "malformed path",
                  "length longer than sent", "sealed memfd", "eventfds"):
        assert budget.by_label.get(label, 0) > 0, label

    # everyone has hung up: the server lets go of every fd and every domain
    await wait_until(lambda: not server.domains, what="all guest domains released")
    final_fds = await settle_fds(baseline_fds)
    assert final_fds == baseline_fds, f"open fds: {baseline_fds} before, {final_fds} after"
    assert server.store.directory(Connection(0, privileged=True), "/local/domain") == ["0"]

    # and it still serves, on both sockets
    for path, key in ((guest_path, "after"), (admin_path, "/after")):
        async with open_client(path) as xs:
            await xs.write(key, b"still serving")
            assert await xs.read(key) == b"still serving"


# ------------------------------------------------------- targeted hostility


async def test_oversized_payload_drops_only_that_connection(nursery, sock_paths):
    admin_path, guest_path = sock_paths
    await start_server(nursery, sock_paths)
    async with trio.open_nursery() as n, open_client(guest_path) as bystander:
        await bystander.write("k", b"v")
        for path in (admin_path, guest_path):
            raw = await Raw.connect(path, n)
            assert kind(await raw.request(XS.READ, b"domid\0")) == "REPLY"
            await raw.send(struct.pack("<IIII", XS.WRITE, 9, 0, 4097))
            assert await raw.dropped(), path
            raw.close()
        assert await bystander.read("k") == b"v"


async def test_too_many_fds_drops_the_connection_and_leaks_nothing(nursery, sock_paths):
    _, guest_path = sock_paths
    await start_server(nursery, sock_paths)
    baseline = open_fd_count()
    async with trio.open_nursery() as n:
        for count in (3, 10, 253):
            raw = await Raw.connect(guest_path, n)
            fd = pipe_fd()
            await raw.send(msg(XS.READ, b"domid\0"), [fd] * count)
            os.close(fd)
            assert await raw.dropped(), count
            raw.close()
    assert await settle_fds(baseline) == baseline


async def test_fd_hand_over_rules(nursery, sock_paths):
    admin_path, guest_path = sock_paths
    server = await start_server(nursery, sock_paths)
    baseline = open_fd_count()
    async with trio.open_nursery() as n:
        raw = await Raw.connect(guest_path, n)
        await wait_until(lambda: len(server.domains) == 1)
        (domain,) = server.domains.values()

        async def expect(errno: str, mtype: int, payload: bytes, fds=()) -> None:
            reply = await raw.request(mtype, payload, fds=list(fds))
            for fd in fds:
                os.close(fd)
            assert reply is not None, f"dropped ({errno} expected)"
            assert kind(reply) == errno, (mtype, payload, fds)

        # an fd on a message that carries none: refused, connection kept
        await expect("EINVAL", XS.READ, b"domid\0", [pipe_fd()])
        await expect("REPLY", XS.READ, b"domid\0")
        # missing fds
        await expect("EINVAL", wire.PVIO_SHARE_MEMORY, b"pool\0")
        await expect("EINVAL", wire.PVIO_BIND_EVTCHN, b"1\0", [eventfd()])
        # unsealed / partly sealed / wrong-size memfds, a pipe
        await expect("EINVAL", wire.PVIO_SHARE_MEMORY, b"pool\0", [memfd(seals=0)])
        await expect("EINVAL", wire.PVIO_SHARE_MEMORY, b"pool\0",
                     [memfd(seals=fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)])
        await expect("EINVAL", wire.PVIO_SHARE_MEMORY, b"pool\0", [memfd(size=1000)])
        await expect("EINVAL", wire.PVIO_SHARE_MEMORY, b"pool\0", [pipe_fd()])
        assert domain.memory == {}
        # non-eventfds for an event channel
        await expect("EINVAL", wire.PVIO_BIND_EVTCHN, b"1\0", [pipe_fd(), eventfd()])
        await expect("EINVAL", wire.PVIO_BIND_EVTCHN, b"1\0", [eventfd(), memfd()])
        await expect("EINVAL", wire.PVIO_BIND_EVTCHN, b"0\0", [eventfd(), eventfd()])
        await expect("EINVAL", wire.PVIO_BIND_EVTCHN, b"4096\0", [eventfd(), eventfd()])
        assert domain.evtchn_fds == {}
        # the real thing, once
        await expect("OK", wire.PVIO_SHARE_MEMORY, b"pool\0", [memfd(8192)])
        await expect("EEXIST", wire.PVIO_SHARE_MEMORY, b"pool\0", [memfd()])
        await expect("OK", wire.PVIO_BIND_EVTCHN, b"1\0", [eventfd(), eventfd()])
        first_pair = domain.evtchn_fds[1]
        # handing the same port over again replaces the pair (specs/xenbus.md 2.1)
        await expect("OK", wire.PVIO_BIND_EVTCHN, b"1\0", [eventfd(), eventfd()])
        assert domain.evtchn_fds[1] != first_pair
        assert set(domain.memory) == {"pool"} and set(domain.evtchn_fds) == {1}
        # the adopted fds are open and are what was sent
        assert os.readlink(f"/proc/self/fd/{domain.memory['pool'].fileno()}").startswith(
            "/memfd:pvio-test")
        for fd in domain.evtchn_fds[1]:
            assert os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
        raw.close()

        # fds on the admin socket: dom0 hands nothing over
        admin = await Raw.connect(admin_path, n)
        reply = await admin.request(wire.PVIO_SHARE_MEMORY, b"pool\0", fds=[fd := memfd()])
        os.close(fd)
        assert kind(reply) == "EINVAL"
        admin.close()
    await wait_until(lambda: not server.domains)
    assert await settle_fds(baseline) == baseline


async def test_a_message_with_more_fds_than_its_type_takes_is_refused(nursery, sock_paths):
    """specs/xenbus.md §2.1 and hardening.md #19: "a message gets exactly the
    fds its type expects, otherwise every fd is closed and the reply is EINVAL"."""
    _, guest_path = sock_paths
    server = await start_server(nursery, sock_paths)
    baseline = open_fd_count()
    async with trio.open_nursery() as n:
        raw = await Raw.connect(guest_path, n)
        await wait_until(lambda: len(server.domains) == 1)
        (domain,) = server.domains.values()
        fds = [memfd(), memfd()]
        reply = await raw.request(wire.PVIO_SHARE_MEMORY, b"pool\0", fds=fds)
        for fd in fds:
            os.close(fd)
        assert kind(reply) == "EINVAL"
        assert domain.memory == {}
        fds = [eventfd(), eventfd(), eventfd()]  # 3 > MAX_FDS: CTRUNC, dropped
        await raw.send(msg(wire.PVIO_BIND_EVTCHN, b"2\0"), fds)
        for fd in fds:
            os.close(fd)
        assert await raw.dropped()
        raw.close()
    await wait_until(lambda: not server.domains)
    assert await settle_fds(baseline) == baseline


async def test_fds_belong_to_the_message_they_were_sent_with(nursery, sock_paths):
    """specs/xenbus.md §2.1: fds travel with the sendmsg that carries the
    message's first byte. A client that pipelines an ordinary request and then
    an fd-carrying one (XsClient does, from concurrent tasks) must get both
    answered properly, although Linux delivers the fds together with the
    earlier bytes in one recvmsg (unix_stream_read_generic stops *after* the
    skb carrying the fds, not before it)."""
    _, guest_path = sock_paths
    server = await start_server(nursery, sock_paths)
    async with trio.open_nursery() as n:
        raw = await Raw.connect(guest_path, n)
        await wait_until(lambda: len(server.domains) == 1)
        # both sent before the server runs again (plain, non-yielding sends)
        raw.std.send(msg(XS.READ, b"domid\0", req_id=1))
        fds = [eventfd(), eventfd()]
        raw.std.sendmsg([msg(wire.PVIO_BIND_EVTCHN, b"7\0", req_id=2)],
                        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        for fd in fds:
            os.close(fd)
        first, second = await raw.reply(), await raw.reply()
        assert (first.req_id, second.req_id) == (1, 2)
        assert (kind(first), first.payload) == ("REPLY", b"1"), \
            "the READ, sent without fds, was charged with the next message's fds"
        assert kind(second) == "OK", "the fds were not given to PVIO_BIND_EVTCHN"
        raw.close()


async def test_a_client_that_never_reads_is_dropped(nursery, sock_paths):
    _, guest_path = sock_paths
    server = await start_server(nursery, sock_paths)
    baseline = open_fd_count()
    async with trio.open_nursery() as n, open_client(guest_path) as bystander:
        hog = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await hog.connect(guest_path)
        one = msg(XS.READ, b"domid\0")
        sent = 0
        with trio.move_on_after(10):
            try:
                while sent < 20_000:  # never reading a single reply
                    await hog.send(one * 50)
                    sent += 50
            except OSError:
                pass  # dropped: what we want
        assert sent < 20_000, "a client that never reads was never disconnected"
        await wait_until(lambda: len(server.domains) == 1, what="the hog released")
        hog.close()
        await bystander.write("k", b"fine")
        assert await bystander.read("k") == b"fine"
        n.cancel_scope.cancel()
    await wait_until(lambda: not server.domains)
    assert await settle_fds(baseline) == baseline


# --------------------------------------------------------- sockets and uids


async def test_socket_directory_0700_and_sockets_0600(nursery, sock_paths):
    admin_path, guest_path = sock_paths
    run = os.path.dirname(guest_path)
    os.makedirs(run, mode=0o755)
    os.chmod(run, 0o755)  # a pre-existing, too open directory
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(guest_path)  # a stale socket from a previous run
    stale.close()
    os.chmod(guest_path, 0o777)
    async with trio.open_nursery() as inner:
        server = XenstoreServer()
        await inner.start(server.serve, admin_path, guest_path)
        assert stat.S_IMODE(os.stat(run).st_mode) == 0o700
        for path in (admin_path, guest_path):
            st = os.lstat(path)
            assert stat.S_ISSOCK(st.st_mode), path
            assert stat.S_IMODE(st.st_mode) == 0o600, (path, oct(st.st_mode))
        async with open_client(guest_path) as xs:
            assert await xs.read("domid") == b"1"
        inner.cancel_scope.cancel()
    assert not os.path.exists(admin_path) and not os.path.exists(guest_path)


async def test_fresh_socket_directory_is_created_0700(nursery, sock_paths):
    admin_path, guest_path = sock_paths
    old = os.umask(0)
    try:
        await start_server(nursery, sock_paths)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(os.path.dirname(guest_path)).st_mode) == 0o700
    for path in (admin_path, guest_path):
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600


async def test_guest_uid_restriction_refuses_other_uids(nursery, sock_paths):
    admin_path, guest_path = sock_paths
    other = os.getuid() + 4242
    server = await start_server(nursery, sock_paths, guest_uids={other})
    baseline = open_fd_count()
    async with trio.open_nursery() as n:
        for _ in range(5):
            raw = await Raw.connect(guest_path, n)
            try:
                reply = await raw.request(XS.READ, b"domid\0")
            except OSError:
                reply = None
            assert reply is None, "a refused uid got an answer"
            assert await raw.dropped()
            raw.close()
        assert server.domains == {}
        # the admin socket is not affected
        async with open_client(admin_path) as xs:
            assert await xs.read("/local/domain/0/name") == b"Domain-0"
    assert await settle_fds(baseline) == baseline


async def test_allowed_guest_uid_is_served(nursery, sock_paths):
    _, guest_path = sock_paths
    await start_server(nursery, sock_paths, guest_uids={os.getuid()})
    async with open_client(guest_path) as xs:
        assert await xs.read("domid") == b"1"


async def test_admin_uid_restriction(nursery, sock_paths):
    admin_path, _ = sock_paths
    await start_server(nursery, sock_paths, admin_uids={os.getuid() + 4242})
    async with trio.open_nursery() as n:
        raw = await Raw.connect(admin_path, n)
        try:
            reply = await raw.request(XS.READ, b"/local/domain/0/name\0")
        except OSError:
            reply = None
        assert reply is None
        raw.close()


# --------------------------------------------------- domain lifetime, churn


async def test_domain_home_and_device_nodes_are_removed_on_close(nursery, sock_paths):
    admin_path, guest_path = sock_paths
    server = await start_server(nursery, sock_paths)
    released = []

    async def hook(domain):
        released.append(domain.domid)
        # devices are torn down while the home is still there
        local = server.local_store("hook")
        assert await local.read_or_none(f"/local/domain/{domain.domid}/device/vbd/51712/state")
        await local.rm(f"/local/domain/0/backend/vbd/{domain.domid}")

    server.on_domain_down.append(hook)
    async with open_client(admin_path) as admin, contextlib.AsyncExitStack() as watches:
        releases = await watches.enter_async_context(admin.watch("@releaseDomain"))
        assert await releases.receive() == "@releaseDomain"
        async with open_client(guest_path) as guest:
            domid = int(await guest.read("domid"))
            home = f"/local/domain/{domid}"
            state_path = f"{home}/device/vbd/51712/state"
            assert await guest.get_domain_path(domid) == home
            await guest.write("device/vbd/51712/state", b"1")
            await guest.write("device/vif/0/state", b"1")
            await guest.write("data/x", b"1")
            await admin.write(f"/local/domain/0/backend/vbd/{domid}/51712/state", b"2")
            assert sorted(await admin.directory(home)) == ["data", "device", "domid", "name"]
            state = await watches.enter_async_context(admin.watch(state_path))
            assert await state.receive() == state_path
        # the guest has hung up
        with trio.fail_after(10):
            assert await releases.receive() == "@releaseDomain"
            assert await state.receive() == state_path  # removal fires the watch below
        assert released == [domid]
        assert domid not in server.domains
        assert await admin.read_or_none(home) is None
        assert await admin.read_or_none(state_path) is None
        assert await admin.read_or_none(f"/local/domain/0/backend/vbd/{domid}") is None
        assert await admin.directory("/local/domain") == ["0"]


async def test_client_aclose_inside_open_client_is_clean(nursery, sock_paths):
    """``XsClient.aclose()`` is public; closing early inside the ``open_client``
    block must not blow the block up (the reader task then sees trio's
    ClosedResourceError, not an OSError) and later requests fail cleanly."""
    _, guest_path = sock_paths
    await start_server(nursery, sock_paths)
    async with open_client(guest_path) as xs:
        assert await xs.read("domid") == b"1"
        await xs.aclose()
        await trio.sleep(0.05)
        with pytest.raises(OSError):
            await xs.read("domid")


async def test_guest_cannot_rewrite_its_domid_and_name(nursery, sock_paths):
    """The daemon's view of a domain (``domid``, ``name``: what ``pvio status``
    shows) is the toolstack's, like libxl's ``n0 r<domid>`` on the domain's
    keys: the guest may read them, not rewrite them; other guests see nothing
    (hardening.md #17)."""
    admin_path, guest_path = sock_paths
    await start_server(nursery, sock_paths)
    async with open_client(guest_path) as g1, open_client(guest_path) as g2:
        domid = int(await g1.read("domid"))
        for key, forged in (("domid", b"0"), ("name", b"Domain-0")):
            with pytest.raises(XenstoreError) as info:
                await g1.write(key, forged)
            assert info.value.name == "EACCES", key
            with pytest.raises(XenstoreError) as info:
                await g2.read(f"/local/domain/{domid}/{key}")
            assert info.value.name == "EACCES", key
        async with open_client(admin_path) as admin:
            assert await admin.read(f"/local/domain/{domid}/domid") == str(domid).encode()


@pytest.mark.slow
async def test_guest_churn_leaves_no_fds_nodes_or_memory_behind(nursery, sock_paths):
    admin_path, guest_path = sock_paths
    server = await start_server(nursery, sock_paths)

    async def cycle(i: int) -> None:
        async with open_client(guest_path) as xs:
            await xs.write("device/vif/0/state", str(i).encode())
            await xs.write("data/blob", bytes(1024))
            assert await xs.read("device/vif/0/state") == str(i).encode()
            async with xs.watch("device") as events:
                assert await events.receive() == "device"
            # left behind on purpose: a watch and a transaction never ended
            await xs.request(XS.WATCH, wire.join(["data", "left-behind"]))
            await xs.transaction_start()

    for i in range(20):  # warm up allocators and caches
        await cycle(i)
    await wait_until(lambda: not server.domains)
    nodes, fds, rss = len(server.store.nodes), open_fd_count(), rss_bytes()

    for i in range(1000):
        await cycle(i)
    await wait_until(lambda: not server.domains, what="churned domains released")

    assert len(server.store.nodes) == nodes
    # (white-box) the store forgot the watches and transactions of the dead domains
    assert server.store._watches == []
    assert server.store._transactions == {}
    assert await settle_fds(fds) == fds
    grown = rss_bytes() - rss
    assert grown < 20 * 1024 * 1024, f"RSS grew by {grown / 2**20:.1f} MiB over 1,000 guests"
    async with open_client(admin_path) as admin:
        assert await admin.directory("/local/domain") == ["0"]
