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

import struct
import sys
from contextlib import asynccontextmanager

import trio

from pvio.frontends.netfront import NET_KEYS
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
from pvio.testing._net import (
    NETTXF_CSUM_BLANK,
    NETTXF_MORE_DATA,
    RSP_NULL,
    RSP_OKAY,
    RawNetFront,
    attach_raw,
    extra_slot,
    gso_slot,
    receive_matching,
    refused,
    tx_req,
)
from pvio.xenbus.state import parse_state

ETHERTYPE = b"\x88\xb5"  # IEEE local experimental
KIT_MAC = bytes.fromhex("020000c0ffee")
BROADCAST = b"\xff" * 6

# ======================================================================= backend kit


@asynccontextmanager
async def _attach(target, **kwargs):
    from pvio.frontends.session import open_session

    async with open_session(target.socket, target.domain, pool_pages=1024) as session:
        vifs = sorted(d.devid for d in await session.devices() if d.type == "vif")
        if not vifs:
            raise KitError(f"domain {target.domain!r} offers no vif")
        raw, device = await attach_raw(session, vifs[0], **kwargs)
        be = (await session.xs.read(f"device/vif/{vifs[0]}/backend")).decode()
        yield raw, device, session, be


def _frame(raw: RawNetFront, size: int = 60) -> bytes:
    mac = bytes.fromhex(raw.mac.replace(":", ""))
    return (BROADCAST + mac + ETHERTYPE + b"pvio-conformance").ljust(size, b"\0")


async def _state(session, be: str) -> S:
    return parse_state(await session.xs.read_or_none(f"{be}/state"))


async def _disconnected(session, be: str) -> S:
    state = await _state(session, be)
    with trio.move_on_after(5):
        while state not in (S.Closing, S.Closed):
            await trio.sleep(0.02)
            state = await _state(session, be)
    return state


async def _still_sends(raw: RawNetFront, what: str) -> None:
    [(_, status)] = await raw.call(*raw.packet_slots(_frame(raw), rid=500))
    expect(status == RSP_OKAY, f"after {what}, a valid packet got status {status}: the vif "
           "must keep working after a refused packet (netif §3)")


async def _nb_connects(t) -> None:
    async with _attach(t) as (_raw, _device, session, be):
        expect(await _state(session, be) == S.Connected, "the backend is not Connected")
        copy = await session.xs.read_or_none(f"{be}/feature-rx-copy")
        expect(copy == b"1", f"feature-rx-copy is {copy!r}: netback must offer rx copy")


async def _nb_requires_rx_copy(t) -> None:
    from pvio.frontends.session import open_session

    async with open_session(t.socket, t.domain, pool_pages=64) as session:
        vif = next((d for d in await session.devices() if d.type == "vif"), None)
        if vif is None:
            raise KitError(f"domain {t.domain!r} offers no vif")
        raw = RawNetFront(session, features={"request-rx-copy": "0"})
        device = await session.attach(raw, vif.devid, NET_KEYS)
        with trio.move_on_after(3):
            await device.connected.wait()
        state = parse_state(await session.xs.read_or_none(f"{vif.backend}/state"))
        expect(state != S.Connected, "a frontend without request-rx-copy=1 got a Connected "
               "backend; rx copy is the only receive mode (netif §1)")


async def _nb_tx_ok(t) -> None:
    async with _attach(t) as (raw, *_):
        answers = await raw.call(*raw.packet_slots(_frame(raw), rid=7))
        expect(answers == [(7, RSP_OKAY)], f"a valid one-slot packet was answered {answers}; "
               "expected [(7, OKAY)]")


async def _nb_tx_multislot(t) -> None:
    async with _attach(t) as (raw, *_):
        data = _frame(raw, 9000)
        answers = await raw.call(*raw.packet_slots(data, rid=20, offsets=[100, 0, 0],
                                                   sizes=[3996, 4096, 908]))
        expect(answers == [(20, RSP_OKAY), (21, RSP_OKAY), (22, RSP_OKAY)],
               f"a 3-slot packet (first slot size = total) was answered {answers}; each "
               "slot needs its own OKAY with its id, in order")


