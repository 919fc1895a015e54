"""The frontend kits' engine: pvio plays a strict (or hostile) backend, the frontend runs.

:func:`run_frontend` starts an in-process daemon on a one-domain configuration
whose backend for the device type is an instrumented subclass (it records what
the frontend does, and misbehaves on request), watches the frontend's XenbusState
and keys, runs the frontend once (a program with ``PVIO_SOCKET``/``PVIO_DOMAIN``
in its environment, or an async factory), and returns an :class:`Observation`.
Checks common to every device type (completion, state order, closing, surviving
a hostile backend) live here too.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from pvio.layouts import XenbusState as S
from pvio.testing._core import Check, expect
from pvio.xenbus.state import parse_state

FrontendFactory = Callable[[str, str], Awaitable[None]]  # (socket, domain) -> done


@dataclass
class FrontendTarget:
    """The frontend under test: a command line, or an async factory (in-process)."""

    command: list[str] | None = None
    factory: FrontendFactory | None = None
    timeout: float = 30.0


@dataclass
class Observation:
    """What the strict backend saw the frontend do."""

    states: list[S] = field(default_factory=list)
    keys_at_initialised: dict[str, bytes | None] = field(default_factory=dict)
    backend_state_when_connected: S | None = None
    requests: int = 0
    invalid: list[str] = field(default_factory=list)  # rule breaches, with reasons
    duplicate_ids: list[int] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)  # device-specific findings
    exit_status: int | None = None
    exit_signal: int | None = None
    timed_out: bool = False
    output: str = ""


@dataclass
class Scenario:
    """One run: the daemon's config, the instrumented backend, helper tasks."""

    config: str  # TOML; "{domain}" is replaced
    device_type: str  # "vbd", "vif", "console"
    backend_class: type
    keys: tuple[str, ...]  # frontend keys recorded at Initialised
    tasks: list[Callable] = field(default_factory=list)  # async (daemon, domain, obs)


async def run_frontend(target: FrontendTarget, scenario: Scenario, obs: Observation,
                       domain: str = "guest") -> Observation:
    from pvio import config as cfg
    from pvio.daemon import Daemon

    root = tempfile.mkdtemp(prefix="pvio-conf-", dir="/tmp")
    config = cfg.parse(scenario.config.replace("{domain}", domain), source="conformance",
                       socket=f"{root}/xb.sock", data_dir=f"{root}/data")
    try:
        async with trio.open_nursery() as nursery:
            daemon = await nursery.start(Daemon(
                config, backend_classes={scenario.device_type: scenario.backend_class}).run)
            _record_states(daemon, scenario, obs)
            for task in scenario.tasks:
                nursery.start_soon(task, daemon, domain, obs)
            await _start(target, config.socket, domain, obs)
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                await daemon.shutdown(frontend_timeout=1)
            nursery.cancel_scope.cancel()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return obs


def device_of(daemon, domain: str):
    """The (only) BackendDevice of ``domain`` once it is claimed, else None."""
    attached = daemon._claimed.get(domain)
    return attached.devices[0] if attached is not None and attached.devices else None


async def _start(target: FrontendTarget, socket_path: str, domain: str,
                 obs: Observation) -> None:
    if target.factory is not None:
        with trio.move_on_after(target.timeout) as scope:
            try:
                await target.factory(socket_path, domain)
                obs.exit_status = 0
            except Exception as exc:
                obs.exit_status = 1
                obs.output = f"error: {type(exc).__name__}: {exc}"
        obs.timed_out = scope.cancelled_caught
        return
    env = {**os.environ, "PVIO_SOCKET": socket_path, "PVIO_DOMAIN": domain}
    env.pop("NOTIFY_SOCKET", None)
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(target.command, env=env, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT)
        try:
            with trio.move_on_after(target.timeout) as scope:
                while proc.poll() is None:
                    await trio.sleep(0.02)
            obs.timed_out = scope.cancelled_caught
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(3)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        rc = proc.returncode
        obs.exit_status, obs.exit_signal = (rc, None) if rc >= 0 else (None, -rc)
        out.seek(0)
        obs.output = out.read().decode("utf-8", "replace")[-4000:]


def _record_states(daemon, scenario: Scenario, obs: Observation) -> None:
    """Record every write of a frontend ``state`` node as it happens (polling would
    miss a quick Closing -> Closed), with the keys present when it went Initialised."""
    store = daemon.server.store
    original = store.write
    marker = f"/device/{scenario.device_type}/"

    def peek(path: str) -> bytes | None:
        try:
            return store.read(daemon._root, path)
        except Exception:
            return None

    def write(conn, path, value, tx_id=0):
        events = original(conn, path, value, tx_id)
        full = store.canonical(conn, path)
        if marker in full and full.endswith("/state"):
            fe = full[:-len("/state")]
            state = parse_state(bytes(value))
            if not obs.states or obs.states[-1] != state:
                obs.states.append(state)
            if state in (S.Initialised, S.Connected) and not obs.keys_at_initialised:
                obs.keys_at_initialised.update({k: peek(f"{fe}/{k}") for k in scenario.keys})
            if state == S.Connected and obs.backend_state_when_connected is None:
                be = peek(f"{fe}/backend")
                obs.backend_state_when_connected = parse_state(
                    peek(f"{be.decode()}/state") if be else None)
        return events

    store.write = write


async def vanish(daemon, domain: str, obs: Observation) -> None:
    """Hostile task: once the frontend is connected, the backend closes the device."""
    while True:
        device = device_of(daemon, domain)
        if device is not None and device.driver.conn is not None:
            await trio.sleep(0.05)
            await device.shutdown()
            return
        await trio.sleep(0.005)


