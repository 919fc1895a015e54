"""Console conformance (io/console.h, specs/console.md): backend and frontend kits.

**Backend kit**: pvio's console frontend (and raw writes to the shared page) against
a running daemon: the handshake and ``tty`` key, output reaching the pty, pty input
reaching the guest, 64 KiB through the 2 KiB ring, an impossible ``out_prod``, an
event flood, closing. The kit opens the backend's pty, so it runs on the daemon's
machine with access to it.

**Frontend kit**: pvio plays the console backend. The frontend program must
write one line, then echo every byte it reads until it reads ``quit\\n``, then
close its console and exit 0. The kit reads the line on the pty, sends
``ping\\n``, expects it back, sends ``quit\\n``. Hostile backends: an impossible
``in_prod``, and a backend that closes the console.
"""

from __future__ import annotations

import contextlib
import os
import struct
import sys
from contextlib import asynccontextmanager

import trio

from pvio.layouts import XenbusState as S
from pvio.testing._core import Check, KitError, Report, expect, run_checks
from pvio.testing._frontend import (
    FrontendEnv,
    FrontendTarget,
    Observation,
    Scenario,
    common_checks,
    decimal_key,
    device_of,
    hostile_check,
    program_main,
    run_frontend,
    vanish,
)
from pvio.xenbus.state import parse_state

IN_PROD, OUT_PROD = 3076, 3084  # struct xencons_interface offsets (console §1)


@asynccontextmanager
async def _attach(target):
    from pvio.frontends.console import open_console
    from pvio.frontends.session import open_session

    async with open_session(target.socket, target.domain, pool_pages=16) as session:
        consoles = sorted(d.devid for d in await session.devices() if d.type == "console")
        if not consoles:
            raise KitError(f"domain {target.domain!r} offers no console")
        front = await open_console(session, consoles[0])
        be = (await session.xs.read(f"device/console/{consoles[0]}/backend")).decode()
        yield session, front, be


