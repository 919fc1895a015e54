"""pvio.layouts against Xen's own headers: sizes, offsets, constants, bytes.

Every expected value comes from the C compiler reading ``/usr/include/xen``
through the shim in ``xen_c.py``; the Xen member lists are enumerated from the
parsed headers, so a member pvio forgot, misnamed or misplaced is caught in
both directions.
"""

from __future__ import annotations

import enum
import errno
import struct

import construct as c
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pvio import _cgen, layouts
from pvio.ring import PAGE_SIZE, grant
from tests.ring.xen_c import pvio_designators, union_members

# pvio layout -> (Xen struct, designator of the aggregate inside it, members
# that are deliberately not part of the pvio layout).
XEN_LAYOUT = {
    # The 64-byte header of every DEFINE_RING_TYPES sring; ring[] follows it.
    "sring_header": ("blkif_sring", "", {"ring"}),
    # DEFINE_XEN_FLEX_RING_AND_INTF's index page; ref[] is a flexible array.
    "flex_ring_intf": ("test_data_intf", "", {"ref"}),
    "blkif_request_segment": ("blkif_request_segment", "", set()),
    "blkif_request": ("blkif_request", "", set()),
    "blkif_request_discard": ("blkif_request_discard", "", set()),
    "blkif_request_indirect": ("blkif_request_indirect", "", set()),
    "blkif_response": ("blkif_response", "", set()),
    "netif_tx_request": ("netif_tx_request", "", set()),
    "netif_tx_response": ("netif_tx_response", "", set()),
    "netif_rx_request": ("netif_rx_request", "", set()),
    "netif_rx_response": ("netif_rx_response", "", set()),
    "netif_extra_info_gso": ("netif_extra_info", "u.gso", set()),
    "netif_extra_info_mcast": ("netif_extra_info", "u.mcast", set()),
    "netif_extra_info_hash": ("netif_extra_info", "u.hash", set()),
    "netif_extra_info": ("netif_extra_info", "", set()),
    "xencons_interface": ("xencons_interface", "", set()),
    "grant_entry_v1": ("grant_entry_v1", "", set()),
    "xsd_sockmsg": ("xsd_sockmsg", "", set()),
    "xenstore_domain_interface": ("xenstore_domain_interface", "", set()),
}

# pvio flattens the one-member structs of the sring ``pvt`` union.
PVIO_ALIASES = {
    ("sring_header", "pvt.netif_smartpoll_active"): "pvt.netif.smartpoll_active",
    ("sring_header", "pvt.tapif_user_msg"): "pvt.tapif_user.msg",
}

LAYOUT_NAMES = list(layouts.LAYOUTS)


def _xen_designator(name: str, pvio_designator: str) -> str:
    prefix = XEN_LAYOUT[name][1]
    d = PVIO_ALIASES.get((name, pvio_designator), pvio_designator)
    return f"{prefix}.{d}" if prefix else d


def _xen_size(xen, name: str) -> int:
    struct_name, prefix, _ = XEN_LAYOUT[name]
    if name == "sring_header":
        return xen.member_offset[struct_name, "ring"]
    if prefix:
        return xen.member_size[struct_name, prefix]
    return xen.struct_size[struct_name]


def _xen_offset(xen, name: str, designator: str) -> int:
    struct_name, prefix, _ = XEN_LAYOUT[name]
    base = xen.member_offset[struct_name, prefix] if prefix else 0
    return xen.member_offset[struct_name, designator] - base


def _pvio_members(name: str):
    """(designator, offset, size) of each pvio field and union member."""
    fields = {f.name: f for f in _cgen.fields(layouts.LAYOUTS[name])}
    out = []
    for designator, parent in pvio_designators(name):
        if parent:
            member = next(
                m for m in union_members(name, parent) if m.name == designator.split(".")[-1]
            )
            out.append((designator, fields[parent].offset, _cgen.sizeof(member)))
        else:
            f = fields[designator]
            out.append((designator, f.offset, f.size))
    return out


