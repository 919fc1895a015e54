"""Derive C declarations, ``struct`` formats and field tables from the construct layouts.

Rule 1 of the design: each wire structure is declared once (in
:mod:`pvio.layouts`); everything else is generated from that declaration here,
so it cannot drift. Only the small subset of construct used by the layouts is
understood: little-endian integers, ``Bytes``, ``Array``, ``Padding``, nested
``Struct`` and the sized union built by :func:`pvio.layouts.union`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import construct as c

from pvio import layouts

_INT_CTYPES = {
    "<B": "uint8_t",
    "<b": "int8_t",
    "<H": "uint16_t",
    "<h": "int16_t",
    "<I": "uint32_t",
    "<i": "int32_t",
    "<L": "uint32_t",
    "<l": "int32_t",
    "<Q": "uint64_t",
    "<q": "int64_t",
}


@dataclass(frozen=True)
class Field:
    """One top-level field of a layout: the row of a spec table."""

    name: str
    offset: int
    size: int
    ctype: str


def _unwrap(con):
    while isinstance(con, c.Renamed):
        con = con.subcon
    return con


def _is_union(con) -> bool:
    return isinstance(con, c.Padded) and isinstance(_unwrap(con.subcon), c.Union)


def sizeof(con) -> int:
    """Size in bytes of a layout (construct's own ``sizeof`` cannot size unions)."""
    con = _unwrap(con)
    if _is_union(con):
        members = [sizeof(m) for m in _unwrap(con.subcon).subcons]
        if max(members) > con.length:
            raise ValueError(f"union members {members} overflow declared size {con.length}")
        return con.length
    if isinstance(con, c.Struct):
        return sum(sizeof(sc) for sc in con.subcons)
    return con.sizeof()


def alignof(con) -> int:
    """C alignment of a layout: that of its most aligned integer field."""
    con = _unwrap(con)
    if isinstance(con, c.FormatField):
        return struct.calcsize(con.fmtstr)
    if _is_union(con):
        return max(alignof(m) for m in _unwrap(con.subcon).subcons)
    if isinstance(con, c.Struct):
        return max((alignof(sc) for sc in con.subcons), default=1)
    if isinstance(con, c.Array):
        return alignof(con.subcon)
    return 1  # bytes and padding


def _struct_name(con) -> str | None:
    for name, layout in layouts.LAYOUTS.items():
        if layout is con:
            return name
    return None


def _ctype(con) -> str:
    """The C type spelling of a field (without array suffix)."""
    con = _unwrap(con)
    if isinstance(con, c.FormatField):
        return _INT_CTYPES[con.fmtstr]
    if isinstance(con, c.Struct):
        name = _struct_name(con)
        if name is None:
            raise ValueError("nested structs must be registered in layouts.LAYOUTS")
        return f"struct pvio_{name}"
    raise TypeError(f"no C type for {con!r}")


def _cfield(name: str, con, offset: int) -> str:
    con = _unwrap(con)
    if _is_union(con):
        members = "".join(
            "    " + _cfield(m.name, m, 0) for m in _unwrap(con.subcon).subcons
        )
        return f"    union {{\n{members}        uint8_t _raw[{con.length}];\n    }} {name};\n"
    if isinstance(con, c.Padded):
        return f"    uint8_t _pad{offset}[{con.length}];\n"
    if isinstance(con, c.Bytes):
        return f"    uint8_t {name}[{con.length}];\n"
    if isinstance(con, c.Array):
        return f"    {_ctype(con.subcon)} {name}[{con.count}];\n"
    return f"    {_ctype(con)} {name};\n"


def c_declaration(name: str) -> str:
    """C source of ``struct pvio_<name>``, byte-identical to the construct layout."""
    con = layouts.LAYOUTS[name]
    body, offset = [], 0
    for sc in con.subcons:
        body.append(_cfield(sc.name, sc, offset))
        offset += sizeof(sc)
    return f"struct pvio_{name} {{\n{''.join(body)}}};\n"


def c_declarations() -> str:
    """All layouts as C declarations, in dependency order (for cffi's cdef and source)."""
    return "\n".join(c_declaration(name) for name in layouts.LAYOUTS)


def _fmt(con) -> str:
    con = _unwrap(con)
    if isinstance(con, c.FormatField):
        return con.fmtstr[1:]
    if _is_union(con) or isinstance(con, c.Bytes):
        return f"{sizeof(con)}s"
    if isinstance(con, c.Padded):
        return f"{con.length}x"
    if isinstance(con, c.Array):
        return _fmt(con.subcon) * con.count
    if isinstance(con, c.Struct):
        return "".join(_fmt(sc) for sc in con.subcons)
    raise TypeError(f"no struct format for {con!r}")


def struct_format(con) -> str:
    """A flattened little-endian ``struct`` format for a layout (padding as ``x``)."""
    fmt = "<" + _fmt(con)
    if struct.calcsize(fmt) != sizeof(con):
        raise AssertionError(f"format {fmt} disagrees with layout size {sizeof(con)}")
    return fmt


def fields(con) -> list[Field]:
    """Top-level fields with offsets and sizes (padding omitted), for tables and tests."""
    out, offset = [], 0
    for sc in con.subcons:
        size = sizeof(sc)
        inner = _unwrap(sc)
        if sc.name is not None:
            if _is_union(inner):
                ctype = "union"
            elif isinstance(inner, c.Bytes):
                ctype = f"uint8_t[{inner.length}]"
            elif isinstance(inner, c.Array):
                ctype = f"{_ctype(inner.subcon)}[{inner.count}]"
            else:
                ctype = _ctype(inner)
            out.append(Field(sc.name, offset, size, ctype))
        offset += size
    return out


def offsetof(con, name: str) -> int:
    """Offset of a top-level field of a layout."""
    for f in fields(con):
        if f.name == name:
            return f.offset
    raise KeyError(name)
