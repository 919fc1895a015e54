"""pvio.testing: conformance kits for anyone's ring, frontend or backend.

In the spirit of ``trio.testing.check_two_way_stream``: each kit is a list of
:class:`Check` objects (a rule, the spec section it enforces, and the code that
exercises an implementation), run by :func:`run_checks` into a :class:`Report`
(readable text, JUnit XML). Kits reach implementations through pvio's transport
(the store socket, fd hand-over, shared pages), so the implementation under test
can be written in any language.

- :mod:`pvio.testing.block`: block backend and frontend kits.
- :mod:`pvio.testing.net`, :mod:`pvio.testing.console`: the same for vif and console.
- :mod:`pvio.testing.ring`: a ring implementation against Xen's ring.h semantics.
- :mod:`pvio.testing.fixtures`: in-process frontend/backend pairs for your own tests.

``pvio conformance`` is the command-line face of all of this.
"""

from pvio.testing._core import Check, CheckResult, KitError, Report, Violation, expect, run_checks

__all__ = ["Check", "CheckResult", "KitError", "Report", "Violation", "expect", "run_checks"]
