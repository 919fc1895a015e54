"""Generate the protocol test vectors in ``specs/vectors/`` (``python -m pvio._vectors``).

The vectors are JSON files any implementation (C, Rust, OCaml...) can replay
without Python: layouts and constants, ring operation sequences with the
expected notify decisions and shared-page bytes, console byte-ring
sequences, blkif/netif request/response slots with the backend's (or
frontend's) expected outcome, and xs_wire message exchanges. Their schemas
are documented in ``specs/README.md``.

Everything here is *derived*: the files are produced by running pvio's own
code (the rings, :mod:`pvio.blkif`, :mod:`pvio.netif`, the sans-I/O store and,
for the fd-carrying extension messages, the store server) on scripted,
seeded inputs. ``tests/specs/test_vectors.py`` regenerates them in memory and
fails if a committed file differs (``python -m pvio._vectors --check`` does
the same from the command line), and replays them through Xen's own C
macros and structs compiled from ``libxen-dev``.
"""

from __future__ import annotations

import array
import contextlib
import enum
import fcntl
import hashlib
import json
import logging
import os
import pathlib
import random
import socket
import struct
import sys
import tempfile

import construct as c

from pvio import _cgen, _specgen, layouts
from pvio.layouts import XEN_PAGE_SIZE, BlkifOp, BlkifRsp, NetifRsp, NetRxFlag, NetTxFlag

U32 = 0xFFFFFFFF
VERSION = 1
GENERATOR = "python -m pvio._vectors"
SCHEMA = "specs/README.md"

# ---------------------------------------------------------------------------
# Output helpers
# ---------------------------------------------------------------------------


def _flat(v) -> bool:
    return not isinstance(v, dict | list)


def _render(v, depth: int) -> str:
    """JSON with sorted keys; a dict or list of scalars goes on one line."""
    if isinstance(v, dict) and v and not all(_flat(x) for x in v.values()):
        pad = " " * (depth + 1)
        items = (f"{pad}{json.dumps(k)}: {_render(v[k], depth + 1)}" for k in sorted(v))
        return "{\n" + ",\n".join(items) + "\n" + " " * depth + "}"
    if isinstance(v, list) and v and not all(_flat(x) for x in v):
        pad = " " * (depth + 1)
        items = (f"{pad}{_render(x, depth + 1)}" for x in v)
        return "[\n" + ",\n".join(items) + "\n" + " " * depth + "]"
    return json.dumps(v, sort_keys=True, ensure_ascii=True)


def _dump(obj) -> str:
    return _render(obj, 0) + "\n"


def _about(name: str, text: str, spec: str) -> dict:
    return {
        "file": name,
        "about": text,
        "generator": GENERATOR,
        "schema": f"{SCHEMA}#{name.replace('.', '')}",
        "spec": spec,
        "version": VERSION,
    }


def _sha(data) -> str:
    return hashlib.sha256(bytes(data)).hexdigest()


# ---------------------------------------------------------------------------
# layouts.json
# ---------------------------------------------------------------------------

# How pvio's enum members are spelled in Xen's C headers.
ENUM_C_SPELLING = {
    "BlkifOp": ("BLKIF_OP_", str),
    "BlkifRsp": ("BLKIF_RSP_", str),
    "NetTxFlag": ("NETTXF_", str.lower),
    "NetRxFlag": ("NETRXF_", str.lower),
    "NetifExtraType": ("XEN_NETIF_EXTRA_TYPE_", str),
    "NetifRsp": ("NETIF_RSP_", str),
    "GTF": ("GTF_", str),
    "GNTST": ("GNTST_", str),
    "EvtchnStatus": ("EVTCHNSTAT_", str),
    "XsdSockmsgType": ("XS_", str),
    "XenbusState": ("XenbusState", str),
}

# pvio constants Xen only has as an expression.
DERIVED_CONSTANTS = {
    "XEN_PAGE_SIZE": "(1 << XEN_PAGE_SHIFT)",
    "SRING_HEADER_SIZE": "offsetof(struct X_sring, ring)",
    "BLKIF_SEGS_PER_INDIRECT_FRAME": "XEN_PAGE_SIZE / sizeof(struct blkif_request_segment)",
    "XENCONS_IN_SIZE": "sizeof(((struct xencons_interface *)0)->in)",
    "XENCONS_OUT_SIZE": "sizeof(((struct xencons_interface *)0)->out)",
}

# Where a layout without a standalone Xen type lives inside one.
XEN_CONTAINER = {
    "sring_header": {"struct": "X_sring", "member": "",
                     "note": "the members before ring[] of every DEFINE_RING_TYPES sring"},
    "flex_ring_intf": {"struct": "X_data_intf", "member": "",
                       "note": "DEFINE_XEN_FLEX_RING_AND_INTF(X), without the ref[] array"},
    "netif_extra_info_gso": {"struct": "netif_extra_info", "member": "u.gso"},
    "netif_extra_info_mcast": {"struct": "netif_extra_info", "member": "u.mcast"},
    "netif_extra_info_hash": {"struct": "netif_extra_info", "member": "u.hash"},
}


def _field_ctype(con) -> str:
    inner = _cgen._unwrap(con)
    if _cgen._is_union(inner):
        return "union"
    if isinstance(inner, c.Bytes):
        return f"uint8_t[{inner.length}]"
    if isinstance(inner, c.Array):
        return f"{_cgen._ctype(inner.subcon)}[{inner.count}]"
    return _cgen._ctype(inner)


def _layout_entry(name: str) -> dict:
    con = layouts.LAYOUTS[name]
    subcons = {sc.name: sc for sc in con.subcons if sc.name is not None}
    fields = []
    for f in _cgen.fields(con):
        entry = {"name": f.name, "offset": f.offset, "size": f.size, "ctype": f.ctype}
        inner = _cgen._unwrap(subcons[f.name])
        if _cgen._is_union(inner):
            entry["members"] = [
                {"name": m.name, "size": _cgen.sizeof(m), "ctype": _field_ctype(m)}
                for m in _cgen._unwrap(inner.subcon).subcons
            ]
        fields.append(entry)
    cname = layouts.XEN_C_NAMES[name]
    return {
        "xen_c_name": cname,
        "xen_container": None if cname else XEN_CONTAINER[name],
        "description": _specgen._DESCRIBED.get(name),
        "size": _cgen.sizeof(con),
        "align": _cgen.alignof(con),
        "struct_format": _cgen.struct_format(con),
        "fields": fields,
    }


def _enum_classes() -> list[type[enum.Enum]]:
    return [
        v for k, v in vars(layouts).items()
        if isinstance(v, type) and issubclass(v, enum.Enum) and not k.startswith("_")
        and v.__module__ == layouts.__name__
    ]


def render_layouts() -> dict:
    constants = {}
    for cls in _enum_classes():
        prefix, spell = ENUM_C_SPELLING[cls.__name__]
        constants[cls.__name__] = {
            "kind": "flags" if issubclass(cls, enum.IntFlag) else "enum",
            "c_family": prefix + "*",
            "members": [
                {"name": n, "c_name": prefix + spell(n), "value": int(m)}
                for n, m in cls.__members__.items()
            ],
        }
    scalars = {}
    for k, v in vars(layouts).items():
        if k.startswith("_") or not k[0].isupper() or isinstance(v, bool | type):
            continue
        if isinstance(v, int):
            scalars[k] = {"value": int(v), "c": DERIVED_CONSTANTS.get(k, k)}
    return {
        **_about("layouts.json", "Every wire structure pvio declares (pvio/layouts.py): size, "
                 "alignment, field offsets/sizes/C types; every constant and enum.",
                 "specs/layouts.md; xen-protocol.md §7 checks 1, 13, 21, 26, 27, 29, 30"),
        "byte_order": "little",
        "layouts": {name: _layout_entry(name) for name in layouts.LAYOUTS},
        "constants": constants,
        "scalars": scalars,
        "xsd_errors": list(layouts.XSD_ERRORS),
    }


# ---------------------------------------------------------------------------
# ring_ops.json
# ---------------------------------------------------------------------------

_HEADER = struct.Struct("<IIII")  # req_prod, req_event, rsp_prod, rsp_event


