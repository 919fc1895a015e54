"""specs/vectors/*.json: current, well-formed, and true of Xen's own C.

(a) The committed files are exactly what ``python -m pvio._vectors`` generates
    now (like specs/layouts.md, they cannot drift from the code).
(b) They hold against Xen: sizes, offsets and constants of layouts.json equal
    what the C compiler computes from libxen-dev's headers; every ring_ops.json
    sequence replayed through io/ring.h's macros on real memory gives the same
    counts, notify decisions, indices and page bytes; byte_rings.json replayed
    through MASK_XENCONS_IDX readers/writers gives the same bytes and indices;
    blkif/netif slot bytes decode with Xen's C structs to the recorded field
    values; xs_wire headers decode with ``struct xsd_sockmsg``.
(c) Every vector has the keys specs/README.md documents.

The replays below read only the JSON and Xen's C: they are what a consumer in
another language does with the files.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import struct

import pytest

from pvio import _vectors
from tests.ring import xen_c

VECTORS = pathlib.Path(__file__).resolve().parents[2] / "specs" / "vectors"
FILES = sorted(_vectors.RENDERERS)
U32 = 0xFFFFFFFF


@pytest.fixture(scope="module")
def xen(request, tmp_path_factory) -> xen_c.XenC:
    cache = getattr(request.config, "cache", None)
    where = cache.mkdir("pvio-xen-c") if cache is not None else tmp_path_factory.mktemp("xen-c")
    return xen_c.build(where)


def load(name: str) -> dict:
    return json.loads((VECTORS / name).read_text())


def sha(data) -> str:
    return hashlib.sha256(bytes(data)).hexdigest()


# ---------------------------------------------------------------------------
# (a) current
# ---------------------------------------------------------------------------


def test_committed_vectors_are_current():
    rendered = _vectors.render_all()
    assert sorted(rendered) == FILES
    stale = [n for n, text in rendered.items()
             if not (VECTORS / n).exists() or (VECTORS / n).read_text() != text]
    assert not stale, f"{stale} stale: run `python -m pvio._vectors`"


def test_check_mode(tmp_path, capsys):
    assert _vectors.main(["--check", str(VECTORS)]) == 0
    (tmp_path / "layouts.json").write_text("{}\n")
    assert _vectors.main(["--check", str(tmp_path)]) == 1
    assert "layouts.json is stale" in capsys.readouterr().err


def test_generation_is_deterministic():
    assert _vectors.render_all() == _vectors.render_all()


def test_files_are_small_and_canonical():
    for name in FILES:
        text = (VECTORS / name).read_text()
        assert len(text) < 300_000, f"{name}: {len(text)} bytes"
        data = json.loads(text)
        assert data["file"] == name
        assert data["version"] == _vectors.VERSION


# ---------------------------------------------------------------------------
# (b) layouts.json against the compiled headers
# ---------------------------------------------------------------------------

# layouts.json's containers -> the struct compiled into the shim.
SHIM_CONTAINER = {"X_sring": "blkif_sring", "X_data_intf": "test_data_intf"}
# pvio flattens the one-member structs of the sring pvt union.
PVT_ALIASES = {"netif_smartpoll_active": "netif.smartpoll_active",
               "tapif_user_msg": "tapif_user.msg"}
# pvio constants Xen spells as an expression (xen_c.DERIVED_CONSTANTS).
SHIM_DERIVED = {
    "XEN_PAGE_SIZE": "SHIM_XEN_PAGE_SIZE",
    "SRING_HEADER_SIZE": "SHIM_SRING_HEADER_SIZE",
    "BLKIF_SEGS_PER_INDIRECT_FRAME": "SHIM_SEGS_PER_INDIRECT_FRAME",
    "XENCONS_IN_SIZE": "SHIM_XENCONS_IN_SIZE",
    "XENCONS_OUT_SIZE": "SHIM_XENCONS_OUT_SIZE",
}


def _xen_place(entry: dict) -> tuple[str, str]:
    """(shim struct, designator prefix) holding a layouts.json layout."""
    if entry["xen_c_name"]:
        return entry["xen_c_name"].removeprefix("struct "), ""
    cont = entry["xen_container"]
    return SHIM_CONTAINER.get(cont["struct"], cont["struct"]), cont["member"]


@pytest.mark.parametrize("name", list(load("layouts.json")["layouts"]))
def test_layout_sizes_and_offsets_equal_xen(xen, name):
    entry = load("layouts.json")["layouts"][name]
    struct_name, prefix = _xen_place(entry)
    base = xen.member_offset[struct_name, prefix] if prefix else 0

    def designator(d: str) -> str:
        return f"{prefix}.{d}" if prefix else d

    if name == "sring_header":
        size = xen.member_offset[struct_name, "ring"]
    elif prefix:
        size = xen.member_size[struct_name, prefix]
    else:
        size = xen.struct_size[struct_name]
    assert entry["size"] == size
    assert struct.calcsize(entry["struct_format"]) == size
    assert size % entry["align"] == 0
    top = {m.designator for m in xen.members[struct_name] if m.parent == prefix
           and not m.flexible and m.designator != "ring"}
    for f in entry["fields"]:
        d = designator(f["name"])
        if (struct_name, d) not in xen.member_offset:
            # pvio spells out C's implicit padding: bytes no Xen member covers
            for other in top:
                lo = xen.member_offset[struct_name, other] - base
                hi = lo + xen.member_size[struct_name, other]
                assert f["offset"] + f["size"] <= lo or f["offset"] >= hi, (d, other)
            continue
        assert (f["offset"], f["size"]) == (
            xen.member_offset[struct_name, d] - base, xen.member_size[struct_name, d]), d
        for m in f.get("members", []):
            md = f"{d}.{PVT_ALIASES.get(m['name'], m['name'])}"
            assert m["size"] == xen.member_size[struct_name, md], md
            assert xen.member_offset[struct_name, md] == xen.member_offset[struct_name, d]
    # every Xen member of the aggregate is described (the flexible arrays excepted)
    assert top <= {designator(f["name"]) for f in entry["fields"]}


def test_constants_equal_xen_macros(xen):
    data = load("layouts.json")
    for family, group in data["constants"].items():
        for m in group["members"]:
            assert xen.constants.get(m["c_name"]) == m["value"], (family, m)
    for name, scalar in data["scalars"].items():
        cname = SHIM_DERIVED.get(name, name)
        assert xen.constants.get(cname) == scalar["value"], name
    assert data["xsd_errors"] == [n for n, _ in xen.xsd_errors]


# ---------------------------------------------------------------------------
# (b) ring_ops.json through io/ring.h
# ---------------------------------------------------------------------------

HEADER = struct.Struct("<IIII")


def _c_ring_state(xen, page, front, back) -> dict:
    req_prod, req_event, rsp_prod, rsp_event = HEADER.unpack_from(page)
    return {"req_prod": req_prod, "req_event": req_event, "rsp_prod": rsp_prod,
            "rsp_event": rsp_event, "req_prod_pvt": front.req_prod_pvt,
            "rsp_cons": front.rsp_cons, "rsp_prod_pvt": back.rsp_prod_pvt,
            "req_cons": back.req_cons, "page_sha256": sha(page)}


@pytest.mark.parametrize("seq", [s["name"] for s in load("ring_ops.json")["sequences"]])
def test_ring_ops_replay_through_xen_macros(xen, seq):
    data = load("ring_ops.json")
    s = next(x for x in data["sequences"] if x["name"] == seq)
    t, ffi = s["ring"], xen.ffi
    sizes = data["rings"][t]
    assert (sizes["req_size"], sizes["rsp_size"], sizes["slot_size"]) == (
        xen.ring(t, "req_size")(), xen.ring(t, "rsp_size")(), xen.ring(t, "slot_size")())
    page = bytearray(s["pages"] * 4096)
    ptr = ffi.from_buffer("uint8_t[]", page)
    front = ffi.new(f"struct {t}_front_ring *")
    back = ffi.new(f"struct {t}_back_ring *")
    setup = s["setup"]
    if setup["mode"] == "init":
        xen.ring(t, "front_init")(front, ptr, len(page))
        xen.ring(t, "back_init")(back, ptr, len(page))
    else:
        h = setup["header"]
        HEADER.pack_into(page, 0, h["req_prod"], h["req_event"], h["rsp_prod"], h["rsp_event"])
        xen.ring(t, "front_attach")(front, ptr, len(page), setup["start"])
        xen.ring(t, "back_attach")(back, ptr, len(page), setup["start"])
    assert front.nr_ents == back.nr_ents == s["nr_ents"]
    assert _c_ring_state(xen, page, front, back) == s["initial"]
    for i, step in enumerate(s["steps"]):
        op, got = step["op"], {}
        if op == "front_put":
            raw = bytes.fromhex(step["data"])
            got["count"] = xen.ring(t, "front_put")(front, raw, len(raw) // sizes["req_size"])
        elif op == "front_push":
            got["notify"] = bool(xen.ring(t, "front_push_check")(front))
        elif op in ("back_take", "front_take"):
            size = sizes["req_size" if op == "back_take" else "rsp_size"]
            buf = ffi.new("uint8_t[]", step["max"] * size)
            n = xen.ring(t, op)(back if op == "back_take" else front, buf, step["max"])
            assert n >= 0, f"{seq} step {i}: C saw a broken ring"
            got["count"] = n
            got["data_sha256"] = sha(ffi.buffer(buf, n * size))
        elif op == "back_put":
            raw = bytes.fromhex(step["data"])
            xen.ring(t, "back_put")(back, raw, len(raw) // sizes["rsp_size"])
            got["count"] = len(raw) // sizes["rsp_size"]
        elif op == "back_push":
            got["notify"] = bool(xen.ring(t, "back_push_check")(back))
        elif op == "front_final_check":
            got["work"] = xen.ring(t, "front_final_check")(front)
        elif op == "back_final_check":
            got["work"] = xen.ring(t, "back_final_check")(back)
        else:
            raise AssertionError(f"unknown op {op}")
        got |= _c_ring_state(xen, page, front, back)
        assert got == step["expect"], f"{seq} step {i} ({op})"


def test_ring_ops_cover_wrap_and_both_notify_decisions():
    data = load("ring_ops.json")
    names = {(s["ring"], s["pages"]) for s in data["sequences"]}
    assert names == {("blkif", 1), ("blkif", 2), ("netif_tx", 1), ("netif_rx", 1)}
    for s in data["sequences"]:
        if s["setup"]["mode"] == "attach":
            start, last = s["setup"]["start"], s["steps"][-1]["expect"]
            for idx in ("req_prod", "rsp_prod"):
                assert (last[idx] - start) & U32 > U32 - start, (s["name"], idx)
    notifies = [st["expect"]["notify"] for s in data["sequences"] for st in s["steps"]
                if "notify" in st["expect"]]
    assert True in notifies and False in notifies
    works = [st["expect"]["work"] for s in data["sequences"] for st in s["steps"]
             if "work" in st["expect"]]
    assert 0 in works and any(works)


# ---------------------------------------------------------------------------
# (b) byte_rings.json through a MASK_XENCONS_IDX reader/writer
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("seq", [s["name"] for s in load("byte_rings.json")["sequences"]])
def test_console_replay_through_xen_console_h(xen, seq):
    data = load("byte_rings.json")
    s = next(x for x in data["sequences"] if x["name"] == seq)
    off, lib, ffi = data["offsets"], xen.lib, xen.ffi
    assert off == {k: xen.member_offset["xencons_interface", k] for k in off}
    assert data["sizes"] == {k: xen.member_size["xencons_interface", k] for k in ("in", "out")}
    page = bytearray(data["page_size"])
    intf = ffi.from_buffer("uint8_t[]", page)
    indices = ("in_cons", "in_prod", "out_cons", "out_prod")
    for k in indices:
        struct.pack_into("<I", page, off[k], s["setup"][k])

    def state() -> dict:
        return {k: struct.unpack_from("<I", page, off[k])[0] for k in indices} | {
            "page_sha256": sha(page)}

    assert state() == s["initial"]
    for i, step in enumerate(s["steps"]):
        ring, op, got = step["ring"], step["op"], {}
        if op == "write":
            raw = bytes.fromhex(step["data"])
            n = getattr(lib, f"shim_cons_write_{ring}")(intf, raw, len(raw))
            got = {"broken": True} if n < 0 else {"count": n}
        elif op == "read":
            buf = ffi.new("char[]", step["max"])
            n = getattr(lib, f"shim_cons_read_{ring}")(intf, buf, step["max"])
            got = {"broken": True} if n < 0 else {"data": ffi.buffer(buf, n)[:].hex()}
        elif op == "poke":
            struct.pack_into("<I", page, off[step["field"]], step["value"])
        else:
            raise AssertionError(op)
        assert got | state() == step["expect"], f"{seq} step {i} ({ring} {op})"


# ---------------------------------------------------------------------------
# (b) blkif and netif slots decoded with Xen's structs
# ---------------------------------------------------------------------------


def _decode(xen, cstruct: str, raw: bytes):
    buf = xen.ffi.new("uint8_t[]", max(len(raw), xen.ffi.sizeof(f"struct {cstruct}")))
    xen.ffi.memmove(buf, raw, len(raw))
    return xen.ffi.cast(f"struct {cstruct} *", buf), buf


def _field(ptr, name):
    value = getattr(ptr, name)
    if isinstance(value, int):
        return value
    return list(value)


@pytest.mark.parametrize("ex", load("blkif_exchanges.json")["exchanges"],
                         ids=lambda e: e["name"])
def test_blkif_slots_decode_with_xen_structs(xen, ex):
    data = load("blkif_exchanges.json")
    req = ex["request"]
    raw = bytes.fromhex(req["hex"])
    assert len(raw) == data["request_slot_size"] == xen.struct_size["blkif_request"]
    ptr, _keep = _decode(xen, req["struct"], raw)
    for name, value in req["fields"].items():
        if name.startswith("_"):
            continue  # padding members: not in the shim's cdef, checked by size
        if name == "seg":
            got = [{"gref": ptr.seg[k].gref, "first_sect": ptr.seg[k].first_sect,
                    "last_sect": ptr.seg[k].last_sect} for k in range(len(value))]
            assert got == value
        else:
            assert _field(ptr, name) == value, name
    rsp = ex["expect"]["response"]
    rraw = bytes.fromhex(rsp["hex"])
    assert len(rraw) == data["response_size"] == xen.struct_size["blkif_response"]
    rptr, _rkeep = _decode(xen, "blkif_response", rraw)
    assert {k: getattr(rptr, k) for k in ("id", "operation", "status")} == rsp["fields"]
    # a response echoes the request's id and operation
    assert rsp["fields"]["id"] == req["fields"]["id"]
    assert rsp["fields"]["operation"] == req["fields"]["operation"]
    status_names = {v: k for k, v in xen.constants.items() if k.startswith("BLKIF_RSP_")}
    assert status_names[ex["expect"]["status"]] == ex["expect"]["status_name"]
    if "indirect_segments_hex" in ex and ex["expect"]["outcome"] == "io":
        seg = bytes.fromhex(ex["indirect_segments_hex"])
        n = xen.struct_size["blkif_request_segment"]
        segs = []
        for k in range(len(seg) // n):
            p, _k = _decode(xen, "blkif_request_segment", seg[k * n:(k + 1) * n])
            segs.append([p.gref, p.first_sect, p.last_sect])
        assert segs == ex["expect"]["io"]["segments"]


@pytest.mark.parametrize("case", load("blkif_exchanges.json")["ring_violations"],
                         ids=lambda c: c["name"])
def test_blkif_ring_violations_match_xen_overflow_check(xen, case):
    page = bytearray(case["pages"] * 4096)
    HEADER.pack_into(page, 0, case["req_prod"], 0, case["rsp_prod_pvt"], 0)
    ptr = xen.ffi.from_buffer("uint8_t[]", page)
    back = xen.ffi.new("struct blkif_back_ring *")
    xen.ring("blkif", "back_attach")(back, ptr, len(page), case["rsp_prod_pvt"])
    assert back.req_cons == case["req_cons"] and back.nr_ents == case["nr_ents"]
    buf = xen.ffi.new("uint8_t[]", back.nr_ents * 112)
    n = xen.ring("blkif", "back_take")(back, buf, back.nr_ents)
    if case["expect"]["outcome"] == "disconnect":
        assert n == -1
    else:
        assert n == case["expect"]["count"]


def _extra_fields(xen, raw: bytes) -> dict:
    """A netif_extra_info slot decoded at the offsets Xen's compiler gives."""
    def get(designator: str) -> int | bytes:
        off = xen.member_offset["netif_extra_info", designator]
        size = xen.member_size["netif_extra_info", designator]
        if designator == "u.mcast.addr":
            return raw[off:off + size].hex()
        return int.from_bytes(raw[off:off + size], "little")

    return {"type": get("type"), "flags": get("flags"), "gso.size": get("u.gso.size"),
            "gso.type": get("u.gso.type"), "gso.pad": get("u.gso.pad"),
            "gso.features": get("u.gso.features"), "mcast.addr": get("u.mcast.addr")}


