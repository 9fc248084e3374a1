"""Optimizers, gradient clipping, sparse updates, LR schedulers and optimizer state.

Every optimizer is driven through `shoal.optimizer` on float64 Parameters whose
`.grad` is set by hand, and compared with a numpy reference of Paddle's formula.
"""
import copy
import math

import numpy as np
import pytest

import shoal
from shoal import nn
from shoal.optimizer import lr as lr_sched
from shoal.worker.sparse import SparseGrad
from tests.kernels.test_optimizer_kernels import (ref_adagrad, ref_adam, ref_lamb, ref_lars,
                                                  ref_momentum)

opt_mod = shoal.optimizer
STEPS = 4
TOL = dict(rtol=1e-11, atol=1e-13)


def _param(arr, name):
    return nn.Parameter(np.asarray(arr, dtype=np.float64), name=name, dtype="float64")


def _problem(names=("fc.w_0", "fc.b_0"), shapes=((4, 3), (3,)), seed=0):
    """Parameters plus STEPS gradients for each (as float64 numpy arrays)."""
    rng = np.random.default_rng(seed)
    init = [rng.normal(size=s) for s in shapes]
    grads = [[rng.normal(size=s) for s in shapes] for _ in range(STEPS)]
    params = [_param(a, n) for a, n in zip(init, names)]
    return params, init, grads


