"""Layer trees (registration, state dicts, modes, copies, printing), containers, initializers."""
import collections
import copy
import math

import numpy as np
import pytest

import shoal
from shoal import nn
from shoal.nn import initializer as init
from shoal.kernels import get_backend

NP = get_backend("numpy")


class MLP(nn.Layer):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Encoder(nn.Layer):
    def __init__(self):
        super().__init__()
        self.mlp = MLP()
        self.scale = self.create_parameter((2,), default_initializer=init.Constant(1.0))
        self.register_buffer("count", shoal.to_tensor(np.zeros(1, np.float32)))
        self.register_buffer("cache", shoal.to_tensor(np.ones(2, np.float32)), persistable=False)

    def forward(self, x):
        return self.mlp(x) * self.scale


def _values(layer):
    return {k: v.numpy().copy() for k, v in layer.state_dict().items()}


# -- registration and traversal -------------------------------------------------------------------
def test_named_parameters_in_registration_order_with_structured_names():
    enc = Encoder()
    names = [n for n, _ in enc.named_parameters()]
    # as in Paddle: a layer's own parameters, then each sublayer's, in registration order
    assert names == ["scale", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
    assert list(enc.state_dict()) == names + ["count"]
    assert [id(p) for _, p in enc.named_parameters()] == [id(p) for p in enc.parameters()]
    assert enc.parameters()[names.index("mlp.fc1.weight")] is enc.mlp.fc1.weight
    assert enc.mlp.fc1.weight.shape == (3, 4)
    assert [n for n, _ in enc.mlp.named_parameters()] == ["fc1.weight", "fc1.bias",
                                                         "fc2.weight", "fc2.bias"]
    assert [id(p) for p in enc.parameters(include_sublayers=False)] == [id(enc.scale)]


def test_sequential_names_are_indices():
    seq = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    assert [n for n, _ in seq.named_parameters()] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert list(seq.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_shared_parameters_and_layers_are_listed_once():
    class Tied(nn.Layer):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.b = self.a                    # the same layer twice
            self.w = self.a.weight             # the same parameter again
            self.c = nn.Linear(3, 3)

    t = Tied()
    params = t.parameters()
    assert len(params) == 4
    assert len({id(p) for p in params}) == 4
    assert [id(p) for p in params[:2]] == [id(t.a.weight), id(t.a.bias)]
    assert len(t.sublayers()) == 2
    assert len(t.state_dict()) == 4


def test_sublayers_in_order():
    enc = Encoder()
    assert enc.sublayers() == [enc.mlp, enc.mlp.fc1, enc.mlp.act, enc.mlp.fc2]
    assert enc.sublayers(include_self=True)[0] is enc
    assert [n for n, _ in enc.named_sublayers()] == ["mlp", "mlp.fc1", "mlp.act", "mlp.fc2"]
    assert list(enc.mlp.children()) == [enc.mlp.fc1, enc.mlp.act, enc.mlp.fc2]


def test_add_sublayer_and_add_parameter():
    layer = nn.Layer()
    lin = nn.Linear(2, 2)
    assert layer.add_sublayer("inner", lin) is lin
    p = nn.Parameter(np.ones(3, np.float32), name="extra")
    assert layer.add_parameter("extra", p) is p
    assert layer.inner is lin and layer.extra is p
    assert [n for n, _ in layer.named_parameters()] == ["extra", "inner.weight", "inner.bias"]
    with pytest.raises(TypeError, match="Parameter"):
        layer.add_parameter("bad", shoal.to_tensor([1.0]))
    with pytest.raises(TypeError, match="Layer"):
        layer.add_sublayer("bad", 3)
    # reassigning an attribute replaces the registration; deleting removes it
    layer.extra = nn.Parameter(np.zeros(3, np.float32))
    assert layer.parameters()[0] is not p
    del layer.inner
    assert [n for n, _ in layer.named_parameters()] == ["extra"]


def test_register_buffer_persistable_or_not():
    enc = Encoder()
    sd = enc.state_dict()
    assert "count" in sd and "cache" not in sd
    assert dict(enc.named_buffers()).keys() == {"count", "cache"}
    assert all(p is not enc.count for p in enc.parameters())  # a buffer is no parameter
    with pytest.raises(TypeError, match="Tensor"):
        enc.register_buffer("bad", np.zeros(2))


def test_register_buffer_again_changes_persistence():
    """As in Paddle: registering a name again with persistable=True makes it persistable."""
    layer = nn.Layer()
    layer.register_buffer("stat", shoal.to_tensor([1.0]), persistable=False)
    assert "stat" not in layer.state_dict()
    layer.register_buffer("stat", shoal.to_tensor([2.0]), persistable=True)
    assert "stat" in layer.state_dict()
    np.testing.assert_array_equal(layer.state_dict()["stat"].numpy(), [2.0])


def test_forgetting_super_init_gives_a_clear_error():
    class Broken(nn.Layer):
        def __init__(self):
            self.fc = nn.Linear(2, 2)

    with pytest.raises(AttributeError, match=r"super\(\).__init__\(\)") as err:
        Broken()
    assert "Broken" in str(err.value) and "'fc'" in str(err.value)


# -- modes ----------------------------------------------------------------------------------------
def test_train_and_eval_propagate_and_dropout_is_identity_in_eval():
    model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Dropout(0.5), nn.ReLU()))
    assert all(layer.training for layer in model.sublayers(include_self=True))
    assert model.eval() is model
    assert not any(layer.training for layer in model.sublayers(include_self=True))
    drop = model[1][0]
    x = shoal.to_tensor(np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32))
    np.testing.assert_array_equal(drop(x).numpy(), x.numpy())
    model.train()
    assert all(layer.training for layer in model.sublayers(include_self=True))
    y = drop(x).numpy()
    zeros = y == 0
    assert 0.3 < zeros.mean() < 0.7
    np.testing.assert_allclose(y[~zeros], 2 * x.numpy()[~zeros], rtol=1e-6)