def _check_extra(xen, slot: dict) -> None:
    raw = bytes.fromhex(slot["hex"])
    decoded = _extra_fields(xen, raw)
    for k, v in slot["fields"].items():
        assert decoded[k] == v, k


@pytest.mark.parametrize("ex", load("netif_exchanges.json")["tx"], ids=lambda e: e["name"])
def test_netif_tx_slots_decode_with_xen_structs(xen, ex):
    assert xen.struct_size["netif_tx_request"] == 12
    for slot in ex["slots"]:
        raw = bytes.fromhex(slot["hex"])
        assert len(raw) == xen.struct_size["netif_tx_request"]
        if slot["kind"] == "request":
            ptr, _keep = _decode(xen, "netif_tx_request", raw)
            assert {k: getattr(ptr, k) for k in slot["fields"]} == slot["fields"]
        else:
            _check_extra(xen, slot)
            ptr, _keep = _decode(xen, "netif_tx_request", raw)
            assert ptr.id == slot["id"]  # the id the NULL response echoes
    if ex["expect"]["outcome"] == "packets":
        ids = [s["id"] if s["kind"] == "extra" else s["fields"]["id"] for s in ex["slots"]]
        assert [r["id"] for r in ex["expect"]["responses"]] == ids
        for r in ex["expect"]["responses"]:
            ptr, _keep = _decode(xen, "netif_tx_response", bytes.fromhex(r["hex"]))
            assert (ptr.id, ptr.status) == (r["id"], r["status"])
            assert xen.constants[r["status_name"]] == r["status"]


