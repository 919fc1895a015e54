"""Checks for gh-77894: on CPython before 3.12.6 the garbage collector may
clear a memoryview in a reference cycle while a cffi ``from_buffer`` pointer
still exports it; freeing that pointer then crashes the process. Long-lived
pointers must come from :func:`pvio.ring._lib.pin_buffer` (the exporting
object, never a memoryview)."""

from __future__ import annotations

import collections
import gc
import types

_CONTAINERS = (list, tuple, dict, set, frozenset, collections.deque)


def pointers_into_memoryviews(root: object, limit: int = 200_000) -> list[str]:
    """Every cffi object reachable from ``root`` through pvio objects and plain
    containers that holds a memoryview; each as the path it was reached by."""
    ffi_types = _cffi_types()
    seen: set[int] = {id(root)}
    todo: collections.deque[tuple[object, str]] = collections.deque([(root, "root")])
    found: list[str] = []
    while todo and len(seen) < limit:
        obj, path = todo.popleft()
        if isinstance(obj, ffi_types):
            if any(isinstance(r, memoryview) for r in gc.get_referents(obj)):
                found.append(path)
            continue
        for name, child in _children(obj):
            if id(child) in seen or not _followed(child, ffi_types):
                continue
            seen.add(id(child))
            todo.append((child, f"{path}{name}"))
    return found


def _cffi_types() -> tuple[type, ...]:
    from pvio.ring._lib import ffi
    return (ffi.CData,)


def _followed(obj: object, ffi_types: tuple[type, ...]) -> bool:
    if isinstance(obj, ffi_types + _CONTAINERS):
        return True
    module = getattr(type(obj), "__module__", "") or ""
    return module.startswith("pvio") and not isinstance(obj, (type, types.ModuleType))


def _children(obj: object):
    if isinstance(obj, dict):
        return ((f"[{k!r}]", v) for k, v in obj.items())
    if isinstance(obj, _CONTAINERS):
        return ((f"[{i}]", v) for i, v in enumerate(obj))
    attrs = dict(getattr(obj, "__dict__", {}))
    for slot in getattr(type(obj), "__slots__", ()):
        if hasattr(obj, slot):
            attrs[slot] = getattr(obj, slot)
    return ((f".{k}", v) for k, v in attrs.items())
