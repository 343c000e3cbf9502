"""A user's data: ``.npz`` files, folders of MNIST IDX files, and factories, as :class:`~netshrink.data.Splits`.

The ``.npz`` layout (read with ``numpy.load(..., allow_pickle=False)``: arrays of Python objects are
refused, nothing in the file runs code):

- **split**: arrays named ``<split>_<column>`` for the splits ``train``, ``val`` and ``test``, the same
  columns in each, e.g. ``train_x, train_y, val_x, val_y, test_x, test_y``;
- **unsplit**: arrays named by column only (``x, y``); the rows are split into train / val / test by a
  permutation from ``numpy.random.default_rng(seed)`` (``val_fraction`` and ``test_fraction`` of the
  rows, rounded, default 0.1 each).

Columns ``x`` and ``y`` give ``(x, y)`` batches. Any other set of columns gives dict batches: example
``i`` is ``{column: array[i]}`` (e.g. ``input_ids, attention_mask, labels`` for a token classifier; the
task finds the target under ``labels``/``label``/``targets``/``target``/``y``). Floating arrays become
float32, integer arrays int64 (token ids and class labels), booleans stay bool. Every column of a split
must have the same number of rows.
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from .errors import ConfigError, DataError

SPLITS = ("train", "val", "test")


class DictDataset(Dataset):
    """Examples as dicts: example ``i`` is ``{key: tensor[i]}``; the default collate makes dict batches."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        lengths = {k: len(v) for k, v in tensors.items()}
        if len(set(lengths.values())) > 1:
            raise DataError(f"columns of different lengths: {lengths}")
        self.tensors = dict(tensors)
        self._len = next(iter(lengths.values()), 0)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}


def _tensor(a: np.ndarray, where: str) -> torch.Tensor:
    if a.dtype.kind == "f":
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    if a.dtype.kind in "iu":
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))
    if a.dtype.kind == "b":
        return torch.from_numpy(np.ascontiguousarray(a))
    raise DataError(f"{where}: arrays of dtype {a.dtype} are not supported (numbers or booleans only)")


def _columns(cols: dict[str, np.ndarray], where: str) -> Dataset:
    """A dataset of one split's columns, after checking they all have the same number of rows."""
    if not cols:
        raise DataError(f"{where}: no arrays")
    for k, a in cols.items():
        if a.ndim == 0:
            raise DataError(f"{where}: array {k!r} is a scalar, not one row per example")
    lengths = {k: int(a.shape[0]) for k, a in cols.items()}
    if len(set(lengths.values())) > 1:
        (k0, n0), *rest = sorted(lengths.items())
        k1, n1 = next((k, n) for k, n in rest if n != n0)
        raise DataError(f"{where}: mismatched lengths: {k1!r} has {n1} rows but {k0!r} has {n0}")
    if next(iter(lengths.values())) == 0:
        raise DataError(f"{where}: the split is empty (0 rows)")
    tensors = {k: _tensor(a, f"{where} {k!r}") for k, a in cols.items()}
    if set(tensors) == {"x", "y"}:
        return TensorDataset(tensors["x"], tensors["y"])
    return DictDataset(tensors)


def _num_classes(datasets: list[Dataset]) -> int:
    """Classes of integer 1-D targets (``y``/``labels``...): ``max + 1``; 0 when the target is not a class."""
    top = -1
    for ds in datasets:
        t = ds.tensors[1] if isinstance(ds, TensorDataset) else next(
            (ds.tensors[k] for k in ("labels", "label", "targets", "target", "y") if k in ds.tensors), None)
        if t is None or t.dtype != torch.int64 or t.dim() != 1:
            return 0
        top = max(top, int(t.max()))
    return top + 1


