"""Fixtures of the pvio.testing tests."""

from __future__ import annotations

import pytest

from tests.ring import xen_c


@pytest.fixture(scope="session")
def xen(request, tmp_path_factory) -> xen_c.XenC:
    """Xen's own ring.h compiled into a cffi shim (see tests/ring/xen_c.py)."""
    cache = getattr(request.config, "cache", None)
    where = cache.mkdir("pvio-xen-c") if cache is not None else tmp_path_factory.mktemp("xen-c")
    return xen_c.build(where)
