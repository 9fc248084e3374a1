"""`import shoal` stays light: the PS, collectives, launcher, Ray and Gloo load only when used."""
import subprocess
import sys


def test_import_shoal_loads_no_ps_collective_ray_or_gloo():
    code = ("import sys, shoal; heavy = [m for m in sys.modules if m.split('.')[0] in "
            "('zmq', 'ray', 'pygloo') or m.startswith(('shoal.ps', 'shoal.collective', "
            "'shoal.launcher', 'shoal.fleet'))]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_shoal_fleet_loads_on_first_use():
    code = "import shoal; f = shoal.fleet; print(f.init.__module__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "shoal.fleet", out.stderr
