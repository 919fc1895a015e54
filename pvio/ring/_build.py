"""cffi API-mode (out-of-line, compiled) builder for ``pvio.ring._cring``.

Run by ``pip install`` through setup.py's ``cffi_modules``; also runnable by
hand (``python pvio/ring/_build.py``) for an in-place build. The wire structs
are generated from :mod:`pvio.layouts`, so the compiled code and the construct
declarations cannot disagree.
"""

from __future__ import annotations

import pathlib
import sys

from cffi import FFI

_HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE.parent.parent))  # import pvio._cgen from the source tree

from pvio import _cgen  # noqa: E402

_STRUCTS = _cgen.c_declarations()
# One compiled module, one C file per job: the ring/grant/evtchn mechanics
# (cring), then whatever protocol fast paths exist (cblk, cnet, ...), each with
# its header of declarations that cffi also reads.
_PARTS = ["cring", *sorted(p.stem for p in _HERE.glob("c*.c") if p.stem != "cring")]
_HEADER = "".join((_HERE / f"{name}.h").read_text() for name in _PARTS)
_SOURCE = "".join((_HERE / f"{name}.c").read_text() for name in _PARTS)

ffibuilder = FFI()
ffibuilder.cdef(_STRUCTS + _HEADER)
ffibuilder.set_source(
    "pvio.ring._cring",
    "#ifndef _GNU_SOURCE\n#define _GNU_SOURCE\n#endif\n#include <stdint.h>\n"
    + _STRUCTS
    + _HEADER
    + _SOURCE,
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wno-unused-function", "-pthread"],
    extra_link_args=["-pthread"],
)

if __name__ == "__main__":
    import os
    import shutil

    built = ffibuilder.compile(tmpdir=str(_HERE.parent.parent / "build" / "cffi"))
    target = _HERE / "_cring.abi3.so"  # the name pip gives it (cffi builds for the limited API)
    # a new inode, renamed into place: processes that have the old module
    # mapped keep their copy (overwriting it in place would SIGBUS them)
    shutil.copy(built, f"{target}.tmp")
    os.replace(f"{target}.tmp", target)
    for other in _HERE.glob("_cring.*.so"):  # a stale build of another tag would shadow it
        if other != target:
            other.unlink()
