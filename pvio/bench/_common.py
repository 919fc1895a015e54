"""Helpers shared by the ``pvio bench`` commands (argument parsing)."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any


class BenchError(RuntimeError):
    """The benchmark could not run (a process died or did not start, a check failed)."""


def positive(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0: {text}")
        return value
    return parse


def choices(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        values = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in values if x not in allowed]
        if bad or not values:
            raise argparse.ArgumentTypeError(
                f"unknown value(s) {', '.join(bad) or text!r}; choose from {', '.join(allowed)}")
        return values
    return parse
