"""Only here for cffi: pyproject.toml has no way to say cffi_modules.

The native module (cachefs/native/build.py) is compiled at install time;
all other metadata lives in pyproject.toml.
"""

from setuptools import setup

setup(cffi_modules=["cachefs/native/build.py:ffibuilder"])
