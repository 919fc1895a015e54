"""Helpers shared by the ``pvio bench`` commands: errors, argument parsing, output."""

from __future__ import annotations

import argparse
import json
import sys
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


def progress(line: str) -> None:
    """Progress lines go to stderr, so ``--json`` output stays clean."""
    print(line, file=sys.stderr, flush=True)


def report(name: str, as_json: bool, measure: Callable[[], dict],
           format_table: Callable[[dict], str]) -> int:
    """Run ``measure`` and print its report as JSON or as the table; 1 on BenchError."""
    try:
        result = measure()
    except BenchError as exc:
        print(f"pvio bench {name}: {exc}", file=sys.stderr)
        return 1
    if as_json:
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_table(result))
    return 0


def standalone(name: str, doc: str | None, add_arguments, run, argv) -> int:
    """``main()`` of a benchmark module run as a script (benchmarks/*.py)."""
    parser = argparse.ArgumentParser(prog=f"pvio bench {name}", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))
