"""The network backend (io/netif.h): transport and handshake for now.

The switch, rx copy and offloads arrive with the network issue; until then no
``feature-*`` key is advertised.
"""

from __future__ import annotations

from pvio.xenbus.ringdev import VIF, RingBackendDriver


class NetBackend(RingBackendDriver):
    layout = VIF

    def __init__(self, domain, mac: str) -> None:
        super().__init__(domain)
        self.mac = mac

    def toolstack_keys(self) -> dict[str, str]:
        return {"mac": self.mac, "handle": "0"}
