"""The ``pvio`` command line."""

from __future__ import annotations

import argparse
import importlib
import sys

from pvio import __version__

DESCRIPTION = """\
pvio: Xen-style paravirtual I/O (shared-memory rings, grant tables, event
channels, xenbus) between ordinary Linux processes, no hypervisor needed.
"""

EPILOG = """\
examples:
  pvio demo                       start a daemon on the embedded default, attach a
                                  frontend session, show states and features
  pvio serve                      run the daemon (embedded default config)
  pvio serve --config pvio.toml   run the daemon with your devices
  pvio status                     domains, devices, states, negotiated features
  pvio guest-console -- bash -i   run bash on the guest's console (a getty on hvc0)
  pvio console guest              attach to that console (Ctrl-] detaches)
  XENSTORED_PATH=$(pvio sockets --admin) xenstore-ls   Xen's own tools work too
  pvio bench ring                 ring vs socketpair vs multiprocessing.Pipe
  pvio bench ring --json          the same, as one JSON object with 'ratios'
  pvio bench ring --seconds 1 --depths 1,256
  pvio blk info                   the default domain's disk: size, features, ring
  pvio blk copy disk.raw pvio:    a local image onto the disk (and `pvio: out.raw` back)
  pvio blk export /mnt/pvio       the disk as a FUSE file for mkfs, fsck, qemu-img...
  pvio netfront-tap --address 10.0.0.1/24   the guest's vif as a TAP device here
  pvio net capture guest guest.pcap         its switch port into a pcap (tshark -r)
  pvio conformance block --socket $(pvio sockets) --junit report.xml
                                  check a daemon's block backend against the specs
"""


