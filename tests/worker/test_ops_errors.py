"""Bad input fails with the specific exception and a message that names the bad value."""
from __future__ import annotations

import numpy as np
import pytest

import shoal
import shoal.nn.functional as F


def _t(shape, dtype="float32", requires_grad=False):
    return shoal.Tensor(np.ones(shape), dtype=dtype, requires_grad=requires_grad)


def _assert_in(msg: str, *parts: str) -> None:
    for p in parts:
        assert p in msg, f"{p!r} missing from error message {msg!r}"


def test_error_classes_share_the_engine_base():
    for cls in (shoal.ShapeError, shoal.DTypeError, shoal.GradError, shoal.IndexRangeError):
        assert issubclass(cls, shoal.EngineError) and issubclass(cls, shoal.ShoalError)
    assert issubclass(shoal.ShapeError, ValueError)
    assert issubclass(shoal.DTypeError, TypeError)
    assert issubclass(shoal.IndexRangeError, IndexError)


# -- matmul / linear ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("sa,sb", [((2, 3), (4, 5)), ((3,), (2, 3)), ((2, 2, 3), (2, 3)),
                                   ((4,), (5,))], ids=str)
def test_matmul_shape_mismatch_names_both_shapes(sa, sb):
    with pytest.raises(shoal.ShapeError) as info:
        shoal.matmul(_t(sa), _t(sb))
    _assert_in(str(info.value), str(sa), str(sb))


def test_matmul_transpose_flags_are_checked():
    with pytest.raises(shoal.ShapeError):
        shoal.matmul(_t((2, 3)), _t((2, 3)), transpose_y=False)
    shoal.matmul(_t((2, 3)), _t((2, 3)), transpose_y=True)  # fits


def test_matmul_of_a_0d_tensor():
    with pytest.raises(shoal.ShapeError):
        shoal.matmul(shoal.Tensor(2.0), _t((2, 2)))


def test_linear_with_wrong_input_width():
    w = _t((4, 5))
    with pytest.raises(shoal.ShapeError) as info:
        F.linear(_t((3, 6)), w)
    _assert_in(str(info.value), "(3, 6)", "(4, 5)")


def test_linear_layer_with_wrong_input_width():
    layer = shoal.nn.Linear(4, 2)
    with pytest.raises(shoal.ShapeError) as info:
        layer(_t((3, 5)))
    _assert_in(str(info.value), "(3, 5)", "(4, 2)")


def test_linear_with_wrong_bias_shape():
    with pytest.raises(shoal.ShapeError) as info:
        F.linear(_t((3, 4)), _t((4, 5)), _t((4,)))
    _assert_in(str(info.value), "(4,)", "5")


def test_linear_with_mixed_dtypes():
    with pytest.raises(shoal.DTypeError) as info:
        F.linear(_t((3, 4), dtype="float64"), _t((4, 5)))
    _assert_in(str(info.value), "float64", "float32")


# -- shapes ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(4, 2), (5, -1), (-1, -1), (7,), (0, -1)], ids=str)
def test_reshape_to_an_incompatible_size(shape):
    with pytest.raises(shoal.ShapeError) as info:
        shoal.reshape(_t((2, 3)), shape)
    _assert_in(str(info.value), "(2, 3)", str(shape))


@pytest.mark.parametrize("perm", [(0, 0, 1), (0, 1), (0, 1, 3), (0, 1, 2, 3), (0, 2, -1)], ids=str)
def test_transpose_with_a_bad_perm(perm):
    with pytest.raises(shoal.ShapeError) as info:
        shoal.transpose(_t((2, 3, 4)), perm)
    _assert_in(str(info.value), str(perm), "(2, 3, 4)")


