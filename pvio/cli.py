"""The ``pvio`` command line."""

from __future__ import annotations

import argparse
import sys

from pvio import __version__

DESCRIPTION = """\
pvio: Xen-style paravirtual I/O (shared-memory rings, grant tables, event
channels, xenbus) between ordinary Linux processes, no hypervisor needed.
"""

EPILOG = """\
examples:
  pvio bench ring                 ring vs socketpair vs multiprocessing.Pipe
  pvio bench ring --json          the same, as one JSON object with 'ratios'
  pvio bench ring --seconds 1 --depths 1,256
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pvio",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"pvio {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    bench = sub.add_parser(
        "bench",
        help="measure pvio against the alternatives a Python user would pick",
        description="Benchmarks run pvio and its alternatives in the same invocation "
        "and print ratios (absolute numbers drift on shared machines; ratios do not).",
    )
    bench_sub = bench.add_subparsers(dest="bench", metavar="WHAT", required=True)
    from pvio.bench import ring as bench_ring

    bench_ring.add_arguments(
        bench_sub.add_parser(
            "ring",
            help="request/response round trips through a shared ring between two processes",
            description=bench_ring.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "bench":
        from pvio.bench import ring as bench_ring

        return bench_ring.run(args)
    parser.error(f"unknown command {args.command}")  # pragma: no cover
    return 2


if __name__ == "__main__":
    sys.exit(main())
