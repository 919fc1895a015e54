"""The conformance kit's machinery: checks, results, reports (text and JUnit XML).

A :class:`Check` is one rule of a spec, named and cited (``"blkif §2"``), with an
async function that exercises an implementation and raises :class:`Violation`
(or any ``AssertionError``) when the implementation departs from the rule. A kit
is a list of checks; :func:`run_checks` runs each with its own timeout and
collects a :class:`Report`.
"""

from __future__ import annotations

import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio


class Violation(AssertionError):
    """The implementation broke the rule of the running check (the message says how)."""


@dataclass(frozen=True)
class Check:
    """One rule of the protocol and the code that checks it."""

    name: str  # e.g. "blkif.response-id"
    section: str  # e.g. "blkif §2"
    rule: str  # the rule, one sentence
    run: Callable[..., Awaitable[None]]
    timeout: float = 20.0
    needs: str = ""  # a backend feature key the check needs ("" = always runs)


@dataclass
class CheckResult:
    check: Check
    outcome: str  # "pass", "fail", "error" (the kit could not run it), "skip" (not offered)
    message: str = ""
    seconds: float = 0.0

    @property
    def line(self) -> str:
        head = f"{self.outcome.upper():5} {self.check.name} [{self.check.section}]"
        if self.outcome == "pass":
            return head
        return f"{head}: {self.message}\n      rule: {self.check.rule}"


@dataclass
class Report:
    suite: str
    results: list[CheckResult] = field(default_factory=list)

    @property
    def failed(self) -> list[CheckResult]:
        return [r for r in self.results if r.outcome in ("fail", "error")]

    @property
    def ok(self) -> bool:
        return not self.failed and any(r.outcome == "pass" for r in self.results)

    def result(self, name: str) -> CheckResult:
        for r in self.results:
            if r.check.name == name:
                return r
        raise KeyError(name)

    def format(self) -> str:
        counts = {k: sum(r.outcome == k for r in self.results)
                  for k in ("pass", "fail", "error", "skip")}
        lines = [f"pvio conformance: {self.suite}"]
        lines += [r.line for r in self.results]
        lines.append(f"{counts['pass']} passed, {counts['fail']} failed, "
                     f"{counts['error']} errors, {counts['skip']} not applicable")
        return "\n".join(lines)

    def junit_xml(self) -> str:
        """JUnit XML (one testsuite, one testcase per check) for CI systems."""
        suite = ET.Element("testsuite", name=f"pvio-conformance.{self.suite}",
                           tests=str(len(self.results)),
                           failures=str(sum(r.outcome == "fail" for r in self.results)),
                           errors=str(sum(r.outcome == "error" for r in self.results)),
                           skipped=str(sum(r.outcome == "skip" for r in self.results)),
                           time=f"{sum(r.seconds for r in self.results):.3f}")
        for r in self.results:
            case = ET.SubElement(suite, "testcase", classname=f"{self.suite}.{r.check.section}",
                                 name=r.check.name, time=f"{r.seconds:.3f}")
            text = f"{r.message}\nrule ({r.check.section}): {r.check.rule}"
            if r.outcome == "fail":
                ET.SubElement(case, "failure", message=r.message[:500]).text = text
            elif r.outcome == "error":
                ET.SubElement(case, "error", message=r.message[:500]).text = text
            elif r.outcome == "skip":
                ET.SubElement(case, "skipped", message=r.message)
        return ET.tostring(ET.ElementTree(suite).getroot(), encoding="unicode",
                           xml_declaration=True)


class KitError(Exception):
    """The kit itself could not run a check (environment, not the implementation)."""


async def run_checks(suite: str, checks: list[Check], env: Any, *,
                     select: Callable[[Check], bool] | None = None,
                     offered: Callable[[str], Awaitable[bool]] | None = None,
                     progress: Callable[[str], None] | None = None) -> Report:
    """Run ``checks`` one after another against ``env`` (each check's ``run(env)``).

    ``offered(feature)`` says whether the implementation offers a feature a
    check needs; a check whose feature is not offered is reported as not
    applicable. Failures never stop the run.
    """
    report = Report(suite)
    for check in checks:
        if select is not None and not select(check):
            continue
        if check.needs and offered is not None and not await offered(check.needs):
            report.results.append(CheckResult(check, "skip", f"{check.needs} not offered"))
            continue
        start = time.monotonic()
        try:
            with trio.fail_after(check.timeout):
                await check.run(env)
            result = CheckResult(check, "pass")
        except trio.TooSlowError:
            result = CheckResult(check, "fail", f"no conclusion within {check.timeout:.0f} s "
                                 "(the implementation stopped answering)")
        except AssertionError as exc:
            result = CheckResult(check, "fail", str(exc) or type(exc).__name__)
        except KitError as exc:
            result = CheckResult(check, "error", str(exc))
        except Exception as exc:
            where = traceback.extract_tb(exc.__traceback__)[-1]
            result = CheckResult(check, "error", f"{type(exc).__name__}: {exc} "
                                 f"(at {where.filename}:{where.lineno})")
        result.seconds = time.monotonic() - start
        report.results.append(result)
        if progress is not None:
            progress(result.line)
    return report


def expect(condition: object, message: str) -> None:
    """Raise :class:`Violation` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise Violation(message)