async def _nb_tx_extra_null(t) -> None:
    async with _attach(t) as (raw, *_):
        slots = raw.packet_slots(_frame(raw, 200), rid=30, flags=NETTXF_CSUM_BLANK,
                                 extras=(gso_slot(1448),))
        answers = await raw.call(*slots)
        statuses = [st for _, st in answers]
        expect(statuses == [RSP_OKAY, RSP_NULL], f"a packet with a GSO extra was answered "
               f"{statuses}; the extra's slot gets XEN_NETIF_RSP_NULL (netif §3)")


def _bad_packets(raw: RawNetFront) -> list[tuple[str, list[bytes]]]:
    frame = _frame(raw)
    (ref, _, _), = raw.data_pages(frame)
    return [
        ("a fragment crossing its page (offset 4000, 200 bytes)",
         [tx_req(raw.data_pages(bytes(4200), [0, 0], [4096, 104])[0][0], 4000, 0, 1, 200)]),
        ("a first slot smaller than the fragments after it",
         [tx_req(ref, 0, NETTXF_MORE_DATA, 1, 100), tx_req(ref, 0, 0, 2, 2000)]),
        ("a packet shorter than an Ethernet header", [tx_req(ref, 0, 0, 1, 10)]),
        ("an extra of unknown type 7", raw.packet_slots(frame, rid=1, extras=(
            extra_slot(7),))),
        ("a GSO extra of type 3", raw.packet_slots(frame, rid=1, extras=(gso_slot(1448, 3),))),
        ("a GSO extra of size 0", raw.packet_slots(frame, rid=1, extras=(gso_slot(0),))),
        ("21 slots (more than netback accepts)",
         raw.packet_slots(bytes(21 * 64), rid=1, sizes=[64] * 21)),
        ("a grant ref out of the table", [tx_req(10**6, 0, 0, 1, 60)]),
        ("a grant for another domain",
         [tx_req(raw.page(domid=raw.session.domid + 1000, fill=frame)[1], 0, 0, 1, 60)]),
    ]


async def _nb_tx_validation(t) -> None:
    async with _attach(t) as (raw, *_):
        for what, slots in _bad_packets(raw):
            answers = await raw.call(*slots)
            got = [st for _, st in answers]
            expect(got == refused(slots), f"{what}: answered {got}, expected "
                   f"{refused(slots)} (ERROR in every slot, NULL for extras)")
            await _still_sends(raw, what)


async def _nb_endless_chain(t) -> None:
    async with _attach(t) as (raw, _device, session, be):
        (ref, _, _), = raw.data_pages(bytes(64))
        raw.send(*[tx_req(ref, 0, NETTXF_MORE_DATA, k, 64) for k in range(30)])
        state = await _disconnected(session, be)
        expect(state in (S.Closing, S.Closed), f"30 slots all saying more_data, the last "
               f"one published: the backend is still {state.name}; a chain running past "
               "req_prod breaks the ring and disconnects the vif (netif §3)")


async def _nb_hostile_index(t) -> None:
    async with _attach(t) as (raw, _device, session, be):
        raw.tx[0].set_req_prod(raw.tx[0].req_prod_pvt + raw.tx[0].nr_ents + 9)
        raw.tx_channel().notify()
        state = await _disconnected(session, be)
        expect(state in (S.Closing, S.Closed), f"an impossible TX req_prod left the backend "
               f"{state.name}; it must disconnect that vif (ring §6)")
    async with _attach(t) as (raw, *_):
        await _still_sends(raw, "a broken ring on an earlier attach")


async def _nb_flood(t) -> None:
    async with _attach(t) as (raw, *_):
        for _ in range(20000):
            raw.tx_channel().notify()
        await _still_sends(raw, "20000 empty notifications")


async def _nb_rx_copy(t) -> None:
    from pvio.frontends.netfront import open_netfront
    from pvio.frontends.session import open_session

    if not t.peer_domain:
        raise KitError("needs --peer-domain (a second domain with a vif on the switch)")
    async with _attach(t) as (raw, *_), open_session(t.socket, t.peer_domain) as peer_s:
        peer = await open_netfront(peer_s)
        raw.post_rx_pages(32)
        mac = bytes.fromhex(raw.mac.replace(":", ""))
        frame = mac + bytes.fromhex(peer.mac.replace(":", "")) + ETHERTYPE + bytes(range(46))
        await peer.send(frame)
        pkt = await receive_matching(raw, lambda d: d[12:14] == ETHERTYPE)
        expect(pkt.data == frame, "the frame copied into the posted RX page differs from "
               "the one sent")
        expect(pkt.first.status == len(frame), f"the RX response status is "
               f"{pkt.first.status}, not the fragment length {len(frame)} (netif §4)")


