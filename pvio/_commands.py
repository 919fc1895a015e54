"""Implementations of the daemon-side CLI commands (serve, status, demo, sockets)."""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile

import trio

from pvio import config as cfg
from pvio.cli import _setup_logging


def serve(args) -> int:
    if args.print_default_config:
        print(cfg.DEFAULT_TOML.strip())
        return 0
    _setup_logging(args.verbose)
    try:
        config = cfg.load(args.config, socket=args.socket, data_dir=args.data_dir)
    except cfg.ConfigError as exc:
        print(f"pvio serve: {exc}", file=sys.stderr)
        return 2
    from pvio.daemon import Daemon

    try:
        trio.run(Daemon(config).serve_until_signal)
    except OSError as exc:
        print(f"pvio serve: {exc}", file=sys.stderr)
        return 1
    return 0


def sockets(args) -> int:
    guest = args.socket or cfg.default_socket()
    if args.admin:
        print(cfg.admin_socket_for(guest))
    else:
        print(f"guest {guest}\nadmin {cfg.admin_socket_for(guest)}")
    return 0


def status(args) -> int:
    from pvio import _status
    from pvio.xenbus.client import open_client

    path = cfg.admin_socket_for(args.socket or cfg.default_socket())

    async def main() -> tuple:
        async with open_client(path) as xs:
            return await _status.collect(xs)

    try:
        domains, rows = trio.run(main)
    except (ConnectionRefusedError, FileNotFoundError) as exc:
        print(f"pvio status: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"domains": domains, "devices": [vars(r) for r in rows]}, indent=2))
    else:
        print(_status.render(domains, rows))
    return 0


async def _demo_net(daemon, nic) -> None:
    """The vif's switch port meets a second port (the demo's): a broadcast out, a reply in."""
    here = daemon.switch.add_port("demo")
    mac = bytes.fromhex(nic.mac.replace(":", ""))
    peer = bytes.fromhex("020000de0001")
    await nic.send(b"\xff" * 6 + mac + b"\x88\xb5" + b"hello, switch" + bytes(33))
    with trio.move_on_after(5):
        while not here.queue:
            await trio.sleep(0.01)
    seen = here.take(1)
    daemon.switch.forward(here, mac + peer + b"\x88\xb5" + b"hello, vif" + bytes(36))
    reply = None
    with trio.move_on_after(5):
        reply = await nic.receive()
    learned = daemon.switch.fdb()
    print(f"   vif: mac {nic.mac}; a broadcast from the vif reached another switch port "
          f"({len(seen[0].data) if seen else 0} bytes); a frame back to the vif's MAC "
          f"arrived: {reply is not None and reply.data[14:24] == b'hello, vif'}; "
          f"the switch learned {len(learned)} MACs")
    daemon.switch.remove_port(here)


def demo(args) -> int:
    _setup_logging(args.verbose - 1)
    return trio.run(_demo)


async def _demo() -> int:
    from pvio import _status
    from pvio.daemon import Daemon
    from pvio.frontends.blkfront import BLK_KEYS, BlkFront
    from pvio.frontends.console import ConsoleFront
    from pvio.frontends.netfront import NET_KEYS, NetFront
    from pvio.frontends.session import open_session
    from pvio.xenbus.client import open_client

    log = logging.getLogger("pvio.demo")
    with tempfile.TemporaryDirectory(prefix="pvio-demo-") as tmp:
        config = cfg.load(None, socket=f"{tmp}/run/xenbus.sock", data_dir=f"{tmp}/data")
        print(f"1. starting the daemon (embedded default config, sockets in {tmp}/run)")
        async with trio.open_nursery() as nursery:
            daemon = await nursery.start(Daemon(config).run)
            print(f"2. opening a frontend session on {config.socket} as domain 'guest'")
            async with open_session(config.socket, "guest", pool_pages=4096) as session:
                offered = await session.devices()
                print(f"   -> we are dom{session.domid}; the daemon offers: "
                      + ", ".join(f"{d.type}/{d.devid}" for d in offered))
                print("3. attaching every device (XenbusState handshake on both sides)")
                devices, disk, console, nic = [], None, None, None
                for dev in offered:
                    if dev.type == "vbd":
                        disk = BlkFront(session)
                        devices.append(await session.attach(disk, dev.devid, BLK_KEYS))
                    elif dev.type == "vif" and nic is None:
                        nic = NetFront(session)
                        devices.append(await session.attach(nic, dev.devid, NET_KEYS))
                    elif dev.type == "console" and console is None:
                        console = ConsoleFront(session)
                        devices.append(await session.attach(console, dev.devid))
                    else:
                        driver = session.driver_for(dev)
                        devices.append(await session.attach(driver, dev.devid))
                with trio.move_on_after(10) as timeout:
                    for device in devices:
                        await device.connected.wait()
                if timeout.cancelled_caught:
                    log.error("devices did not connect within 10 s")
                for device in devices:
                    hist = " -> ".join(h[1] for h in device.status.history)
                    print(f"   {device.driver.type}/{device.devid}: frontend {hist}")
                if disk is not None and disk.ring is not None:
                    data = os.urandom(1 << 20)
                    await disk.write(4096, data)
                    await disk.flush()
                    same = await disk.read(4096, len(data)) == data
                    print(f"   vbd: {disk.size >> 20} MiB disk; wrote 1 MiB at 4096, flushed, "
                          f"read it back: {'identical' if same else 'MISMATCH'} "
                          f"({disk.stats['requests']} requests, ring of {disk.ring.nr_ents})")
                if console is not None and console.stream is not None:
                    await console.stream.send_all(b"hello from the guest's hvc0\n")
                    log_path = os.path.join(config.data_dir, "console", "guest-0.log")
                    with trio.move_on_after(5):
                        while not os.path.exists(log_path) or not os.path.getsize(log_path):
                            await trio.sleep(0.02)
                    with open(log_path, "rb") as log_file:
                        logged = log_file.read().decode(errors="replace").strip()
                    print(f"   console: wrote a line on hvc0; the daemon's log has: {logged}")
                if nic is not None and nic.carrier:
                    await _demo_net(daemon, nic)
                await trio.sleep(1.1)  # the daemon publishes statistics once a second
                print("4. the store as `pvio status` sees it (admin socket):")
                async with open_client(config.admin_socket) as xs:
                    domains, rows = await _status.collect(xs)
                print("   " + _status.render(domains, rows).replace("\n", "\n   "))
                print("5. closing the devices (frontend Closing, backend unmaps, both Closed)")
                for device in devices:
                    await device.close()
                    hist = " -> ".join(h[1] for h in device.status.history)
                    print(f"   {device.driver.type}/{device.devid}: frontend {hist}")
            await daemon.shutdown()
            nursery.cancel_scope.cancel()
    print("done.")
    return 0
