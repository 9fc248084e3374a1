"""Declares the C++ extensions of csrc/; all metadata lives in setup.cfg."""
from setuptools import setup

# The native uint64 hash map (parameter server) and the Gloo binding
# (collectives) are declared here when their issues land.
ext_modules = []

setup(ext_modules=ext_modules)