# -- state dicts ----------------------------------------------------------------------------------
def test_state_dict_round_trip():
    shoal.seed(1)
    a = Encoder()
    a.count.data[...] = 7.0
    shoal.seed(2)
    b = Encoder()
    assert not np.array_equal(a.mlp.fc1.weight.numpy(), b.mlp.fc1.weight.numpy())
    missing, unexpected = b.set_state_dict(a.state_dict())
    assert missing == [] and unexpected == []
    for k, v in a.state_dict().items():
        np.testing.assert_array_equal(b.state_dict()[k].numpy(), v.numpy(), err_msg=k)
    # values are copied, not shared
    a.mlp.fc1.weight.data[...] = 0.0
    assert not np.all(b.mlp.fc1.weight.numpy() == 0.0)
    # numpy arrays load too
    b.set_state_dict({k: v.numpy() + 1 for k, v in a.state_dict().items()})
    np.testing.assert_array_equal(b.count.numpy(), [8.0])


def test_set_state_dict_missing_unexpected_and_misshaped_keys_raise_and_change_nothing():
    model = MLP()
    before = _values(model)
    sd = {k: v.numpy() * 0 + 5 for k, v in model.state_dict().items()}
    del sd["fc2.bias"]                               # missing
    sd["fc3.weight"] = np.zeros((4, 2), np.float32)  # unexpected
    sd["fc1.weight"] = np.zeros((4, 3), np.float32)  # mis-shaped (3, 4)
    with pytest.raises(shoal.StateDictError) as err:
        model.set_state_dict(sd)
    msg = str(err.value)
    assert "fc2.bias" in msg and "fc3.weight" in msg
    assert "fc1.weight" in msg and "(4, 3)" in msg and "(3, 4)" in msg
    after = _values(model)
    for k in before:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)


