"""The console frontend: a guest's ``hvc0`` as a trio stream (io/console.h).

``ConsoleFront`` attaches a console device of a domain session; once
connected, ``front.stream`` is a :class:`pvio.console.ConsoleStream`
(``send_all``, ``receive_some``, ``send_eof``, ``aclose``). The guest writes
``out`` and reads ``in``.
"""

from __future__ import annotations

import trio

from pvio.console import ConsoleStream
from pvio.ring import console_rings
from pvio.xenbus.ringdev import CONSOLE, RingFrontendDriver


class ConsoleFront(RingFrontendDriver):
    layout = CONSOLE

    def __init__(self, session) -> None:
        super().__init__(session)
        self.stream: ConsoleStream | None = None
        self._scope: trio.CancelScope | None = None

    async def attach(self, backend: dict[str, bytes | None]) -> None:
        await super().attach(backend)
        tx, rx = console_rings(self.area(0), frontend=True)
        self.stream = ConsoleStream(tx, rx, self.channel)
        self._scope = trio.CancelScope()
        self.session._nursery.start_soon(self._pump, self._scope, self.stream)

    @staticmethod
    async def _pump(scope: trio.CancelScope, stream: ConsoleStream) -> None:
        with scope:
            await stream.pump()

    async def detach(self) -> None:
        if self._scope is not None:
            self._scope.cancel()
            self._scope = None
        if self.stream is not None:
            await self.stream.aclose()
            self.stream = None
        await super().detach()


async def open_console(session, devid: int = 0, timeout: float = 10.0) -> ConsoleFront:
    """Attach console ``devid`` of ``session`` and wait until it is connected."""
    front = ConsoleFront(session)
    device = await session.attach(front, devid)
    await device.wait_connected(timeout)
    front.device = device
    return front
