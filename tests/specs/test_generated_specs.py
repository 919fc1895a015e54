"""specs/layouts.md is generated from pvio.layouts and must be current."""

import pathlib

from pvio import _specgen

SPEC = pathlib.Path(__file__).resolve().parents[2] / "specs" / "layouts.md"


def test_committed_layout_tables_match_the_construct_declarations():
    assert SPEC.read_text() == _specgen.render(), (
        "specs/layouts.md is stale: run `python -m pvio._specgen`"
    )


def test_tables_name_every_layout_with_its_size():
    text = SPEC.read_text()
    for name in ("blkif_request", "netif_tx_request", "xencons_interface", "grant_entry_v1"):
        assert f"## `{name}`" in text
    assert "Size: **112** bytes" in text  # blkif_request, io/blkif.h
    assert "Size: **3088** bytes" in text  # xencons_interface, io/console.h


def test_state_diagrams_in_xenbus_md_match_the_tables():
    path = SPEC.parent / "xenbus.md"
    text = path.read_text()
    assert _specgen.splice(text, _specgen.render_state_diagrams()) == text, (
        "specs/xenbus.md diagrams are stale: run `python -m pvio._specgen`"
    )
    assert "stateDiagram-v2" in text