@pytest.mark.parametrize("edit, names", [
    (lambda sd: sd.pop("fc1.bias"), ["fc1.bias"]),
    (lambda sd: sd.update(extra=np.zeros(2, np.float32)), ["extra"]),
    (lambda sd: sd.update({"fc2.weight": np.zeros((2, 4), np.float32)}),
     ["fc2.weight", "(2, 4)", "(4, 2)"]),
])
def test_set_state_dict_each_problem_alone_raises_naming_it(edit, names):
    model = MLP()
    before = _values(model)
    sd = {k: v.numpy() + 1 for k, v in model.state_dict().items()}
    edit(sd)
    with pytest.raises(shoal.StateDictError) as err:
        model.set_state_dict(sd)
    for n in names:
        assert n in str(err.value)
    after = _values(model)
    for k in before:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)


def test_set_state_dict_non_strict_returns_missing_and_unexpected():
    model = MLP()
    sd = {k: v.numpy() + 1 for k, v in model.state_dict().items()}
    expected = dict(sd)
    del sd["fc2.bias"]
    sd["other.weight"] = np.zeros(3, np.float32)
    bias_before = model.fc2.bias.numpy().copy()
    missing, unexpected = model.set_state_dict(sd, strict=False)
    assert missing == ["fc2.bias"] and unexpected == ["other.weight"]
    np.testing.assert_array_equal(model.fc1.weight.numpy(), expected["fc1.weight"])
    np.testing.assert_array_equal(model.fc2.bias.numpy(), bias_before)
    # a shape mismatch still raises without strict
    sd["fc1.bias"] = np.zeros(5, np.float32)
    with pytest.raises(shoal.StateDictError, match=r"fc1.bias.*\(5,\).*\(4,\)"):
        model.set_state_dict(sd, strict=False)


def test_deepcopy_gives_independent_equal_parameters():
    class Tied(nn.Layer):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.b = self.a

    for model in (Encoder(), Tied()):
        twin = copy.deepcopy(model)
        pairs = list(zip(model.parameters(), twin.parameters()))
        assert len(pairs) == len(model.parameters()) == len(twin.parameters())
        for p, q in pairs:
            assert p is not q and p.data is not q.data
            np.testing.assert_array_equal(p.numpy(), q.numpy())
            assert q.name == p.name and q.trainable == p.trainable
        for p in twin.parameters():
            p.data[...] += 1.0
        for p, q in pairs:
            np.testing.assert_array_equal(q.numpy(), p.numpy() + 1.0)
    assert twin.b is twin.a  # sharing inside the copy is kept


def test_repr_prints_the_tree():
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Sequential(nn.Dropout(0.25)))
    text = repr(model)
    assert text.startswith("Sequential(")
    assert "(0): Linear(in_features=2, out_features=3" in text
    assert "(1): ReLU()" in text
    assert "(2): Sequential(\n    (0): Dropout(p=0.25)\n  )" in text
    assert text.endswith(")")


# -- containers -----------------------------------------------------------------------------------
def test_sequential_indexing_len_iteration_and_call():
    layers = [nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)]
    seq = nn.Sequential(*layers)
    assert len(seq) == 3
    assert list(seq) == layers
    assert seq[0] is layers[0] and seq[-1] is layers[2]
    head = seq[:2]
    assert isinstance(head, nn.Sequential) and list(head) == layers[:2]
    x = shoal.to_tensor(np.ones((4, 2), np.float32))
    np.testing.assert_array_equal(seq(x).numpy(), layers[2](layers[1](layers[0](x))).numpy())


def test_sequential_named_construction():
    enc, dec = nn.Linear(2, 3), nn.Linear(3, 2)
    for seq in (nn.Sequential(("enc", enc), ("dec", dec)),
                nn.Sequential(collections.OrderedDict([("enc", enc), ("dec", dec)]))):
        assert [n for n, _ in seq.named_parameters()] == ["enc.weight", "enc.bias",
                                                           "dec.weight", "dec.bias"]
        assert seq.enc is enc and seq[1] is dec
        assert "(enc): Linear" in repr(seq)


