"""Generate spec tables from the code (``python -m pvio._specgen``).

``specs/layouts.md`` comes from the construct layouts; the state diagrams in
``specs/xenbus.md`` from the XenbusState tables.

The tables are derived, never hand-written: a test regenerates them and fails
if the committed file differs, so the spec cannot drift from the code.
"""

from __future__ import annotations

import enum
import pathlib
import sys

from pvio import _cgen, layouts

HEADER = """\
# pvio wire layouts

Generated from `pvio/layouts.py` by `python -m pvio._specgen`; do not edit by
hand. Every size and offset below is checked against Xen's own headers
(Debian `libxen-dev`) by `tests/ring/test_layouts_vs_xen.py`. All fields are
little-endian; gaps between offsets are padding that must be zero when pvio
writes a structure (hardening.md #4).
"""

_CONSTANT_GROUPS = (
    ("BLKIF_OP_*", layouts.BlkifOp),
    ("BLKIF_RSP_*", layouts.BlkifRsp),
    ("NETTXF_*", layouts.NetTxFlag),
    ("NETRXF_*", layouts.NetRxFlag),
    ("XEN_NETIF_EXTRA_TYPE_*", layouts.NetifExtraType),
    ("XEN_NETIF_RSP_*", layouts.NetifRsp),
    ("GTF_*", layouts.GTF),
    ("GNTST_*", layouts.GNTST),
    ("EVTCHNSTAT_*", layouts.EvtchnStatus),
    ("XS_* (enum xsd_sockmsg_type)", layouts.XsdSockmsgType),
    ("XenbusState", layouts.XenbusState),
)


# Layouts with no standalone Xen type name.
_DESCRIBED = {
    "sring_header": "the 64-byte header of every struct X_sring (DEFINE_RING_TYPES)",
    "flex_ring_intf": "struct X_data_intf (DEFINE_XEN_FLEX_RING_AND_INTF), before ref[]",
    "netif_extra_info_gso": "the u.gso member of struct netif_extra_info",
    "netif_extra_info_mcast": "the u.mcast member of struct netif_extra_info",
    "netif_extra_info_hash": "the u.hash member of struct netif_extra_info",
}


def _layout_section(name: str) -> str:
    con = layouts.LAYOUTS[name]
    xen = layouts.XEN_C_NAMES.get(name) or _DESCRIBED[name]
    rows = "\n".join(
        f"| {f.offset} | {f.size} | `{f.name}` | `{f.ctype}` |" for f in _cgen.fields(con)
    )
    return (
        f"## `{name}`\n\nXen type: `{xen}`. Size: **{_cgen.sizeof(con)}** bytes. "
        f"`struct` format: `{_cgen.struct_format(con)}`\n\n"
        f"| offset | size | field | C type |\n|---:|---:|---|---|\n{rows}\n"
    )


def _constants_section() -> str:
    parts = ["## Constants\n"]
    for title, enum_cls in _CONSTANT_GROUPS:
        members = [(m.name, int(m.value)) for m in enum_cls.__members__.values()]
        hexes = isinstance(enum_cls, enum.EnumMeta) and issubclass(enum_cls, enum.IntFlag)
        rows = "\n".join(
            f"| `{n}` | {f'{v:#x}' if hexes else v} |" for n, v in members
        )
        parts.append(f"### {title}\n\n| name | value |\n|---|---:|\n{rows}\n")
    parts.append(
        "### xsd_errors (order is part of the wire)\n\n"
        + ", ".join(f"`{e}`" for e in layouts.XSD_ERRORS)
        + "\n"
    )
    return "\n".join(parts)


def render() -> str:
    sections = [HEADER]
    sections += [_layout_section(name) for name in layouts.LAYOUTS]
    sections.append(_constants_section())
    return "\n".join(sections)


BEGIN = "<!-- BEGIN GENERATED: state diagrams -->"
END = "<!-- END GENERATED: state diagrams -->"


def render_state_diagrams() -> str:
    """The XenbusState tables of pvio.xenbus.state as mermaid diagrams."""
    from pvio.xenbus import state

    parts = []
    for title, table in (("Backend", state.BACKEND_TABLE), ("Frontend", state.FRONTEND_TABLE)):
        rows = "\n".join(
            f"| {row.peer.name} | {', '.join(s.name for s in sorted(row.ours, key=int))} "
            f"| {row.action.value} | {row.goto.name if row.goto is not None else '(stay)'} |"
            for row in table
        )
        parts.append(
            f"### {title} side\n\n| peer state | our state | action | next |\n"
            f"|---|---|---|---|\n{rows}\n\n```mermaid\n"
            f"{state.render_mermaid(table, title + ' side')}\n```\n"
        )
    return "\n".join(parts)


def splice(text: str, generated: str) -> str:
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n{generated}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    specs = pathlib.Path(argv[0] if argv else "specs")
    (specs / "layouts.md").write_text(render())
    xenbus = specs / "xenbus.md"
    xenbus.write_text(splice(xenbus.read_text(), render_state_diagrams()))
    print(f"wrote {specs}/layouts.md and the diagrams in {xenbus}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
