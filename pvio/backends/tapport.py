"""The switch's uplink: a host TAP device as one more port (``[switch] tap = "pvio0"``).

Frames the host sends on the TAP enter the switch like a vif's; frames the
switch queues for the port are written to the TAP. Offloads cross both ways
through the virtio-net header (:mod:`pvio.tap`), so a host bridge or routing
on the TAP sees full-size TCP super-packets. The port's queue is bounded like
every other port's: a host that stops reading loses frames (counted).
"""

from __future__ import annotations

import logging

import trio

from pvio.netswitch import Switch
from pvio.tap import Tap

log = logging.getLogger("pvio.tapport")


async def serve_tap_port(switch: Switch, ifname: str, *,
                         task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Bridge TAP ``ifname`` (created and brought up here) to ``switch`` until cancelled."""
    with Tap(ifname) as tap:
        tap.set_up()
        port = switch.add_port(f"tap:{tap.name}")
        ready = trio.Event()

        def wake() -> None:
            ready.set()

        port.on_ready = wake
        log.info("switch uplink: TAP %s is port %s", tap.name, port.name)
        task_status.started(tap.name)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_host_to_switch, tap, switch, port)
                while True:
                    await ready.wait()
                    ready = trio.Event()
                    while port.queue:
                        for frame in port.take(64):
                            tap.write_frame(frame)
                        await trio.lowlevel.checkpoint()
        finally:
            switch.remove_port(port)


async def _host_to_switch(tap: Tap, switch: Switch, port) -> None:
    while True:
        frames = tap.read_frames(64)
        if not frames:
            await tap.wait_readable()
            continue
        switch.begin_batch()
        try:
            for frame in frames:
                switch.forward(port, frame.data, frame.offload)
        finally:
            switch.end_batch()
        await trio.lowlevel.checkpoint()