def read_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Every array of an .npz file (no pickles); a :class:`DataError` line for a missing or bad file."""
    from ._inputs import check_npz

    path = Path(path)
    check_npz(path)  # declared array sizes bounded before anything is inflated
    try:
        with np.load(path, allow_pickle=False) as z:
            if not hasattr(z, "files"):
                raise DataError(f"{path}: a single .npy array, not an .npz archive of named arrays")
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except ValueError as err:  # object arrays (pickles) and malformed headers
        raise DataError(f"{path}: unreadable array ({str(err).splitlines()[0]}); only numeric arrays are read, never pickles") from None
    except (OSError, zipfile.BadZipFile, EOFError, zlib.error) as err:
        raise DataError(f"{path}: not a readable .npz file ({err})") from None


def load_npz(path: str | Path, *, seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.1, name: str | None = None):
    """:class:`~netshrink.data.Splits` from an ``.npz`` file in the layout of this module's docstring."""
    from .data import Splits

    path = Path(path)
    arrays = read_npz(path)
    if not arrays:
        raise DataError(f"{path}: the file holds no arrays")
    split_keys = [k for k in arrays if k.split("_", 1)[0] in SPLITS and "_" in k]
    parts: dict[str, Dataset] = {}
    if split_keys:
        loose = sorted(set(arrays) - set(split_keys))
        if loose:
            raise DataError(f"{path}: array {loose[0]!r} has no split prefix while others do (train_, val_, test_)")
        cols = {s: {k[len(s) + 1:]: a for k, a in arrays.items() if k.startswith(s + "_")} for s in SPLITS}
        for s in SPLITS:
            if not cols[s]:
                raise DataError(f"{path}: no {s}_* arrays (a split file needs train_*, val_* and test_* arrays)")
            if set(cols[s]) != set(cols["train"]):
                raise DataError(f"{path}: split {s} has columns {sorted(cols[s])}, train has {sorted(cols['train'])}")
            parts[s] = _columns(cols[s], f"{path}: {s}")
    else:
        for fname, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0.0 < frac < 1.0:
                raise ConfigError(fname, f"must lie in (0, 1), got {frac!r}")
        if val_fraction + test_fraction >= 1.0:
            raise ConfigError("val_fraction", "val_fraction + test_fraction must be below 1")
        whole = _columns(arrays, str(path))  # checks the lengths
        n = len(whole)
        perm = np.random.default_rng(seed).permutation(n)
        n_test, n_val = int(round(n * test_fraction)), int(round(n * val_fraction))
        if n - n_test - n_val < 1 or n_test < 1 or n_val < 1:
            raise DataError(f"{path}: {n} rows are too few to split into train / val / test")
        idx = {"test": perm[:n_test], "val": perm[n_test:n_test + n_val], "train": perm[n_test + n_val:]}
        for s in SPLITS:
            parts[s] = _columns({k: a[idx[s]] for k, a in arrays.items()}, f"{path}: {s}")
    return Splits(name or path.stem, parts["train"], parts["val"], parts["test"], num_classes=_num_classes(list(parts.values())))


def load_idx_folder(folder: str | Path):
    """MNIST-style splits from a folder of the four standard IDX files (:func:`~netshrink.data.mnist_arrays_from_idx`)."""
    from .data import _splits_from_pixels, mnist_arrays_from_idx

    folder = Path(folder)
    return _splits_from_pixels(folder.name or "idx", mnist_arrays_from_idx(folder))


def splits_of(obj: Any, name: str, field: str):
    """A factory's result as :class:`~netshrink.data.Splits`: a Splits, or a dict of train/val/test datasets."""
    from .data import Splits

    if isinstance(obj, Splits):
        return obj
    if not isinstance(obj, Mapping):
        raise ConfigError(field, f"{name!r} returned a {type(obj).__name__}; expected netshrink.data.Splits or a dict of train/val/test datasets")
    missing = [s for s in SPLITS if s not in obj]
    if missing:
        raise ConfigError(field, f"{name!r} returned a dict without {missing[0]!r} (it needs train, val and test)")
    for s in SPLITS:
        ds = obj[s]
        if not (hasattr(ds, "__len__") and hasattr(ds, "__getitem__")):
            raise ConfigError(field, f"{name!r}: {s} is a {type(ds).__name__}, not a map-style Dataset")
        if len(ds) == 0:
            raise DataError(f"{name}: the {s} split is empty")
    return Splits(name, obj["train"], obj["val"], obj["test"], num_classes=int(obj.get("num_classes", 0)))


def resolve_data(spec: Any, args: Mapping[str, Any] | None = None, field: str = "data"):
    """The :class:`~netshrink.data.Splits` a recipe's ``data:`` names: a registered data set, a
    ``package.module:function`` factory, an ``.npz`` file, or a folder of MNIST IDX files; ``args``
    are the loader's keyword arguments."""
    from ._plugins import call_factory, is_object_spec
    from .data import _DATASETS, load_dataset

    args = dict(args or {})
    if not isinstance(spec, str) or not spec:
        raise ConfigError(field, f"expected a data set name, a path or 'package.module:function', got {spec!r}")
    if is_object_spec(spec):
        return splits_of(call_factory(spec, args, field, "the data splits"), spec, field)
    if spec in _DATASETS:
        try:
            return load_dataset(spec, **args)
        except ConfigError as err:
            raise ConfigError(field if err.field == "dataset" else err.field, err.message) from None
    path = Path(spec).expanduser()
    if path.is_dir():
        if args:
            raise ConfigError(f"{field}_args", "a folder of IDX files takes no arguments")
        return load_idx_folder(path)
    if path.suffix == ".npz":
        if not path.exists():
            raise DataError(f"{path}: file not found")
        unknown = sorted(set(args) - {"seed", "val_fraction", "test_fraction", "name"})
        if unknown:
            raise ConfigError(f"{field}_args.{unknown[0]}", "unknown argument (known: seed, val_fraction, test_fraction, name)")
        return load_npz(path, **args)
    known = ", ".join(_DATASETS.names())
    raise ConfigError(field, f"{spec!r} is not a data set (known: {known}), an existing .npz file, a folder of IDX files "
                             "or 'package.module:function'")

