"""shoal.save / shoal.load: round trips, the safe npz format, errors, atomic writes."""
import os

import numpy as np
import pytest

import shoal
from shoal import nn


def _files(directory):
    return sorted(os.listdir(directory))


def test_round_trip_of_a_nested_tree(tmp_path):
    obj = {
        "tensor": shoal.to_tensor(np.arange(6, dtype=np.float32).reshape(2, 3)),
        "f64": shoal.to_tensor(np.array([0.1, -2.5]), dtype="float64"),
        "ints": shoal.to_tensor(np.array([[1, 2]], dtype=np.int64)),
        "grad": shoal.to_tensor([1.0, 2.0], stop_gradient=False),
        "array": np.array([[1.5, 2.5]], dtype=np.float16),
        "uint": np.array([2 ** 64 - 1], dtype=np.uint64),
        "mask": np.array([True, False]),
        "scalar0d": np.array(3.25),
        "nested": {"list": [1, 2.5, "three", None, True, False, [shoal.to_tensor([4.0])]],
                   "tuple": (7, "eight", (9.0,)),
                   "empty": {}, "empty_list": [], "empty_tuple": ()},
        3: "an int key",
        "int": -12, "float": 1e-300, "big": 2 ** 62, "str": "héllo ✓", "none": None,
        "true": True, "false": False, "npfloat": np.float32(0.5), "npint": np.int64(4),
        "inf": float("inf"),
    }
    path = tmp_path / "tree.npz"
    assert shoal.save(obj, path) is None
    back = shoal.load(path)

    assert list(back) == list(obj)  # keys and their order
    for key in ("tensor", "f64", "ints", "grad"):
        t = back[key]
        assert isinstance(t, shoal.Tensor), key
        assert t.dtype == obj[key].dtype, key
        np.testing.assert_array_equal(t.numpy(), obj[key].numpy())
    assert back["grad"].requires_grad and not back["tensor"].requires_grad
    for key in ("array", "uint", "mask", "scalar0d"):
        a = back[key]
        assert type(a) is np.ndarray and a.dtype == obj[key].dtype and a.shape == obj[key].shape
        np.testing.assert_array_equal(a, obj[key])
    lst = back["nested"]["list"]
    assert lst[:6] == [1, 2.5, "three", None, True, False]
    assert [type(v) for v in lst[:6]] == [int, float, str, type(None), bool, bool]
    assert isinstance(lst[6], list) and isinstance(lst[6][0], shoal.Tensor)
    np.testing.assert_array_equal(lst[6][0].numpy(), [4.0])
    assert back["nested"]["tuple"] == (7, "eight", (9.0,))
    assert isinstance(back["nested"]["tuple"], tuple)
    assert back["nested"]["empty"] == {} and back["nested"]["empty_list"] == []
    assert back["nested"]["empty_tuple"] == ()
    assert back[3] == "an int key"
    for key in ("int", "float", "big", "str", "none", "true", "false", "inf"):
        assert back[key] == obj[key] and type(back[key]) is type(obj[key]), key
    assert back["npfloat"] == 0.5 and back["npint"] == 4


def test_load_return_numpy(tmp_path):
    shoal.save({"t": shoal.to_tensor([1.0, 2.0])}, tmp_path / "a.npz")
    back = shoal.load(tmp_path / "a.npz", return_numpy=True)
    assert type(back["t"]) is np.ndarray and back["t"].dtype == np.float32


def test_top_level_values(tmp_path):
    for i, obj in enumerate([shoal.to_tensor([1.0]), [1, 2], 5, "text", None]):
        path = tmp_path / f"{i}.npz"
        shoal.save(obj, str(path))  # str paths too
        back = shoal.load(str(path))
        if isinstance(obj, shoal.Tensor):
            np.testing.assert_array_equal(back.numpy(), obj.numpy())
        else:
            assert back == obj


def test_model_and_optimizer_checkpoint(tmp_path):
    shoal.seed(1)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    opt = shoal.optimizer.Adam(0.01, parameters=model.parameters())
    x = shoal.to_tensor(np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32))
    for _ in range(2):
        model(x).sum().backward()
        opt.step()
        opt.clear_grad()
    shoal.save({"model": model.state_dict(), "opt": opt.state_dict(), "epoch": 2},
               tmp_path / "ckpt.npz")

    shoal.seed(2)
    model2 = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    opt2 = shoal.optimizer.Adam(0.01, parameters=model2.parameters())
    ckpt = shoal.load(tmp_path / "ckpt.npz")
    assert ckpt["epoch"] == 2
    model2.set_state_dict(ckpt["model"])
    opt2.set_state_dict(ckpt["opt"])
    for (k, v), v2 in zip(model.state_dict().items(), model2.state_dict().values()):
        np.testing.assert_array_equal(v2.numpy(), v.numpy(), err_msg=k)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["state"].keys() == s2["state"].keys() and s2["lr"] == 0.01
    for k in s1["state"]:
        np.testing.assert_array_equal(np.asarray(s2["state"][k]), np.asarray(s1["state"][k]))
    for _ in range(2):
        for m, o in ((model, opt), (model2, opt2)):
            m(x).sum().backward()
            o.step()
            o.clear_grad()
    for p, q in zip(model.parameters(), model2.parameters()):
        np.testing.assert_array_equal(q.numpy(), p.numpy())