@pytest.mark.parametrize("ex", load("netif_exchanges.json")["rx"], ids=lambda e: e["name"])
def test_netif_rx_slots_decode_with_xen_structs(xen, ex):
    for req in ex["requests"]:
        ptr, _keep = _decode(xen, "netif_rx_request", bytes.fromhex(req["hex"]))
        assert {k: getattr(ptr, k) for k in req["fields"]} == req["fields"]
    for slot, rsp in enumerate(ex["responses"]):
        raw = bytes.fromhex(rsp["hex"])
        assert len(raw) == xen.struct_size["netif_rx_response"]
        if rsp["kind"] == "frag":
            ptr, _keep = _decode(xen, "netif_rx_response", raw)
            assert {k: getattr(ptr, k) for k in rsp["fields"]} == rsp["fields"]
            # the response sits in the slot of the request it consumed
            assert rsp["fields"]["id"] == ex["requests"][slot]["fields"]["id"]
        else:
            _check_extra(xen, rsp)
    for packet in ex["expect"].get("packets", []):
        for slot, _offset, _length, rid in packet["chunks"]:
            assert ex["requests"][slot]["fields"]["id"] == rid


def test_netif_flag_values_are_xen_s(xen):
    data = load("layouts.json")["constants"]
    for family in ("NetTxFlag", "NetRxFlag", "NetifExtraType", "NetifRsp"):
        for m in data[family]["members"]:
            assert xen.constants[m["c_name"]] == m["value"]


