"""The glibc allocator settings: applied on glibc, skipped when the user opts out."""
import ctypes.util
import subprocess
import sys

import pytest

from shoal.kernels import tune_allocator


@pytest.mark.skipif(ctypes.util.find_library("c") is None or not sys.platform.startswith("linux"),
                    reason="needs glibc")
def test_tune_allocator_takes_on_glibc():
    assert tune_allocator() is True


def test_opt_out_keeps_the_defaults(monkeypatch):
    monkeypatch.setenv("SHOAL_MALLOC_TUNE", "0")
    assert tune_allocator() is False


def test_import_reports_the_opt_out():
    code = "import shoal.kernels as k; print(k.ALLOCATOR_TUNED)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={"SHOAL_MALLOC_TUNE": "0", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
