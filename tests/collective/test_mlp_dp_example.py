"""examples/mlp_dp.py: 2 ranks through spawn (as fleetrun --nproc_per_node 2 starts them), and
a plain `python examples/mlp_dp.py` (a world of one, no contract)."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shoal.launcher._spawn import spawn

pytest.importorskip("shoal.collective._gloo", reason="the Gloo binding is not built (libgloo-dev)")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "mlp_dp.py"
ARGS = ["--steps", "40", "--log-every", "20", "--samples", "4000", "--test-samples", "2000"]


def run_example(argv: list) -> dict:
    """In a spawned rank: the example loaded from its path, its run() with `argv`."""
    spec = importlib.util.spec_from_file_location("mlp_dp_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.run(argv)


def test_two_ranks_learn_the_task_and_end_with_identical_replicas():
    two = spawn(run_example, (ARGS,), nprocs=2, timeout=60)
    one = spawn(run_example, (ARGS,), nprocs=1, timeout=60)[0]
    assert two[0]["accuracy"] > 0.75, two[0]["accuracy"]   # 8 classes: chance is 0.125
    assert two[0]["accuracy"] == two[1]["accuracy"]        # one global count, not per rank
    assert two[0]["loss"] == two[1]["loss"]
    assert set(two[0]["params"]) == set(one["params"]) and two[0]["params"]
    for name, value in two[0]["params"].items():
        np.testing.assert_array_equal(value, two[1]["params"][name], err_msg=name)
        # each rank trains on half of the global batch: the same model one process trains
        np.testing.assert_allclose(value, one["params"][name], rtol=1e-4, atol=1e-5, err_msg=name)
    assert abs(two[0]["accuracy"] - one["accuracy"]) <= 0.01


def test_plain_python_runs_a_world_of_one():
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PADDLE_", "SHOAL_")) and k not in ("TRAINING_ROLE", "POD_IP")}
    res = subprocess.run([sys.executable, str(EXAMPLE), "--steps", "20", "--log-every", "10",
                          "--samples", "2000", "--test-samples", "1000"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "world of one" in res.stderr
    assert re.search(r"^step   10  loss \d+\.\d{4}$", res.stdout, re.M), res.stdout
    m = re.search(r"^final accuracy: (\d\.\d\d)$", res.stdout, re.M)
    assert m and float(m.group(1)) > 0.5, res.stdout
