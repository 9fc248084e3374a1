"""recompute / apply_recompute: same numbers as without, fewer saved arrays, nested passes."""
from __future__ import annotations

import copy

import numpy as np
import pytest

import shoal
import shoal.nn as nn
from shoal.kernels import get_backend
from shoal.worker import autograd
from shoal.worker.autograd import graph_stats
from shoal.worker.recompute import (RecomputeError, UnknownCheckpointError, apply_recompute,
                                    is_recomputed, recompute, register_forward_state)
from shoal.worker.recompute import _STATE_CAPTURES
from tests.worker.gradcheck import check_grad

D, BATCH, BLOCKS = 8, 4, 3


class Block(nn.Layer):
    """x + fc2(dropout(relu(fc1(x)))): five arrays saved inside, one (the sum) at its edge."""

    def __init__(self, d=D, p=0.3):
        super().__init__()
        self.fc1, self.drop, self.fc2 = nn.Linear(d, d), nn.Dropout(p), nn.Linear(d, d)

    def forward(self, x):
        return x + self.fc2(self.drop(shoal.relu(self.fc1(x))))


class Net(nn.Layer):
    def __init__(self, blocks=BLOCKS):
        super().__init__()
        self.blocks = nn.LayerList([Block() for _ in range(blocks)])
        self.head = nn.Linear(D, 2)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def _x(seed=1):
    return shoal.to_tensor(np.random.default_rng(seed).normal(size=(BATCH, D)))


def _train(checkpoints, steps=2, retain=False):
    """Loss per step, final grads and parameters, the loss graph's stats, the next random draw."""
    shoal.seed(0)
    model = Net()
    if checkpoints:
        assert apply_recompute(model, checkpoints) is model
    opt = shoal.optimizer.SGD(0.1, parameters=model.parameters())
    shoal.seed(7)
    losses, stats = [], None
    for s in range(steps):
        loss = (model(_x(s)) ** 2).mean()
        stats = stats or graph_stats(loss)
        loss.backward(retain_graph=retain)
        if retain:
            loss.backward()
        losses.append(loss.item())
        grads = {n: p.grad.numpy().copy() for n, p in model.named_parameters()}
        opt.step()
        opt.clear_grad()
    params = {n: p.numpy() for n, p in model.named_parameters()}
    return losses, grads, params, stats, get_backend().to_numpy(get_backend().uniform((3,)))


ALL = [f"blocks.{i}" for i in range(BLOCKS)]


def _assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# -- equivalence ----------------------------------------------------------------------------------
@pytest.mark.parametrize("checkpoints", [ALL, ["blocks.1"], ["blocks", "blocks.0"]],
                         ids=["every-block", "one-block", "nested"])
def test_recompute_gives_bit_identical_losses_and_gradients(checkpoints):
    plain, rec = _train([]), _train(checkpoints)
    assert plain[0] == rec[0]
    _assert_same(plain[1], rec[1])
    _assert_same(plain[2], rec[2])
    # the recomputation leaves the random stream where the forward left it
    np.testing.assert_array_equal(plain[4], rec[4])


@pytest.mark.requires_gpu
def test_on_cupy_the_generator_state_round_trips_and_dropout_replays():
    shoal.set_device("gpu")
    be = get_backend("cupy")
    state = be.get_rng_state()
    first = be.to_numpy(be.uniform((1000,)))
    be.set_rng_state(state)
    np.testing.assert_array_equal(be.to_numpy(be.uniform((1000,))), first)
    plain, rec = _train([]), _train(ALL)
    assert plain[0] == rec[0]
    _assert_same(plain[1], rec[1])
    np.testing.assert_array_equal(plain[4], rec[4])


def test_without_preserving_the_rng_state_dropout_draws_other_masks():
    shoal.seed(0)
    block = Block(p=0.5)
    grads = []
    for preserve in (True, False):
        shoal.seed(3)
        x = _x()
        x.requires_grad = True
        recompute(block, x, preserve_rng_state=preserve).sum().backward()
        grads.append(x.grad.numpy())
    shoal.seed(3)
    x = _x()
    x.requires_grad = True
    block(x).sum().backward()
    np.testing.assert_array_equal(grads[0], x.grad.numpy())
    assert not np.array_equal(grads[1], x.grad.numpy())


def test_input_gradients_of_a_recomputed_segment_match_finite_differences():
    def segment(x, y):
        h = shoal.tanh(x @ y) * x.sum(axis=1, keepdim=True)
        return h, (h * h).mean(axis=0)   # two outputs: one node, two picks

    outs, _, _ = check_grad(lambda x, y: recompute(segment, x, y),
                            np.random.default_rng(0).normal(size=(3, 4)),
                            np.random.default_rng(1).normal(size=(4, 4)))
    # each output picks its part of one node (freed by now)
    assert [type(o._ctx).__name__ for o in outs] == ["_Pick", "_Pick"]
    x = shoal.Tensor(np.ones((3, 4)), requires_grad=True)
    h, m = recompute(segment, x, shoal.Tensor(np.ones((4, 4))))
    assert h._ctx.edges[0] is m._ctx.edges[0] and graph_stats(m)["nodes"] == 2


