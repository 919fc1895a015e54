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