# ---------------------------------------------------------------------------
# (b) xs_wire headers decoded with struct xsd_sockmsg
# ---------------------------------------------------------------------------


def _check_message(xen, m: dict) -> None:
    raw = bytes.fromhex(m["hex"])
    hdr = xen.struct_size["xsd_sockmsg"]
    ptr, _keep = _decode(xen, "xsd_sockmsg", raw[:hdr])
    assert (ptr.type, ptr.req_id, ptr.tx_id, ptr.len) == (
        m["type"], m["req_id"], m["tx_id"], m["len"])
    assert raw[hdr:].hex() == m["payload_hex"] and len(raw) - hdr == m["len"]
    if m["type_name"] in _XS_NAMES:
        assert xen.constants[f"XS_{m['type_name']}"] == m["type"]


_XS_NAMES = {m["name"] for m in load("layouts.json")["constants"]["XsdSockmsgType"]["members"]}


def test_xenstore_messages_decode_with_xen_structs(xen):
    data = load("xenstore_messages.json")
    errors = {n for n, _ in xen.xsd_errors}
    for ex in data["exchanges"]:
        _check_message(xen, ex["request"])
        _check_message(xen, ex["reply"])
        assert ex["reply"]["req_id"] == ex["request"]["req_id"]
        assert ex["reply"]["tx_id"] == ex["request"]["tx_id"]
        for ev in ex["events"]:
            _check_message(xen, ev["message"])
            assert ev["message"]["type"] == xen.constants["XS_WATCH_EVENT"]
        if "error" in ex:
            assert ex["reply"]["type"] == xen.constants["XS_ERROR"]
            assert ex["error"] in errors
    for ex in data["extensions"]:
        _check_message(xen, ex["request"])
        if ex["expect"]["outcome"] == "reply":
            _check_message(xen, ex["expect"]["reply"])
            assert ex["expect"]["reply"]["req_id"] == ex["request"]["req_id"]
            assert ex["expect"].get("error", "EINVAL") in errors
        assert ex["request"]["type"] > xen.constants["XS_TYPE_COUNT"]
    assert xen.constants["XENSTORE_PAYLOAD_MAX"] == 4096
    for case in data["framing"]:
        raw = b"".join(bytes.fromhex(ch) for ch in case["chunks_hex"])
        length = struct.unpack_from("<I", raw, 12)[0]
        assert (case["expect"]["outcome"] == "disconnect") == (
            length > xen.constants["XENSTORE_PAYLOAD_MAX"])


