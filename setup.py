"""Build hook: compiles the cffi API-mode extension ``pvio.ring._cring``.

Everything else about the package lives in pyproject.toml; setuptools needs this
file only because ``cffi_modules`` is a setup() keyword.
"""

from setuptools import setup

setup(cffi_modules=["pvio/ring/_build.py:ffibuilder"])
