"""The compiled helpers (``pvio.ring._cring``), imported in one place."""

from __future__ import annotations

try:
    from pvio.ring._cring import ffi, lib
except ImportError as exc:  # pragma: no cover - only on a broken install
    raise ImportError(
        "pvio's C helpers are not built: install with `pip install -e .` "
        "(needs a C compiler and the Python headers)"
    ) from exc

__all__ = ["ffi", "lib", "pin_buffer"]


def pin_buffer(buf) -> tuple[object, int, object]:
    """A long-lived writable C pointer to ``buf``'s bytes, their length, and the
    cdata that must stay referenced while the pointer is used.

    For a memoryview (e.g. a ``SharedMemory.page()`` slice) the pointer is taken
    from the object the view was made of, not from the view: on CPython before
    3.12.6 the garbage collector may release a memoryview that sits in a
    reference cycle while cffi still holds it (gh-77894), which would crash the
    process. The returned cdata keeps the underlying object exported (so a
    shared mapping cannot be unmapped underneath a ring); keep it alive as long
    as the pointer is used.
    """
    view = memoryview(buf)
    if view.readonly:
        raise TypeError("a ring needs a writable buffer")
    if not view.c_contiguous:
        raise TypeError("a ring needs a contiguous buffer")
    size = view.nbytes
    owner = view.obj if view.obj is not None else buf
    base = ffi.from_buffer("uint8_t[]", owner, require_writable=True)
    probe = ffi.from_buffer("uint8_t[]", view, require_writable=True)
    offset = int(ffi.cast("uintptr_t", probe)) - int(ffi.cast("uintptr_t", base))
    ffi.release(probe)
    view.release()
    if not 0 <= offset <= len(base) - size:
        raise TypeError("buffer does not lie within its exporting object")
    return base + offset, size, base
