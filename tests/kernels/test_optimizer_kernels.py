"""The in-place optimizer kernels of the numpy backend against the published formulas.

The references below follow Paddle's operator definitions (adam_op, adagrad_op,
momentum_op, lamb_op, lars_momentum_op) and are written independently of
shoal/kernels/_backend.py (e.g. Adam in Paddle's `lr_t` / `eps * sqrt(1 - beta2^t)` form).
"""
import math

import numpy as np
import pytest

from shoal.kernels import KernelShapeError, get_backend

NP = get_backend("numpy")
STEPS = 4


# -- references (float64, returning new arrays) ---------------------------------------------------
def ref_sgd(p, g, lr):
    return (p - lr * g,)


def ref_momentum(p, g, v, lr, momentum, nesterov=False):
    v = momentum * v + g
    p = p - lr * (g + momentum * v) if nesterov else p - lr * v
    return p, v


def ref_adam(p, g, m, v, lr, beta1, beta2, eps, step, weight_decay=0.0):
    p = p * (1.0 - lr * weight_decay)  # AdamW: decay the parameter before the Adam step
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    b1p, b2p = beta1 ** step, beta2 ** step
    lr_t = lr * math.sqrt(1 - b2p) / (1 - b1p)
    p = p - lr_t * m / (np.sqrt(v) + eps * math.sqrt(1 - b2p))
    return p, m, v


def ref_adagrad(p, g, moment, lr, eps):
    moment = moment + g * g
    return p - lr * g / (np.sqrt(moment) + eps), moment


def ref_lamb(p, g, m, v, lr, beta1, beta2, eps, step, weight_decay):
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    m_hat = m / (1 - beta1 ** step)
    v_hat = v / (1 - beta2 ** step)
    r = m_hat / (np.sqrt(v_hat) + eps) + weight_decay * p
    w_norm, r_norm = np.linalg.norm(p), np.linalg.norm(r)
    trust = w_norm / r_norm if w_norm > 0 and r_norm > 0 else 1.0
    return p - lr * trust * r, m, v


def ref_lars(p, g, v, lr, momentum, lars_coeff, weight_decay, eps):
    p_norm, g_norm = np.linalg.norm(p), np.linalg.norm(g)
    if p_norm > 0 and g_norm > 0:
        local_lr = lr * lars_coeff * p_norm / (g_norm + weight_decay * p_norm + eps)
    else:
        local_lr = lr
    v = momentum * v + local_lr * (g + weight_decay * p)
    return p - v, v


REFS = {"sgd_": ref_sgd, "momentum_": ref_momentum, "adam_": ref_adam, "adagrad_": ref_adagrad,
        "lamb_": ref_lamb, "lars_": ref_lars}

# (kernel, number of state arrays, hyperparameters; "step" is filled in per step)
CASES = {
    "sgd": ("sgd_", 0, dict(lr=0.1)),
    "momentum": ("momentum_", 1, dict(lr=0.05, momentum=0.9)),
    "momentum-nesterov": ("momentum_", 1, dict(lr=0.05, momentum=0.9, nesterov=True)),
    "adam": ("adam_", 2, dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8)),
    "adamw": ("adam_", 2, dict(lr=0.01, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.1)),
    "adagrad": ("adagrad_", 1, dict(lr=0.1, eps=1e-6)),
    "lamb": ("lamb_", 2, dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.0)),
    "lamb-wd": ("lamb_", 2, dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01)),
    "lars": ("lars_", 1, dict(lr=0.1, momentum=0.9, lars_coeff=0.001, weight_decay=0.0,
                              eps=0.0)),
    "lars-wd": ("lars_", 1, dict(lr=0.1, momentum=0.9, lars_coeff=0.02, weight_decay=0.0005,
                                 eps=1e-9)),
}
STEPPED = {"adam_", "lamb_"}


def _hparams(kernel, hp, step):
    return dict(hp, step=step) if kernel in STEPPED else dict(hp)


def _problem(n_states, shape=(5, 3), seed=0):
    rng = np.random.default_rng(seed)
    p = rng.normal(size=shape)
    grads = [rng.normal(size=shape) for _ in range(STEPS)]
    # states start at zero, as an optimizer creates them
    states = [np.zeros(shape) for _ in range(n_states)]
    return p, grads, states


def _run_reference(kernel, hp, p, grads, states):
    for step, g in enumerate(grads, start=1):
        p, *states = REFS[kernel](p, g, *states, **_hparams(kernel, hp, step))
    return p, states


