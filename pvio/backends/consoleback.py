"""The console backend (io/console.h): transport and handshake for now.

The pty, log and rate limiting arrive with the console issue.
"""

from __future__ import annotations

from pvio.xenbus.ringdev import CONSOLE, RingBackendDriver


class ConsoleBackend(RingBackendDriver):
    layout = CONSOLE

    def toolstack_keys(self) -> dict[str, str]:
        return {"type": "xenconsoled", "protocol": "vt100"}