def test_parameter_gradients_of_a_float64_layer_match_finite_differences():
    shoal.set_default_dtype("float64")
    try:
        shoal.seed(0)
        layer = Block(d=3, p=0.0)
    finally:
        shoal.set_default_dtype("float32")
    w = layer.fc1.weight
    x0 = np.random.default_rng(2).normal(size=(2, 3))
    base = w.numpy().copy()
    x = shoal.Tensor(x0, dtype="float64", requires_grad=True)
    w.clear_grad()
    out = recompute(layer, x)
    r = np.random.default_rng(5).normal(size=out.shape)
    (out * shoal.Tensor(r, dtype="float64")).sum().backward()
    eps, numeric = 1e-6, np.zeros_like(base)
    for j in np.ndindex(base.shape):
        vals = []
        for sign in (1, -1):
            with shoal.no_grad():
                w.data[...] = base
                w.data[j] += sign * eps
                vals.append(float((layer(shoal.Tensor(x0, dtype="float64")).numpy() * r).sum()))
        numeric[j] = (vals[0] - vals[1]) / (2 * eps)
    with shoal.no_grad():
        w.data[...] = base
    np.testing.assert_allclose(w.grad.numpy(), numeric, atol=1e-6, rtol=1e-5)


# -- memory ---------------------------------------------------------------------------------------
def test_graph_stats_shows_the_activations_recompute_does_not_keep():
    plain, rec = _train([], steps=1)[3], _train(ALL, steps=1)[3]
    # per block: fc1 out, relu out, dropout mask, dropout out, fc2 out are kept without recompute;
    # both keep the three block outputs, the head's output and the square (the input x is a
    # leaf's own data, not counted)
    inside, edge = 5, BLOCKS + 2
    act = BATCH * D * 4
    assert plain["saved_arrays"] == BLOCKS * inside + edge == 20
    assert rec["saved_arrays"] == edge
    assert plain["saved_bytes"] - rec["saved_bytes"] == BLOCKS * inside * act
    # nodes per block: linear, relu, dropout, linear, add -> one recompute node
    assert plain["nodes"] - rec["nodes"] == BLOCKS * (5 - 1)


def test_graph_stats_of_a_leaf_a_single_op_and_a_freed_graph():
    w = shoal.Tensor(np.ones((2, 3)), requires_grad=True)
    assert graph_stats(w) == {"nodes": 0, "saved_arrays": 0, "saved_bytes": 0}
    h = shoal.tanh(w)                   # saves x (w's own data: not counted) and y
    y = h * h                           # saves a and b: h's data, already counted
    assert graph_stats(y) == {"nodes": 2, "saved_arrays": 2, "saved_bytes": 2 * 6 * 4}
    y.sum().backward()
    assert graph_stats(y)["saved_arrays"] == 0


# -- shapes of use --------------------------------------------------------------------------------
def test_tuple_outputs_and_inputs_without_grad():
    calls = []

    def fn(x, scale, *, bias, label):
        calls.append(1)
        return x * scale + bias, x.sum(), label + 1, "tag"

    x = shoal.Tensor(np.arange(6.0).reshape(2, 3), requires_grad=True)
    scale = shoal.Tensor(np.full((2, 3), 2.0))          # no grad
    bias = shoal.Tensor(np.ones(3), requires_grad=True)
    label = shoal.Tensor(np.array([1, 2]), dtype="int64")
    a, s, lab, tag = recompute(fn, x, scale, bias=bias, label=label)
    assert tag == "tag" and lab.dtype == np.int64 and not lab.requires_grad
    assert a.requires_grad and s.requires_grad
    a.sum().backward()                                   # s gets no gradient
    np.testing.assert_array_equal(x.grad.numpy(), np.full((2, 3), 2.0))
    np.testing.assert_array_equal(bias.grad.numpy(), np.full(3, 2.0))
    assert scale.grad is None and len(calls) == 2        # forward + one recomputation


def test_nothing_requires_grad_means_no_node():
    out = recompute(lambda t: t * 2, shoal.Tensor([1.0, 2.0]))
    assert out._ctx is None and not out.requires_grad
    with shoal.no_grad():
        out = recompute(Block(), _x())
    assert out._ctx is None