async def _pty(session, be: str) -> int:
    tty = await session.xs.read_or_none(f"{be}/tty")
    expect(tty, "a Connected console backend must publish its pty as tty (console §2)")
    try:
        return os.open(tty.decode(), os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as exc:
        raise KitError(f"cannot open the backend's pty {tty.decode()}: {exc}") from exc


async def _read_pty(fd: int, want: bytes, timeout: float = 5.0) -> bytes:
    got = b""
    with trio.move_on_after(timeout):
        while want not in got:
            await trio.lowlevel.wait_readable(fd)
            with contextlib.suppress(BlockingIOError):
                got += os.read(fd, 65536)
    return got


async def _receive(stream, want: bytes, timeout: float = 5.0) -> bytes:
    got = b""
    with trio.move_on_after(timeout):
        while want not in got:
            got += await stream.receive_some(65536)
    return got


async def _cb_output(t) -> None:
    async with _attach(t) as (session, front, be):
        fd = await _pty(session, be)
        try:
            await front.stream.send_all(b"pvio-conformance output\n")
            got = await _read_pty(fd, b"pvio-conformance output")
            expect(b"pvio-conformance output" in got, f"the guest wrote a line on its "
                   f"console; the backend's pty showed {got[-80:]!r}")
        finally:
            os.close(fd)


async def _cb_input(t) -> None:
    async with _attach(t) as (session, front, be):
        fd = await _pty(session, be)
        try:
            os.write(fd, b"typed on the pty\n")
            got = await _receive(front.stream, b"typed on the pty")
            expect(b"typed on the pty" in got, f"bytes written to the backend's pty did not "
                   f"reach the guest's in ring (got {got[-80:]!r})")
        finally:
            os.close(fd)


async def _cb_bulk(t) -> None:
    data = bytes(range(256)) * 256  # 64 KiB through a 2 KiB ring
    async with _attach(t) as (session, front, be):
        fd = await _pty(session, be)
        try:
            got = b""

            async def reader() -> None:
                nonlocal got
                while len(got) < len(data):
                    await trio.lowlevel.wait_readable(fd)
                    with contextlib.suppress(BlockingIOError):
                        got += os.read(fd, 65536)

            with trio.move_on_after(15):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(reader)
                    await front.stream.send_all(data)
            expect(got[:len(data)] == data, f"64 KiB written by the guest arrived as "
                   f"{len(got)} bytes{' (different)' if got else ''}: the ring must flow "
                   "in order without loss")
        finally:
            os.close(fd)


async def _cb_hostile_prod(t) -> None:
    async with _attach(t) as (session, front, be):
        page = front.area(0)
        cons = struct.unpack_from("<I", page, OUT_PROD - 4)[0]
        struct.pack_into("<I", page, OUT_PROD, (cons + 5000) & 0xFFFFFFFF)
        front.channel.notify()
        state = S.Unknown
        with trio.move_on_after(5):
            while state not in (S.Closing, S.Closed):
                state = parse_state(await session.xs.read_or_none(f"{be}/state"))
                await trio.sleep(0.02)
        expect(state in (S.Closing, S.Closed), f"out_prod 5000 ahead of out_cons (the ring "
               f"holds 2048); the backend is still {state.name}: it must disconnect that "
               "console (console §1)")


async def _cb_flood(t) -> None:
    async with _attach(t) as (session, front, be):
        fd = await _pty(session, be)
        try:
            for _ in range(20000):
                front.channel.notify()
            await front.stream.send_all(b"after the flood\n")
            got = await _read_pty(fd, b"after the flood", timeout=10)
            expect(b"after the flood" in got, "after 20000 empty notifications the console "
                   "no longer carried output")
        finally:
            os.close(fd)


async def _cb_close(t) -> None:
    async with _attach(t) as (session, front, be):
        await front.device.close()
        state = parse_state(await session.xs.read_or_none(f"{be}/state"))
        expect(state == S.Closed, f"after the frontend closed, the backend is {state.name}")


CONSOLE_BACKEND_CHECKS = [
    Check("console.output", "console §4", "what the guest writes to out appears on the "
          "backend's pty", _cb_output),
    Check("console.input", "console §4", "what is typed on the pty arrives in the guest's "
          "in ring", _cb_input),
    Check("console.bulk", "console §1", "64 KiB flow through the 2 KiB out ring in order",
          _cb_bulk, timeout=30),
    Check("console.hostile-prod", "console §1", "an out_prod more than the ring ahead "
          "disconnects that console", _cb_hostile_prod),
    Check("evtchn.flood", "ring §5", "a flood of empty notifications does not stop the "
          "console", _cb_flood),
    Check("xenbus.backend-closes", "xenbus §5", "a frontend closing makes the backend go "
          "Closed", _cb_close),
]


async def check_console_backend(target, *, select=None, progress=None) -> Report:
    """Run :data:`CONSOLE_BACKEND_CHECKS` against the daemon at ``target``
    (a :class:`pvio.testing.block.BackendTarget`)."""
    return await run_checks("console-backend", CONSOLE_BACKEND_CHECKS, target, select=select,
                            progress=progress)


# ====================================================================== frontend kit

_CONFIG = """
[[domain]]
name = "{domain}"
  [[domain.device]]
  type = "console"
  devid = 0
"""


async def _operator(daemon, domain: str, obs: Observation) -> None:
    """The kit at the pty: read the frontend's line, ping, expect the echo, quit."""
    while True:
        device = device_of(daemon, domain)
        tty = getattr(device.driver, "tty", "") if device is not None else ""
        if tty and device.driver.conn is not None:
            break
        await trio.sleep(0.01)
    fd = os.open(tty, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        got = await _read_pty(fd, b"\n", timeout=20)
        obs.data["line"] = got
        os.write(fd, b"ping\n")
        obs.data["echo"] = await _read_pty(fd, b"ping\n", timeout=10)
        os.write(fd, b"quit\n")
    finally:
        os.close(fd)


async def _corrupt_in_prod(daemon, domain: str, obs: Observation) -> None:
    while True:
        device = device_of(daemon, domain)
        conn = device.driver.conn if device is not None else None
        if conn is not None:
            await trio.sleep(0.1)
            buf = conn.queues[0].mappings[0].buf
            cons = struct.unpack_from("<I", buf, IN_PROD - 4)[0]
            struct.pack_into("<I", buf, IN_PROD, (cons + 3000) & 0xFFFFFFFF)
            conn.queues[0].channel.notify()
            return
        await trio.sleep(0.005)


async def _run(target: FrontendTarget, misbehave: str = "") -> Observation:
    from pvio.backends.consoleback import ConsoleBackend

    obs = Observation()
    tasks = {"bad-in-prod": [_corrupt_in_prod], "vanish": [vanish]}.get(misbehave,
                                                                         [_operator])
    scenario = Scenario(_CONFIG, "console", ConsoleBackend, ("ring-ref", "port"), tasks)
    return await run_frontend(target, scenario, obs)


async def _cf_keys(env: FrontendEnv) -> None:
    decimal_key(await env.strict(), "ring-ref", "port")


async def _cf_output(env: FrontendEnv) -> None:
    obs = await env.strict()
    expect(obs.data.get("line"), "nothing the frontend wrote on its console reached the pty")


async def _cf_echo(env: FrontendEnv) -> None:
    obs = await env.strict()
    expect(b"ping\n" in obs.data.get("echo", b""), "the kit typed ping on the pty; the "
           f"frontend's echo never came back (got {obs.data.get('echo', b'')!r})")


_COMMON = common_checks("console §5", "writes a line and echoes")
CONSOLE_FRONTEND_CHECKS = [
    _COMMON["completes"],
    _COMMON["states"],
    Check("console.frontend-keys", "console §2", "ring-ref and port are published before "
          "Initialised", _cf_keys, timeout=90),
    Check("console.frontend-output", "console §3", "bytes the frontend writes reach the "
          "backend", _cf_output, timeout=90),
    Check("console.frontend-input", "console §3", "bytes the backend puts in the in ring "
          "reach the frontend", _cf_echo, timeout=90),
    _COMMON["closes"],
    hostile_check("hostile.bad-in-prod", "console §1", "an impossible in_prod is detected "
                  "(fail, not hang or crash)", "bad-in-prod",
                  "a backend publishing in_prod 3000 ahead"),
    _COMMON["vanish"],
]


async def check_console_frontend(target: FrontendTarget, *, select=None,
                                 progress=None) -> Report:
    return await run_checks("console-frontend", CONSOLE_FRONTEND_CHECKS,
                            FrontendEnv(target, _run, _run), select=select, progress=progress)


# ------------------------------------------------------------ pvio's own frontend program


async def reference_console_frontend(socket_path: str, domain: str) -> None:
    """pvio's console frontend doing what the kit expects (see the module doc)."""
    from pvio.frontends.console import open_console
    from pvio.frontends.session import open_session

    async with open_session(socket_path, domain, pool_pages=16) as session:
        front = await open_console(session)
        await front.stream.send_all(b"hello from pvio's console frontend\n")
        buf = b""
        while b"quit\n" not in buf:
            data = await front.stream.receive_some(4096)
            if not data:
                raise RuntimeError("error: the console closed before quit")
            buf += data
            echo = data.split(b"quit\n")[0]
            if echo:
                await front.stream.send_all(echo)
        await front.device.close()


def main() -> int:
    """``python -m pvio.testing.console``: pvio's console frontend as a kit program."""
    return program_main(reference_console_frontend)


if __name__ == "__main__":
    sys.exit(main())
