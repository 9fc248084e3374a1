"""Shared fixtures: a fixed seed per test, float32 default restored, the GPU skip marker."""
import pytest

import shoal
from shoal import kernels


def pytest_collection_modifyitems(config, items):
    if "cupy" in kernels.available_backends():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU with cupy (pip install -e '.[gpu]')")
    for item in items:
        if "requires_gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_engine_state():
    shoal.seed(0)
    shoal.set_default_dtype("float32")
    shoal.nn.initializer.set_global_initializer(None, None)
    yield
    shoal.set_default_dtype("float32")
    shoal.nn.initializer.set_global_initializer(None, None)
    kernels.set_default_backend("numpy")