# ---------------------------------------------------------------------------
# Sizes and offsets
# ---------------------------------------------------------------------------


def test_every_layout_has_a_xen_counterpart():
    assert set(XEN_LAYOUT) == set(layouts.LAYOUTS)


def test_xen_c_names_name_the_structs_compared_here():
    for name, cname in layouts.XEN_C_NAMES.items():
        struct_name, prefix, _ = XEN_LAYOUT[name]
        if cname is not None:
            assert (cname, prefix) == (f"struct {struct_name}", ""), name
    assert set(layouts.XEN_C_NAMES) == set(layouts.LAYOUTS)


@pytest.mark.parametrize("name", LAYOUT_NAMES)
def test_layout_size_equals_c_sizeof(xen, name):
    con = layouts.LAYOUTS[name]
    size = _cgen.sizeof(con)
    assert size == _xen_size(xen, name)
    assert struct.calcsize(_cgen.struct_format(con)) == size
    assert con.sizeof() == size  # construct's own idea (unions are Padded: sized)
    # pvio's generated C struct, compiled next to Xen's headers
    assert xen.pvio_struct_size[name] == size


@pytest.mark.parametrize("name", LAYOUT_NAMES)
def test_every_pvio_field_sits_where_xen_has_it(xen, name):
    struct_name, prefix, excluded = XEN_LAYOUT[name]
    xen_members = {m.designator: m for m in xen.members[struct_name]}
    level = {
        m.designator
        for m in xen.members[struct_name]
        if m.parent == prefix and m.designator.split(".")[-1] not in excluded
    }
    for designator, offset, size in _pvio_members(name):
        xd = _xen_designator(name, designator)
        if xd in xen_members:
            assert (designator, offset, size) == (
                designator,
                _xen_offset(xen, name, xd),
                xen.member_size[struct_name, xd],
            )
            continue
        # A pvio-only field must be explicit padding: it may only cover bytes
        # that no Xen member of the same aggregate covers.
        assert not designator.count("."), f"{name}.{designator}: no such Xen union member"
        for other in level:
            lo = _xen_offset(xen, name, other)
            hi = lo + (xen.member_size[struct_name, other] or 0)
            assert offset + size <= lo or offset >= hi, (
                f"{name}.{designator} [{offset}, {offset + size}) overlaps Xen's "
                f"{struct_name}.{other} [{lo}, {hi}) but has another name"
            )


@pytest.mark.parametrize("name", LAYOUT_NAMES)
def test_every_xen_member_is_in_the_pvio_layout(xen, name):
    struct_name, prefix, excluded = XEN_LAYOUT[name]
    mapped = {_xen_designator(name, d) for d, _, _ in _pvio_members(name)}
    unions = {
        _xen_designator(name, f.name)
        for f in _cgen.fields(layouts.LAYOUTS[name])
        if f.ctype == "union"
    }
    for m in xen.members[struct_name]:
        if m.designator.split(".")[-1] in excluded:
            continue
        if m.parent != prefix and m.parent not in unions:
            continue  # inside a nested struct that has its own layout
        assert any(d == m.designator or d.startswith(m.designator + ".") for d in mapped), (
            f"Xen's {struct_name}.{m.designator} is missing from pvio layout {name}"
        )


@pytest.mark.parametrize("name", LAYOUT_NAMES)
def test_generated_pvio_c_struct_matches_cgen_and_xen(xen, name):
    for designator, offset, size in _pvio_members(name):
        assert xen.pvio_offset[name, designator] == offset, designator
        assert xen.pvio_size[name, designator] == size, designator
        xd = _xen_designator(name, designator)
        struct_name = XEN_LAYOUT[name][0]
        if (struct_name, xd) in xen.member_offset:
            assert xen.pvio_offset[name, designator] == _xen_offset(xen, name, xd)