def test_file_is_an_npz_that_numpy_opens_without_pickle(tmp_path):
    path = tmp_path / "plain.npz"
    shoal.save({"w": shoal.to_tensor(np.ones((2, 2), np.float32)), "n": 3}, path)
    with np.load(path, allow_pickle=False) as z:
        assert "__shoal_tree__" in z.files
        arrays = [z[k] for k in z.files if k != "__shoal_tree__"]
        assert z["__shoal_tree__"].dtype == np.uint8
    assert len(arrays) == 1
    np.testing.assert_array_equal(arrays[0], np.ones((2, 2), np.float32))


@pytest.mark.parametrize("obj, where, what", [
    ({"a": {"fn": lambda x: x}}, "obj['a']['fn']", "function"),
    ({"a": [1, {2, 3}]}, "obj['a'][1]", "set"),
    ([1, (2, object())], "obj[1][1]", "object"),
    ({"s": np.array(["x", "y"])}, "obj['s']", "<U1"),
    ({"o": np.array([None, 1], dtype=object)}, "obj['o']", "object"),
    ({(1, 2): 3}, "obj", "tuple"),
    ({True: 3}, "obj", "bool"),
])
def test_saving_an_unsupported_object_names_its_path(tmp_path, obj, where, what):
    path = tmp_path / "bad.npz"
    with pytest.raises(shoal.SerializationError) as err:
        shoal.save(obj, path)
    msg = str(err.value)
    assert where in msg and what in msg
    assert _files(tmp_path) == []  # nothing written, no temporary left


def test_load_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        shoal.load(tmp_path / "nope.npz")


def test_load_random_bytes_raises_serialization_error_naming_the_path(tmp_path):
    path = tmp_path / "junk.npz"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(shoal.SerializationError, match="junk.npz"):
        shoal.load(path)


def test_load_truncated_save_raises_serialization_error(tmp_path):
    path = tmp_path / "cut.npz"
    shoal.save({"w": np.arange(1000.0)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(shoal.SerializationError, match="cut.npz"):
        shoal.load(path)


def test_load_plain_npz_without_the_tree_raises_naming_the_path(tmp_path):
    path = tmp_path / "plain.npz"
    np.savez(path, a=np.arange(3))
    with pytest.raises(shoal.SerializationError) as err:
        shoal.load(path)
    assert "plain.npz" in str(err.value) and "__shoal_tree__" in str(err.value)


def test_load_a_pickled_npz_member_is_refused(tmp_path):
    path = tmp_path / "pickled.npz"
    np.savez(path, __shoal_tree__=np.array([{"evil": 1}], dtype=object))
    with pytest.raises(shoal.SerializationError, match="pickled.npz"):
        shoal.load(path)


def _rewrite_tree(path, tree_bytes):
    with np.load(path, allow_pickle=False) as z:
        members = {k: z[k] for k in z.files}
    members["__shoal_tree__"] = np.frombuffer(tree_bytes, dtype=np.uint8)
    np.savez(path, **members)


@pytest.mark.parametrize("tree", [
    b"{not json",
    b'{"format": "shoal-state-v0", "tree": {"t": "value", "v": 1}}',
    b'{"format": "shoal-state-v1", "tree": {"t": "tensor", "k": 7}}',
    b'{"format": "shoal-state-v1", "tree": {"t": "mystery"}}',
    b'{"format": "shoal-state-v1", "tree": {"t": "dict", "items": 5}}',
    b'[1, 2]',
])
def test_load_corrupt_tree_raises_serialization_error_naming_the_path(tmp_path, tree):
    path = tmp_path / "corrupt.npz"
    shoal.save({"w": np.arange(3.0)}, path)
    _rewrite_tree(path, tree)
    with pytest.raises(shoal.SerializationError, match="corrupt.npz"):
        shoal.load(path)


def test_save_into_a_missing_directory_raises(tmp_path):
    with pytest.raises(shoal.SerializationError, match="does not exist"):
        shoal.save({"a": 1}, tmp_path / "no" / "such" / "dir.npz")


def test_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.npz"
    shoal.save({"v": 1}, path)
    assert _files(tmp_path) == ["ckpt.npz"]
    shoal.save({"v": 2}, path)  # overwrite
    assert _files(tmp_path) == ["ckpt.npz"]
    assert shoal.load(path) == {"v": 2}

    # a failure during the write leaves the old file whole and no temporary behind
    def broken_savez(f, **arrays):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        shoal.save({"v": 3}, path)
    assert _files(tmp_path) == ["ckpt.npz"]
    monkeypatch.undo()
    assert shoal.load(path) == {"v": 2}

    # a failure while encoding does not touch the file either
    with pytest.raises(shoal.SerializationError):
        shoal.save({"v": {1, 2}}, path)
    assert _files(tmp_path) == ["ckpt.npz"]
    assert shoal.load(path) == {"v": 2}


def test_sparse_grad_saves_dense(tmp_path):
    g = shoal.SparseGrad(np.array([1, 1]), np.ones((2, 2), np.float32), (3, 2))
    shoal.save({"g": g}, tmp_path / "g.npz")
    back = shoal.load(tmp_path / "g.npz")["g"]
    np.testing.assert_array_equal(back, [[0, 0], [2, 2], [0, 0]])
