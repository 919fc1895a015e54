"""Network device conformance (io/netif.h, specs/netif.md): backend and frontend kits.

**Backend kit** (:data:`NET_BACKEND_CHECKS`): pvio plays a raw netfront
(:class:`~pvio.testing._net.RawNetFront`: the real handshake, then raw slots on
the TX and RX rings) against a running daemon: the handshake, a valid packet,
multi-slot packets, extras answered ``XEN_NETIF_RSP_NULL``, every TX validation
rule (each bad packet answered ``XEN_NETIF_RSP_ERROR`` in every slot while the
vif keeps working), a chain that never ends and an impossible ``req_prod``
(that vif disconnected, nothing else), event floods. With ``peer_domain``
(a second domain with a vif on the same switch) it also checks RX copy.

**Frontend kit** (:data:`NET_FRONTEND_CHECKS`): pvio plays the backend; the
kit owns a port of the switch. The frontend program must send 8 frames of
EtherType 0x88B5 from its MAC to the broadcast address, then echo every 0x88B5
frame it receives back to its sender (addresses swapped) until one whose
payload starts with ``quit``, then close its vif and exit 0. Hostile backends:
RX responses leaving their page, TX responses for ids never sent, a backend
that closes the vif.
"""

from __future__ import annotations

import os
import struct
import sys

import trio

from pvio.netswitch import Port
from pvio.testing._core import Check, Report, expect, run_checks
from pvio.testing._frontend import (
    FrontendEnv,
    FrontendTarget,
    Observation,
    Scenario,
    closes,
    completed,
    decimal_key,
    device_of,
    noticed,
    run_frontend,
    state_order,
    survived,
    vanish,
)

ETHERTYPE = b"\x88\xb5"  # IEEE local experimental
KIT_MAC = bytes.fromhex("020000c0ffee")
BROADCAST = b"\xff" * 6

# ====================================================================== frontend kit

_CONFIG = """
[[domain]]
name = "{domain}"
  [[domain.device]]
  type = "vif"
  devid = 0
  mac = "00:16:3e:c0:ff:ee"
"""
VIF_MAC = bytes.fromhex("00163ec0ffee")


def _instrumented(obs: Observation, misbehave: str):
    from pvio.backends.netback import NetBackend
    from pvio.netif import RX_RSP

    class StrictNetBackend(NetBackend):
        def _refuse(self, reason: str) -> None:
            obs.invalid.append(reason)
            super()._refuse(reason)

        def _tx(self, queue, mapper) -> int:
            n = super()._tx(queue, mapper)
            obs.requests += n
            if misbehave == "wrong-tx-id" and n:
                # rewrite the last response just produced with an id never sent
                buf = self.conn.queues[queue.index].mappings[0].buf
                rsp_prod = struct.unpack_from("<I", buf, 8)[0]
                slot = 64 + ((rsp_prod - 1) % queue.tx.nr_ents) * 12
                struct.pack_into("<H", buf, slot, 0xFFFE)
                queue.channels[0].notify()
            return n

        def _rx(self, queue, mapper) -> int:
            n = super()._rx(queue, mapper)
            if misbehave == "bad-rx-offset" and n:
                buf = self.conn.queues[queue.index].mappings[1].buf
                rsp_prod = struct.unpack_from("<I", buf, 8)[0]
                slot = 64 + ((rsp_prod - 1) % queue.rx.nr_ents) * RX_RSP.size
                struct.pack_into("<H", buf, slot + 2, 4000)  # offset: 4000 + length > page
                struct.pack_into("<h", buf, slot + 6, 1000)
                queue.channels[1].notify()
            return n

    return StrictNetBackend


async def _kit_port(daemon, domain: str, obs: Observation) -> None:
    """The kit on the switch: collect the frontend's frames, ping it, expect the echo, quit."""
    port = daemon.switch.add_port("conformance-kit")
    try:
        while device_of(daemon, domain) is None or device_of(daemon, domain).driver.conn is None:
            await trio.sleep(0.01)
        sent: list[bytes] = []
        echoes: list[bytes] = []
        with trio.move_on_after(20):
            while len(sent) < 8:
                for frame in port.take(64):
                    if frame.data[12:14] == ETHERTYPE:
                        sent.append(bytes(frame.data))
                await trio.sleep(0.01)
        obs.data["sent"] = sent
        for k in range(4):
            ping = VIF_MAC + KIT_MAC + ETHERTYPE + b"ping %d" % k + bytes(40)
            daemon.switch.forward(port, ping)
        with trio.move_on_after(10):
            while len(echoes) < 4:
                for frame in port.take(64):
                    if frame.data[12:14] == ETHERTYPE and frame.data[14:18] == b"ping":
                        echoes.append(bytes(frame.data))
                await trio.sleep(0.01)
        obs.data["echoes"] = echoes
        daemon.switch.forward(port, VIF_MAC + KIT_MAC + ETHERTYPE + b"quit" + bytes(42))
    finally:
        daemon.switch.remove_port(port)


async def _run(target: FrontendTarget, misbehave: str = "") -> Observation:
    obs = Observation()
    tasks = [vanish] if misbehave == "vanish" else [_kit_port]
    keys = ("tx-ring-ref", "rx-ring-ref", "event-channel", "event-channel-tx",
            "event-channel-rx", "request-rx-copy", "feature-rx-notify")
    scenario = Scenario(_CONFIG, "vif", _instrumented(obs, misbehave), keys, tasks)
    return await run_frontend(target, scenario, obs)


async def _nf_completes(env: FrontendEnv) -> None:
    completed(await env.strict())