def _drive(opt, params, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g
        opt.step()
        opt.clear_grad()


def _check(params, expected):
    for p, e in zip(params, expected):
        assert p.dtype == np.float64
        np.testing.assert_allclose(p.numpy(), e, **TOL, err_msg=p.name)


# -- each optimizer against its reference ---------------------------------------------------------
@pytest.mark.parametrize("wd", [None, 0.01])
def test_sgd(wd):
    params, init, grads = _problem()
    _drive(opt_mod.SGD(0.1, parameters=params, weight_decay=wd), params, grads)
    wd = wd or 0.0
    exp = [a.copy() for a in init]
    for step_grads in grads:
        exp = [p - 0.1 * (g + wd * p) for p, g in zip(exp, step_grads)]
    _check(params, exp)


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("wd", [None, 0.01])
def test_momentum(nesterov, wd):
    params, init, grads = _problem()
    opt = opt_mod.Momentum(0.05, momentum=0.9, parameters=params, use_nesterov=nesterov,
                           weight_decay=wd)
    _drive(opt, params, grads)
    wd = wd or 0.0
    exp, vel = [a.copy() for a in init], [np.zeros_like(a) for a in init]
    for step_grads in grads:
        for i, g in enumerate(step_grads):
            exp[i], vel[i] = ref_momentum(exp[i], g + wd * exp[i], vel[i], 0.05, 0.9, nesterov)
    _check(params, exp)


@pytest.mark.parametrize("wd", [None, 0.01])
def test_adam_with_coupled_l2(wd):
    params, init, grads = _problem()
    opt = opt_mod.Adam(0.01, beta1=0.8, beta2=0.99, epsilon=1e-7, parameters=params,
                       weight_decay=wd)
    _drive(opt, params, grads)
    wd = wd or 0.0
    exp = [a.copy() for a in init]
    m, v = [np.zeros_like(a) for a in init], [np.zeros_like(a) for a in init]
    for step, step_grads in enumerate(grads, start=1):
        for i, g in enumerate(step_grads):
            exp[i], m[i], v[i] = ref_adam(exp[i], g + wd * exp[i], m[i], v[i], 0.01, 0.8, 0.99,
                                          1e-7, step)
    _check(params, exp)


def test_adam_defaults_are_paddles():
    params, _, _ = _problem()
    opt = opt_mod.Adam(parameters=params)
    assert (opt.get_lr(), opt.beta1, opt.beta2, opt.epsilon) == (0.001, 0.9, 0.999, 1e-8)


@pytest.mark.parametrize("use_fun", [False, True])
def test_adamw_decoupled_decay_and_apply_decay_param_fun(use_fun):
    params, init, grads = _problem()
    seen_names = []

    def decays(name):
        seen_names.append(name)
        return not name.endswith("b_0")

    opt = opt_mod.AdamW(0.01, parameters=params, weight_decay=0.1,
                        apply_decay_param_fun=decays if use_fun else None)
    _drive(opt, params, grads)
    wds = [0.1, 0.0 if use_fun else 0.1]
    exp = [a.copy() for a in init]
    m, v = [np.zeros_like(a) for a in init], [np.zeros_like(a) for a in init]
    for step, step_grads in enumerate(grads, start=1):
        for i, g in enumerate(step_grads):
            exp[i], m[i], v[i] = ref_adam(exp[i], g, m[i], v[i], 0.01, 0.9, 0.999, 1e-8, step,
                                          weight_decay=wds[i])
    _check(params, exp)
    if use_fun:
        assert set(seen_names) == {"fc.w_0", "fc.b_0"}  # called with parameter names


def test_adamw_default_weight_decay_is_001():
    params, init, grads = _problem()
    _drive(opt_mod.AdamW(0.01, parameters=params), params, grads[:1])
    exp = [ref_adam(a, g, 0 * a, 0 * a, 0.01, 0.9, 0.999, 1e-8, 1, weight_decay=0.01)[0]
           for a, g in zip(init, grads[0])]
    _check(params, exp)


@pytest.mark.parametrize("initial", [0.0, 0.1])
def test_adagrad_with_initial_accumulator_value(initial):
    params, init, grads = _problem()
    opt = opt_mod.Adagrad(0.1, epsilon=1e-6, parameters=params,
                          initial_accumulator_value=initial)
    _drive(opt, params, grads)
    exp = [a.copy() for a in init]
    acc = [np.full_like(a, initial) for a in init]
    for step_grads in grads:
        for i, g in enumerate(step_grads):
            exp[i], acc[i] = ref_adagrad(exp[i], g, acc[i], 0.1, 1e-6)
    _check(params, exp)
    st = opt.state_dict()["state"]
    np.testing.assert_allclose(st["0.moment"], acc[0], **TOL)


LAMB_NAMES = ("fc.w_0", "fc.b_0", "layer_norm_0.w_0")
LAMB_SHAPES = ((4, 3), (3,), (3,))


@pytest.mark.parametrize("exclude", ["none", "fn", "names", "both"])
def test_lamb_with_exclusions(exclude):
    params, init, grads = _problem(LAMB_NAMES, LAMB_SHAPES)
    fn = (lambda p: p.name.endswith("b_0")) if exclude in ("fn", "both") else None
    names = ["layer_norm"] if exclude in ("names", "both") else None
    opt = opt_mod.Lamb(0.01, lamb_weight_decay=0.05, parameters=params,
                       exclude_from_weight_decay_fn=fn, exclude_from_weight_decay=names)
    _drive(opt, params, grads)
    wds = [0.05,
           0.0 if fn else 0.05,
           0.0 if names else 0.05]
    exp = [a.copy() for a in init]
    m, v = [np.zeros_like(a) for a in init], [np.zeros_like(a) for a in init]
    for step, step_grads in enumerate(grads, start=1):
        for i, g in enumerate(step_grads):
            exp[i], m[i], v[i] = ref_lamb(exp[i], g, m[i], v[i], 0.01, 0.9, 0.999, 1e-6, step,
                                          wds[i])
    _check(params, exp)


@pytest.mark.parametrize("exclude", [None, ["b_0"]])
def test_lars_with_exclusions(exclude):
    params, init, grads = _problem()
    opt = opt_mod.Lars(0.1, momentum=0.9, lars_coeff=0.01, lars_weight_decay=0.01,
                       parameters=params, exclude_from_weight_decay=exclude, epsilon=1e-9)
    _drive(opt, params, grads)
    wds = [0.01, 0.0 if exclude else 0.01]
    exp, vel = [a.copy() for a in init], [np.zeros_like(a) for a in init]
    for step_grads in grads:
        for i, g in enumerate(step_grads):
            exp[i], vel[i] = ref_lars(exp[i], g, vel[i], 0.1, 0.9, 0.01, wds[i], 1e-9)
    _check(params, exp)


def test_parameters_without_grad_or_not_trainable_are_left_alone():
    params, init, grads = _problem()
    frozen = nn.Parameter(np.ones(3), name="frozen", trainable=False, dtype="float64")
    frozen.grad = np.ones(3)  # even with a gradient set by hand
    opt = opt_mod.Momentum(0.1, parameters=params + [frozen])
    params[0].grad = grads[0][0]  # params[1] has no gradient
    opt.step()
    np.testing.assert_array_equal(params[1].numpy(), init[1])
    np.testing.assert_array_equal(frozen.numpy(), np.ones(3))
    assert not np.array_equal(params[0].numpy(), init[0])


# -- gradient clipping ----------------------------------------------------------------------------
def test_clip_grad_by_global_norm_scales_all_grads_together():
    a = _param(np.zeros((2, 2)), "a")
    b = _param(np.zeros(3), "b")
    ga, gb = np.array([[1.0, 2.0], [2.0, 1.0]]), np.array([0.0, 3.0, -4.0])
    norm = math.sqrt(10 + 25)
    clip = nn.ClipGradByGlobalNorm(2.0)
    opt = opt_mod.SGD(1.0, parameters=[a, b], grad_clip=clip)
    a.grad, b.grad = ga, gb
    opt.step()
    scale = 2.0 / max(norm, 2.0)
    np.testing.assert_allclose(a.numpy(), -scale * ga, **TOL)
    np.testing.assert_allclose(b.numpy(), -scale * gb, **TOL)
    np.testing.assert_allclose(math.sqrt(np.sum(a.numpy() ** 2) + np.sum(b.numpy() ** 2)), 2.0)


def test_clip_grad_by_global_norm_leaves_small_grads():
    a = _param(np.zeros(3), "a")
    opt = opt_mod.SGD(1.0, parameters=[a], grad_clip=nn.ClipGradByGlobalNorm(100.0))
    a.grad = np.array([1.0, -2.0, 3.0])
    opt.step()
    np.testing.assert_array_equal(a.numpy(), [-1.0, 2.0, -3.0])


def test_clip_grad_by_global_norm_merges_sparse_duplicates_before_the_norm():
    dense = _param(np.zeros((2, 2)), "dense")
    table = _param(np.zeros((5, 2)), "table")
    g_dense = np.array([[1.0, 2.0], [2.0, 1.0]])                  # |.|^2 = 10
    ids = np.array([1, 1, 3])
    rows = np.array([[3.0, 0.0], [3.0, 0.0], [0.0, 4.0]])          # merged: (6, 0) and (0, 4)
    norm = math.sqrt(10 + 36 + 16)  # not sqrt(10 + 9 + 9 + 16): duplicates are summed first
    opt = opt_mod.SGD(1.0, parameters=[dense, table], grad_clip=nn.ClipGradByGlobalNorm(1.5))
    dense.grad = g_dense
    table.grad = SparseGrad(ids, rows, (5, 2))
    opt.step()
    scale = 1.5 / norm
    np.testing.assert_allclose(dense.numpy(), -scale * g_dense, **TOL)
    expected_table = np.zeros((5, 2))
    expected_table[1] = -scale * np.array([6.0, 0.0])
    expected_table[3] = -scale * np.array([0.0, 4.0])
    np.testing.assert_allclose(table.numpy(), expected_table, **TOL)


def test_clip_grad_by_global_norm_rejects_non_positive():
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="clip_norm"):
            nn.ClipGradByGlobalNorm(bad)


