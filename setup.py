"""Shim so that old tooling can build the package; all metadata lives in setup.cfg."""
from setuptools import setup

setup()