def test_concat_of_mismatched_shapes():
    with pytest.raises(shoal.ShapeError) as info:
        shoal.concat([_t((2, 3)), _t((2, 4))], axis=0)
    _assert_in(str(info.value), "(2, 3)", "(2, 4)")
    with pytest.raises(shoal.ShapeError):
        shoal.concat([_t((2, 3)), _t((2, 3, 1))], axis=0)
    shoal.concat([_t((2, 3)), _t((2, 4))], axis=1)  # fits along axis 1


def test_concat_of_mismatched_dtypes():
    with pytest.raises(shoal.DTypeError) as info:
        shoal.concat([_t((2, 3)), _t((2, 3), dtype="float64")])
    _assert_in(str(info.value), "float32", "float64")


def test_concat_of_nothing():
    with pytest.raises(shoal.ShapeError):
        shoal.concat([])


def test_stack_of_mismatched_shapes():
    with pytest.raises(shoal.ShapeError) as info:
        shoal.stack([_t((2, 3)), _t((3, 2))])
    _assert_in(str(info.value), "(2, 3)", "(3, 2)")


@pytest.mark.parametrize("sections", [3, [1, 2], [3, 2], 0], ids=str)
def test_split_that_does_not_fit(sections):
    with pytest.raises(shoal.ShapeError) as info:
        shoal.split(_t((2, 4)), sections, axis=1)
    assert "4" in str(info.value)


@pytest.mark.parametrize("op", ["sum", "mean", "max"])
def test_reduction_axis_out_of_range(op):
    with pytest.raises(shoal.ShapeError) as info:
        getattr(shoal, op)(_t((2, 3)), axis=2)
    assert "2" in str(info.value)


def test_softmax_axis_out_of_range():
    with pytest.raises(shoal.ShapeError):
        F.softmax(_t((2, 3)), axis=2)


def test_getitem_out_of_range():
    with pytest.raises(shoal.EngineError) as info:
        _t((2, 3))[5]
    assert "(2, 3)" in str(info.value)


# -- embedding -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [10, 57, -1])
def test_embedding_out_of_range_id_is_named(bad):
    w = _t((10, 4), requires_grad=True)
    with pytest.raises(shoal.IndexRangeError) as info:
        F.embedding(shoal.Tensor([[1, bad], [0, 2]]), w)
    _assert_in(str(info.value), str(bad), "10")


def test_embedding_with_float_ids():
    with pytest.raises(shoal.DTypeError) as info:
        F.embedding(shoal.Tensor([1.0, 2.0]), _t((10, 4)))
    assert "float32" in str(info.value)
    with pytest.raises(shoal.DTypeError):
        F.embedding(np.array([1.5]), _t((10, 4)))


# -- cross entropy ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [4, 9, -1])
def test_cross_entropy_label_out_of_range(bad):
    with pytest.raises(shoal.IndexRangeError) as info:
        F.cross_entropy(_t((3, 4)), shoal.Tensor([0, bad, 1]))
    _assert_in(str(info.value), str(bad), "4")


@pytest.mark.parametrize("lshape", [(2,), (3, 2), (4,), (1, 3)], ids=str)
def test_cross_entropy_wrong_label_shape(lshape):
    labels = shoal.Tensor(np.zeros(lshape, dtype=np.int64))
    with pytest.raises(shoal.ShapeError) as info:
        F.cross_entropy(_t((3, 4)), labels)
    _assert_in(str(info.value), str(lshape), "(3, 4)")


def test_cross_entropy_float_labels_without_soft_label():
    with pytest.raises(shoal.DTypeError) as info:
        F.cross_entropy(_t((3, 4)), shoal.Tensor([0.0, 1.0, 2.0]))
    _assert_in(str(info.value), "float32", "soft_label")


def test_cross_entropy_soft_label_shape_mismatch():
    with pytest.raises(shoal.ShapeError) as info:
        F.cross_entropy(_t((3, 4)), _t((3, 5)), soft_label=True)
    _assert_in(str(info.value), "(3, 5)", "(3, 4)")