# -- sparse (embedding) gradients -----------------------------------------------------------------
def _embedding_step(emb, ids, coeff):
    out = emb(ids)
    (out * shoal.to_tensor(coeff)).sum().backward()


def _expected_row_grads(ids, coeff, vocab, dim):
    g = np.zeros((vocab, dim))
    for pos, i in enumerate(ids.reshape(-1)):
        g[i] += coeff.reshape(-1, dim)[pos]
    return g


@pytest.mark.parametrize("wd", [None, 0.1])
def test_embedding_sgd_updates_only_looked_up_rows_and_sums_duplicates(wd):
    shoal.set_default_dtype("float64")
    emb = nn.Embedding(10, 3)
    w0 = emb.weight.numpy().copy()
    ids = np.array([[2, 5], [2, 7]])  # 2 twice
    coeff = np.random.default_rng(0).normal(size=(2, 2, 3))
    opt = opt_mod.SGD(0.1, parameters=emb.parameters(), weight_decay=wd)
    _embedding_step(emb, ids, coeff)
    grad = emb.weight.grad
    assert isinstance(grad, SparseGrad)
    g = _expected_row_grads(ids, coeff, 10, 3)
    np.testing.assert_allclose(g[2], coeff[0, 0] + coeff[1, 0])
    np.testing.assert_allclose(grad.to_dense(), g, **TOL)
    opt.step()
    w = emb.weight.numpy()
    touched = [2, 5, 7]
    untouched = [i for i in range(10) if i not in touched]
    # coupled L2 decay reaches only the looked-up rows (as Paddle's sparse regularization)
    decay = (wd or 0.0) * w0[touched]
    np.testing.assert_allclose(w[touched], w0[touched] - 0.1 * (g[touched] + decay), **TOL)
    np.testing.assert_array_equal(w[untouched], w0[untouched])


