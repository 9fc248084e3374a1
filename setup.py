"""Declares the C++ extensions of csrc/; all metadata lives in setup.cfg."""
import os

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

ext_modules = [
    # The uint64 key -> row hash map of the parameter server's sparse tables.
    Pybind11Extension("shoal.ps._keymap", ["csrc/keymap.cpp"], cxx_std=17, extra_compile_args=["-O3"]),
    # Fused in-place optimizer updates of the numpy backend (engine and dense PS tables).
    Pybind11Extension("shoal.kernels._fused", ["csrc/fused.cpp"], cxx_std=17,
                      # sqrt vectorizes only when it need not set errno (nothing here reads errno)
                      extra_compile_args=["-O3", "-fno-math-errno"]),
    # Paddle's MultiSlot text format: the parser (threads, GIL released) and writer of worker/data.
    Pybind11Extension("shoal.worker.data._multislot", ["csrc/multislot.cpp"], cxx_std=17,
                      extra_compile_args=["-O3", "-pthread"], extra_link_args=["-pthread"]),
    # Collectives through POSIX shared memory for the ranks of a group on one host (the gloo
    # group uses it instead of TCP loopback): only shm/mmap, futexes and C++17 atomics.
    Pybind11Extension("shoal.collective._shm", ["csrc/shm.cpp"], cxx_std=17,
                      extra_compile_args=["-O3"], libraries=["rt"]),
]

# The Gloo binding (collectives) links the system's libgloo (Debian: apt-get install libgloo-dev,
# which scripts/_install.sh does when run as root). Without its headers the binding is left out
# rather than failing the whole install: the parameter-server side needs no Gloo.
if os.path.exists("/usr/include/gloo/context.h"):
    ext_modules.append(Pybind11Extension("shoal.collective._gloo", ["csrc/gloo.cpp"], cxx_std=17,
                                         libraries=["gloo"], extra_compile_args=["-O3"]))

setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext})
