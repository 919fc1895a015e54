"""Small trio helpers shared by the clients and sessions."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator


@contextlib.asynccontextmanager
async def unwrap_single() -> AsyncIterator[None]:
    """Around a nursery that hosts a user's ``async with`` body: a lone error
    (a refused claim, an XenstoreError from the body, an unreachable daemon)
    reaches the caller as itself instead of wrapped in exception groups."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        if len(leaves) == 1 and isinstance(leaves[0], Exception):
            raise leaves[0] from group
        raise


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out