# ---------------------------------------------------------------------------
# (c) schema
# ---------------------------------------------------------------------------

ABOUT = {"file", "about", "generator", "schema", "spec", "version"}
RING_STATE = {"req_prod", "req_event", "rsp_prod", "rsp_event", "req_prod_pvt", "rsp_cons",
              "rsp_prod_pvt", "req_cons", "page_sha256"}
RING_RESULT = {"front_put": {"count"}, "back_put": {"count"}, "front_push": {"notify"},
               "back_push": {"notify"}, "back_take": {"count", "data_sha256"},
               "front_take": {"count", "data_sha256"}, "front_final_check": {"work"},
               "back_final_check": {"work"}}
RING_ARGS = {"front_put": {"data"}, "back_put": {"data"}, "back_take": {"max"},
             "front_take": {"max"}}
MESSAGE = {"type", "type_name", "req_id", "tx_id", "len", "payload_hex", "payload_text", "hex"}


def keys(obj: dict, required: set, optional: set = frozenset(), what: str = "") -> None:
    assert required <= set(obj), f"{what}: missing {required - set(obj)}"
    assert set(obj) <= required | optional, f"{what}: unexpected {set(obj) - required - optional}"


@pytest.mark.parametrize("name", FILES)
def test_every_file_has_the_common_header(name):
    data = load(name)
    assert set(data) >= ABOUT
    assert data["generator"] == "python -m pvio._vectors"
    readme = (VECTORS.parent / "README.md").read_text()
    assert f"### `{name}`" in readme, f"specs/README.md does not document {name}"


