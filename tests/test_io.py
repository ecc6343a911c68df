"""Restricted unpickling: real-format files load, nothing executes, garbage gives a named error."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from ofer.io import SafeLoadError, safe_load_npy_object, safe_load_pickle


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/ofer_pwned",))


def test_round_trip_of_allowed_types(tmp_path):
    obj = {"a": np.arange(6.0).reshape(2, 3), "J": sp.csc_matrix(np.eye(3)), "s": "x", "n": np.float32(2),
           "l": [1, (2, 3)], "i": np.int64(4)}
    for proto in (2, 4, 5):
        p = tmp_path / f"o{proto}.pkl"
        p.write_bytes(pickle.dumps(obj, protocol=proto))
        out = safe_load_pickle(p)
        np.testing.assert_array_equal(out["a"], obj["a"])
        np.testing.assert_array_equal(out["J"].toarray(), np.eye(3))
        assert out["s"] == "x" and out["l"] == [1, (2, 3)] and out["n"] == np.float32(2)


def test_code_is_never_executed(tmp_path):
    p = tmp_path / "evil.pkl"
    p.write_bytes(pickle.dumps({"x": _Evil()}))
    if os.path.exists("/tmp/ofer_pwned"):
        os.remove("/tmp/ofer_pwned")
    with pytest.raises(SafeLoadError, match=r"evil\.pkl.*refusing to load class posix\.system"):
        safe_load_pickle(p)
    assert not os.path.exists("/tmp/ofer_pwned")
    q = tmp_path / "evil.npy"
    np.save(q, np.array({"x": _Evil()}, dtype=object), allow_pickle=True)
    with pytest.raises(SafeLoadError, match="evil.npy"):
        safe_load_npy_object(q)
    assert not os.path.exists("/tmp/ofer_pwned")


def test_npy_dict_and_plain(tmp_path):
    p = tmp_path / "d.npy"
    np.save(p, {"k": np.ones((1, 68))}, allow_pickle=True)
    assert safe_load_npy_object(p)["k"].shape == (1, 68)
    np.save(p, np.arange(5))
    np.testing.assert_array_equal(safe_load_npy_object(p), np.arange(5))


def test_missing_and_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pkl"):
        safe_load_pickle(tmp_path / "nope.pkl")
    (tmp_path / "e.pkl").write_bytes(b"")
    with pytest.raises(SafeLoadError, match="e.pkl: empty"):
        safe_load_pickle(tmp_path / "e.pkl")


@settings(max_examples=200, deadline=None)
@given(data=st.binary(min_size=1, max_size=256))
def test_random_bytes_give_named_error(tmp_path_factory, data):
    d = tmp_path_factory.mktemp("fuzz")
    p = d / "f.pkl"
    p.write_bytes(data)
    try:
        safe_load_pickle(p)
    except SafeLoadError as err:
        assert "f.pkl" in str(err)
    q = d / "f.npy"
    q.write_bytes(data)
    try:
        safe_load_npy_object(q)
    except SafeLoadError as err:
        assert "f.npy" in str(err)


def test_truncations_of_a_real_file(tmp_path):
    obj = {"a": np.random.default_rng(0).normal(size=(50, 3)), "J": sp.csc_matrix(np.eye(4))}
    data = pickle.dumps(obj, protocol=2)
    p = tmp_path / "t.pkl"
    for n in range(1, len(data), max(1, len(data) // 60)):
        p.write_bytes(data[:n])
        with pytest.raises(SafeLoadError, match="t.pkl"):
            safe_load_pickle(p)