def test_layer_list_keeps_order_and_registers_parameters():
    a, b, c, d = (nn.Linear(2, 2) for _ in range(4))
    ll = nn.LayerList([a])
    ll.append(b)
    ll.extend([c])
    assert len(ll) == 3 and list(ll) == [a, b, c]
    assert [n for n, _ in ll.named_parameters()] == [f"{i}.{w}" for i in range(3)
                                                     for w in ("weight", "bias")]
    ll[1] = d
    assert list(ll) == [a, d, c] and ll[1] is d and ll[-1] is c
    params = ll.parameters()
    # identity comparisons: `==` between Tensors is element-wise
    assert [id(p) for p in params] == [id(p) for p in (a.weight, a.bias, d.weight, d.bias,
                                                       c.weight, c.bias)]
    with pytest.raises(TypeError, match="Layer"):
        ll[0] = "not a layer"

    class Holder(nn.Layer):
        def __init__(self):
            super().__init__()
            self.blocks = nn.LayerList([nn.Linear(2, 2) for _ in range(2)])

    assert [n for n, _ in Holder().named_parameters()] == [
        "blocks.0.weight", "blocks.0.bias", "blocks.1.weight", "blocks.1.bias"]


# -- initializers ---------------------------------------------------------------------------------
def _linear_with(weight_init, fan_in=400, fan_out=300):
    return nn.Linear(fan_in, fan_out, weight_attr=nn.ParamAttr(initializer=weight_init))


def test_linear_default_init_is_xavier_uniform_and_zero_bias():
    lin = nn.Linear(400, 300)
    limit = math.sqrt(6.0 / (400 + 300))
    w = lin.weight.numpy()
    assert np.abs(w).max() <= limit and np.abs(w).max() > 0.99 * limit
    np.testing.assert_array_equal(lin.bias.numpy(), 0.0)


def test_constant():
    lin = nn.Linear(3, 4, weight_attr=init.Constant(0.25), bias_attr=init.Constant(-1.5))
    np.testing.assert_array_equal(lin.weight.numpy(), np.full((3, 4), 0.25, np.float32))
    np.testing.assert_array_equal(lin.bias.numpy(), np.full(4, -1.5, np.float32))


def test_uniform_bounds_and_mean():
    w = _linear_with(init.Uniform(-0.3, 0.7)).weight.numpy()
    assert w.dtype == np.float32
    assert w.min() >= -0.3 and w.max() <= 0.7
    assert w.min() < -0.29 and w.max() > 0.69
    assert abs(w.mean() - 0.2) < 0.01
    with pytest.raises(ValueError):
        init.Uniform(1.0, 1.0)


def test_normal_moments():
    w = init.Normal(mean=1.0, std=2.0)((500, 400), np.float64, NP)
    assert w.shape == (500, 400) and w.dtype == np.float64
    assert abs(w.mean() - 1.0) < 0.015   # 5 standard errors of 2/sqrt(2e5)
    assert abs(w.std() - 2.0) < 0.015


def test_xavier_uniform_limit():
    fan_in, fan_out = 400, 300
    w = _linear_with(init.XavierUniform()).weight.numpy()
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    assert np.abs(w).max() <= limit * (1 + 1e-6)
    assert np.abs(w).max() > 0.99 * limit
    assert abs(w.std() - limit / math.sqrt(3)) < 0.01 * limit


def test_kaiming_normal_std():
    w = _linear_with(init.KaimingNormal()).weight.numpy()
    std = math.sqrt(2.0 / 400)  # fan_in is the first axis of a [in, out] weight
    assert abs(w.std() - std) < 0.01 * std
    assert abs(w.mean()) < 0.01 * std