def test_schema_layouts():
    data = load("layouts.json")
    keys(data, ABOUT | {"byte_order", "layouts", "constants", "scalars", "xsd_errors"})
    for name, entry in data["layouts"].items():
        keys(entry, {"xen_c_name", "xen_container", "description", "size", "align",
                     "struct_format", "fields"}, what=name)
        assert (entry["xen_c_name"] is None) != (entry["xen_container"] is None)
        end = 0
        for f in entry["fields"]:
            keys(f, {"name", "offset", "size", "ctype"}, {"members"}, what=f"{name}.{f}")
            assert f["offset"] >= end
            end = f["offset"] + f["size"]
            for m in f.get("members", []):
                keys(m, {"name", "size", "ctype"})
                assert m["size"] <= f["size"]
        assert end <= entry["size"]
    for family, group in data["constants"].items():
        keys(group, {"kind", "c_family", "members"}, what=family)
        assert group["kind"] in ("enum", "flags")
        for m in group["members"]:
            keys(m, {"name", "c_name", "value"})
            assert m["c_name"].startswith(group["c_family"].rstrip("*"))


def test_schema_ring_ops():
    data = load("ring_ops.json")
    keys(data, ABOUT | {"rings", "sequences"})
    for s in data["sequences"]:
        keys(s, {"name", "ring", "pages", "nr_ents", "setup", "initial", "steps", "note"})
        assert s["ring"] in data["rings"]
        assert set(s["initial"]) == RING_STATE
        if s["setup"]["mode"] == "attach":
            keys(s["setup"], {"mode", "start", "header"})
            assert set(s["setup"]["header"]) == {"req_prod", "req_event", "rsp_prod",
                                                 "rsp_event"}
        else:
            assert s["setup"] == {"mode": "init"}
        for st in s["steps"]:
            op = st["op"]
            keys(st, {"op", "expect"} | RING_ARGS.get(op, set()), what=op)
            assert set(st["expect"]) == RING_STATE | RING_RESULT[op]