@pytest.mark.parametrize("loss", ["cross_entropy", "bce", "mse"])
def test_bad_reduction_lists_the_choices(loss):
    x = _t((3, 4))
    calls = {
        "cross_entropy": lambda: F.cross_entropy(x, shoal.Tensor([0, 1, 2]), reduction="avg"),
        "bce": lambda: F.binary_cross_entropy_with_logits(x, _t((3, 4)), reduction="avg"),
        "mse": lambda: F.mse_loss(x, _t((3, 4)), reduction="avg"),
    }
    with pytest.raises(ValueError) as info:
        calls[loss]()
    _assert_in(str(info.value), "avg", "mean", "sum", "none")


# -- bce / mse ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lshape", [(3,), (3, 1), (4, 3), (1, 3, 4)], ids=str)
def test_bce_with_mismatched_label_shape(lshape):
    with pytest.raises(shoal.ShapeError) as info:
        F.binary_cross_entropy_with_logits(_t((3, 4)), _t(lshape))
    _assert_in(str(info.value), str(lshape), "(3, 4)")


def test_bce_weight_that_does_not_broadcast():
    with pytest.raises(shoal.ShapeError) as info:
        F.binary_cross_entropy_with_logits(_t((3, 4)), _t((3, 4)), weight=_t((3,)))
    _assert_in(str(info.value), "weight", "(3,)")


@pytest.mark.parametrize("lshape", [(3,), (4, 3), (3, 4, 1), (1, 4)], ids=str)
def test_mse_loss_with_mismatched_shapes(lshape):
    with pytest.raises(shoal.ShapeError) as info:
        F.mse_loss(_t((3, 4)), _t(lshape))
    _assert_in(str(info.value), str(lshape), "(3, 4)")


# -- dropout / gather / item ------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [-0.1, 1.5, 2])
def test_dropout_p_outside_unit_interval(p):
    with pytest.raises(ValueError) as info:
        F.dropout(_t((2, 3)), p=p)
    assert str(p) in str(info.value)
    with pytest.raises(ValueError):
        shoal.nn.Dropout(p)


@pytest.mark.parametrize("axis,index", [(0, [0, 3]), (1, [4]), (0, [-4]), (1, [1, -5])], ids=str)
def test_gather_with_out_of_range_index(axis, index):
    x = _t((3, 4))
    # an index outside the entries it addresses is an IndexRangeError (see errors.py), as for
    # embedding ids and cross_entropy labels
    with pytest.raises(shoal.IndexRangeError) as info:
        shoal.gather(x, shoal.Tensor(index), axis=axis)
    bad = [i for i in index if not -x.shape[axis] <= i < x.shape[axis]][0]
    _assert_in(str(info.value), str(bad), str(x.shape[axis]))


def test_gather_with_a_float_index():
    with pytest.raises((shoal.DTypeError, shoal.ShapeError)) as info:
        shoal.gather(_t((3, 4)), shoal.Tensor([0.0, 1.0]))
    assert "float32" in str(info.value)


@pytest.mark.parametrize("shape", [(2,), (2, 3), (0,)], ids=str)
def test_item_on_a_tensor_that_is_not_one_element(shape):
    with pytest.raises(shoal.ShapeError) as info:
        _t(shape).item()
    assert str(shape) in str(info.value)


def test_item_on_one_element():
    assert _t((1, 1)).item() == 1.0
    assert shoal.Tensor(2.5).item() == 2.5


# -- setitem ------------------------------------------------------------------------------------------------------
def test_setitem_with_a_value_of_the_wrong_shape():
    x = _t((4, 3)) * 1.0
    with pytest.raises(shoal.ShapeError) as info:
        x[1:3] = _t((3, 3))
    assert "(3, 3)" in str(info.value) and "(4, 3)" in str(info.value)


def test_setitem_with_a_value_of_another_dtype():
    x = _t((4, 3)) * 1.0
    with pytest.raises(shoal.DTypeError):
        x[0] = _t((3,), dtype="float64")