def test_sring_header_and_flex_intf_tails(xen):
    # ring[] starts right after pvio's header, in every ring type
    for t in ("blkif_sring", "netif_tx_sring", "netif_rx_sring", "xen_netif_ctrl_sring",
              "tiny_sring", "wide_sring", "odd_sring"):
        assert xen.member_offset[t, "ring"] == layouts.SRING_HEADER_SIZE
    assert _cgen.sizeof(layouts.sring_header) == layouts.SRING_HEADER_SIZE
    # ref[] follows ring_order: pvio's index-page layout ends where it starts
    assert xen.member_offset["test_data_intf", "ref"] == _cgen.sizeof(layouts.flex_ring_intf)


def test_grant_entry_size_used_by_grant_module(xen):
    assert xen.struct_size["grant_entry_v1"] == grant.ENTRY_SIZE


def test_shared_memory_page_size(xen):
    assert xen.constants["SHIM_XEN_PAGE_SIZE"] == PAGE_SIZE == layouts.XEN_PAGE_SIZE


# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------

# How pvio's enum members are spelled in C.
ENUM_C_NAMES = {
    layouts.BlkifOp: lambda n: f"BLKIF_OP_{n}",
    layouts.BlkifRsp: lambda n: f"BLKIF_RSP_{n}",
    layouts.NetTxFlag: lambda n: f"NETTXF_{n.lower()}",
    layouts.NetRxFlag: lambda n: f"NETRXF_{n.lower()}",
    layouts.NetifExtraType: lambda n: f"XEN_NETIF_EXTRA_TYPE_{n}",
    layouts.NetifRsp: lambda n: f"NETIF_RSP_{n}",
    layouts.GTF: lambda n: f"GTF_{n}",
    layouts.GNTST: lambda n: f"GNTST_{n}",
    layouts.EvtchnStatus: lambda n: f"EVTCHNSTAT_{n}",
    layouts.XsdSockmsgType: lambda n: f"XS_{n}",
    layouts.XenbusState: lambda n: f"XenbusState{n}",
}

# pvio constants that Xen spells as an expression (see xen_c.DERIVED_CONSTANTS).
DERIVED = {
    "XEN_PAGE_SIZE": "SHIM_XEN_PAGE_SIZE",
    "SRING_HEADER_SIZE": "SHIM_SRING_HEADER_SIZE",
    "BLKIF_SEGS_PER_INDIRECT_FRAME": "SHIM_SEGS_PER_INDIRECT_FRAME",
    "XENCONS_IN_SIZE": "SHIM_XENCONS_IN_SIZE",
    "XENCONS_OUT_SIZE": "SHIM_XENCONS_OUT_SIZE",
}


def _enum_classes():
    return [
        v
        for k, v in vars(layouts).items()
        if isinstance(v, type) and issubclass(v, enum.Enum) and not k.startswith("_")
        and v.__module__ == layouts.__name__
    ]


def _pvio_constants():
    """(pvio name, value, C name) for every integer constant in pvio.layouts."""
    out = []
    for k, v in vars(layouts).items():
        if k.startswith("_") or not k.isupper() or isinstance(v, bool) or not isinstance(v, int):
            continue
        out.append((k, int(v), DERIVED.get(k, k)))
    for cls in _enum_classes():
        spell = ENUM_C_NAMES.get(cls)
        for member_name, member in cls.__members__.items():  # aliases included
            cname = spell(member_name) if spell else f"<no C spelling for {cls.__name__}>"
            out.append((f"{cls.__name__}.{member_name}", int(member), cname))
    return out


PVIO_CONSTANTS = _pvio_constants()


def test_every_pvio_enum_has_a_c_spelling():
    assert set(_enum_classes()) == set(ENUM_C_NAMES)