def test_embedding_adam_lazy_updates_only_looked_up_rows():
    shoal.set_default_dtype("float64")
    emb = nn.Embedding(10, 3)
    w0 = emb.weight.numpy().copy()
    opt = opt_mod.Adam(0.01, parameters=emb.parameters())
    rng = np.random.default_rng(1)
    batches = [np.array([2, 5, 2, 7]), np.array([3, 2, 3])]
    exp, m, v = w0.copy(), np.zeros((10, 3)), np.zeros((10, 3))
    for step, ids in enumerate(batches, start=1):
        coeff = rng.normal(size=(len(ids), 3))
        _embedding_step(emb, ids, coeff)
        opt.step()
        opt.clear_grad()
        g = _expected_row_grads(ids, coeff, 10, 3)
        rows = np.unique(ids)
        # lazy mode: only these rows move, with the parameter's step count for bias correction
        exp[rows], m[rows], v[rows] = ref_adam(exp[rows], g[rows], m[rows], v[rows], 0.01, 0.9,
                                               0.999, 1e-8, step)
        w = emb.weight.numpy()
        np.testing.assert_allclose(w[rows], exp[rows], **TOL)
    untouched = [0, 1, 4, 6, 8, 9]
    np.testing.assert_array_equal(emb.weight.numpy()[untouched], w0[untouched])
    np.testing.assert_allclose(emb.weight.numpy(), exp, **TOL)
    state = opt.state_dict()["state"]
    np.testing.assert_array_equal(state["0.moment1"][untouched], 0.0)
    np.testing.assert_array_equal(state["0.moment2"][untouched], 0.0)


# -- learning rate --------------------------------------------------------------------------------
def test_get_lr_and_set_lr():
    params, init, grads = _problem()
    opt = opt_mod.SGD(0.1, parameters=params)
    assert opt.get_lr() == 0.1
    opt.set_lr(0.5)
    assert opt.get_lr() == 0.5
    params[0].grad = grads[0][0]
    opt.step()
    np.testing.assert_allclose(params[0].numpy(), init[0] - 0.5 * grads[0][0], **TOL)
    with pytest.raises(ValueError, match="-1"):
        opt.set_lr(-1.0)
    assert opt.get_lr() == 0.5


def test_set_lr_with_a_scheduler_raises():
    params, _, _ = _problem()
    sched = lr_sched.StepDecay(0.1, step_size=2)
    opt = opt_mod.SGD(sched, parameters=params)
    with pytest.raises(TypeError, match="StepDecay"):
        opt.set_lr(0.5)
    assert opt.get_lr() == 0.1
    assert opt.lr_scheduler is sched