# ------------------------------------------------------------------ common checks


def survived(obs: Observation, what: str) -> None:
    expect(not obs.timed_out, f"{what}: the frontend was still running after the timeout "
           "(it hangs instead of noticing)")
    if obs.exit_signal is not None:
        expect(False, f"{what}: the frontend died by signal {obs.exit_signal} "
               f"({signal.Signals(obs.exit_signal).name})")


def completed(obs: Observation) -> None:
    survived(obs, "against a strict backend")
    expect(obs.exit_status == 0, f"the frontend exited with status {obs.exit_status} against "
           f"a conforming backend; its output ends: {obs.output[-600:]!r}")


def state_order(obs: Observation) -> None:
    seq = [s for i, s in enumerate(obs.states) if i == 0 or obs.states[i - 1] != s]
    expect(S.Initialised in seq or S.Connected in seq,
           f"the frontend's states were {[s.name for s in seq]}: it never connected")
    if S.Connected in seq:
        expect(S.Initialised in seq[:seq.index(S.Connected)],
               f"the frontend went to Connected without passing Initialised "
               f"(states: {[s.name for s in seq]})")
        when = obs.backend_state_when_connected
        expect(when == S.Connected, "the frontend went Connected while the backend was "
               f"{when.name if when is not None else 'absent'}, not Connected")
    order = [S.Initialising, S.Initialised, S.Connected, S.Closing, S.Closed]
    ranks = [order.index(s) for s in seq if s in order]
    expect(ranks == sorted(ranks), f"the frontend's states went backwards: "
           f"{[s.name for s in seq]}")


def closes(obs: Observation) -> None:
    expect(S.Closed in obs.states or S.Closing in obs.states,
           f"the frontend left without closing its device (states "
           f"{[s.name for s in obs.states]}); it must go Closing then Closed")


def noticed(obs: Observation, what: str) -> None:
    survived(obs, what)
    expect(obs.exit_status != 0 or "error" in obs.output.lower(),
           f"{what}: the frontend exited 0 without reporting anything: it must notice a "
           "backend that breaks the protocol")


def decimal_key(obs: Observation, *names: str) -> None:
    keys = obs.keys_at_initialised
    expect(keys, "the frontend never went Initialised (no keys to check)")
    for name in names:
        value = keys.get(name)
        expect(value is not None and value.strip().isdigit(),
               f"at Initialised, {name} must be a decimal number; it is {value!r}")


class FrontendEnv:
    """What a frontend kit's checks share: the target, and the strict run (done once)."""

    def __init__(self, target: FrontendTarget, strict: Callable[[FrontendTarget],
                                                                 Awaitable[Observation]],
                 hostile: Callable[[FrontendTarget, str], Awaitable[Observation]]) -> None:
        self.target = target
        self._strict_fn = strict
        self.hostile = lambda how: hostile(target, how)
        self._strict: Observation | None = None
        self._lock = trio.Lock()

    async def strict(self) -> Observation:
        async with self._lock:
            if self._strict is None:
                self._strict = await self._strict_fn(self.target)
            return self._strict


# ------------------------------------------------------------ checks every device shares


async def _completes(env: FrontendEnv) -> None:
    completed(await env.strict())


async def _states(env: FrontendEnv) -> None:
    state_order(await env.strict())


async def _closes(env: FrontendEnv) -> None:
    closes(await env.strict())


async def _vanishes(env: FrontendEnv) -> None:
    survived(await env.hostile("vanish"), "a backend that closes the device mid-run")


def common_checks(section: str, work: str) -> dict[str, Check]:
    """The checks of every frontend kit, by key: ``completes`` (citing ``section``,
    ``work`` says what the contract asks), ``states``, ``closes``, ``vanish``."""
    return {
        "completes": Check("frontend.completes", section, f"against a conforming backend "
                           f"the frontend {work} and exits 0", _completes, timeout=90),
        "states": Check("xenbus.frontend-states", "xenbus §5", "the frontend goes "
                        "Initialising -> Initialised -> Connected (only after the backend "
                        "is Connected) -> Closing -> Closed, never backwards", _states,
                        timeout=90),
        "closes": Check("xenbus.frontend-closes", "xenbus §5", "the frontend closes its "
                        "device before it leaves", _closes, timeout=90),
        "vanish": Check("hostile.backend-vanishes", "xenbus §5", "a backend closing mid-run "
                        "makes the frontend stop cleanly (no hang, no crash)", _vanishes,
                        timeout=90),
    }


def hostile_check(name: str, section: str, rule: str, how: str, what: str) -> Check:
    """A check that runs the hostile backend ``how`` and expects the frontend to
    notice (fail with a message, not exit 0, hang or crash)."""
    async def run(env: FrontendEnv) -> None:
        noticed(await env.hostile(how), what)

    return Check(name, section, rule, run, timeout=90)


def program_main(factory: FrontendFactory, done: str = "") -> int:
    """``main()`` of a kit program: run ``factory`` on ``PVIO_SOCKET``/``PVIO_DOMAIN``;
    0 on success, 1 with ``error: ...`` on stderr on failure, 2 without a socket."""
    import sys

    sock = os.environ.get("PVIO_SOCKET")
    if not sock:
        print("error: set PVIO_SOCKET to the daemon's guest socket", file=sys.stderr)
        return 2
    try:
        trio.run(factory, sock, os.environ.get("PVIO_DOMAIN", "guest"))
    except BaseException as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if done:
        print(f"ok: {done}", file=sys.stderr)
    return 0
