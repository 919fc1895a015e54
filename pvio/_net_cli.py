"""``pvio netfront-tap`` (a vif as a TAP device) and ``pvio net capture``."""

from __future__ import annotations

import ipaddress
import logging
import signal
import subprocess
import sys

import trio

from pvio import config as cfg
from pvio._trio import unwrap_single
from pvio.frontends.netfront import NetDeviceError

log = logging.getLogger("pvio.netfront-tap")


def add_arguments(sub) -> None:
    tap = sub.add_parser(
        "netfront-tap",
        help="expose a vif of a domain as a TAP device here (the kernel's stack over pvio)",
        description="Open a frontend session as DOMAIN, attach its vif DEVID and expose it as "
        "a TAP interface in this process's network namespace, with the vif's MAC and MTU. "
        "Frames the kernel sends on the interface go out on the vif; frames the switch sends "
        "to the vif arrive on the interface. Checksum offload and TSO are mapped between "
        "virtio-net headers and netif's csum_blank/GSO flags, so TCP runs at super-packet "
        "size. Runs until SIGINT/SIGTERM; survives a daemon restart.",
        epilog="example: ip netns exec ns1 pvio netfront-tap --domain a --address 10.0.0.1/24",
    )
    tap.add_argument("--socket", help="the daemon's guest socket (default: `pvio sockets`)")
    tap.add_argument("--domain", default="guest", help="domain name to claim (default: guest)")
    tap.add_argument("--devid", type=int, default=0, help="vif number (default: 0)")
    tap.add_argument("--ifname", default="pvio%d",
                     help="interface name; %%d picks a free number (default: pvio%%d)")
    tap.add_argument("--address", action="append", default=[], metavar="CIDR",
                     help="add this address to the interface (repeatable), e.g. 10.0.0.1/24")
    tap.add_argument("--queues", type=int, default=1, help="vif queues to ask for (default: 1)")
    tap.add_argument("--no-offloads", action="store_true",
                     help="no checksum offload or TSO (every frame complete, MTU-sized)")
    tap.add_argument("-v", "--verbose", action="count", default=0)

    net = sub.add_parser("net", help="the daemon's switch: capture a port",
                         description="Look at the daemon's L2 switch.")
    net_sub = net.add_subparsers(dest="net", metavar="WHAT", required=True)
    cap = net_sub.add_parser(
        "capture",
        help="write the frames of a switch port to a pcap file",
        description="Capture every frame a switch port sends or receives into FILE, a classic "
        "pcap that tcpdump, tshark and Wireshark read. PORT is vif<domid>.<devid> (Xen's "
        "naming), a domain name (its vif 0) or <domain>.<devid>. Stops on Ctrl-C, after "
        "--count frames or --duration seconds. Frames the daemon could not hand over "
        "fast enough are skipped, never queued without bound.",
        epilog="example: pvio net capture guest guest.pcap --duration 10 && tshark -r guest.pcap",
    )
    cap.add_argument("port", metavar="PORT")
    cap.add_argument("file", metavar="FILE")
    cap.add_argument("--socket", help="the daemon's guest socket (its admin socket is used)")
    cap.add_argument("--count", type=int, help="stop after this many frames")
    cap.add_argument("--duration", type=float, help="stop after this many seconds")
    cap.add_argument("--snaplen", type=int, default=262144,
                     help="bytes kept of each frame (default: 262144, all)")
    cap.add_argument("-q", "--quiet", action="store_true")


def run(args) -> int:
    if args.command == "net":
        from pvio.capture import capture

        admin = cfg.admin_socket_for(args.socket or cfg.default_socket())
        try:
            return trio.run(lambda: capture(admin, args.port, args.file, count=args.count,
                                            duration=args.duration, snaplen=args.snaplen,
                                            quiet=args.quiet))
        except (OSError, LookupError) as exc:
            print(f"pvio net capture: {exc}", file=sys.stderr)
            return 1
    for addr in args.address:
        try:
            ipaddress.ip_interface(addr)
        except ValueError:
            print(f"pvio netfront-tap: bad --address {addr!r} (want e.g. 10.0.0.1/24)",
                  file=sys.stderr)
            return 2
    try:
        return trio.run(_netfront_tap, args)
    except OSError as exc:
        print(f"pvio netfront-tap: {exc}", file=sys.stderr)
        return 1


async def _netfront_tap(args) -> int:
    from pvio.frontends.netfront import open_netfront
    from pvio.frontends.session import open_session
    from pvio.tap import Tap

    socket_path = args.socket or cfg.default_socket()
    offloads = not args.no_offloads
    with Tap(args.ifname, offloads=offloads) as tap, \
            trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_session(socket_path, args.domain, reconnect=True) as session:
            nic = await open_netfront(session, args.devid, offloads=offloads,
                                      queues=args.queues)
            tap.set_mac(nic.mac)
            tap.set_mtu(nic.mtu)
            tap.set_up()
            for addr in args.address:
                subprocess.run(["ip", "addr", "add", addr, "dev", tap.name], check=True)
            print(f"pvio netfront-tap: {tap.name} is vif {args.devid} of dom{session.domid} "
                  f"({args.domain}), mac {nic.mac}, mtu {nic.mtu}"
                  f"{', offloads on' if offloads else ''}", flush=True)
            async with unwrap_single(), trio.open_nursery() as nursery:
                nursery.start_soon(_tap_to_vif, tap, nic)
                nursery.start_soon(_vif_to_tap, tap, nic)
                async for signum in signals:
                    log.info("%s: stopping", signal.Signals(signum).name)
                    break
                nursery.cancel_scope.cancel()
    return 0


async def _tap_to_vif(tap, nic) -> None:
    """Kernel -> vif. Frames go from the TAP straight into the vif's TX pages
    (NetFront.send_vnet_from_fd: one C call per batch, no copy on the way); a
    frame that needs Python (a checksum to finish, a super-packet to cut, one
    to drop) takes the general path (Tap.from_vnet, send_many). While the ring
    is short of room the frames wait in the kernel's TAP queue."""
    from pvio.ring._lib import lib

    while True:
        try:
            got = nic.send_vnet_from_fd(tap.fd, 64)
            if got is not None and got[1] == lib.PVIO_VNET_FULL and not got[0]:
                await nic.wait_tx_room()  # the frames wait in the kernel meanwhile
                continue
            if got is None:
                frames = tap.read_frames(64)
                if not frames:
                    await tap.wait_readable()
                    continue
                await nic.send_many(frames)
                continue
            _, why, raw = got
            if raw is not None:
                await nic.send_many(tap.from_vnet(raw))
            elif why == lib.PVIO_VNET_EMPTY:
                await tap.wait_readable()
            else:
                await trio.lowlevel.checkpoint()
        except NetDeviceError:  # the vif is down (e.g. the daemon restarts): a cable pulled
            await _wait_carrier(nic)



async def _vif_to_tap(tap, nic) -> None:
    while True:
        try:
            frames = await nic.receive_many(64)
        except NetDeviceError:
            await _wait_carrier(nic)
            continue
        for frame in frames:
            tap.write_frame(frame)


async def _wait_carrier(nic) -> None:
    log.warning("vif has no carrier; waiting for the backend")
    while not nic.carrier:
        await trio.sleep(0.1)
    log.warning("vif carrier back")
