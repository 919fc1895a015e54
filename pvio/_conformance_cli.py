"""``pvio conformance``: run a conformance kit from the command line."""

from __future__ import annotations

import argparse
import fnmatch
import shlex
import sys

import trio

from pvio import config as cfg

KINDS = ("block", "net", "console", "ring")

DESCRIPTION = """\
Check an implementation against pvio's executable specs, rule by rule, hostile
peer included. Each check names the spec section it enforces (specs/*.md).

  --socket PATH        pvio plays the FRONTEND against the backend served at PATH
                       (a running `pvio serve`, or any daemon speaking pvio's
                       transport): state machine, I/O, every validation rule,
                       hostile ring indices, grant abuse, event floods.
  --frontend-cmd CMD   pvio plays the BACKEND (first strict, then hostile) against
                       the frontend program CMD, started with PVIO_SOCKET (the
                       store's guest socket) and PVIO_DOMAIN in its environment.
  ring                 a ring implementation (--ring-adapter MODULE:FACTORY, default
                       pvio's own) against Xen's ring.h semantics.

Exit status: 0 if every applicable check passed, 1 if any failed, 2 on usage errors.
"""

EPILOG = """\
examples:
  pvio conformance block --socket /run/pvio/xenbus.sock --junit report.xml
  pvio conformance block --frontend-cmd "./c-blkfront"
  pvio conformance block --frontend-cmd "python3 -m pvio.testing.block"
  pvio conformance net --socket $(pvio sockets) --checks 'netif.*'
  pvio conformance ring
  pvio conformance block --list
"""


def add_arguments(sub) -> None:
    p = sub.add_parser("conformance", help="check a backend, frontend or ring against the "
                       "protocol (report, JUnit XML)", description=DESCRIPTION, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=KINDS, help="which device (or the ring layer)")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--socket", help="a daemon's guest socket: check its backends")
    target.add_argument("--frontend-cmd", metavar="CMD",
                        help="a frontend program (shell words): check it")
    target.add_argument("--ring-adapter", metavar="MODULE:FACTORY",
                        help="ring: a factory returning a RingAdapter (default: pvio's rings)")
    p.add_argument("--domain", default="guest",
                   help="domain name to claim with --socket (default: guest)")
    p.add_argument("--peer-domain",
                   help="net --socket: a second domain with a vif, for checks that need "
                   "frames to come back")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds the frontend program gets per run (default: 60)")
    p.add_argument("--checks", metavar="GLOB", action="append",
                   help="run only checks whose name matches (repeatable), e.g. 'blkif.*'")
    p.add_argument("--junit", metavar="FILE", help="also write a JUnit XML report to FILE")
    p.add_argument("--list", action="store_true", help="list the checks and exit")
    p.add_argument("-q", "--quiet", action="store_true", help="only the summary")


_KITS = {
    ("block", "backend"): ("block", "BLOCK_BACKEND_CHECKS", "check_block_backend"),
    ("block", "frontend"): ("block", "BLOCK_FRONTEND_CHECKS", "check_block_frontend"),
    ("net", "backend"): ("net", "NET_BACKEND_CHECKS", "check_net_backend"),
    ("net", "frontend"): ("net", "NET_FRONTEND_CHECKS", "check_net_frontend"),
    ("console", "backend"): ("console", "CONSOLE_BACKEND_CHECKS", "check_console_backend"),
    ("console", "frontend"): ("console", "CONSOLE_FRONTEND_CHECKS", "check_console_frontend"),
    ("ring", "ring"): ("ring", "RING_CHECKS", "check_ring"),
}


def _kit(kind: str, role: str):
    import importlib

    module, checks, runner = _KITS[(kind, role)]
    mod = importlib.import_module(f"pvio.testing.{module}")
    return getattr(mod, checks), getattr(mod, runner)


def run(args) -> int:
    role = "ring" if args.kind == "ring" else ("frontend" if args.frontend_cmd else "backend")
    if args.kind == "ring" and (args.socket or args.frontend_cmd):
        print("pvio conformance ring: takes --ring-adapter, not --socket/--frontend-cmd",
              file=sys.stderr)
        return 2
    if args.kind != "ring" and args.ring_adapter:
        print("pvio conformance: --ring-adapter is for `ring`", file=sys.stderr)
        return 2
    checks, runner = _kit(args.kind, role)
    if args.list:
        for check in checks:
            print(f"{check.name:32} [{check.section}] {check.rule}")
        return 0

    def select(check) -> bool:
        return not args.checks or any(fnmatch.fnmatch(check.name, g) for g in args.checks)

    progress = None if args.quiet else (lambda line: print(line, flush=True))
    if role == "ring":
        from pvio.testing.ring import load_adapter

        try:
            factory = load_adapter(args.ring_adapter)
        except (ImportError, AttributeError, ValueError) as exc:
            print(f"pvio conformance ring: cannot load {args.ring_adapter}: {exc}",
                  file=sys.stderr)
            return 2
        report = trio.run(lambda: runner(factory, select=select, progress=progress))
    elif role == "frontend":
        from pvio.testing.block import FrontendTarget

        target = FrontendTarget(shlex.split(args.frontend_cmd), timeout=args.timeout)
        report = trio.run(lambda: runner(target, select=select, progress=progress))
    else:
        from pvio.testing.block import BackendTarget

        sock = args.socket or cfg.default_socket()
        target = BackendTarget(sock, args.domain)
        kwargs = {"peer_domain": args.peer_domain} if args.kind == "net" else {}
        try:
            report = trio.run(lambda: runner(target, select=select, progress=progress,
                                             **kwargs))
        except (ConnectionRefusedError, FileNotFoundError) as exc:
            print(f"pvio conformance: no daemon at {sock}: {exc}", file=sys.stderr)
            return 2
    if not report.results:
        print("pvio conformance: no check matched --checks", file=sys.stderr)
        return 2
    if args.quiet:  # progress was silent: show what failed
        for result in report.failed:
            print(result.line)
    print(report.format().splitlines()[-1])
    if args.junit:
        with open(args.junit, "w") as f:
            f.write(report.junit_xml())
    return 0 if report.ok else 1