def test_optimizer_follows_its_scheduler():
    params, init, grads = _problem()
    sched = lr_sched.StepDecay(0.1, step_size=1, gamma=0.5)
    opt = opt_mod.SGD(sched, parameters=params[:1])
    exp = init[0].copy()
    for step_grads in grads:
        assert opt.get_lr() == sched()
        params[0].grad = step_grads[0]
        opt.step()
        exp = exp - sched() * step_grads[0]
        sched.step()
    np.testing.assert_allclose(params[0].numpy(), exp, **TOL)


def test_step_decay_values():
    sched = lr_sched.StepDecay(0.5, step_size=3, gamma=0.1)
    got = []
    for _ in range(10):
        got.append(sched())
        sched.step()
    want = [0.5] * 3 + [0.05] * 3 + [0.005] * 3 + [0.0005]
    assert got == pytest.approx(want, rel=1e-12)
    assert sched.last_epoch == 10


def _paddle_cosine(base, t_max, eta_min, n):
    """Paddle's CosineAnnealingDecay.get_lr, which is recursive in the last lr."""
    out, last = [], None
    for e in range(n):
        if e == 0:
            lr = base
        elif (e - 1 - t_max) % (2 * t_max) == 0:
            lr = last + (base - eta_min) * (1 - math.cos(math.pi / t_max)) / 2
        else:
            lr = ((1 + math.cos(math.pi * e / t_max)) / (1 + math.cos(math.pi * (e - 1) / t_max))
                  * (last - eta_min) + eta_min)
        out.append(lr)
        last = lr
    return out


def test_cosine_annealing_values():
    sched = lr_sched.CosineAnnealingDecay(0.1, T_max=10, eta_min=0.01)
    got = []
    for _ in range(35):  # past T_max: the cosine rises again, as in Paddle
        got.append(sched())
        sched.step()
    want = _paddle_cosine(0.1, 10, 0.01, 35)
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert got[0] == pytest.approx(0.1) and got[10] == pytest.approx(0.01)
    assert got[5] == pytest.approx(0.01 + 0.09 / 2)


def test_linear_warmup_to_a_number():
    sched = lr_sched.LinearWarmup(0.5, warmup_steps=4, start_lr=0.0, end_lr=0.5)
    got = []
    for _ in range(8):
        got.append(sched())
        sched.step()
    assert got == pytest.approx([0.0, 0.125, 0.25, 0.375, 0.5, 0.5, 0.5, 0.5], rel=1e-12)


def test_linear_warmup_then_inner_scheduler():
    inner = lr_sched.StepDecay(0.5, step_size=2, gamma=0.5)
    sched = lr_sched.LinearWarmup(inner, warmup_steps=3, start_lr=0.1, end_lr=0.5)
    got = []
    for _ in range(9):
        got.append(sched())
        sched.step()
    # the inner scheduler starts at its epoch 0 when the warm-up ends
    want = [0.1, 0.1 + 0.4 / 3, 0.1 + 0.8 / 3, 0.5, 0.5, 0.25, 0.25, 0.125, 0.125]
    assert got == pytest.approx(want, rel=1e-12)


def test_scheduler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="step_size"):
        lr_sched.StepDecay(0.1, step_size=0)
    with pytest.raises(ValueError, match="T_max"):
        lr_sched.CosineAnnealingDecay(0.1, T_max=0)
    with pytest.raises(ValueError, match="warmup_steps"):
        lr_sched.LinearWarmup(0.1, warmup_steps=0, start_lr=0.0, end_lr=0.1)
    with pytest.raises(ValueError, match="learning_rate"):
        lr_sched.StepDecay(-0.1, step_size=2)


# -- optimizer state ------------------------------------------------------------------------------
def _model(seed):
    shoal.seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def _batches(n, seed=5):
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(6, 4)).astype(np.float32), rng.integers(0, 3, size=6))
            for _ in range(n)]


def _train_step(model, opt, batch):
    x, y = batch
    loss = nn.functional.cross_entropy(model(shoal.to_tensor(x)), y)
    loss.backward()
    opt.step()
    opt.clear_grad()