#: ``pvio bench NAME``: the module ``pvio.bench.NAME`` (add_arguments, run) and its help.
BENCHMARKS = {
    "ring": "request/response round trips through a shared ring between two processes",
    "block": "a pvio disk vs in-process os.pread and a Unix-socket block server",
    "console": "console throughput and echo latency vs a plain pty pair and a socketpair",
    "net": "iperf3 TCP and 64-byte frames/s through pvio vs veth and a Python relay",
    "recovery": "stress: kill -9 the daemon N times under QD32 writes; nothing acknowledged lost",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pvio",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"pvio {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="run the daemon: the store plus the configured backends",
        description="Run the pvio daemon. It serves a xenstore-compatible store on a guest "
        "socket (each frontend connection is a domain) and an admin socket (<socket>.admin, "
        "domain 0: Xen's xenstore-* tools and `pvio status`), and runs the backends of the "
        "devices in the config. With no --config it uses an embedded default (one domain "
        "'guest' with a sparse disk image, a console and a network port); print it with "
        "`pvio serve --print-default-config`. SIGINT/SIGTERM close devices gracefully.",
    )
    _socket_args(serve)
    serve.add_argument("--config", metavar="FILE", help="TOML configuration (see above)")
    serve.add_argument("--data-dir", metavar="DIR", help="where disk images live "
                       "(default: /var/lib/pvio as root, else ~/.local/share/pvio)")
    serve.add_argument("--print-default-config", action="store_true",
                       help="print the embedded default configuration and exit")
    serve.add_argument("-v", "--verbose", action="count", default=0,
                       help="more log detail (-vv for debug)")

    status = sub.add_parser(
        "status",
        help="list domains, devices, both sides' states and negotiated features",
        description="Connect to the daemon's admin socket as an ordinary xenstore client "
        "and summarise the store: domains, devices, their XenbusStates on both sides and "
        "the keys each side published.",
    )
    _socket_args(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")

    demo = sub.add_parser(
        "demo",
        help="start a daemon on the embedded default and attach a frontend session",
        description="Start a daemon in this process (temporary sockets and data directory, "
        "embedded default config), open a frontend domain session against it, attach every "
        "offered device, and print what happened: the handshake states and the keys each "
        "side negotiated. Then close the devices and stop.",
    )
    demo.add_argument("-v", "--verbose", action="count", default=0)

    console = sub.add_parser(
        "console",
        help="attach to a domain's console (like `xl console`); Ctrl-] detaches",
        description="Attach this terminal to the console of a connected domain: what the "
        "guest writes appears here, what you type goes to the guest. The terminal is put "
        "in raw mode and restored on exit. Ctrl-] detaches. Output written while nobody "
        "was attached was logged and buffered by the daemon.",
    )
    _socket_args(console)
    console.add_argument("domain", nargs="?", default="guest",
                         help="domain name or domid (default: guest)")
    console.add_argument("--devid", type=int, default=0, help="console number (default: 0)")

    guest = sub.add_parser(
        "guest-console",
        help="run a program with its stdin/stdout/stderr on a console (a getty on hvc0)",
        description="Open a frontend session as DOMAIN, attach its console and run COMMAND "
        "on a terminal whose other end is that console, the way a guest runs a getty on "
        "hvc0. Attach to it with `pvio console DOMAIN`. Exits with COMMAND's status.",
        epilog="example: pvio guest-console -- bash -i",
    )
    _socket_args(guest)
    guest.add_argument("--domain", default="guest", help="domain name to claim (default: guest)")
    guest.add_argument("--devid", type=int, default=0, help="console number (default: 0)")
    guest.add_argument("command_argv", nargs="*", metavar="-- COMMAND",
                       help="the program to run, after --")

    from pvio import _conformance_cli, _net_cli

    _net_cli.add_arguments(sub)
    _conformance_cli.add_arguments(sub)

    sockets = sub.add_parser("sockets", help="print the default socket paths")
    _socket_args(sockets)
    sockets.add_argument("--admin", action="store_true", help="only the admin socket")

    bench = sub.add_parser(
        "bench",
        help="measure pvio against the alternatives a Python user would pick",
        description="Benchmarks run pvio and its alternatives in the same invocation "
        "and print ratios (absolute numbers drift on shared machines; ratios do not).",
    )
    bench_sub = bench.add_subparsers(dest="bench", metavar="WHAT", required=True)
    for name, help_text in BENCHMARKS.items():
        module = importlib.import_module(f"pvio.bench.{name}")
        module.add_arguments(bench_sub.add_parser(
            name, help=help_text, description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter))
    from pvio import _blkcli

    _blkcli.add_arguments(
        sub.add_parser(
            "blk",
            help="a pvio disk for ordinary tools: info, read, write, copy, export (FUSE)",
            description=_blkcli.DESCRIPTION,
            epilog=_blkcli.EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    return parser


def _socket_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", metavar="PATH", help="the daemon's guest socket "
                        "(default: /run/pvio/xenbus.sock as root, else "
                        "$XDG_RUNTIME_DIR/pvio/xenbus.sock); the admin socket is PATH.admin")


def _setup_logging(verbose: int) -> None:
    import logging

    level = logging.WARNING - 10 * min(verbose + 1, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "guest-console" in argv and "--" in argv:  # everything after -- is the program's
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1:]
    args = parser.parse_args(argv)
    if command:
        args.command_argv = command
    if args.command is None:
        parser.print_help()
        return 2
    if args.command in ("console", "guest-console"):
        from pvio import _console_cli

        return getattr(_console_cli, args.command.replace("-", "_"))(args)
    if args.command in ("serve", "status", "demo", "sockets"):
        from pvio import _commands

        return getattr(_commands, args.command)(args)
    if args.command in ("netfront-tap", "net"):
        from pvio import _net_cli

        if getattr(args, "verbose", 0):
            _setup_logging(args.verbose)
        return _net_cli.run(args)
    if args.command == "conformance":
        from pvio import _conformance_cli

        return _conformance_cli.run(args)
    if args.command == "blk":
        from pvio import _blkcli

        return _blkcli.run(args)
    if args.command == "bench":
        return importlib.import_module(f"pvio.bench.{args.bench}").run(args)
    parser.error(f"unknown command {args.command}")  # pragma: no cover
    return 2


if __name__ == "__main__":
    sys.exit(main())