def test_a_segment_used_twice_in_one_graph():
    shoal.seed(0)
    block = Block(p=0.0)
    grads = []
    for ck in ([], ["0"]):
        model = nn.Sequential(block)
        if ck:
            apply_recompute(model, ck)
        x = _x()
        x.requires_grad = True
        loss = (block(block(x)) ** 2).sum()
        loss.backward()
        grads.append({"x": x.grad.numpy(), **{n: p.grad.numpy().copy()
                                             for n, p in block.named_parameters()}})
        block.clear_gradients()
    _assert_same(grads[0], grads[1])


def test_backward_twice_with_retain_graph():
    plain, rec = _train([], steps=1, retain=True), _train(ALL, steps=1, retain=True)
    _assert_same(plain[1], rec[1])


def test_an_identity_segment_and_a_bound_method():
    x = shoal.Tensor([1.0, -2.0], requires_grad=True)
    recompute(lambda t: t, x).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [1.0, 1.0])
    shoal.seed(0)
    block = Block(p=0.0)
    out = recompute(block.forward, _x())          # a bound method: its layer's parameters
    assert out._ctx.params == block.parameters()
    out.sum().backward()
    assert block.fc1.weight.grad is not None


# -- failures -------------------------------------------------------------------------------------
def test_an_exception_in_the_recomputed_forward_leaves_the_graph_usable():
    shoal.seed(0)
    model = Net()
    apply_recompute(model, ["blocks.1"])
    broken = {"on": False}
    inner = model.blocks[1].fc1

    def fail_when_broken(x):
        if broken["on"]:
            raise ValueError("fails on purpose")
        return type(inner).forward(inner, x)
    object.__setattr__(inner, "forward", fail_when_broken)
    ref = _train(["blocks.1"], steps=1)[1]
    shoal.seed(7)
    loss = (model(_x(0)) ** 2).mean()
    rng_before = get_backend().get_rng_state()
    broken["on"] = True
    with pytest.raises(RecomputeError, match="fails on purpose") as info:
        loss.backward(retain_graph=True)
    assert isinstance(info.value.__cause__, ValueError)
    assert shoal.is_grad_enabled() and autograd.backward_pass() is None
    assert get_backend().get_rng_state() == rng_before
    for p in model.blocks[1].parameters() + model.blocks[0].parameters():
        assert p.grad is None                    # nothing half-accumulated inside or behind it
    with pytest.raises(autograd.GradError, match="outside a backward pass"):
        autograd.queue_callback(lambda: None)
    broken["on"] = False
    model.clear_gradients()
    loss.backward()
    _assert_same(ref, {n: p.grad.numpy() for n, p in model.named_parameters()})


def test_a_function_that_computes_something_else_when_run_again():
    state = {"n": 0}

    def unstable(x):
        state["n"] += 1
        return x[: state["n"]] * 2

    x = shoal.Tensor(np.ones(4), requires_grad=True)
    out = recompute(unstable, x)
    with pytest.raises(RecomputeError, match="returned something else"):
        out.sum().backward()


def test_a_captured_tensor_that_needs_grad_is_refused():
    w = shoal.Tensor(np.ones(3), requires_grad=True)
    h = w * 2                                    # computed outside, used inside, not passed in
    x = shoal.Tensor(np.ones(3), requires_grad=True)
    out = recompute(lambda t: t * h, x)
    with pytest.raises(autograd.GradError, match="pass it as an argument"):
        (out + h).sum().backward()
    with pytest.raises(RecomputeError, match="inside a container"):
        recompute(lambda ts: ts[0] * 2, [h])


def test_bad_arguments():
    with pytest.raises(RecomputeError, match="Layer or a callable"):
        recompute(3, shoal.Tensor([1.0]))
    with pytest.raises(RecomputeError, match="must return a Tensor"):
        recompute(lambda t: 3, shoal.Tensor([1.0], requires_grad=True))
    with pytest.raises(autograd.GradError, match="outside a backward pass"):
        autograd.run_nested_backward([], [], [])


