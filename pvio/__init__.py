"""pvio: Xen-style paravirtual split-driver I/O between ordinary Linux processes.

Layers (bottom up): :mod:`pvio.ring` (shared memory, rings, grant table, event
channels), the wire layouts in :mod:`pvio.layouts`, then protocols, the store,
frontends and backends.
"""

from pvio._version import __version__

__all__ = ["__version__"]