class _RingSim:
    """Both ends of a pvio ring over one zeroed page buffer."""

    def __init__(self, spec, pages: int, setup: dict) -> None:
        from pvio.ring import BackRing, FrontRing

        self.spec = spec
        self.page = bytearray(pages * XEN_PAGE_SIZE)
        if setup["mode"] == "init":
            self.front = FrontRing.init(spec, self.page)
            self.back = BackRing.attach(spec, self.page, 0)
        else:
            h = setup["header"]
            _HEADER.pack_into(self.page, 0, h["req_prod"], h["req_event"], h["rsp_prod"],
                              h["rsp_event"])
            self.front = FrontRing.attach(spec, self.page, setup["start"])
            self.back = BackRing.attach(spec, self.page, setup["start"])

    def state(self) -> dict:
        req_prod, req_event, rsp_prod, rsp_event = _HEADER.unpack_from(self.page)
        return {
            "req_prod": req_prod, "req_event": req_event,
            "rsp_prod": rsp_prod, "rsp_event": rsp_event,
            "req_prod_pvt": self.front.req_prod_pvt, "rsp_cons": self.front.rsp_cons,
            "rsp_prod_pvt": self.back.rsp_prod_pvt, "req_cons": self.back.req_cons,
            "page_sha256": _sha(self.page),
        }

    def run(self, op: str, arg) -> dict:
        f, b = self.front, self.back
        if op == "front_put":
            out = {"count": f.put_requests(arg)}
        elif op == "front_push":
            out = {"notify": f.push_requests()}
        elif op == "back_take":
            data = bytes(b.take_requests(arg))
            out = {"count": len(data) // self.spec.req_size, "data_sha256": _sha(data)}
        elif op == "back_put":
            out = {"count": b.put_responses(arg)}
        elif op == "back_push":
            out = {"notify": b.push_responses()}
        elif op == "front_take":
            data = bytes(f.take_responses(arg))
            out = {"count": len(data) // self.spec.rsp_size, "data_sha256": _sha(data)}
        elif op == "front_final_check":
            out = {"work": f.final_check_for_responses()}
        elif op == "back_final_check":
            out = {"work": b.final_check_for_requests()}
        else:
            raise ValueError(op)
        return out | self.state()


def _ring_step(sim: _RingSim, op: str, arg=None) -> dict:
    step = {"op": op}
    if op in ("front_put", "back_put"):
        step["data"] = bytes(arg).hex()
    elif op in ("back_take", "front_take"):
        step["max"] = arg
    step["expect"] = sim.run(op, arg)
    return step


def _random_steps(sim: _RingSim, rng: random.Random, count: int) -> list[dict]:
    spec, steps = sim.spec, []
    for _ in range(count):
        f, b = sim.front, sim.back
        weights = {
            "front_put": 4 if f.free_requests else 1, "front_push": 3, "back_take": 3,
            "back_put": 5 if b.pending_responses else 0, "back_push": 3, "front_take": 3,
            "front_final_check": 1, "back_final_check": 1,
        }
        op = rng.choices(list(weights), list(weights.values()))[0]
        if op == "front_put":
            n = rng.randint(1, min(f.free_requests + 2, 8))
            steps.append(_ring_step(sim, op, rng.randbytes(n * spec.req_size)))
        elif op == "back_put":
            n = rng.randint(1, b.pending_responses)
            steps.append(_ring_step(sim, op, rng.randbytes(n * spec.rsp_size)))
        elif op in ("back_take", "front_take"):
            steps.append(_ring_step(sim, op, rng.randint(1, 12)))
        else:
            steps.append(_ring_step(sim, op))
    # Drain: everything published is consumed and answered, so responses cross
    # the wrap too and both ends go to sleep (final checks) at the end.
    steps.append(_ring_step(sim, "front_push"))
    steps.append(_ring_step(sim, "back_take", sim.front.nr_ents))
    steps.append(_ring_step(sim, "back_final_check"))
    if sim.back.pending_responses:
        steps.append(_ring_step(sim, "back_put",
                                rng.randbytes(sim.back.pending_responses * spec.rsp_size)))
    steps.append(_ring_step(sim, "back_push"))
    steps.append(_ring_step(sim, "front_take", sim.front.nr_ents))
    steps.append(_ring_step(sim, "front_final_check"))
    return steps


def _cycle_steps(sim: _RingSim, rng: random.Random, cycles: int) -> list[dict]:
    nr, spec, steps = sim.front.nr_ents, sim.spec, []
    for _ in range(cycles):
        steps.append(_ring_step(sim, "front_put", rng.randbytes(nr * spec.req_size)))
        steps.append(_ring_step(sim, "front_push"))
        steps.append(_ring_step(sim, "back_take", nr))
        steps.append(_ring_step(sim, "back_final_check"))
        steps.append(_ring_step(sim, "back_put", rng.randbytes(nr * spec.rsp_size)))
        steps.append(_ring_step(sim, "back_push"))
        steps.append(_ring_step(sim, "front_take", nr))
        steps.append(_ring_step(sim, "front_final_check"))
    return steps


def _ring_sequence(name: str, ring: str, pages: int, setup: dict, kind: str, seed: int,
                   note: str) -> dict:
    from pvio.ring import BLKIF, NETIF_RX, NETIF_TX

    spec = {"blkif": BLKIF, "netif_tx": NETIF_TX, "netif_rx": NETIF_RX}[ring]
    start = setup.get("start", 0)
    for attempt in range(100):
        sim = _RingSim(spec, pages, setup)
        rng = random.Random(seed + 1000 * attempt)
        initial = sim.state()
        steps = _random_steps(sim, rng, 24) if kind == "random" else _cycle_steps(sim, rng, 1)
        # A sequence attached below 2^32 must see both producers wrap: retry
        # with the next seed otherwise (deterministically).
        if setup["mode"] == "init" or (sim.front.rsp_cons - start) & U32 > U32 - start:
            break
    else:
        raise AssertionError(f"{name}: no seed makes the indices wrap")
    return {"name": name, "ring": ring, "pages": pages, "nr_ents": sim.front.nr_ents,
            "setup": setup, "initial": initial, "steps": steps, "note": note}


def render_ring_ops() -> dict:
    from pvio.ring import BLKIF, NETIF_RX, NETIF_TX

    rings = {
        s.name: {"req_size": s.req_size, "rsp_size": s.rsp_size, "slot_size": s.slot_size,
                 "request": f"struct {s.name}_request", "response": f"struct {s.name}_response",
                 "sring": f"struct {s.name}_sring"}
        for s in (BLKIF, NETIF_TX, NETIF_RX)
    }
    sequences = []
    for ring, pages in (("blkif", 1), ("blkif", 2), ("netif_tx", 1), ("netif_rx", 1)):
        nr = {"blkif": BLKIF, "netif_tx": NETIF_TX, "netif_rx": NETIF_RX}[ring].nr_ents(pages)
        base = f"{ring}-{pages}p"
        seed = sum(map(ord, base))
        rng = random.Random(seed)
        sequences.append(_ring_sequence(
            f"{base}-init", ring, pages, {"mode": "init"}, "random", seed + 1,
            "XEN_FRONT_RING_INIT + BACK_RING_INIT on a zeroed page, random legal operations"))
        start = (1 << 32) - rng.randint(2, 10)
        sequences.append(_ring_sequence(
            f"{base}-wrap", ring, pages,
            {"mode": "attach", "start": start,
             "header": {"req_prod": start, "req_event": (start + 1) & U32, "rsp_prod": start,
                        "rsp_event": (start + 1) & U32}},
            "random", seed + 2,
            "FRONT/BACK_RING_ATTACH just below 2^32: the indices wrap during the run"))
        start = (1 << 32) - rng.randint(2, 10)
        events = (rng.getrandbits(32), (start + rng.randint(1, 8)) & U32)
        sequences.append(_ring_sequence(
            f"{base}-wrap-odd-events", ring, pages,
            {"mode": "attach", "start": start,
             "header": {"req_prod": start, "req_event": events[0], "rsp_prod": start,
                        "rsp_event": events[1]}},
            "random", seed + 3,
            "as -wrap, but the event indices start where a previous consumer left them"))
        start = ((1 << 32) - nr // 2) & U32
        sequences.append(_ring_sequence(
            f"{base}-full-cycle", ring, pages,
            {"mode": "attach", "start": start,
             "header": {"req_prod": start, "req_event": (start + 1) & U32, "rsp_prod": start,
                        "rsp_event": (start + 1) & U32}},
            "cycles", seed + 4,
            "fill the whole ring, consume everything, answer everything; the indices "
            "cross 2^32 half-way"))
    return {
        **_about("ring_ops.json",
                 "io/ring.h operation sequences run on pvio's FrontRing/BackRing: the result "
                 "of every step and the shared ring state after it.",
                 "specs/ring.md §2.3-§2.6; xen-protocol.md §7 checks 3-8"),
        "rings": rings,
        "sequences": sequences,
    }


# ---------------------------------------------------------------------------
# byte_rings.json (console)
# ---------------------------------------------------------------------------

_CONS_OFF = {f.name: f.offset for f in _cgen.fields(layouts.xencons_interface)}
_CONS_INDICES = ("in_cons", "in_prod", "out_cons", "out_prod")


class _ConsoleSim:
    def __init__(self, setup: dict) -> None:
        from pvio.ring import console_rings

        self.page = bytearray(XEN_PAGE_SIZE)
        for k in _CONS_INDICES:
            struct.pack_into("<I", self.page, _CONS_OFF[k], setup[k])
        guest_out, guest_in = console_rings(self.page, frontend=True)
        back_in, back_out = console_rings(self.page, frontend=False)
        # ring name -> (writer end, reader end)
        self.ends = {"out": (guest_out, back_out), "in": (back_in, guest_in)}

    def state(self) -> dict:
        out = {k: struct.unpack_from("<I", self.page, _CONS_OFF[k])[0] for k in _CONS_INDICES}
        return out | {"page_sha256": _sha(self.page)}

    def step(self, ring: str, op: str, arg) -> dict:
        from pvio.ring import RingBrokenError

        writer, reader = self.ends[ring]
        step = {"ring": ring, "op": op}
        try:
            if op == "write":
                step["data"] = bytes(arg).hex()
                result = {"count": writer.write(arg)}
            elif op == "read":
                step["max"] = arg
                result = {"data": reader.read(arg).hex()}
            else:  # poke: the peer scribbles on a shared index
                field, value = arg
                step["field"], step["value"] = field, value
                struct.pack_into("<I", self.page, _CONS_OFF[field], value)
                result = {}
        except RingBrokenError:
            result = {"broken": True}
        step["expect"] = result | self.state()
        return step


def _console_sequence(name: str, seed: int, starts: tuple[int, int], hostile: bool,
                      note: str) -> dict:
    rng = random.Random(seed)
    setup = {"in_cons": starts[0], "in_prod": starts[0], "out_cons": starts[1],
             "out_prod": starts[1]}
    sim = _ConsoleSim(setup)
    initial = sim.state()
    steps = []
    for _ in range(24):
        ring = rng.choice(["in", "out"])
        size = layouts.XENCONS_IN_SIZE if ring == "in" else layouts.XENCONS_OUT_SIZE
        if rng.random() < 0.55:
            n = rng.choice([1, 7, 100, rng.randint(1, size), size + 50])
            steps.append(sim.step(ring, "write", rng.randbytes(n)))
        else:
            steps.append(sim.step(ring, "read", rng.choice([1, 64, 700, size])))
    if hostile:
        # The backend claims to have consumed more than the guest ever wrote:
        # the guest's next write must refuse (hvc_xen's check).
        prod = sim.state()["out_prod"]
        steps.append(sim.step("out", "poke", ("out_cons", (prod + 1) & U32)))
        steps.append(sim.step("out", "write", b"refused"))
        # The backend publishes an in_prod more than 1024 bytes ahead of what the
        # guest consumed: the guest's next read must refuse.
        cons = sim.state()["in_cons"]
        steps.append(sim.step("in", "poke", ("in_prod", (cons + layouts.XENCONS_IN_SIZE + 1)
                                             & U32)))
        steps.append(sim.step("in", "read", 16))
    return {"name": name, "setup": setup, "initial": initial, "steps": steps, "note": note}


def render_byte_rings() -> dict:
    return {
        **_about("byte_rings.json",
                 "Console (struct xencons_interface) byte-ring sequences run on pvio's "
                 "console_rings: bytes written/read, indices and page after every step.",
                 "specs/ring.md §3, specs/console.md §1; xen-protocol.md §7 check 26"),
        "page_size": XEN_PAGE_SIZE,
        "offsets": {k: _CONS_OFF[k] for k in ("in", "out", *_CONS_INDICES)},
        "sizes": {"in": layouts.XENCONS_IN_SIZE, "out": layouts.XENCONS_OUT_SIZE},
        "sequences": [
            _console_sequence("console-zero", 11, (0, 0), False,
                              "indices from 0, random writes and reads in both directions"),
            _console_sequence("console-wrap", 12, ((1 << 32) - 40, (1 << 32) - 900), False,
                              "indices just below 2^32: they wrap during the run"),
            _console_sequence("console-hostile", 13, ((1 << 32) - 5, 4000), True,
                              "then a peer publishes impossible indices: that direction is "
                              "broken for good, nothing is copied"),
        ],
    }


# ---------------------------------------------------------------------------
# blkif_exchanges.json
# ---------------------------------------------------------------------------

_BLK_FEATURES = {
    # A 1 MiB writable disk, everything advertised (blkback's defaults).
    "rw": dict(sectors=2048),
    # mode=r: blkback advertises no flush/barrier/discard (blkif.md §1).
    "ro": dict(sectors=2048, readonly=True, flush=False, barrier=False, discard=False),
    # A writable disk that advertises no optional operation.
    "bare": dict(sectors=2048, flush=False, barrier=False, discard=False,
                 max_indirect_segments=0),
    # 4 KiB sectors (feature-large-sector-size): one sector per page.
    "4k": dict(sectors=256, sector_size=4096),
}


def _blk_feats(name: str):
    from pvio.blkif import BackendFeatures

    return BackendFeatures(**_BLK_FEATURES[name])


def _blk_rw(op: int, rid: int, sector: int, segs: list[tuple[int, int, int]],
            nseg: int | None = None, handle: int = 0) -> tuple[bytes, str, dict]:
    seg = [{"gref": g, "first_sect": f, "last_sect": ll} for g, f, ll in segs]
    pad = [{"gref": 0, "first_sect": 0, "last_sect": 0}] * (11 - len(seg))
    fields = {"operation": op, "nr_segments": len(segs) if nseg is None else nseg,
              "handle": handle, "id": rid, "sector_number": sector, "seg": seg}
    raw = layouts.blkif_request.build(fields | {"seg": seg + pad})
    return raw, "blkif_request", fields


def _blk_discard(rid: int, sector: int, nr: int, flag: int = 0) -> tuple[bytes, str, dict]:
    fields = {"operation": BlkifOp.DISCARD, "flag": flag, "handle": 0, "id": rid,
              "sector_number": sector, "nr_sectors": nr}
    raw = layouts.blkif_request_discard.build(fields)
    return raw.ljust(112, b"\0"), "blkif_request_discard", fields


def _blk_indirect(iop: int, rid: int, sector: int, nseg: int, grefs: list[int]
                  ) -> tuple[bytes, str, dict]:
    fields = {"operation": BlkifOp.INDIRECT, "indirect_op": iop, "nr_segments": nseg,
              "id": rid, "sector_number": sector, "handle": 0, "_pad2": 0,
              "indirect_grefs": grefs + [0] * (8 - len(grefs)), "_pad3": 0}
    raw = layouts.blkif_request_indirect.build(fields)
    return raw.ljust(112, b"\0"), "blkif_request_indirect", fields


def _segments_bytes(segs: list[tuple[int, int, int]]) -> bytes:
    return b"".join(layouts.blkif_request_segment.build(
        {"gref": g, "first_sect": f, "last_sect": ll}) for g, f, ll in segs)


def _blk_cases() -> list[tuple]:
    """(name, features, request, indirect segment bytes or None, spec, note)."""
    R, W = BlkifOp.READ, BlkifOp.WRITE
    rid = 0x0123456789ABCDEF
    segs11 = [(100 + i, 0, 7) for i in range(11)]
    ind20 = [(200 + i, 0, 7) for i in range(20)]
    ind256 = [(1000 + i, i % 8, 7) for i in range(256)]
    return [
        # -- valid
        ("read-1-segment", "rw", _blk_rw(R, rid, 8, [(9, 0, 7)]), None, "§3.1", ""),
        ("read-partial-page", "rw", _blk_rw(R, 1, 0, [(9, 2, 5)]), None, "§3.1",
         "sectors 2..5 of the granted page"),
        ("read-11-segments", "rw", _blk_rw(R, 2, 100, segs11), None, "§3.1", ""),
        ("read-last-sector", "rw", _blk_rw(R, 3, 2047, [(9, 7, 7)]), None, "§2",
         "ends exactly at the end of the disk"),
        ("write-2-segments", "rw", _blk_rw(W, 4, 16, [(10, 0, 7), (11, 0, 3)]), None,
         "§3.1", ""),
        ("write-handle-ignored", "rw", _blk_rw(W, 5, 0, [(10, 0, 0)], handle=0xBEEF), None,
         "§3.1", "handle is not checked"),
        ("write-4k-sector", "4k", _blk_rw(W, 6, 255, [(12, 0, 0)]), None, "§1, §2",
         "sector-size 4096: one sector per page, sector_number in 4096-byte units"),
        ("flush-0-segments", "rw", _blk_rw(BlkifOp.FLUSH_DISKCACHE, 7, 0, []), None, "§3.3",
         "a flush without data"),
        ("flush-with-data", "rw", _blk_rw(BlkifOp.FLUSH_DISKCACHE, 8, 64, [(13, 0, 7)]), None,
         "§3.3", "flush, then write"),
        ("barrier-write", "rw", _blk_rw(BlkifOp.WRITE_BARRIER, 9, 64, [(13, 0, 7)]), None,
         "§3.4", ""),
        ("discard", "rw", _blk_discard(10, 128, 64), None, "§3.5", ""),
        ("discard-secure-flag-ignored", "rw", _blk_discard(11, 0, 8, flag=1), None, "§3.5",
         "discard-secure=0: the flag is ignored"),
        ("indirect-read-20", "rw", _blk_indirect(R, 12, 0, 20, [300]), _segments_bytes(ind20),
         "§3.2", "segments come from the indirect page (granted ref 300)"),
        ("indirect-write-256", "rw", _blk_indirect(W, 13, 0, 256, [301]),
         _segments_bytes(ind256), "§3.2", "the advertised maximum"),
        # -- invalid: unknown or unadvertised operation
        ("op-reserved-1", "rw", _blk_rw(BlkifOp.RESERVED_1, 20, 0, [(9, 0, 7)]), None, "§2",
         "unknown opcode"),
        ("op-7", "rw", _blk_rw(7, 21, 0, [(9, 0, 7)]), None, "§2", "unknown opcode"),
        ("op-255", "rw", _blk_rw(255, 22, 0, [(9, 0, 7)]), None, "§2", "unknown opcode"),
        ("barrier-not-advertised", "bare", _blk_rw(BlkifOp.WRITE_BARRIER, 23, 0, [(9, 0, 7)]),
         None, "§2", ""),
        ("flush-not-advertised", "bare", _blk_rw(BlkifOp.FLUSH_DISKCACHE, 24, 0, []), None,
         "§2", ""),
        ("discard-not-advertised", "bare", _blk_discard(25, 0, 8), None, "§2", ""),
        ("indirect-not-advertised", "bare", _blk_indirect(R, 26, 0, 20, [300]),
         _segments_bytes(ind20), "§2", ""),
        ("flush-on-read-only", "ro", _blk_rw(BlkifOp.FLUSH_DISKCACHE, 27, 0, []), None, "§2",
         "never advertised on a read-only disk"),
        ("discard-on-read-only", "ro", _blk_discard(28, 0, 8), None, "§2",
         "never advertised on a read-only disk"),
        # -- invalid: read-only disk
        ("write-on-read-only", "ro", _blk_rw(W, 29, 0, [(9, 0, 7)]), None, "§2", ""),
        ("read-on-read-only", "ro", _blk_rw(R, 30, 0, [(9, 0, 7)]), None, "§2",
         "reads are fine"),
        ("indirect-write-on-read-only", "ro", _blk_indirect(W, 31, 0, 20, [300]),
         _segments_bytes(ind20), "§2", ""),
        # -- invalid: segments
        ("read-0-segments", "rw", _blk_rw(R, 32, 0, []), None, "§2", ""),
        ("write-12-segments", "rw", _blk_rw(W, 33, 0, segs11, nseg=12), None, "§2",
         "nr_segments says 12 (more than BLKIF_MAX_SEGMENTS_PER_REQUEST)"),
        ("last-before-first", "rw", _blk_rw(R, 34, 0, [(9, 5, 4)]), None, "§2", ""),
        ("last-sect-8", "rw", _blk_rw(R, 35, 0, [(9, 0, 8)]), None, "§2",
         "beyond the 8 sectors of a page"),
        ("last-sect-1-on-4k", "4k", _blk_rw(R, 36, 0, [(9, 0, 1)]), None, "§2",
         "a 4 KiB-sector page holds one sector"),
        ("bad-second-segment", "rw", _blk_rw(W, 37, 0, [(9, 0, 7), (10, 7, 6)]), None, "§2",
         ""),
        # -- invalid: range
        ("read-past-end", "rw", _blk_rw(R, 38, 2047, [(9, 0, 1)]), None, "§2",
         "one sector too many"),
        ("read-huge-sector", "rw", _blk_rw(R, 39, (1 << 64) - 1, [(9, 0, 7)]), None, "§2",
         "no 64-bit overflow"),
        ("discard-0-sectors", "rw", _blk_discard(40, 0, 0), None, "§2", ""),
        ("discard-past-end", "rw", _blk_discard(41, 2040, 9), None, "§2", ""),
        ("discard-huge", "rw", _blk_discard(42, 8, (1 << 64) - 1), None, "§2",
         "no 64-bit overflow"),
        # -- invalid: indirect
        ("indirect-op-flush", "rw", _blk_indirect(BlkifOp.FLUSH_DISKCACHE, 43, 0, 20, [300]),
         _segments_bytes(ind20), "§2", "indirect_op must be READ or WRITE"),
        ("indirect-0-segments", "rw", _blk_indirect(R, 44, 0, 0, [300]), b"", "§2", ""),
        ("indirect-257-segments", "rw", _blk_indirect(R, 45, 0, 257, [300]),
         _segments_bytes([(1, 0, 7)] * 257), "§2", "above feature-max-indirect-segments"),
        ("indirect-bad-segment", "rw", _blk_indirect(R, 46, 0, 20, [300]),
         _segments_bytes([*ind20[:19], (219, 3, 2)]), "§3.2",
         "the 20th segment in the indirect page has last_sect < first_sect"),
        ("indirect-past-end", "rw", _blk_indirect(R, 47, 2040, 20, [300]),
         _segments_bytes(ind20), "§3.2", "160 sectors from sector 2040"),
    ]


def _rsp_hex(rid: int, op: int, status: int) -> tuple[str, dict]:
    from pvio.blkif import pack_responses

    raw = bytes(pack_responses([(rid, op, status)], bytearray()))
    return raw.hex(), {"id": rid, "operation": op, "status": status}


def _blk_exchange(name, feats_name, request, indirect, section, note) -> dict:
    from pvio.blkif import BlkError, finish_indirect, parse_request

    raw, sname, fields = request
    feats = _blk_feats(feats_name)
    result = parse_request(memoryview(raw), feats)
    if not isinstance(result, BlkError) and result.indirect_grefs:
        err = finish_indirect(result, indirect or b"", feats)
        result = err or result
    ex = {
        "name": name, "features": feats_name,
        "request": {"struct": sname, "hex": raw.hex(), "fields": fields},
        "spec": f"specs/blkif.md {section}", "note": note,
    }
    if indirect is not None:
        ex["indirect_segments_hex"] = indirect.hex()
    if isinstance(result, BlkError):
        rsp_hex, rsp_fields = _rsp_hex(result.id, result.op, result.status)
        ex["expect"] = {"outcome": "error", "status": int(result.status),
                        "status_name": f"BLKIF_RSP_{BlkifRsp(result.status).name}",
                        "reason": result.reason,
                        "response": {"hex": rsp_hex, "fields": rsp_fields}}
    else:
        rsp_hex, rsp_fields = _rsp_hex(result.id, result.op, BlkifRsp.OKAY)
        ex["expect"] = {
            "outcome": "io",
            "io": {"kind": BlkifOp(result.kind).name, "offset": result.offset,
                   "length": result.length,
                   "segments": [[s.gref, s.first_sect, s.last_sect] for s in result.segments],
                   "indirect_grefs": list(result.indirect_grefs),
                   "secure": result.secure},
            "status": 0, "status_name": "BLKIF_RSP_OKAY",
            "response": {"hex": rsp_hex, "fields": rsp_fields},
        }
    return ex


def _ring_violations() -> list[dict]:
    """Backend view of impossible ``req_prod`` values: the device is disconnected."""
    from pvio.ring import BLKIF, BackRing, RingBrokenError

    out = []
    for name, rsp_prod_pvt, req_prod in (
        ("req-prod-one-ring-ahead", 10, 42),
        ("req-prod-overflows", 10, 43),
        ("req-prod-behind", 10, 9),
        ("req-prod-across-wrap", 0xFFFFFFF0, 0x10),
        ("req-prod-overflows-across-wrap", 0xFFFFFFF0, 0x11),
    ):
        page = bytearray(XEN_PAGE_SIZE)
        _HEADER.pack_into(page, 0, req_prod, rsp_prod_pvt + 1, rsp_prod_pvt, rsp_prod_pvt + 1)
        back = BackRing.attach(BLKIF, page, rsp_prod_pvt)
        try:
            n = len(back.take_requests()) // BLKIF.req_size
            expect = {"outcome": "consume", "count": n}
        except RingBrokenError:
            expect = {"outcome": "disconnect"}
        out.append({"name": name, "pages": 1, "nr_ents": back.nr_ents,
                    "req_cons": rsp_prod_pvt, "rsp_prod_pvt": rsp_prod_pvt,
                    "req_prod": req_prod, "expect": expect,
                    "spec": "specs/ring.md §2.5, specs/blkif.md §2 (last paragraph)"})
    return out


def render_blkif() -> dict:
    from dataclasses import asdict

    return {
        **_about("blkif_exchanges.json",
                 "blkif requests (slot bytes), the backend's verdict (pvio.blkif.parse_request "
                 "and finish_indirect) and the response slot it answers with.",
                 "specs/blkif.md §2, §3; xen-protocol.md §7 checks 13-17, 20"),
        "features": {k: asdict(_blk_feats(k)) for k in _BLK_FEATURES},
        "request_slot_size": 112,
        "response_size": 16,
        "exchanges": [_blk_exchange(*case) for case in _blk_cases()],
        "ring_violations": _ring_violations(),
    }


# ---------------------------------------------------------------------------
# netif_exchanges.json
# ---------------------------------------------------------------------------

_EXTRA = struct.Struct("<BBHBBH")  # type, flags, gso.size, gso.type, gso.pad, gso.features


def _tx_slot(gref, offset, flags, rid, size) -> dict:
    from pvio.netif import tx_request

    return {"kind": "request", "hex": tx_request(gref, offset, flags, rid, size).hex(),
            "fields": {"gref": gref, "offset": offset, "flags": int(flags), "id": rid,
                       "size": size}}


def _tx_extra(rid: int, etype: int, more: bool = False, gso_size: int = 0, gso_type: int = 0,
              addr: bytes | None = None) -> dict:
    raw = bytearray(12)
    flags = layouts.XEN_NETIF_EXTRA_FLAG_MORE if more else 0
    if addr is not None:
        raw[0], raw[1] = etype, flags
        raw[2:8] = addr
        fields = {"type": etype, "flags": flags, "mcast.addr": addr.hex()}
    else:
        _EXTRA.pack_into(raw, 0, etype, flags, gso_size, gso_type, 0, 0)
        fields = {"type": etype, "flags": flags, "gso.size": gso_size, "gso.type": gso_type,
                  "gso.pad": 0, "gso.features": 0}
    struct.pack_into("<H", raw, 8, rid)
    return {"kind": "extra", "hex": bytes(raw).hex(), "fields": fields, "id": rid}


def _tx_cases() -> list[tuple]:
    from pvio.layouts import NetifExtraType as E

    MORE, EXTRA, CSUM, VALID = (NetTxFlag.MORE_DATA, NetTxFlag.EXTRA_INFO,
                                NetTxFlag.CSUM_BLANK, NetTxFlag.DATA_VALIDATED)
    V4, V6 = layouts.XEN_NETIF_GSO_TYPE_TCPV4, layouts.XEN_NETIF_GSO_TYPE_TCPV6
    gso = (V4, V6)
    frags18 = [_tx_slot(500, 0, MORE, 0, 18 * 1000)] + [
        _tx_slot(501 + i, 0, MORE if i < 16 else 0, 1 + i, 1000) for i in range(17)]
    frags20 = [_tx_slot(500, 0, MORE, 0, 20 * 100)] + [
        _tx_slot(501 + i, 0, MORE if i < 18 else 0, 1 + i, 100) for i in range(19)]
    frags21 = [_tx_slot(500, 0, MORE, 0, 21 * 100)] + [
        _tx_slot(501 + i, 0, MORE if i < 19 else 0, 1 + i, 100) for i in range(20)]
    return [
        # name, slots, accept_gso, spec note
        ("single-slot", [_tx_slot(8, 0, 0, 0, 60)], gso, "a 60-byte frame in one slot"),
        ("single-csum-blank", [_tx_slot(8, 128, CSUM | VALID, 1, 1514)], gso,
         "checksum offload flags carried to the packet"),
        ("multi-slot", [_tx_slot(8, 0, MORE, 2, 9000), _tx_slot(9, 0, MORE, 3, 4096),
                        _tx_slot(10, 0, 0, 4, 808)], gso,
         "first size is the total: fragment 1 = 9000 - 4096 - 808"),
        ("gso-extra", [_tx_slot(8, 0, MORE | EXTRA | CSUM, 5, 6000),
                       _tx_extra(6, E.GSO, gso_size=1448, gso_type=V4),
                       _tx_slot(9, 0, 0, 7, 1904)], gso,
         "the extra slot is answered NETIF_RSP_NULL"),
        ("gso-v6-and-mcast-extras", [_tx_slot(8, 0, EXTRA, 8, 1000),
                                     _tx_extra(9, E.MCAST_ADD, more=True,
                                               addr=bytes.fromhex("01005e000001")),
                                     _tx_extra(10, E.GSO, gso_size=1440, gso_type=V6)], gso,
         "two chained extras (XEN_NETIF_EXTRA_FLAG_MORE)"),
        ("18-slots", frags18, gso, "XEN_NETIF_NR_SLOTS_MIN slots must be accepted"),
        ("20-slots", frags20, gso, "pvio's limit (MAX_SLOTS)"),
        ("zero-length-fragment", [_tx_slot(8, 0, MORE, 11, 100), _tx_slot(9, 0, MORE, 12, 0),
                                  _tx_slot(10, 0, 0, 13, 40)], gso,
         "a 0-byte fragment is answered OKAY but carries nothing (XSA-448)"),
        ("two-packets", [_tx_slot(8, 0, 0, 14, 60), _tx_slot(9, 0, MORE, 15, 200),
                         _tx_slot(10, 0, 0, 16, 100)], gso, "one batch, two packets"),
        ("max-tx-size", [_tx_slot(8, 0, MORE, 22, 0xFFFF)] + [
            _tx_slot(9 + i, 0, MORE if i < 14 else 0, 23 + i, 4096) for i in range(15)], gso,
         "XEN_NETIF_MAX_TX_SIZE in 16 slots: the first fragment holds 4095 bytes"),
        # -- dropped (every slot answered ERROR, extras NULL)
        ("first-smaller-than-rest", [_tx_slot(8, 0, MORE, 17, 100),
                                     _tx_slot(9, 0, 0, 18, 200)], gso, ""),
        ("fragment-crosses-page", [_tx_slot(8, 4000, 0, 19, 200)], gso, "4000 + 200 > 4096"),
        ("second-fragment-crosses-page", [_tx_slot(8, 0, MORE, 20, 1000),
                                          _tx_slot(9, 4090, 0, 21, 10)], gso, ""),
        ("shorter-than-ethernet", [_tx_slot(8, 0, 0, 40, 13)], gso, ""),
        ("21-slots", frags21, gso, "more than MAX_SLOTS"),
        ("gso-type-unknown", [_tx_slot(8, 0, EXTRA, 41, 1000),
                              _tx_extra(42, E.GSO, gso_size=1448, gso_type=3)], gso, ""),
        ("gso-not-negotiated", [_tx_slot(8, 0, EXTRA, 43, 1000),
                                _tx_extra(44, E.GSO, gso_size=1448, gso_type=V4)], (),
         "feature-gso-tcpv4 not offered"),
        ("gso-size-0", [_tx_slot(8, 0, EXTRA, 45, 1000),
                        _tx_extra(46, E.GSO, gso_size=0, gso_type=V4)], gso, ""),
        ("extra-type-none", [_tx_slot(8, 0, EXTRA, 47, 1000), _tx_extra(48, E.NONE)], gso, ""),
        ("extra-type-5", [_tx_slot(8, 0, EXTRA, 49, 1000), _tx_extra(50, 5)], gso, ""),
        # -- the ring protocol is broken: disconnect
        ("more-data-cut-off", [_tx_slot(8, 0, MORE, 51, 1000)], gso,
         "the last published slot says more_data"),
        ("extra-cut-off", [_tx_slot(8, 0, EXTRA, 52, 1000)], gso,
         "extra_info on the last published slot"),
        ("extra-more-cut-off", [_tx_slot(8, 0, EXTRA, 53, 1000),
                                _tx_extra(54, E.GSO, more=True, gso_size=1448, gso_type=V4)],
         gso, "XEN_NETIF_EXTRA_FLAG_MORE on the last published slot"),
    ]


def _tx_exchange(name, slots, accept_gso, note) -> dict:
    from pvio.netif import TX_RSP, NetifFatal, TxDrop, assemble

    raw = b"".join(bytes.fromhex(s["hex"]) for s in slots)
    ex = {"name": name, "slots": slots, "accept_gso": list(accept_gso), "max_slots": 20,
          "note": note, "spec": "io/netif.h 'Guest transmit'; pvio/netif.py; "
          "xen-protocol.md §7 checks 22, 24"}
    try:
        results = assemble(memoryview(raw), max_slots=20, accept_gso=tuple(accept_gso))
    except NetifFatal as exc:
        ex["expect"] = {"outcome": "disconnect", "reason": str(exc)}
        return ex
    packets, responses = [], []
    for r in results:
        if isinstance(r, TxDrop):
            packets.append({"dropped": True, "reason": r.reason})
        else:
            packets.append({
                "dropped": False, "size": r.size,
                "fragments": [[f.gref, f.offset, f.size] for f in r.fragments],
                "csum_blank": r.csum_blank, "data_validated": r.data_validated,
                "gso_type": r.gso_type, "gso_size": r.gso_size,
                "mcast": [[t, a.hex()] for t, a in r.mcast]})
        for rid, status in r.responses:
            responses.append({"id": rid, "status": int(status),
                              "status_name": f"NETIF_RSP_{NetifRsp(status).name}",
                              "hex": TX_RSP.pack(rid, status).hex()})
    ex["expect"] = {"outcome": "packets", "packets": packets, "responses": responses}
    return ex


def _rx_frames_to_slots(frames, first_id: int = 0) -> tuple[list[dict], list[dict]]:
    """RX requests posted by a frontend and netback's responses for ``frames``.

    Mirrors pvio.backends.netback: each fragment (and the GSO extra after the
    first) occupies the slot of the request it consumed, ids are echoed,
    offsets are 0.
    """
    from pvio.netif import RX_REQ, RX_RSP, pack_extra_gso, rx_flags

    requests, responses = [], []
    slot = 0
    for length, offload in frames:
        chunks = -(-length // XEN_PAGE_SIZE)
        plan = []
        for k in range(chunks):
            plan.append(("frag", k, min(XEN_PAGE_SIZE, length - k * XEN_PAGE_SIZE)))
            if k == 0 and offload.gso_type:
                plan.append(("extra", 0, 0))
        for kind, k, size in plan:
            rid, gref = first_id + slot, 700 + slot
            requests.append({"hex": RX_REQ.pack(rid, 0, gref).hex(),
                             "fields": {"id": rid, "pad": 0, "gref": gref}})
            out = bytearray(RX_RSP.size)
            if kind == "frag":
                f = rx_flags(offload) if k == 0 else 0
                if k < chunks - 1:
                    f |= NetRxFlag.MORE_DATA
                if k == 0 and offload.gso_type:
                    f |= NetRxFlag.EXTRA_INFO
                RX_RSP.pack_into(out, 0, rid, 0, f, size)
                fields = {"id": rid, "offset": 0, "flags": int(f), "status": size}
            else:
                pack_extra_gso(out, 0, offload.gso_type, offload.gso_size)
                fields = {"type": 1, "flags": 0, "gso.size": offload.gso_size,
                          "gso.type": offload.gso_type, "gso.pad": 0, "gso.features": 0}
            responses.append({"kind": kind, "hex": bytes(out).hex(), "fields": fields})
            slot += 1
    return requests, responses


def _rx_set(responses: list[dict], index: int, **fields) -> list[dict]:
    """A copy of ``responses`` with fields of one (fragment) response changed."""
    from pvio.netif import RX_RSP

    out = [dict(r) for r in responses]
    f = dict(out[index]["fields"]) | fields
    out[index] = {"kind": "frag", "fields": f,
                  "hex": RX_RSP.pack(f["id"], f["offset"], f["flags"], f["status"]).hex()}
    return out


def _rx_cases() -> list[tuple]:
    from pvio.netif import MAX_RX_SLOTS, Offload

    V4, V6 = layouts.XEN_NETIF_GSO_TYPE_TCPV4, layouts.XEN_NETIF_GSO_TYPE_TCPV6
    plain = Offload()
    one = _rx_frames_to_slots([(1514, Offload(data_validated=True))])
    multi = _rx_frames_to_slots([(9000, plain)])
    gso = _rx_frames_to_slots([(20000, Offload(True, True, V4, 1448))])
    gso6 = _rx_frames_to_slots([(3000, Offload(True, True, V6, 1440))])
    two = _rx_frames_to_slots([(60, plain), (5000, Offload(csum_blank=True))])
    longest = _rx_frames_to_slots([(MAX_RX_SLOTS * XEN_PAGE_SIZE, plain)])
    bad_extra = [dict(r) for r in gso[1]]
    raw = bytearray(bytes.fromhex(bad_extra[1]["hex"]))
    raw[0] = 2  # MCAST_ADD where only GSO may appear
    bad_extra[1] = {"kind": "extra", "hex": raw.hex(),
                    "fields": dict(bad_extra[1]["fields"]) | {"type": 2}}
    return [
        # name, (requests, responses), gso_ok, note
        ("single-slot", one, True, "data_validated -> NETRXF_data_validated"),
        ("more-data", multi, True, "9000 bytes over 3 slots, chained by NETRXF_more_data"),
        ("gso-extra", gso, True, "csum_blank + GSO: NETRXF_extra_info, the extra sits in "
         "the slot after the first fragment"),
        ("gso-v6", gso6, True, ""),
        ("two-packets", two, True, "csum_blank on RX also sets data_validated"),
        ("error-status", (one[0], _rx_set(one[1], 0, status=-1)), True,
         "the backend failed the copy: the packet is delivered as an error"),
        ("longest-chain", longest, True, f"{MAX_RX_SLOTS} slots: the most a packet may use"),
        ("incomplete-chain", (multi[0][:2], multi[1][:2]), True,
         "more_data on the last published response: nothing is consumed yet"),
        # -- the backend broke the protocol: the frontend stops using the device
        ("offset-leaves-page", (one[0], _rx_set(one[1], 0, offset=3000)), True,
         "3000 + 1514 > 4096"),
        ("gso-not-requested", gso, False, "an extra the frontend did not negotiate"),
        ("extra-not-gso", (gso[0], bad_extra), True, ""),
        ("chain-too-long", _rx_frames_to_slots([((MAX_RX_SLOTS + 1) * XEN_PAGE_SIZE, plain)]),
         True, "more slots than a 64 KiB packet can need"),
    ]


def _rx_exchange(name, slots, gso_ok, note) -> dict:
    from pvio.netif import RxProtocolError, parse_rx_responses

    requests, responses = slots
    raw = b"".join(bytes.fromhex(r["hex"]) for r in responses)
    ex = {"name": name, "requests": requests, "responses": responses, "gso_ok": gso_ok,
          "note": note, "spec": "io/netif.h 'Guest receive'; pvio/netif.py "
          "parse_rx_responses; xen-protocol.md §7 check 23"}
    try:
        packets, used = parse_rx_responses(memoryview(raw), 0, gso_ok=gso_ok)
    except RxProtocolError as exc:
        ex["expect"] = {"outcome": "disconnect", "reason": str(exc)}
        return ex
    ex["expect"] = {
        "outcome": "packets", "consumed": used,
        "packets": [{
            "chunks": [[ch.slot, ch.offset, ch.length, ch.id] for ch in p.chunks],
            "csum_blank": p.offload.csum_blank, "data_validated": p.offload.data_validated,
            "gso_type": p.offload.gso_type, "gso_size": p.offload.gso_size,
            "error": p.error, "slots": p.slots} for p in packets],
    }
    return ex


def render_netif() -> dict:
    return {
        **_about("netif_exchanges.json",
                 "netif TX request chains with the backend's verdict (pvio.netif.assemble) "
                 "and response slots; RX responses with the frontend's verdict "
                 "(pvio.netif.parse_rx_responses).",
                 "io/netif.h; xen-protocol.md §3 and §7 checks 21-24"),
        "tx_request_size": 12, "tx_response_size": 4, "rx_request_size": 8,
        "rx_response_size": 8, "extra_info_size": 8,
        "tx": [_tx_exchange(*case) for case in _tx_cases()],
        "rx": [_rx_exchange(*case) for case in _rx_cases()],
    }


# ---------------------------------------------------------------------------
# xenstore_messages.json
# ---------------------------------------------------------------------------


def _msg_json(msg) -> dict:
    return {"type": msg.type, "type_name": msg.type_name, "req_id": msg.req_id,
            "tx_id": msg.tx_id, "len": len(msg.payload), "payload_hex": msg.payload.hex(),
            "payload_text": msg.payload.decode("ascii", "backslashreplace"),
            "hex": msg.encode().hex()}


_XS_CONNS = {"dom0": (0, True), "dom1": (1, False), "dom2": (2, False)}


def _xs_script() -> list[tuple]:
    """(connection, type, payload, tx label or None, binds label or None, note)."""
    from pvio.layouts import XsdSockmsgType as XS

    d1 = b"/local/domain/1"
    vbd = b"device/vbd/51712"
    return [
        ("dom0", XS.MKDIR, d1 + b"\0", None, None, "dom0 creates dom1's home"),
        ("dom0", XS.SET_PERMS, d1 + b"\0n1\0", None, None, "owned by dom1, others: none"),
        ("dom0", XS.MKDIR, b"/local/domain/2\0", None, None, ""),
        ("dom0", XS.SET_PERMS, b"/local/domain/2\0n2\0", None, None, ""),
        ("dom0", XS.GET_PERMS, d1 + b"\0", None, None, ""),
        ("dom1", XS.WRITE, vbd + b"/state\x001", None, None,
         "relative path; the value is the unterminated rest; parents are created"),
        ("dom1", XS.READ, vbd + b"/state\0", None, None, ""),
        ("dom0", XS.READ, d1 + b"/" + vbd + b"/state\0", None, None, ""),
        ("dom1", XS.WRITE, b"data\0v\0with\0nuls", None, None, "values may hold NULs"),
        ("dom1", XS.READ, b"data\0", None, None, ""),
        ("dom1", XS.WRITE, b"empty\0", None, None, "an empty value"),
        ("dom1", XS.DIRECTORY, b"device/vbd\0", None, None, ""),
        ("dom1", XS.DIRECTORY, vbd + b"/state\0", None, None, "a leaf: no children"),
        ("dom1", XS.READ, b"missing\0", None, None, ""),
        ("dom2", XS.READ, d1 + b"/" + vbd + b"/state\0", None, None,
         "dom2 may not read dom1's nodes"),
        ("dom2", XS.READ, d1 + b"/nothing/here\0", None, None,
         "EACCES, not ENOENT: dom2 may not learn what is missing"),
        ("dom2", XS.WRITE, d1 + b"/intrude\0x", None, None, ""),
        ("dom1", XS.GET_PERMS, vbd + b"/state\0", None, None,
         "inherited from the parent, the creator becomes the owner"),
        ("dom0", XS.WATCH, d1 + b"/device\0fe-watch\0", None, None,
         "OK, then the watch fires once at once"),
        ("dom1", XS.WATCH, b"device\0mine\0", None, None,
         "a relative watch reports relative paths"),
        ("dom1", XS.WATCH, b"device\0mine\0", None, None, "the same watch twice"),
        ("dom1", XS.WRITE, vbd + b"/ring-ref\x008", None, None,
         "fires both watches: dom0's with the absolute path, dom1's relative"),
        ("dom2", XS.WATCH, d1 + b"/device\0peek\0", None, None,
         "registration fires even without read access..."),
        ("dom1", XS.WRITE, vbd + b"/event-channel\x005", None, None,
         "...but changes are only reported to watchers allowed to read the node"),
        ("dom0", XS.WATCH, b"@introduceDomain\0intro\0", None, None, "a special path"),
        ("dom1", XS.TRANSACTION_START, b"\0", None, "t1", ""),
        ("dom1", XS.WRITE, vbd + b"/state\x003", "t1", None, "inside: no events yet"),
        ("dom1", XS.READ, vbd + b"/state\0", "t1", None, "the transaction sees its write"),
        ("dom0", XS.READ, d1 + b"/" + vbd + b"/state\0", None, None, "outside: not yet"),
        ("dom1", XS.TRANSACTION_END, b"T\0", "t1", None, "commit: the watches fire now"),
        ("dom0", XS.READ, d1 + b"/" + vbd + b"/state\0", None, None, ""),
        ("dom1", XS.TRANSACTION_START, b"\0", None, "t2", ""),
        ("dom1", XS.READ, vbd + b"/state\0", "t2", None, ""),
        ("dom0", XS.WRITE, d1 + b"/" + vbd + b"/state\x005", None, None,
         "dom0 changes a node t2 read"),
        ("dom1", XS.WRITE, vbd + b"/state\x004", "t2", None, ""),
        ("dom1", XS.TRANSACTION_END, b"T\0", "t2", None, "conflict: nothing is applied"),
        ("dom1", XS.READ, vbd + b"/state\0", None, None, "still dom0's value"),
        ("dom1", XS.TRANSACTION_START, b"\0", None, "t3", ""),
        ("dom1", XS.WRITE, b"scratch\0x", "t3", None, ""),
        ("dom1", XS.TRANSACTION_END, b"F\0", "t3", None, "abort"),
        ("dom1", XS.READ, b"scratch\0", None, None, "the aborted write never happened"),
        ("dom1", XS.TRANSACTION_END, b"T\0", "t3", None, "the transaction is gone"),
        ("dom1", XS.MKDIR, vbd + b"/sub/dir\0", None, None, ""),
        ("dom1", XS.MKDIR, vbd + b"/sub/dir\0", None, None, "MKDIR of an existing node"),
        ("dom1", XS.RM, vbd + b"\0", None, None,
         "removes the subtree; watches on and above it fire"),
        ("dom1", XS.RM, vbd + b"\0", None, None, "removing a missing node whose parent exists"),
        ("dom1", XS.RM, b"no/such/parent\0", None, None, ""),
        ("dom1", XS.UNWATCH, b"device\0mine\0", None, None, ""),
        ("dom1", XS.UNWATCH, b"device\0mine\0", None, None, "not registered any more"),
        ("dom0", XS.RESET_WATCHES, b"", None, None, ""),
        ("dom1", XS.GET_DOMAIN_PATH, b"1\0", None, None, ""),
        ("dom1", XS.GET_DOMAIN_PATH, b"x\0", None, None, ""),
        # -- malformed and refused requests
        ("dom1", XS.READ, b"a//b\0", None, None, "invalid path"),
        ("dom1", XS.READ, b"trailing/\0", None, None, "invalid path"),
        ("dom1", XS.READ, b"bad char\0", None, None, "invalid path"),
        ("dom1", XS.READ, b"no-nul", None, None, "arguments must be NUL-terminated"),
        ("dom1", XS.WRITE, b"no-nul-at-all", None, None, ""),
        ("dom1", XS.WATCH, b"only-path\0", None, None, "WATCH takes two arguments"),
        ("dom1", XS.TRANSACTION_END, b"X\0", "t1", None,
         "a verdict other than T or F (checked before the transaction id)"),
        ("dom1", XS.SET_PERMS, b"data\0q1\0", None, None, "bad permission letter"),
        ("dom2", XS.SET_PERMS, d1 + b"/data\0b2\0", None, None,
         "only the owner may change permissions"),
        ("dom1", XS.CONTROL, b"print\0hi\0", None, None, "dom0 only"),
        ("dom0", XS.CONTROL, b"print\0hi\0", None, None, ""),
        ("dom1", XS.INTRODUCE, b"3\x00123\x004\0", None, None,
         "toolstack operations are the daemon's"),
        ("dom1", XS.IS_DOMAIN_INTRODUCED, b"1\0", None, None, ""),
        ("dom1", XS.WATCH_EVENT, b"a\0b\0", None, None, "server-to-client only"),
        ("dom1", 20, b"", None, None, "type 20 was removed from xs_wire.h"),
        ("dom1", XS.TYPE_COUNT, b"", None, None, ""),
        ("dom1", 0x12345678, b"x\0", None, None, ""),
    ]


def _xs_exchanges() -> list[dict]:
    from pvio.xenbus import wire
    from pvio.xenbus.dispatch import dispatch
    from pvio.xenbus.store import Connection, Store

    store = Store()
    conns = {n: Connection(d, privileged=p, name=n) for n, (d, p) in _XS_CONNS.items()}
    by_obj = {id(v): k for k, v in conns.items()}
    labels: dict[str, int] = {}
    out = []
    for req_id, (conn, mtype, payload, tx, binds, note) in enumerate(_xs_script(), 1):
        tx_id = labels.get(tx, 0) if tx else 0
        msg = wire.Message(int(mtype), 0x1000 + req_id, tx_id, payload)
        reply, events = dispatch(store, conns[conn], msg)
        ex = {"conn": conn, "request": _msg_json(msg), "reply": _msg_json(reply),
              "events": [{"to": by_obj[id(e.conn)],
                          "message": _msg_json(wire.watch_event(e.path, e.token))}
                         for e in events],
              "note": note}
        if tx:
            ex["tx"] = tx
        if binds:
            labels[binds] = int(reply.payload.rstrip(b"\0"))
            ex["binds"] = binds
        if reply.type == int(layouts.XsdSockmsgType.ERROR):
            ex["error"] = reply.payload.rstrip(b"\0").decode()
        out.append(ex)
    return out


def _xs_framing() -> list[dict]:
    from pvio.xenbus.wire import HEADER, MessageReader, WireError

    cases = [
        ("two-messages-one-chunk",
         [HEADER.pack(2, 7, 0, 4) + b"a/b\0" + HEADER.pack(1, 8, 0, 2) + b"a\0"]),
        ("one-message-three-chunks", [HEADER.pack(11, 9, 0, 5)[:10],
                                      HEADER.pack(11, 9, 0, 5)[10:] + b"p\0",
                                      b"val"]),
        ("payload-4096", [HEADER.pack(11, 10, 0, 4096) + b"big\0" + b"v" * 4092]),
        ("payload-4097", [HEADER.pack(11, 11, 0, 4097)]),
        ("empty-payload", [HEADER.pack(21, 12, 0, 0)]),
    ]
    out = []
    for name, chunks in cases:
        reader, msgs, expect = MessageReader(), [], None
        try:
            for chunk in chunks:
                reader.feed(chunk)
                msgs += list(reader)
            expect = {"outcome": "messages",
                      "messages": [{"type": m.type, "req_id": m.req_id, "tx_id": m.tx_id,
                                    "payload_sha256": _sha(m.payload),
                                    "len": len(m.payload)} for m in msgs],
                      "buffered": reader.buffered}
        except WireError as exc:
            expect = {"outcome": "disconnect", "reason": str(exc), "messages_before": len(msgs)}
        out.append({"name": name, "chunks_hex": [ch.hex() for ch in chunks],
                    "expect": expect, "spec": "specs/xenbus.md §2"})
    return out


# The fd-carrying extension messages, run through the real store server (trio):
# (socket, type, payload, fds, note); fds: "memfd" (sealed, 1 page),
# "memfd-unsealed", "memfd-short" (sealed, 100 bytes), "eventfd", "pipe".
def _ext_script() -> list[tuple]:
    from pvio.xenbus import wire

    SM, BE, CL, CAP = (wire.PVIO_SHARE_MEMORY, wire.PVIO_BIND_EVTCHN, wire.PVIO_CLAIM,
                       wire.PVIO_CAPTURE)
    return [
        ("guest", CL, b"nobody\0", [], "not a configured domain"),
        ("guest", CL, b"guest\0", ["pipe"], "a claim carries no fds"),
        ("guest", CL, b"guest\0", [], "reply: the domid"),
        ("guest", CL, b"guest\0", [], "claiming twice"),
        ("guest", SM, b"pool\0", ["memfd"], ""),
        ("guest", SM, b"pool\0", ["memfd"], "a second pool"),
        ("guest", SM, b"gnttab\0", ["memfd-unsealed"], "the seals are required"),
        ("guest", SM, b"gnttab\0", ["memfd-short"], "not a page multiple"),
        ("guest", SM, b"gnttab\0", ["pipe"], "not a memfd"),
        ("guest", SM, b"heap\0", ["memfd"], "unknown kind"),
        ("guest", SM, b"gnttab\0", [], "missing fd"),
        ("guest", SM, b"gnttab\0", ["memfd", "memfd"], "one fd too many"),
        ("guest", SM, b"gnttab\0", ["memfd"], ""),
        ("guest", BE, b"5\0", ["eventfd", "eventfd"], ""),
        ("guest", BE, b"5\0", ["eventfd", "eventfd"], "a port handed over again replaces it"),
        ("guest", BE, b"0\0", ["eventfd", "eventfd"], "ports are 1..4095"),
        ("guest", BE, b"4096\0", ["eventfd", "eventfd"], ""),
        ("guest", BE, b"6\0", ["eventfd"], "exactly two fds"),
        ("guest", BE, b"7\0", ["pipe", "pipe"], "event channel fds must be eventfds"),
        ("guest", CAP, b"vif1.0\0", ["pipe"], "capture is for admin connections"),
        ("admin", SM, b"pool\0", ["memfd"], "dom0 has no guest memory"),
        ("admin", CL, b"guest\0", [], "admin connections are domain 0"),
        ("admin", CAP, b"vif1.0\0", ["pipe"], "this store serves no switch"),
        ("guest2", SM, b"pool\0", ["memfd", "memfd", "memfd"],
         "more fds than any message carries (MSG_CTRUNC): disconnect"),
    ]


_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def _make_fd(kind: str) -> int:
    if kind.startswith("memfd"):
        fd = os.memfd_create("pvio-vectors", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, 100 if kind == "memfd-short" else XEN_PAGE_SIZE)
        if kind != "memfd-unsealed":
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
        return fd
    if kind == "eventfd":
        return os.eventfd(0, os.EFD_CLOEXEC)
    r, w = os.pipe()
    os.close(w)
    return r


_FD_KINDS = {
    "memfd": "memfd, MFD_ALLOW_SEALING, 4096 bytes, sealed F_SEAL_SHRINK|F_SEAL_GROW|F_SEAL_SEAL",
    "memfd-unsealed": "memfd, 4096 bytes, no seals",
    "memfd-short": "memfd, 100 bytes, sealed",
    "eventfd": "eventfd",
    "pipe": "the read end of a pipe",
}


async def _ext_run(tmp: str) -> list[dict]:
    import trio

    from pvio.xenbus import wire
    from pvio.xenbus.server import XenstoreServer
    from pvio.xenbus.store import XenstoreError

    server = XenstoreServer(guest_uids=None)

    async def on_claim(domain, name: str) -> None:
        if name != "guest":
            raise XenstoreError("ENOENT", f"no domain {name!r} configured")

    server.on_claim = on_claim
    paths = {"admin": os.path.join(tmp, "xs.admin"), "guest": os.path.join(tmp, "xs.sock")}
    out: list[dict] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, paths["admin"], paths["guest"])
        socks: dict[str, trio.socket.SocketType] = {}
        try:
            for req_id, (who, mtype, payload, fds, note) in enumerate(_ext_script(), 1):
                if who not in socks:
                    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    await sock.connect(paths["admin" if who == "admin" else "guest"])
                    socks[who] = sock
                sock = socks[who]
                msg = wire.Message(mtype, 0x2000 + req_id, 0, payload)
                raw_fds = [_make_fd(k) for k in fds]
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", raw_fds))] \
                    if raw_fds else []
                try:
                    await sock.sendmsg([msg.encode()], anc)
                finally:
                    for fd in raw_fds:
                        os.close(fd)
                reader = wire.MessageReader()
                reply = None
                with trio.fail_after(10):
                    while reply is None:
                        try:
                            data = await sock.recv(65536)
                        except ConnectionResetError:
                            data = b""
                        if not data:
                            break
                        reader.feed(data)
                        reply = reader.next()
                ex = {"socket": "guest" if who.startswith("guest") else "admin",
                      "connection": who, "request": _msg_json(msg), "fds": fds, "note": note}
                if reply is None:
                    ex["expect"] = {"outcome": "disconnect"}
                else:
                    ex["expect"] = {"outcome": "reply", "reply": _msg_json(reply)}
                    if reply.type == int(layouts.XsdSockmsgType.ERROR):
                        ex["expect"]["error"] = reply.payload.rstrip(b"\0").decode()
                out.append(ex)
        finally:
            for sock in socks.values():
                sock.close()
            nursery.cancel_scope.cancel()
    return out


def _xs_extensions() -> list[dict]:
    """Run the extension script against a private server, its logging muted and
    its per-peer log budget (a module-level rate limiter) left untouched."""
    import trio

    from pvio._log import RateLimitedLogger
    from pvio.xenbus import server

    store_log = logging.getLogger("pvio.store")
    muted = logging.getLogger("pvio.vectors.muted")
    muted.disabled = True
    saved = store_log.disabled, server.peer_log
    tmp = tempfile.mkdtemp(prefix="pvio-vec-")
    try:
        store_log.disabled, server.peer_log = True, RateLimitedLogger(muted)
        return trio.run(_ext_run, tmp)
    finally:
        store_log.disabled, server.peer_log = saved
        with contextlib.suppress(OSError):
            for name in os.listdir(tmp):
                os.unlink(os.path.join(tmp, name))
            os.rmdir(tmp)


def render_xenstore() -> dict:
    from pvio.xenbus import wire

    return {
        **_about("xenstore_messages.json",
                 "xs_wire exchanges: a scripted session of three domains against pvio's "
                 "sans-I/O store (Store + dispatch), framing cases (MessageReader), and the "
                 "pvio extension messages against the store server.",
                 "specs/xenbus.md §2, §2.1, §3; xen-protocol.md §5 and §7 checks 27, 29"),
        "connections": {n: {"domid": d, "privileged": p} for n, (d, p) in _XS_CONNS.items()},
        "initial_store": "empty: only / (owner dom0, perms n0)",
        "exchanges": _xs_exchanges(),
        "framing": _xs_framing(),
        "extension_types": {
            "PVIO_SHARE_MEMORY": wire.PVIO_SHARE_MEMORY, "PVIO_BIND_EVTCHN": wire.PVIO_BIND_EVTCHN,
            "PVIO_CLAIM": wire.PVIO_CLAIM, "PVIO_CAPTURE": wire.PVIO_CAPTURE},
        "extension_fds_expected": {
            "PVIO_SHARE_MEMORY": 1, "PVIO_BIND_EVTCHN": 2, "PVIO_CLAIM": 0, "PVIO_CAPTURE": 1},
        "extension_fd_kinds": _FD_KINDS,
        "extension_server": "a fresh server whose only configured domain is 'guest'; "
                            "each guest connection is a new domain (the first is dom1)",
        "extensions": _xs_extensions(),
    }


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------

RENDERERS = {
    "layouts.json": render_layouts,
    "ring_ops.json": render_ring_ops,
    "byte_rings.json": render_byte_rings,
    "blkif_exchanges.json": render_blkif,
    "netif_exchanges.json": render_netif,
    "xenstore_messages.json": render_xenstore,
}


def render_all() -> dict[str, str]:
    """Every vectors file by name, as the text that must be committed."""
    return {name: _dump(fn()) for name, fn in RENDERERS.items()}


def stale(directory: pathlib.Path) -> list[str]:
    """Names of the files in ``directory`` that differ from what pvio generates now."""
    out = []
    for name, text in render_all().items():
        path = directory / name
        if not path.exists() or path.read_text() != text:
            out.append(name)
    return out


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    check = "--check" in args
    args = [a for a in args if a != "--check"]
    directory = pathlib.Path(args[0] if args else "specs/vectors")
    if check:
        bad = stale(directory)
        for name in bad:
            print(f"{directory / name} is stale: run `{GENERATOR}`", file=sys.stderr)
        return 1 if bad else 0
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in render_all().items():
        (directory / name).write_text(text)
        print(f"wrote {directory / name} ({len(text)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