OPTIMIZERS = {
    "momentum": lambda ps: opt_mod.Momentum(0.05, momentum=0.9, parameters=ps,
                                            weight_decay=0.001),
    "adam": lambda ps: opt_mod.Adam(0.01, parameters=ps),
    "adamw-scheduled": lambda ps: opt_mod.AdamW(lr_sched.StepDecay(0.01, step_size=2),
                                                parameters=ps),
    "adagrad": lambda ps: opt_mod.Adagrad(0.05, parameters=ps, initial_accumulator_value=0.1),
    "lamb": lambda ps: opt_mod.Lamb(0.01, parameters=ps),
    "lars": lambda ps: opt_mod.Lars(0.1, parameters=ps),
}


def _step_sched(opt):
    if opt.lr_scheduler is not None:
        opt.lr_scheduler.step()


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_state_round_trip_through_a_checkpoint_continues_bit_identically(kind, tmp_path):
    batches = _batches(6)
    model = _model(1)
    opt = OPTIMIZERS[kind](model.parameters())
    for b in batches[:3]:
        _train_step(model, opt, b)
        _step_sched(opt)
    shoal.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.npz")
    for b in batches[3:]:  # the uninterrupted run
        _train_step(model, opt, b)
        _step_sched(opt)

    fresh = _model(2)  # another initialization, overwritten by the checkpoint
    fresh_opt = OPTIMIZERS[kind](fresh.parameters())
    ckpt = shoal.load(tmp_path / "ckpt.npz")
    fresh.set_state_dict(ckpt["model"])
    fresh_opt.set_state_dict(ckpt["opt"])
    for b in batches[3:]:
        _train_step(fresh, fresh_opt, b)
        _step_sched(fresh_opt)
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        np.testing.assert_array_equal(q.numpy(), p.numpy(), err_msg=name)
    assert fresh_opt.get_lr() == opt.get_lr()


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_state_round_trip_in_memory_continues_bit_identically(kind):
    """Loading copies the state: the source optimizer training on does not disturb the copy."""
    batches = _batches(6)
    model = _model(1)
    opt = OPTIMIZERS[kind](model.parameters())
    for b in batches[:3]:
        _train_step(model, opt, b)
        _step_sched(opt)
    fresh = _model(2)
    fresh_opt = OPTIMIZERS[kind](fresh.parameters())
    fresh.set_state_dict(model.state_dict())
    fresh_opt.set_state_dict(opt.state_dict())
    for b in batches[3:]:  # both runs go on, step by step
        _train_step(model, opt, b)
        _step_sched(opt)
        _train_step(fresh, fresh_opt, b)
        _step_sched(fresh_opt)
        for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
            np.testing.assert_array_equal(q.numpy(), p.numpy(), err_msg=name)


def _snapshot(opt):
    sd = opt.state_dict()
    return {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in sd["state"].items()}, \
        opt.get_lr()


def _assert_unchanged(opt, snap):
    state, lr = _snapshot(opt)
    assert state.keys() == snap[0].keys()
    for k in state:
        np.testing.assert_array_equal(state[k], snap[0][k], err_msg=k)
    assert lr == snap[1]


@pytest.fixture
def trained_pair():
    """An Adam that took two steps, and a state dict (of another run) to load into it."""
    model = _model(1)
    opt = opt_mod.Adam(0.01, parameters=model.parameters())
    for b in _batches(2):
        _train_step(model, opt, b)
    other = _model(3)
    other_opt = opt_mod.Adam(0.02, parameters=other.parameters())
    for b in _batches(3, seed=9):
        _train_step(other, other_opt, b)
    sd = other_opt.state_dict()
    sd = {"state": {k: (v.copy() if isinstance(v, np.ndarray) else v)
                    for k, v in sd["state"].items()},
          "num_params": sd["num_params"], "lr": sd["lr"]}
    return model, opt, sd