def test_schema_byte_rings():
    data = load("byte_rings.json")
    keys(data, ABOUT | {"page_size", "offsets", "sizes", "sequences"})
    state = {"in_cons", "in_prod", "out_cons", "out_prod", "page_sha256"}
    args = {"write": {"data"}, "read": {"max"}, "poke": {"field", "value"}}
    for s in data["sequences"]:
        keys(s, {"name", "setup", "initial", "steps", "note"})
        assert set(s["initial"]) == state
        for st in s["steps"]:
            assert st["ring"] in ("in", "out")
            keys(st, {"ring", "op", "expect"} | args[st["op"]])
            result = set(st["expect"]) - state
            assert result in ({"count"}, {"data"}, {"broken"}, set()), result


def test_schema_blkif():
    data = load("blkif_exchanges.json")
    keys(data, ABOUT | {"features", "request_slot_size", "response_size", "exchanges",
                        "ring_violations"})
    for ex in data["exchanges"]:
        keys(ex, {"name", "features", "request", "expect", "spec", "note"},
             {"indirect_segments_hex"}, what=ex["name"])
        assert ex["features"] in data["features"]
        keys(ex["request"], {"struct", "hex", "fields"})
        x = ex["expect"]
        if x["outcome"] == "io":
            keys(x, {"outcome", "io", "status", "status_name", "response"})
            keys(x["io"], {"kind", "offset", "length", "segments", "indirect_grefs", "secure"})
            assert x["status"] == 0
        else:
            assert x["outcome"] == "error"
            keys(x, {"outcome", "status", "status_name", "reason", "response"})
            assert x["status"] < 0
        keys(x["response"], {"hex", "fields"})
    for case in data["ring_violations"]:
        keys(case, {"name", "pages", "nr_ents", "req_cons", "rsp_prod_pvt", "req_prod",
                    "expect", "spec"})
        assert case["expect"]["outcome"] in ("consume", "disconnect")


