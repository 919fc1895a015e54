"""Fixtures of the pvio.ring tests."""

from __future__ import annotations

import pytest

from tests.ring import xen_c


@pytest.fixture(scope="session")
def xen(request, tmp_path_factory) -> xen_c.XenC:
    """Xen's own headers compiled into a cffi shim (see ``xen_c.py``).

    Built once per session; the compiled module is cached in pytest's cache
    directory under a hash of its source, so unchanged runs skip the compiler.
    """
    cache = getattr(request.config, "cache", None)
    where = cache.mkdir("pvio-xen-c") if cache is not None else tmp_path_factory.mktemp("xen-c")
    return xen_c.build(where)
