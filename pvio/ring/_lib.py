"""The compiled helpers (``pvio.ring._cring``), imported in one place."""

from __future__ import annotations

try:
    from pvio.ring._cring import ffi, lib
except ImportError as exc:  # pragma: no cover - only on a broken install
    raise ImportError(
        "pvio's C helpers are not built: install with `pip install -e .` "
        "(needs a C compiler and the Python headers)"
    ) from exc

__all__ = ["ffi", "lib"]
