"""Packet capture of a switch port (``pvio net capture PORT FILE``).

The CLI makes a ``SOCK_SEQPACKET`` socket pair and hands one end to the
daemon over the admin socket (``PVIO_CAPTURE``, specs/xenbus.md); the daemon
puts a :class:`CaptureTap` on the port, which sends one message per frame
(timestamp, direction, bytes) without ever blocking the switch: when the
reader falls behind, frames are counted as lost instead. The CLI writes them
to a pcap file (:mod:`pvio.pcap`).
"""

from __future__ import annotations

import contextlib
import signal
import socket
import struct
import sys
import time

import trio

from pvio.netif import Frame
from pvio.pcap import SNAPLEN, PcapWriter

RECORD = struct.Struct("<QBI")  # CLOCK_REALTIME ns, direction (0 in, 1 out), frame length
SOCKET_BUFFER = 4 << 20


class CaptureTap:
    """Daemon side: mirror a port's frames to a capture socket (never blocks)."""

    def __init__(self, sock: socket.socket, port, snaplen: int = SNAPLEN) -> None:
        if sock.type != socket.SOCK_SEQPACKET:
            raise ValueError("a capture needs a SOCK_SEQPACKET socket")
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        self.sock = sock
        self.port = port
        self.snaplen = max(14, min(snaplen, SNAPLEN))
        self.lost = 0
        port.taps.append(self)

    def __call__(self, direction: str, frame: Frame) -> None:
        try:
            self.sock.sendmsg([RECORD.pack(time.time_ns(), direction != "in", len(frame.data)),
                               frame.data[:self.snaplen]])
        except BlockingIOError:
            self.lost += 1
        except OSError:  # the capture ended
            self.close()

    def close(self) -> None:
        if self in self.port.taps:
            self.port.taps.remove(self)
        self.sock.close()


async def capture(admin_socket: str, port: str, out_path: str, *, count: int | None,
                  duration: float | None, snaplen: int = SNAPLEN, quiet: bool = False) -> int:
    """Client side: capture until ``count`` frames, ``duration`` s, or SIGINT/SIGTERM."""
    from pvio.xenbus.client import open_client

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
    with ours, open(out_path, "wb") as out:
        writer = PcapWriter(out, snaplen)
        out.flush()
        try:
            async with open_client(admin_socket) as xs:
                await xs.capture(port, theirs.fileno(), snaplen)
        finally:
            theirs.close()
        if not quiet:
            print(f"capturing {port} to {out_path} (Ctrl-C stops)", file=sys.stderr)
        tsock = trio.socket.from_stdlib_socket(ours)
        reason = "the port went away"
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals, \
                trio.move_on_after(duration if duration is not None else float("inf")) as timer:
            async with trio.open_nursery() as nursery:
                async def on_signal() -> None:
                    nonlocal reason
                    async for signum in signals:
                        reason = f"{signal.Signals(signum).name} received"
                        nursery.cancel_scope.cancel()

                nursery.start_soon(on_signal)
                while count is None or writer.frames < count:
                    msg = await tsock.recv(SNAPLEN + RECORD.size)
                    if not msg:
                        break
                    ts, _direction, length = RECORD.unpack_from(msg)
                    writer.write(msg[RECORD.size:], ts, length)
                    out.flush()
                else:
                    reason = f"{count} frames captured"
                nursery.cancel_scope.cancel()
        if timer.cancelled_caught:
            reason = f"{duration} s elapsed"
    if not quiet:
        print(f"{writer.frames} frames written to {out_path} ({reason})", file=sys.stderr)
    return 0