def test_truncated_normal_within_two_std():
    w = init.TruncatedNormal(mean=0.5, std=0.1)((400, 300), np.float32, NP)
    assert w.dtype == np.float32
    assert w.min() >= 0.5 - 0.2 - 1e-6 and w.max() <= 0.5 + 0.2 + 1e-6
    assert abs(w.mean() - 0.5) < 0.002
    assert abs(w.std() - 0.1 * 0.8796) < 0.002  # the std of N(0, 1) truncated to [-2, 2]


def test_assign_exact_values_and_wrong_shape():
    values = np.arange(12, dtype=np.float64).reshape(3, 4)
    lin = nn.Linear(3, 4, weight_attr=init.Assign(values))
    np.testing.assert_array_equal(lin.weight.numpy(), values.astype(np.float32))
    assert lin.weight.dtype == np.float32
    lin2 = nn.Linear(3, 4, weight_attr=init.Assign(shoal.to_tensor(values)))
    np.testing.assert_array_equal(lin2.weight.numpy(), values.astype(np.float32))
    with pytest.raises(shoal.ShapeError, match=r"\(4, 3\).*\(3, 4\)"):
        nn.Linear(3, 4, weight_attr=init.Assign(np.zeros((4, 3))))


def test_set_global_initializer_affects_new_layers_only():
    before = nn.Linear(3, 4)
    w_before = before.weight.numpy().copy()
    init.set_global_initializer(init.Constant(0.5), init.Constant(0.1))
    lin = nn.Linear(3, 4)
    np.testing.assert_array_equal(lin.weight.numpy(), 0.5)
    np.testing.assert_array_equal(lin.bias.numpy(), np.float32(0.1))
    np.testing.assert_array_equal(before.weight.numpy(), w_before)
    # a parameter's own initializer wins over the global one
    own = nn.Linear(3, 4, weight_attr=init.Constant(2.0))
    np.testing.assert_array_equal(own.weight.numpy(), 2.0)
    np.testing.assert_array_equal(own.bias.numpy(), np.float32(0.1))
    init.set_global_initializer(None, None)
    back = nn.Linear(3, 4)
    assert not np.all(back.weight.numpy() == 0.5)
    np.testing.assert_array_equal(back.bias.numpy(), 0.0)
    with pytest.raises(TypeError):
        init.set_global_initializer("xavier")


def test_seed_makes_initialization_repeatable():
    shoal.seed(42)
    a = MLP()
    shoal.seed(42)
    b = MLP()
    shoal.seed(43)
    c = MLP()
    for (k, va), vb, vc in zip(_values(a).items(), _values(b).values(), _values(c).values()):
        np.testing.assert_array_equal(va, vb, err_msg=k)
        if k.endswith("weight"):
            assert not np.array_equal(va, vc), k
    shoal.seed(7)
    d1 = init.Normal()((5,), np.float32, NP)
    shoal.seed(7)
    np.testing.assert_array_equal(init.Normal()((5,), np.float32, NP), d1)


def test_parameter_names_and_param_attr():
    lin = nn.Linear(2, 2, weight_attr=nn.ParamAttr(name="my_w", trainable=False), bias_attr=False)
    assert lin.weight.name == "my_w" and not lin.weight.trainable
    assert lin.bias is None
    assert [n for n, _ in lin.named_parameters()] == ["weight"]
    other = nn.Linear(2, 2)
    assert other.weight.name != other.bias.name
    assert other.weight.name.endswith("w_0") and other.bias.name.endswith("b_0")


def test_to_float64():
    enc = Encoder()
    before = _values(enc)
    assert enc.to(dtype="float64") is enc
    for k, v in enc.state_dict().items():
        assert v.dtype == np.float64, k
        np.testing.assert_array_equal(v.numpy(), before[k].astype(np.float64))
    assert all(p.dtype == np.float64 for p in enc.parameters())
    assert enc.cache.dtype == np.float64  # non-persistable buffers too
    y = enc(shoal.to_tensor(np.ones((2, 3)), dtype="float64"))
    assert y.dtype == np.float64
    y.sum().backward()
    assert enc.mlp.fc1.weight.grad.dtype == np.float64