@pytest.mark.parametrize(
    ("pvio_name", "value", "cname"), PVIO_CONSTANTS, ids=[p[0] for p in PVIO_CONSTANTS]
)
def test_constant_equals_xen_macro(xen, pvio_name, value, cname):
    assert cname in xen.constants, f"{pvio_name}: Xen's headers define no {cname}"
    assert value == xen.constants[cname]


def test_enums_cover_every_xen_value_of_their_family(xen):
    """The reverse direction: no BLKIF_OP_*, XS_*, ... value is missing in pvio."""
    families = {
        layouts.BlkifOp: "BLKIF_OP_",
        layouts.BlkifRsp: "BLKIF_RSP_",
        layouts.NetTxFlag: "NETTXF_",
        layouts.NetRxFlag: "NETRXF_",
        layouts.NetifRsp: "NETIF_RSP_",
        layouts.GNTST: "GNTST_",
        layouts.EvtchnStatus: "EVTCHNSTAT_",
        layouts.XenbusState: "XenbusState",
    }
    for cls, prefix in families.items():
        xen_values = {v for k, v in xen.constants.items() if k.startswith(prefix)}
        assert xen_values == {int(m) for m in cls.__members__.values()}, cls.__name__
    xs = {
        v for k, v in xen.constants.items()
        if k.startswith("XS_") and k not in ("XS_WATCH_PATH", "XS_WATCH_TOKEN")
    }
    assert xs == {int(m) for m in layouts.XsdSockmsgType}
    types = {
        v for k, v in xen.constants.items()
        if k.startswith("XEN_NETIF_EXTRA_TYPE_") and k != "XEN_NETIF_EXTRA_TYPE_MAX"
    }
    assert types == {int(m) for m in layouts.NetifExtraType}
    assert max(types) + 1 == xen.constants["XEN_NETIF_EXTRA_TYPE_MAX"]


def test_xsd_errors_order_matches_xs_wire(xen):
    assert tuple(n for n, _ in xen.xsd_errors) == layouts.XSD_ERRORS
    # the table Xen compiled pairs each name with this platform's errno
    for name, num in xen.xsd_errors:
        assert getattr(errno, name) == num


# ---------------------------------------------------------------------------
# Bytes: construct build == C struct filled with the same values
# ---------------------------------------------------------------------------

FILLABLE = [
    "blkif_request_segment",
    "blkif_request",
    "blkif_request_discard",
    "blkif_request_indirect",
    "blkif_response",
    "netif_tx_request",
    "netif_tx_response",
    "netif_rx_request",
    "netif_rx_response",
    "grant_entry_v1",
    "xsd_sockmsg",
]

_INT_RANGES = {
    "B": (0, 2**8 - 1), "H": (0, 2**16 - 1), "I": (0, 2**32 - 1), "L": (0, 2**32 - 1),
    "Q": (0, 2**64 - 1), "b": (-(2**7), 2**7 - 1), "h": (-(2**15), 2**15 - 1),
    "i": (-(2**31), 2**31 - 1), "q": (-(2**63), 2**63 - 1),
}


def _unwrap(con):
    while isinstance(con, c.Renamed):
        con = con.subcon
    return con


def _values(con):
    """A strategy of build() values for ``con``; pvio-only fields are padding (0)."""
    con = _unwrap(con)
    if isinstance(con, c.FormatField):
        lo, hi = _INT_RANGES[con.fmtstr[1]]
        return st.integers(lo, hi)
    if isinstance(con, c.Array):
        return st.lists(_values(con.subcon), min_size=con.count, max_size=con.count)
    assert isinstance(con, c.Struct), con
    xen_fields = _FFI_FIELDS[_struct_name_of(con)]
    return st.fixed_dictionaries({
        sc.name: _values(sc) if sc.name in xen_fields else st.just(0)
        for sc in con.subcons
        if sc.name is not None
    })


# Field names of the Xen structs as the compiler declares them (filled by a fixture).
_FFI_FIELDS: dict[str, set[str]] = {}


def _struct_name_of(con):
    return next(n for n, layout in layouts.LAYOUTS.items() if layout is con)