def test_set_state_dict_wrong_number_of_params_raises_and_changes_nothing(trained_pair):
    model, opt, sd = trained_pair
    snap = _snapshot(opt)
    sd["num_params"] = 3
    for k in [k for k in sd["state"] if k.startswith("3.")]:
        del sd["state"][k]
    with pytest.raises(shoal.StateDictError, match="3 parameters.*4"):
        opt.set_state_dict(sd)
    _assert_unchanged(opt, snap)


def test_set_state_dict_into_an_optimizer_over_fewer_params_raises(trained_pair):
    model, _, sd = trained_pair
    small = opt_mod.Adam(0.01, parameters=model.parameters()[:2])
    with pytest.raises(shoal.StateDictError, match="4 parameters.*2"):
        small.set_state_dict(sd)
    assert small.state_dict()["state"] == {}


def test_set_state_dict_wrong_slot_shape_raises_and_changes_nothing(trained_pair):
    model, opt, sd = trained_pair
    snap = _snapshot(opt)
    sd["state"]["3.moment2"] = np.zeros((2, 2))  # the last key checked: the rest are fine
    with pytest.raises(shoal.ShapeError) as err:
        opt.set_state_dict(sd)
    msg = str(err.value)
    assert "'3.moment2'" in msg and "(2, 2)" in msg and "(3,)" in msg
    _assert_unchanged(opt, snap)


@pytest.mark.parametrize("key", ["3.velocity", "9.moment1", "moment1", "x.step"])
def test_set_state_dict_unknown_key_raises_and_changes_nothing(trained_pair, key):
    model, opt, sd = trained_pair
    snap = _snapshot(opt)
    sd["state"][key] = np.zeros(3)
    with pytest.raises(shoal.StateDictError, match=repr(key)):
        opt.set_state_dict(sd)
    _assert_unchanged(opt, snap)


def test_set_state_dict_missing_slot_raises_and_changes_nothing(trained_pair):
    model, opt, sd = trained_pair
    snap = _snapshot(opt)
    del sd["state"]["1.moment1"]
    with pytest.raises(shoal.StateDictError, match="moment1"):
        opt.set_state_dict(sd)
    _assert_unchanged(opt, snap)


def test_set_state_dict_rejects_what_is_not_a_state_dict(trained_pair):
    _, opt, _ = trained_pair
    with pytest.raises(shoal.StateDictError):
        opt.set_state_dict({"0.weight": np.zeros(3)})


# -- argument checks ------------------------------------------------------------------------------
def _ps():
    return [_param(np.zeros(3), "w")]


@pytest.mark.parametrize("make, name", [
    (lambda: opt_mod.SGD(-0.1, parameters=_ps()), "learning_rate"),
    (lambda: opt_mod.Adam(-1.0, parameters=_ps()), "learning_rate"),
    (lambda: opt_mod.Adam(0.1, beta1=1.0, parameters=_ps()), "beta1"),
    (lambda: opt_mod.Adam(0.1, beta1=1.5, parameters=_ps()), "beta1"),
    (lambda: opt_mod.AdamW(0.1, beta2=1.0, parameters=_ps()), "beta2"),
    (lambda: opt_mod.Lamb(0.1, beta1=1.0, parameters=_ps()), "beta1"),
    (lambda: opt_mod.Adam(0.1, epsilon=0.0, parameters=_ps()), "epsilon"),
    (lambda: opt_mod.Momentum(0.1, momentum=-0.5, parameters=_ps()), "momentum"),
    (lambda: opt_mod.Adagrad(0.1, parameters=_ps(), initial_accumulator_value=-1.0),
     "initial_accumulator_value"),
    (lambda: opt_mod.Lars(0.1, lars_coeff=0.0, parameters=_ps()), "lars_coeff"),
    (lambda: opt_mod.SGD(0.1), "parameters"),
    (lambda: opt_mod.Adam(0.1, parameters=None), "parameters"),
    (lambda: opt_mod.Lamb(0.1), "parameters"),
])
def test_invalid_hyperparameters_raise_value_error_naming_them(make, name):
    with pytest.raises(ValueError, match=name):
        make()


def test_parameter_listed_twice_raises():
    p = _param(np.zeros(3), "w")
    with pytest.raises(ValueError, match="twice"):
        opt_mod.SGD(0.1, parameters=[p, p])


