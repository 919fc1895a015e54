"""``pvio console`` (attach to a console, like ``xl console``) and
``pvio guest-console`` (run a program on a console, like a getty on hvc0)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import signal
import subprocess
import sys
import termios
import tty

import trio

from pvio import config as cfg
from pvio._trio import unwrap_single

ESCAPE = 0x1D  # Ctrl-]


async def _find_tty(admin: str, domain: str, devid: int) -> tuple[int, str]:
    from pvio.xenbus.client import open_client

    async with open_client(admin) as xs:
        domid = int(domain) if domain.isdigit() else None
        if domid is None:
            for candidate in await xs.directory("/local/domain"):
                name = await xs.read_or_none(f"/local/domain/{candidate}/name")
                if name is not None and name.decode() == domain:
                    domid = int(candidate)
                    break
        if domid is None:
            raise LookupError(f"no domain named {domain!r} is connected")
        path = f"/local/domain/0/backend/console/{domid}/{devid}/tty"
        raw = await xs.read_or_none(path)
        if not raw:
            raise LookupError(f"dom{domid} has no connected console {devid} ({path} is empty)")
        return domid, raw.decode()


def console(args) -> int:
    admin = cfg.admin_socket_for(args.socket or cfg.default_socket())
    try:
        domid, tty_path = trio.run(_find_tty, admin, args.domain, args.devid)
    except (LookupError, ConnectionRefusedError, FileNotFoundError) as exc:
        print(f"pvio console: {exc}", file=sys.stderr)
        return 1
    fd = os.open(tty_path, os.O_RDWR | os.O_NOCTTY)
    print(f"Connected to the console of dom{domid} ({tty_path}). "
          "Escape character is '^]'.", file=sys.stderr)
    stdin = sys.stdin.fileno()
    saved = termios.tcgetattr(stdin) if os.isatty(stdin) else None
    try:
        if saved is not None:
            tty.setraw(stdin)
        _relay(stdin, sys.stdout.fileno(), fd)
    finally:
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
        os.close(fd)
    print("\r\n[detached]", file=sys.stderr)
    return 0


def _relay(stdin: int, stdout: int, fd: int) -> None:
    """Copy stdin -> console and console -> stdout until Ctrl-] or EOF."""
    while True:
        ready, _, _ = select.select([stdin, fd], [], [])
        if fd in ready:
            try:
                data = os.read(fd, 4096)
            except OSError as exc:
                if exc.errno == errno.EIO:
                    return
                raise
            if not data:
                return
            os.write(stdout, data)
        if stdin in ready:
            data = os.read(stdin, 1024)
            if not data:
                return
            if ESCAPE in data:
                os.write(fd, data[: data.index(ESCAPE)])
                return
            os.write(fd, data)


def guest_console(args) -> int:
    command = list(args.command_argv)
    if not command:
        print("pvio guest-console: give a command after --", file=sys.stderr)
        return 2
    socket_path = args.socket or cfg.default_socket()
    try:
        return trio.run(_guest_console, socket_path, args.domain, args.devid, command)
    except (ConnectionRefusedError, FileNotFoundError) as exc:
        print(f"pvio guest-console: {exc}", file=sys.stderr)
        return 1


async def _relay_program(stream, master: int) -> None:
    """Console <-> the program's terminal, until the program exits (EIO on the master)."""
    async with unwrap_single(), trio.open_nursery() as nursery:

        async def console_to_program() -> None:
            while True:
                data = await stream.receive_some(4096)
                view = memoryview(data)
                while view:
                    await trio.lowlevel.wait_writable(master)
                    with contextlib.suppress(BlockingIOError):
                        view = view[os.write(master, view):]

        nursery.start_soon(console_to_program)
        while True:
            await trio.lowlevel.wait_readable(master)
            try:
                data = os.read(master, 4096)
            except BlockingIOError:
                continue
            except OSError as exc:
                if exc.errno == errno.EIO:
                    break
                raise
            if not data:
                break
            await stream.send_all(data)
        nursery.cancel_scope.cancel()


_RESET_SIGNALS = (signal.SIGINT, signal.SIGQUIT, signal.SIGTSTP, signal.SIGTTIN,
                  signal.SIGTTOU, signal.SIGHUP, signal.SIGTERM)


def _make_controlling_tty() -> None:  # runs in the child, between fork and exec
    """Like getty: the console is the program's controlling terminal, and job-control
    signals have their default actions even if we were started with them ignored
    (e.g. from a non-interactive shell's background job), so Ctrl-C works."""
    for signum in _RESET_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


async def _guest_console(socket_path: str, domain: str, devid: int, command: list[str]) -> int:
    from pvio.frontends.console import open_console
    from pvio.frontends.session import open_session

    async with open_session(socket_path, domain, pool_pages=64) as session:
        front = await open_console(session, devid)
        stream = front.stream
        master, slave = os.openpty()
        try:
            proc = subprocess.Popen(
                command, stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                preexec_fn=_make_controlling_tty, close_fds=True,
            )
        except OSError as exc:
            os.close(master)
            os.close(slave)
            await stream.send_all(f"pvio guest-console: cannot run {command[0]}: {exc}\r\n"
                                  .encode())
            return 127
        os.close(slave)
        os.set_blocking(master, False)
        try:
            await _relay_program(stream, master)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            # The daemon went away (or broke the console): hang up the program.
            print(f"pvio guest-console: console lost ({exc}); hanging up {command[0]}",
                  file=sys.stderr)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGHUP)
        finally:
            os.close(master)
            del stream  # the rings pin the guest memory; let the session unmap it
        return await trio.to_thread.run_sync(proc.wait)