@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_matches_reference_float64(case):
    kernel, n_states, hp = CASES[case]
    p0, grads, states0 = _problem(n_states)
    ref_p, ref_states = _run_reference(kernel, hp, p0, grads, states0)
    p, states = p0.copy(), [s.copy() for s in states0]
    for step, g in enumerate(grads, start=1):
        g_before = g.copy()
        assert getattr(NP, kernel)(p, g, *states, **_hparams(kernel, hp, step)) is None
        np.testing.assert_array_equal(g, g_before)  # the gradient is an input only
    np.testing.assert_allclose(p, ref_p, rtol=1e-12, atol=1e-14)
    for s, r in zip(states, ref_states):
        np.testing.assert_allclose(s, r, rtol=1e-12, atol=1e-14)
    assert not np.allclose(p, p0)  # the update did something


class Float32Only(np.ndarray):
    """An ndarray that records the dtype of every ufunc operand and result it meets.

    A numpy float64 scalar or array slipping into a float32 update shows up
    here even when an in-place ``param -= x`` would silently cast it back.
    """

    seen: list = []

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        def plain(x):
            return x.view(np.ndarray) if isinstance(x, Float32Only) else x

        for x in inputs:
            if isinstance(x, (np.ndarray, np.generic)):
                Float32Only.seen.append((ufunc.__name__, np.asarray(x).dtype))
        if out is not None:
            kwargs["out"] = tuple(plain(o) for o in out)
        result = getattr(ufunc, method)(*(plain(x) for x in inputs), **kwargs)
        results = result if isinstance(result, tuple) else (result,)
        for r in results:
            if isinstance(r, (np.ndarray, np.generic)):
                Float32Only.seen.append((ufunc.__name__, r.dtype))
        if out is not None:
            return out[0] if len(out) == 1 else out
        if isinstance(result, np.ndarray):
            return result.view(Float32Only)
        return result


def _f32(a):
    return np.asarray(a, dtype=np.float32).view(Float32Only)


@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_keeps_float32_float32(case):
    kernel, n_states, hp = CASES[case]
    p0, grads, states0 = _problem(n_states)
    p0 = p0.astype(np.float32)
    grads = [g.astype(np.float32) for g in grads]
    ref_p, ref_states = _run_reference(kernel, hp, p0.astype(np.float64),
                                       [g.astype(np.float64) for g in grads], states0)
    p, states = _f32(p0), [_f32(s) for s in states0]
    Float32Only.seen = []
    for step, g in enumerate(grads, start=1):
        getattr(NP, kernel)(p, _f32(g), *states, **_hparams(kernel, hp, step))
    leaks = sorted({name for name, dt in Float32Only.seen if dt == np.float64})
    assert Float32Only.seen, "the probe saw no ufunc: the check would be vacuous"
    assert not leaks, f"{kernel} computed in float64 inside: {leaks}"
    for a in [p] + states:
        assert a.dtype == np.float32
    np.testing.assert_allclose(p, ref_p, rtol=2e-5, atol=1e-6)
    for s, r in zip(states, ref_states):
        np.testing.assert_allclose(s, r, rtol=2e-5, atol=1e-6)


# -- the trust ratio is 1 where a norm is zero ----------------------------------------------------
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_lamb_zero_parameter_uses_trust_ratio_one(weight_decay):
    g = np.array([[0.5, -1.0], [2.0, 0.25]])
    p, m, v = np.zeros((2, 2)), np.zeros((2, 2)), np.zeros((2, 2))
    lr, beta1, beta2, eps = 0.1, 0.9, 0.999, 1e-6
    NP.lamb_(p, g, m, v, lr=lr, beta1=beta1, beta2=beta2, eps=eps, step=1,
             weight_decay=weight_decay)
    # step 1: m_hat = g, v_hat = g^2, so the update is g / (|g| + eps), taken with the full lr
    np.testing.assert_allclose(p, -lr * g / (np.abs(g) + eps), rtol=1e-12)
    ref_p, _, _ = ref_lamb(np.zeros((2, 2)), g, np.zeros((2, 2)), np.zeros((2, 2)), lr, beta1,
                           beta2, eps, 1, weight_decay)
    np.testing.assert_allclose(p, ref_p, rtol=1e-12)


def test_lamb_zero_gradient_and_no_decay_leaves_parameter():
    p = np.array([1.0, -2.0, 3.0])
    m, v = np.zeros(3), np.zeros(3)
    NP.lamb_(p, np.zeros(3), m, v, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-6, step=1,
             weight_decay=0.0)
    np.testing.assert_array_equal(p, [1.0, -2.0, 3.0])
    assert np.all(np.isfinite(m)) and np.all(np.isfinite(v))