def _fill(cdata, values, ffi_fields):
    for k, v in values.items():
        if k not in ffi_fields:
            assert v == 0
            continue
        if isinstance(v, list):
            arr = getattr(cdata, k)
            for i, item in enumerate(v):
                if isinstance(item, dict):
                    for kk, vv in item.items():
                        setattr(arr[i], kk, vv)
                else:
                    arr[i] = item
        else:
            setattr(cdata, k, v)


def _flatten(con, values):
    """Values in the order of ``_cgen.struct_format`` (padding and unions excluded)."""
    con = _unwrap(con)
    if isinstance(con, c.FormatField):
        return [values]
    if isinstance(con, c.Array):
        return [x for v in values for x in _flatten(con.subcon, v)]
    out = []
    for sc in con.subcons:
        if sc.name is not None:
            out += _flatten(sc, values[sc.name])
    return out


def _c_bytes(xen, name, values):
    p = xen.ffi.new(f"struct {name} *")  # zero-filled, padding included
    _fill(p, values, _FFI_FIELDS[name])
    return bytes(xen.ffi.buffer(p))


@pytest.fixture(scope="module", autouse=True)
def _ffi_fields(xen):
    for name in FILLABLE:
        _FFI_FIELDS[name] = {f for f, _ in xen.ffi.typeof(f"struct {name}").fields}


def _check_bytes(xen, name, values):
    con = layouts.LAYOUTS[name]
    built = con.build(values)
    assert built == _c_bytes(xen, name, values)
    assert struct.pack(_cgen.struct_format(con), *_flatten(con, values)) == built
    parsed = con.parse(built)
    assert _flatten(con, {k: parsed[k] for k in values}) == _flatten(con, values)


def test_sample_blkif_request_bytes_equal_c(xen):
    values = {
        "operation": layouts.BlkifOp.WRITE,
        "nr_segments": 3,
        "handle": 0x0301,
        "id": 0xDEADBEEFCAFEF00D,
        "sector_number": 0x0123456789ABCDEF,
        "seg": [
            {"gref": 0x1000 + i, "first_sect": i % 8, "last_sect": 7} for i in range(11)
        ],
    }
    _check_bytes(xen, "blkif_request", values)
    built = layouts.blkif_request.build(values)
    assert built[8:16] == (0xDEADBEEFCAFEF00D).to_bytes(8, "little")  # id@8
    assert built[24:28] == (0x1000).to_bytes(4, "little")  # seg[0].gref@24


def test_sample_responses_and_indirect_bytes_equal_c(xen):
    _check_bytes(xen, "blkif_response", {"id": 2**64 - 1, "operation": 6, "status": -2})
    _check_bytes(xen, "blkif_request_indirect", {
        "operation": layouts.BlkifOp.INDIRECT, "indirect_op": layouts.BlkifOp.READ,
        "nr_segments": 4096, "id": 7, "sector_number": 9, "handle": 0xFFFF, "_pad2": 0,
        "indirect_grefs": list(range(100, 108)), "_pad3": 0,
    })
    _check_bytes(xen, "blkif_request_discard", {
        "operation": layouts.BlkifOp.DISCARD, "flag": layouts.BLKIF_DISCARD_SECURE,
        "handle": 1, "id": 2, "sector_number": 3, "nr_sectors": 2**40,
    })
    _check_bytes(xen, "netif_rx_response", {"id": 1, "offset": 2, "flags": 3, "status": -2})
    _check_bytes(xen, "grant_entry_v1", {
        "flags": layouts.GTF.permit_access | layouts.GTF.readonly, "domid": 0x7FF0,
        "frame": 0xFFFFFFFF,
    })


@pytest.mark.parametrize("name", FILLABLE)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_built_bytes_equal_c_struct_bytes(xen, name, data):
    values = data.draw(_values(layouts.LAYOUTS[name]))
    _check_bytes(xen, name, values)