# -- nested passes: hooks and callbacks -----------------------------------------------------------
def test_hooks_and_callbacks_join_the_outer_pass():
    shoal.seed(0)
    block = Block(p=0.0)
    shared = block.fc1.weight                       # also used outside the segment below
    closure = shoal.Tensor(np.full(D, 0.5), requires_grad=True)   # reached only by recompute
    events, outer = [], {}

    def shared_hook(p):
        events.append(("shared", autograd.backward_pass(), p.grad.numpy().copy()))

    def closure_hook(p):
        events.append(("closure", autograd.backward_pass()))
        autograd.queue_callback(lambda: events.append(("callback", autograd.backward_pass())))

    def last_hook(p):
        outer["id"] = autograd.backward_pass()
        events.append(("last", autograd.backward_pass()))

    x = shoal.Tensor(np.random.default_rng(0).normal(size=(2, D)), requires_grad=True)
    x.register_post_accumulate_grad_hook(last_hook)
    shared.register_post_accumulate_grad_hook(shared_hook)
    closure.register_post_accumulate_grad_hook(closure_hook)

    def loss_of(recomputed):
        h = recompute(block, x) if recomputed else block(x)
        g = recompute(lambda t: t * closure, h) if recomputed else h * closure
        return (g.sum(axis=1, keepdim=True) * (x @ shared)).sum()

    loss_of(False).backward()
    final = shared.grad.numpy().copy()
    shared.clear_grad()
    events.clear()
    loss_of(True).backward()
    kinds = [e[0] for e in events]
    assert kinds.count("shared") == 1 and kinds.count("closure") == 1
    assert kinds.count("callback") == 1 and kinds[-1] == "callback"   # after the outer pass
    assert kinds.index("last") < kinds.index("callback")
    # one pass id in every hook, the nested pass's included (callbacks run once it has ended)
    assert {e[1] for e in events if e[0] != "callback"} == {outer["id"]}
    np.testing.assert_array_equal(events[kinds.index("shared")][2], final)  # the final sum


def test_a_closure_parameter_with_hooks_reached_twice_in_one_pass_raises():
    closure = shoal.Tensor(np.full(3, 0.5), requires_grad=True)
    closure.register_post_accumulate_grad_hook(lambda p: None)
    x = shoal.Tensor(np.ones(3), requires_grad=True)
    out = recompute(lambda t: t * closure, x) + closure
    with pytest.raises(autograd.GradError, match="second gradient accumulation"):
        out.sum().backward()


def test_forward_state_is_reinstated_during_recomputation():
    seen = []

    class Scope:
        def __enter__(self):
            seen.append("in")

        def __exit__(self, *exc):
            seen.append("out")

    register_forward_state(Scope)
    try:
        x = shoal.Tensor([1.0], requires_grad=True)
        out = recompute(lambda t: t * 3, x)
        assert seen == []
        out.sum().backward()
        assert seen == ["in", "out"]
    finally:
        _STATE_CAPTURES.remove(Scope)
    with pytest.raises(RecomputeError, match="callable"):
        register_forward_state(None)


# -- apply_recompute ------------------------------------------------------------------------------
def test_an_unknown_checkpoint_name_changes_nothing_and_suggests():
    model = Net()
    with pytest.raises(UnknownCheckpointError, match=r"close matches: \['blocks.1'") as info:
        apply_recompute(model, ["blocks.0", "blocks1"])
    assert "named_sublayers" in str(info.value)
    assert not any(is_recomputed(layer) for layer in model.sublayers())
    with pytest.raises(RecomputeError, match="list of names"):
        apply_recompute(model, "blocks.0")
    with pytest.raises(RecomputeError, match="expected a Layer"):
        apply_recompute(lambda x: x, ["a"])


def test_apply_recompute_is_idempotent_and_survives_deepcopy():
    model = Net()
    apply_recompute(model, ["blocks.0"])
    first = model.blocks[0].forward
    apply_recompute(model, ["blocks.0", "blocks.0"])
    assert model.blocks[0].forward is first
    assert [n for n, layer in model.named_sublayers() if is_recomputed(layer)] == ["blocks.0"]
    twin = copy.deepcopy(model)
    assert is_recomputed(twin.blocks[0]) and twin.blocks[0].forward.layer is twin.blocks[0]
    x = _x()
    out = twin(x)
    out.sum().backward()
    assert twin.blocks[0].fc1.weight.grad is not None and model.blocks[0].fc1.weight.grad is None
    assert model.state_dict().keys() == twin.state_dict().keys()


def test_a_forward_replaced_by_something_else_is_refused():
    model = Net()
    object.__setattr__(model.head, "forward", lambda x: x)
    with pytest.raises(RecomputeError, match="replaced"):
        apply_recompute(model, ["head"])


def test_a_segment_recomputed_outside_auto_cast_casts_as_its_forward_did():
    import shoal.nn.functional as F
    from shoal import amp

    def run(checkpoint: bool):
        shoal.seed(3)
        model = nn.Sequential(nn.Sequential(nn.Linear(D, 8), nn.Tanh()), nn.Linear(8, 3))
        if checkpoint:
            apply_recompute(model, ["0"])
        with amp.auto_cast(level="O1"):
            out = model(_x())
            loss = F.mse_loss(out, shoal.to_tensor(np.zeros(out.shape, np.float32)))
        loss.backward()            # outside auto_cast: the recomputation must still cast
        return [p.grad.numpy() for p in model.parameters()]

    plain, again = run(False), run(True)
    for i, (g, h) in enumerate(zip(plain, again)):
        assert h.dtype == g.dtype == np.float32, i
        np.testing.assert_array_equal(h, g, err_msg=str(i))