async def _nf_states(env: FrontendEnv) -> None:
    state_order(await env.strict())


async def _nf_keys(env: FrontendEnv) -> None:
    obs = await env.strict()
    decimal_key(obs, "tx-ring-ref", "rx-ring-ref")
    keys = obs.keys_at_initialised
    split = keys.get("event-channel-tx") is not None
    decimal_key(obs, *(("event-channel-tx", "event-channel-rx") if split else
                       ("event-channel",)))
    for key in ("request-rx-copy", "feature-rx-notify"):
        expect(keys.get(key) == b"1", f"{key} must be 1 (netif §1: pvio's netback, like "
               f"Linux's, only copies and needs rx notifications); it is {keys.get(key)!r}")


async def _nf_tx_valid(env: FrontendEnv) -> None:
    obs = await env.strict()
    expect(obs.requests > 0, "the frontend put no TX request on the ring")
    expect(not obs.invalid, f"the backend refused {len(obs.invalid)} of the frontend's "
           f"packets: {obs.invalid[:3]}")


async def _nf_frames(env: FrontendEnv) -> None:
    obs = await env.strict()
    sent = obs.data.get("sent", [])
    expect(len(sent) >= 8, f"the kit's port saw {len(sent)} of the 8 frames the frontend "
           "was to broadcast")
    expect(all(f[6:12] == VIF_MAC for f in sent), "frames left the vif with a source MAC "
           "other than the vif's mac key")


async def _nf_echo(env: FrontendEnv) -> None:
    obs = await env.strict()
    echoes = obs.data.get("echoes", [])
    expect(len(echoes) == 4, f"the kit sent 4 frames to the vif; {len(echoes)} echoes came "
           "back (the frontend must post RX buffers and receive)")
    expect(all(e[:6] == KIT_MAC for e in echoes), "echoes were not addressed to the kit")


async def _nf_closes(env: FrontendEnv) -> None:
    closes(await env.strict())


async def _nf_bad_rx(env: FrontendEnv) -> None:
    noticed(await env.hostile("bad-rx-offset"), "RX responses whose offset+size leave the "
            "page")


async def _nf_wrong_tx_id(env: FrontendEnv) -> None:
    noticed(await env.hostile("wrong-tx-id"), "TX responses for an id never sent")


async def _nf_vanish(env: FrontendEnv) -> None:
    survived(await env.hostile("vanish"), "a backend that closes the vif mid-run")


NET_FRONTEND_CHECKS = [
    Check("frontend.completes", "netif §5", "the frontend sends, echoes and exits 0",
          _nf_completes, timeout=90),
    Check("xenbus.frontend-states", "xenbus §5", "Initialising -> Initialised -> Connected "
          "(after the backend) -> Closing -> Closed", _nf_states, timeout=90),
    Check("netif.frontend-keys", "netif §1", "ring refs, event channel(s), request-rx-copy=1 "
          "and feature-rx-notify=1 are published before Initialised", _nf_keys, timeout=90),
    Check("netif.tx-valid", "netif §3", "every packet the frontend sends passes netback's "
          "validation", _nf_tx_valid, timeout=90),
    Check("netif.frontend-sends", "netif §3", "frames leave the vif with its MAC",
          _nf_frames, timeout=90),
    Check("netif.frontend-receives", "netif §4", "the frontend posts RX buffers and "
          "receives frames", _nf_echo, timeout=90),
    Check("xenbus.frontend-closes", "xenbus §5", "the frontend closes its vif", _nf_closes,
          timeout=90),
    Check("hostile.bad-rx-response", "netif §4", "an RX response leaving its page is "
          "detected (fail, not crash or hang)", _nf_bad_rx, timeout=90),
    Check("hostile.wrong-tx-id", "netif §3", "a TX response for an id not in flight is "
          "detected", _nf_wrong_tx_id, timeout=90),
    Check("hostile.backend-vanishes", "xenbus §5", "a backend closing mid-run does not hang "
          "or crash the frontend", _nf_vanish, timeout=90),
]


async def check_net_frontend(target: FrontendTarget, *, select=None, progress=None) -> Report:
    return await run_checks("net-frontend", NET_FRONTEND_CHECKS,
                            FrontendEnv(target, _run, _run), select=select, progress=progress)


# ------------------------------------------------------------ pvio's own frontend program


async def reference_net_frontend(socket_path: str, domain: str) -> None:
    """pvio's netfront doing what the kit expects (see the module doc)."""
    from pvio.frontends.netfront import open_netfront
    from pvio.frontends.session import open_session

    async with open_session(socket_path, domain) as session:
        nic = await open_netfront(session)
        mac = bytes.fromhex(nic.mac.replace(":", ""))
        await nic.send_many([BROADCAST + mac + ETHERTYPE + b"pvio-conformance %d" % k
                             + bytes(30) for k in range(8)])
        while True:
            frame = await nic.receive()
            data = frame.data
            if data[12:14] != ETHERTYPE:
                continue
            if data[14:18] == b"quit":
                break
            await nic.send(data[6:12] + mac + data[12:])
        await nic.device.close()


def main() -> int:
    """``python -m pvio.testing.net``: pvio's netfront as a kit program."""
    sock = os.environ.get("PVIO_SOCKET")
    if not sock:
        print("error: set PVIO_SOCKET", file=sys.stderr)
        return 2
    try:
        trio.run(reference_net_frontend, sock, os.environ.get("PVIO_DOMAIN", "guest"))
    except BaseException as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["NET_FRONTEND_CHECKS", "Port", "check_net_frontend", "reference_net_frontend"]
