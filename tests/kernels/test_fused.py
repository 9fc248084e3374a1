"""The fused native updates of the numpy backend agree with the generic numpy bodies."""
import numpy as np
import pytest

from shoal.kernels import get_backend
from shoal.kernels._backend import Backend

NP = get_backend("numpy")

CASES = {
    "sgd_": ([], dict(lr=0.1)),
    "momentum_": (["velocity"], dict(lr=0.1, momentum=0.9, nesterov=False)),
    "momentum_nesterov": (["velocity"], dict(lr=0.1, momentum=0.9, nesterov=True)),
    "adam_": (["m", "v"], dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, step=None,
                               weight_decay=0.0)),
    "adamw": (["m", "v"], dict(lr=0.01, beta1=0.9, beta2=0.99, eps=1e-6, step=None,
                               weight_decay=0.1)),
    "adagrad_": (["acc"], dict(lr=0.1, eps=1e-6)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_matches_generic_over_steps(case):
    kernel = {"momentum_nesterov": "momentum_", "adamw": "adam_"}.get(case, case)
    states, hp = CASES[case]
    rng = np.random.default_rng(0)
    p_fused = rng.normal(size=1000).astype(np.float32)
    p_ref = p_fused.copy()
    s_fused = [np.zeros_like(p_fused) for _ in states]
    s_ref = [np.zeros_like(p_fused) for _ in states]
    for step in range(1, 6):
        g = rng.normal(size=1000).astype(np.float32)
        kw = dict(hp, step=step) if "step" in hp else hp
        getattr(NP, kernel)(p_fused, g, *s_fused, **kw)
        getattr(Backend, kernel)(NP, p_ref, g, *s_ref, **kw)  # the generic numpy body
        np.testing.assert_allclose(p_fused, p_ref, rtol=2e-6, atol=1e-7)
        for a, b in zip(s_fused, s_ref):
            np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-9)
    assert p_fused.dtype == np.float32


def test_non_contiguous_or_float64_arrays_take_the_generic_path():
    p = np.ones((4, 6), np.float32)[:, ::2]  # a strided view
    g = np.ones((4, 3), np.float32)
    NP.sgd_(p, g, 0.5)
    assert np.all(p == 0.5)
    p64 = np.ones(3)
    NP.sgd_(p64, np.ones(3), 0.25)
    assert p64.dtype == np.float64 and np.all(p64 == 0.75)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_all_finite_finds_any_non_finite_value(bad):
    a = np.zeros(10001, np.float32)
    assert NP.all_finite(a)
    a[7777] = bad
    assert not NP.all_finite(a)
    assert not NP.all_finite(a.astype(np.float64))  # the generic path agrees
    assert NP.all_finite(np.zeros(0, np.float32))