async def _nb_close(t) -> None:
    async with _attach(t) as (_raw, device, session, be):
        await device.close()
        state = await _state(session, be)
        expect(state == S.Closed, f"after the frontend closed, the backend is {state.name}")


NET_BACKEND_CHECKS = [
    Check("xenbus.backend-connects", "netif §1", "a frontend with rings, channels, "
          "request-rx-copy and feature-rx-notify gets a Connected backend offering rx copy",
          _nb_connects),
    Check("netif.requires-rx-copy", "netif §1", "a frontend without request-rx-copy=1 is "
          "not connected", _nb_requires_rx_copy),
    Check("netif.tx-ok", "netif §3", "a valid packet is answered OKAY with its id",
          _nb_tx_ok),
    Check("netif.tx-multislot", "netif §3", "a more_data chain gets one OKAY per slot, in "
          "order, with the slots' ids", _nb_tx_multislot),
    Check("netif.tx-extra-null", "netif §3", "an extra-info slot is answered "
          "XEN_NETIF_RSP_NULL", _nb_tx_extra_null),
    Check("netif.tx-validation", "netif §3", "a bad packet (page crossing, size mismatch, "
          "runt, bogus extras, too many slots, bad grants) gets ERROR in every slot and the "
          "vif keeps working", _nb_tx_validation),
    Check("netif.endless-chain", "netif §3", "a more_data chain running past req_prod "
          "disconnects that vif", _nb_endless_chain),
    Check("ring.hostile-req-prod", "ring §6", "an impossible req_prod disconnects that vif "
          "only", _nb_hostile_index),
    Check("evtchn.flood", "ring §5", "a flood of empty notifications does not stop the vif",
          _nb_flood),
    Check("netif.rx-copy", "netif §4", "a frame for the vif is copied into a posted page, "
          "status = its length", _nb_rx_copy, needs="peer-domain"),
    Check("xenbus.backend-closes", "xenbus §5", "a frontend closing makes the backend go "
          "Closed", _nb_close),
]


async def check_net_backend(target, *, peer_domain: str | None = None, select=None,
                            progress=None) -> Report:
    """Run :data:`NET_BACKEND_CHECKS` against the daemon at ``target`` (a
    :class:`pvio.testing.block.BackendTarget`); ``peer_domain`` enables RX checks."""
    if peer_domain is not None:
        target.peer_domain = peer_domain
    peer_domain = target.peer_domain

    async def offered(feature: str) -> bool:
        return feature != "peer-domain" or bool(peer_domain)

    return await run_checks("net-backend", NET_BACKEND_CHECKS, target, select=select,
                            offered=offered, progress=progress)


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


_COMMON = common_checks("netif §5", "sends, echoes")
NET_FRONTEND_CHECKS = [
    _COMMON["completes"],
    _COMMON["states"],
    Check("netif.frontend-keys", "netif §1", "ring refs, event channel(s), request-rx-copy=1 "
          "and feature-rx-notify=1 are published before Initialised", _nf_keys, timeout=90),
    Check("netif.tx-valid", "netif §3", "every packet the frontend sends passes netback's "
          "validation", _nf_tx_valid, timeout=90),
    Check("netif.frontend-sends", "netif §3", "frames leave the vif with its MAC",
          _nf_frames, timeout=90),
    Check("netif.frontend-receives", "netif §4", "the frontend posts RX buffers and "
          "receives frames", _nf_echo, timeout=90),
    _COMMON["closes"],
    hostile_check("hostile.bad-rx-response", "netif §4", "an RX response leaving its page "
                  "is detected (fail, not crash or hang)", "bad-rx-offset",
                  "RX responses whose offset+size leave the page"),
    hostile_check("hostile.wrong-tx-id", "netif §3", "a TX response for an id not in "
                  "flight is detected", "wrong-tx-id", "TX responses for an id never sent"),
    _COMMON["vanish"],
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
    return program_main(reference_net_frontend)


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["NET_BACKEND_CHECKS", "NET_FRONTEND_CHECKS", "check_net_backend",
           "check_net_frontend", "reference_net_frontend"]
