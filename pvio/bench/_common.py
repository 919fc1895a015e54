"""Helpers shared by the ``pvio bench`` commands: errors, argument parsing, output,
the processes a benchmark starts."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
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


class Proc:
    """A child process we started; stopped by its pid with SIGTERM (then SIGKILL)."""

    def __init__(self, name: str, argv: list[str], log_path: str, *, stdout=None) -> None:
        self.name = name
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET",)}
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                         stdout=stdout if stdout is not None else log,
                                         stderr=log, env=env)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def fail(self, what: str) -> BenchError:
        return BenchError(f"{self.name} {what}; its log:\n{self.log()}")

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_serve(sock: str, data_dir: str, log_path: str, config: str | None = None) -> Proc:
    """Start ``pvio serve`` on ``sock`` and wait until it logs that it is ready
    (a socket a SIGKILLed daemon left behind is removed first)."""
    if os.path.exists(sock):
        os.unlink(sock)
    argv = [sys.executable, "-m", "pvio", "serve", "--socket", sock, "--data-dir", data_dir]
    if config is not None:
        argv += ["--config", config]
    proc = Proc("pvio serve", argv, log_path)
    deadline = time.monotonic() + 30
    while "pvio daemon ready" not in proc.log():
        if proc.proc.poll() is not None:
            raise proc.fail("exited at start")
        if time.monotonic() > deadline:
            proc.stop()
            raise proc.fail("did not get ready within 30 s")
        time.sleep(0.02)
    return proc
