"""Logging helpers: rate limiting for lines a peer can trigger (XSA-43/157).

A hostile peer must not be able to flood the operator's log. Each message
*key* (e.g. ``"wire:dom5"``) may log ``burst`` lines per ``interval`` seconds;
the rest are counted and reported in one summary line when the key next logs.
"""

from __future__ import annotations

import logging
import threading
import time


class RateLimitedLogger:
    def __init__(self, logger: logging.Logger, burst: int = 5, interval: float = 10.0) -> None:
        self.logger = logger
        self.burst = burst
        self.interval = interval
        self._lock = threading.Lock()
        self._state: dict[str, list] = {}  # key -> [window start, count, suppressed]

    def log(self, level: int, key: str, msg: str, *args: object) -> bool:
        """Log unless ``key`` is over its budget; returns whether it logged."""
        now = time.monotonic()
        with self._lock:
            state = self._state.setdefault(key, [now, 0, 0])
            if now - state[0] >= self.interval:
                if state[2]:
                    self.logger.log(level, "(%d similar messages suppressed for %s)",
                                    state[2], key)
                state[:] = [now, 0, 0]
            if state[1] >= self.burst:
                state[2] += 1
                return False
            state[1] += 1
            if len(self._state) > 4096:  # bound memory for keys from many peers
                self._state = {key: state}
        self.logger.log(level, msg, *args)
        return True

    def warning(self, key: str, msg: str, *args: object) -> bool:
        return self.log(logging.WARNING, key, msg, *args)

    def info(self, key: str, msg: str, *args: object) -> bool:
        return self.log(logging.INFO, key, msg, *args)