# -- gradients accumulate until clear_grad --------------------------------------------------------
def test_two_backwards_then_one_step_equals_one_step_with_doubled_grads():
    a = _model(1)
    b = copy.deepcopy(a)
    opt_a = opt_mod.Momentum(0.1, momentum=0.9, parameters=a.parameters(), weight_decay=0.01)
    opt_b = opt_mod.Momentum(0.1, momentum=0.9, parameters=b.parameters(), weight_decay=0.01)
    x, y = _batches(1)[0]
    for _ in range(2):
        nn.functional.cross_entropy(a(shoal.to_tensor(x)), y).backward()
    nn.functional.cross_entropy(b(shoal.to_tensor(x)), y).backward()
    for p in b.parameters():
        p.grad = p.grad.numpy() * 2
    for pa, pb in zip(a.parameters(), b.parameters()):
        np.testing.assert_array_equal(pa.grad.numpy(), pb.grad.numpy())
    opt_a.step()
    opt_b.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        np.testing.assert_array_equal(pa.numpy(), pb.numpy())
    # step() leaves the gradients; clear_grad() drops them, and the next backward starts afresh
    assert all(p.grad is not None for p in a.parameters())
    opt_a.clear_grad()
    assert all(p.grad is None for p in a.parameters())
    nn.functional.cross_entropy(a(shoal.to_tensor(x)), y).backward()
    nn.functional.cross_entropy(b(shoal.to_tensor(x)), y).backward()
    # a: one fresh gradient; b: its doubled gradient plus a fresh one (never cleared)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert not np.array_equal(pa.grad.numpy(), pb.grad.numpy())


def test_sparse_gradients_accumulate_across_backwards():
    shoal.set_default_dtype("float64")
    emb = nn.Embedding(6, 2)
    w0 = emb.weight.numpy().copy()
    opt = opt_mod.SGD(1.0, parameters=emb.parameters())
    emb(np.array([1, 4])).sum().backward()
    emb(np.array([4, 4])).sum().backward()
    opt.step()
    expected = w0.copy()
    expected[1] -= 1.0
    expected[4] -= 3.0
    np.testing.assert_allclose(emb.weight.numpy(), expected, **TOL)


def test_embedding_adam_non_lazy_mode_updates_every_row_with_a_moment():
    """lazy_mode=False densifies: a row seen once keeps moving on its decaying moments."""
    shoal.set_default_dtype("float64")
    emb = nn.Embedding(5, 2)
    w0 = emb.weight.numpy().copy()
    opt = opt_mod.Adam(0.01, parameters=emb.parameters(), lazy_mode=False)
    exp, m, v = w0.copy(), np.zeros((5, 2)), np.zeros((5, 2))
    for step, ids in enumerate([np.array([1]), np.array([3, 3])], start=1):
        emb(ids).sum().backward()
        opt.step()
        opt.clear_grad()
        g = _expected_row_grads(ids, np.ones((len(ids), 2)), 5, 2)
        exp, m, v = ref_adam(exp, g, m, v, 0.01, 0.9, 0.999, 1e-8, step)
    np.testing.assert_allclose(emb.weight.numpy(), exp, **TOL)
    assert not np.allclose(emb.weight.numpy()[1], w0[1] - 0.01)  # row 1 moved at step 2 too
    np.testing.assert_array_equal(emb.weight.numpy()[[0, 2, 4]], w0[[0, 2, 4]])


def test_scheduler_state_round_trip():
    def make():
        return lr_sched.LinearWarmup(lr_sched.StepDecay(0.5, step_size=2, gamma=0.5),
                                     warmup_steps=3, start_lr=0.1, end_lr=0.5)

    a = make()
    for _ in range(5):
        a.step()
    b = make()
    b.set_state_dict(a.state_dict())
    for _ in range(4):
        assert b() == a()
        a.step()
        b.step()
    with pytest.raises(shoal.StateDictError, match="last_epoch"):
        make().set_state_dict({"last_lr": 0.1})