def test_schema_netif():
    data = load("netif_exchanges.json")
    keys(data, ABOUT | {"tx_request_size", "tx_response_size", "rx_request_size",
                        "rx_response_size", "extra_info_size", "tx", "rx"})
    for ex in data["tx"]:
        keys(ex, {"name", "slots", "accept_gso", "max_slots", "expect", "note", "spec"})
        for slot in ex["slots"]:
            keys(slot, {"kind", "hex", "fields"}, {"id"})
        x = ex["expect"]
        if x["outcome"] == "disconnect":
            keys(x, {"outcome", "reason"})
        else:
            keys(x, {"outcome", "packets", "responses"})
            assert len(x["responses"]) == len(ex["slots"])
            for p in x["packets"]:
                if p["dropped"]:
                    keys(p, {"dropped", "reason"})
                else:
                    keys(p, {"dropped", "size", "fragments", "csum_blank", "data_validated",
                             "gso_type", "gso_size", "mcast"})
            for r in x["responses"]:
                keys(r, {"id", "status", "status_name", "hex"})
    for ex in data["rx"]:
        keys(ex, {"name", "requests", "responses", "gso_ok", "expect", "note", "spec"})
        assert len(ex["requests"]) == len(ex["responses"])
        x = ex["expect"]
        if x["outcome"] == "disconnect":
            keys(x, {"outcome", "reason"})
        else:
            keys(x, {"outcome", "consumed", "packets"})
            for p in x["packets"]:
                keys(p, {"chunks", "csum_blank", "data_validated", "gso_type", "gso_size",
                         "error", "slots"})
    outcomes = {ex["expect"]["outcome"] for ex in data["tx"] + data["rx"]}
    assert outcomes == {"packets", "disconnect"}


def test_schema_xenstore():
    data = load("xenstore_messages.json")
    keys(data, ABOUT | {"connections", "initial_store", "exchanges", "framing",
                        "extension_types", "extension_fds_expected", "extension_fd_kinds",
                        "extension_server", "extensions"})
    labels = set()
    for ex in data["exchanges"]:
        keys(ex, {"conn", "request", "reply", "events", "note"}, {"tx", "binds", "error"})
        assert ex["conn"] in data["connections"]
        keys(ex["request"], MESSAGE)
        keys(ex["reply"], MESSAGE)
        for ev in ex["events"]:
            keys(ev, {"to", "message"})
            assert ev["to"] in data["connections"]
        if "tx" in ex:
            assert ex["tx"] in labels, "a transaction label is bound before use"
        if "binds" in ex:
            labels.add(ex["binds"])
    for case in data["framing"]:
        keys(case, {"name", "chunks_hex", "expect", "spec"})
    for ex in data["extensions"]:
        keys(ex, {"socket", "connection", "request", "fds", "note", "expect"})
        assert ex["socket"] in ("guest", "admin")
        assert set(ex["fds"]) <= set(data["extension_fd_kinds"])
        assert ex["expect"]["outcome"] in ("reply", "disconnect")
    types = {ex["request"]["type_name"] for ex in data["exchanges"]}
    for t in ("READ", "WRITE", "MKDIR", "DIRECTORY", "WATCH", "TRANSACTION_START",
              "TRANSACTION_END", "RM", "GET_PERMS", "SET_PERMS", "UNWATCH"):
        assert t in types
    assert any(ex["events"] for ex in data["exchanges"])
    assert any("error" in ex for ex in data["exchanges"])
    assert {ex["request"]["type_name"] for ex in data["extensions"]} == set(
        data["extension_types"])