@pytest.mark.parametrize("weight_decay", [0.0, 0.0005])
def test_lars_zero_parameter_uses_trust_ratio_one(weight_decay):
    g = np.array([0.5, -1.0, 2.0])
    p, vel = np.zeros(3), np.zeros(3)
    NP.lars_(p, g, vel, lr=0.1, momentum=0.9, lars_coeff=0.001, weight_decay=weight_decay,
             eps=0.0)
    # both norms positive is required for the layer-wise lr; otherwise it is lr itself
    np.testing.assert_allclose(vel, 0.1 * g, rtol=1e-12)
    np.testing.assert_allclose(p, -0.1 * g, rtol=1e-12)


def test_lars_zero_gradient_uses_trust_ratio_one():
    p, vel = np.array([3.0, 4.0]), np.zeros(2)
    NP.lars_(p, np.zeros(2), vel, lr=0.1, momentum=0.9, lars_coeff=0.001, weight_decay=0.5,
             eps=0.0)
    np.testing.assert_allclose(vel, 0.1 * 0.5 * np.array([3.0, 4.0]), rtol=1e-12)
    np.testing.assert_allclose(p, np.array([3.0, 4.0]) * (1 - 0.05), rtol=1e-12)


def test_lars_layerwise_lr_value():
    p, g, vel = np.array([3.0, 4.0]), np.array([0.0, 2.0]), np.zeros(2)  # |p| = 5, |g| = 2
    NP.lars_(p, g, vel, lr=0.5, momentum=0.9, lars_coeff=0.01, weight_decay=0.1, eps=0.0)
    local_lr = 0.5 * 0.01 * 5.0 / (2.0 + 0.1 * 5.0)
    np.testing.assert_allclose(vel, local_lr * (g + 0.1 * np.array([3.0, 4.0])), rtol=1e-12)


# -- rows_update_ ---------------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(CASES))
def test_rows_update_touches_only_named_rows(case):
    kernel, n_states, hp = CASES[case]
    rng = np.random.default_rng(1)
    vocab, dim = 9, 4
    param = rng.normal(size=(vocab, dim)).astype(np.float32)
    states = [rng.uniform(0.1, 1.0, size=(vocab, dim)).astype(np.float32)
              for _ in range(n_states)]
    ids = np.array([7, 2, 4], dtype=np.int64)  # unique, unsorted
    others = np.setdiff1d(np.arange(vocab), ids)
    param0, states0 = param.copy(), [s.copy() for s in states]
    for step in (1, 2, 3):
        grad_rows = rng.normal(size=(3, dim)).astype(np.float32)
        # the expected rows: the dense kernel on copies of just those rows
        exp_p = param[ids].copy()
        exp_s = [s[ids].copy() for s in states]
        getattr(NP, kernel)(exp_p, grad_rows.copy(), *exp_s, **_hparams(kernel, hp, step))
        NP.rows_update_(kernel, param, ids, grad_rows, *states, **_hparams(kernel, hp, step))
        np.testing.assert_array_equal(param[ids], exp_p)
        for s, e in zip(states, exp_s):
            np.testing.assert_array_equal(s[ids], e)
    # rows not named are bit-identical, in the parameter and in every state array
    np.testing.assert_array_equal(param[others], param0[others])
    for s, s0 in zip(states, states0):
        np.testing.assert_array_equal(s[others], s0[others])
    assert not np.array_equal(param[ids], param0[ids])
    assert param.dtype == np.float32 and all(s.dtype == np.float32 for s in states)


def test_rows_update_adam_matches_reference_rows():
    rng = np.random.default_rng(2)
    param = rng.normal(size=(6, 2))
    m, v = np.zeros((6, 2)), np.zeros((6, 2))
    ids = np.array([0, 5])
    g = rng.normal(size=(2, 2))
    hp = dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, step=1)
    ref_p, ref_m, ref_v = ref_adam(param[ids], g, m[ids], v[ids], **hp)
    before = param.copy()
    NP.rows_update_("adam_", param, ids, g, m, v, **hp)
    np.testing.assert_allclose(param[ids], ref_p, rtol=1e-12)
    np.testing.assert_allclose(m[ids], ref_m, rtol=1e-12)
    np.testing.assert_allclose(v[ids], ref_v, rtol=1e-12)
    np.testing.assert_array_equal(param[1:5], before[1:5])
    np.testing.assert_array_equal(m[1:5], 0.0)
    np.testing.assert_array_equal(v[1:5], 0.0)


def test_rows_update_rejects_mismatched_rows():
    param = np.zeros((4, 2))
    with pytest.raises(KernelShapeError, match=r"\(3,\).*\(2, 2\)"):
        NP.rows_update_("sgd_", param, np.array([0, 1, 2]), np.ones((2, 2)), lr=0.1)
    np.testing.assert_array_equal(param, 0.0)
