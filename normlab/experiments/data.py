"""Data sets for the lab: an embedded default and loaders for files a user downloads.

Every loader returns a :class:`Dataset` holding images as float32 ``[N, C, H, W]`` in
``[0, 1]`` and labels as int64 ``[N]``. Models that want vectors call
:meth:`Dataset.flat`.

The default, :func:`load_digits`, is scikit-learn's bundled 8x8 handwritten digits
(1,797 images, 10 classes). It ships inside the scikit-learn wheel, so it needs no
network and no download step, it is real handwriting rather than a synthetic
distribution, and it is small enough that a 4-layer MLP trains to ~97% test accuracy in
seconds on two CPU cores, which is what keeps ``normlab demo`` under a minute.

For real-sized runs, ``--data DIR`` reads:

* MNIST or Fashion-MNIST IDX files (``train-images-idx3-ubyte`` etc., gzipped or not);
* CIFAR-10 "python version" batches (``data_batch_1`` .. ``data_batch_5``, ``test_batch``).

A wrong or truncated file raises ``ValueError`` naming the file and what is wrong.
"""

from __future__ import annotations

import gzip
import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "Dataset",
    "load_cifar10",
    "load_dataset",
    "load_digits",
    "load_mnist",
    "read_idx",
]


@dataclass(frozen=True)
class Dataset:
    """A train/test split of labelled images.

    ``x_train``/``x_test`` are float32 ``[N, C, H, W]`` in ``[0, 1]``; ``y_*`` int64 ``[N]``.
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        c, h, w = self.x_train.shape[1:]
        return int(c), int(h), int(w)

    @property
    def num_inputs(self) -> int:
        """Length of one flattened image, ``C * H * W``."""
        c, h, w = self.image_shape
        return c * h * w

    def flat(self) -> tuple[Tensor, Tensor]:
        """Train and test images as ``[N, C*H*W]`` views (for MLPs)."""
        return self.x_train.flatten(1), self.x_test.flatten(1)

    def subset(self, max_train: int | None, max_test: int | None, seed: int = 0) -> Dataset:
        """A seeded random subset (``None`` keeps all) -- for quick runs on large data."""
        g = torch.Generator().manual_seed(seed)

        def pick(x: Tensor, y: Tensor, n: int | None) -> tuple[Tensor, Tensor]:
            if n is None or n >= len(y):
                return x, y
            idx = torch.randperm(len(y), generator=g)[:n]
            return x[idx], y[idx]

        xtr, ytr = pick(self.x_train, self.y_train, max_train)
        xte, yte = pick(self.x_test, self.y_test, max_test)
        return Dataset(self.name, xtr, ytr, xte, yte, self.num_classes)

    def describe(self) -> str:
        """One line: name, sizes and image shape."""
        c, h, w = self.image_shape
        return (
            f"{self.name}: {len(self.y_train)} train / {len(self.y_test)} test images, "
            f"{c}x{h}x{w}, {self.num_classes} classes"
        )


def _make(name: str, xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray,
          scale: float) -> Dataset:
    """Build a Dataset from ``[N, C, H, W]`` arrays, dividing pixels by ``scale``."""
    def images(a: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32) / np.float32(scale))

    def labels(a: np.ndarray) -> Tensor:
        return torch.from_numpy(np.asarray(a, dtype=np.int64).copy())

    num_classes = int(max(ytr.max(), yte.max())) + 1
    return Dataset(name, images(xtr), labels(ytr), images(xte), labels(yte), num_classes)


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8x8 digits, split per class (stratified) with a fixed seed.

    Pixels are integers 0..16 in the source; they are scaled to ``[0, 1]``.
    Returns images ``[N, 1, 8, 8]``: 1,437 train and 360 test at the default fraction.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    x = bunch.images.reshape(-1, 1, 8, 8)
    y = bunch.target
    rng = np.random.default_rng(seed)
    test_idx = []
    for label in np.unique(y):
        members = np.flatnonzero(y == label)
        rng.shuffle(members)
        test_idx.extend(members[: round(len(members) * test_fraction)])
    is_test = np.zeros(len(y), dtype=bool)
    is_test[test_idx] = True
    return _make("digits", x[~is_test], y[~is_test], x[is_test], y[is_test], scale=16.0)


# IDX format (http://yann.lecun.com/exdb/mnist/): two zero bytes, a type code, the number
# of dimensions, then each dimension as a big-endian uint32, then the data, big-endian.
_IDX_TYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_bytes(path: Path) -> bytes:
    """File contents, transparently gunzipped when the file is gzip (by magic, not name)."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as exc:  # BadGzipFile is an OSError; truncation is EOF
            raise ValueError(f"{path}: corrupt or truncated gzip data ({exc})") from exc
    return raw


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (``.gz`` or not) into an array of its stored type and shape."""
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise ValueError(f"{path}: truncated IDX file ({len(raw)} bytes, header needs 4)")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ValueError(
            f"{path}: not an IDX file (magic bytes {raw[:4].hex()}; expected 0000 then a "
            f"type code in {sorted(hex(k) for k in _IDX_TYPES)} and a rank)"
        )
    dtype, ndim = _IDX_TYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header (rank {ndim} needs {header} bytes)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) < expected:
        raise ValueError(
            f"{path}: truncated IDX data (shape {shape} needs {expected} bytes, file has "
            f"{len(raw)})"
        )
    if len(raw) > expected:
        raise ValueError(
            f"{path}: {len(raw) - expected} unexpected trailing bytes after IDX data of "
            f"shape {shape}"
        )
    values = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return values.astype(dtype.newbyteorder("="))  # native byte order, writable copy


_MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


def _find_idx(directory: Path, stem: str) -> Path | None:
    """``stem`` with or without ``.gz``; also the ``train-images.idx3-ubyte`` spelling."""
    alt = stem.replace("-idx", ".idx")
    for name in (stem, stem + ".gz", alt, alt + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def load_mnist(directory: str | Path, name: str | None = None) -> Dataset:
    """MNIST or Fashion-MNIST from the four IDX files in ``directory`` (gzipped or not).

    Returns images ``[N, 1, 28, 28]`` (any ``H, W`` the files hold) scaled to ``[0, 1]``.
    """
    directory = Path(directory)
    paths = {key: _find_idx(directory, stem) for key, stem in _MNIST_FILES.items()}
    missing = [_MNIST_FILES[k] for k, p in paths.items() if p is None]
    if missing:
        raise ValueError(f"{directory}: missing IDX file(s) {missing} (optionally .gz)")
    arrays = {key: read_idx(p) for key, p in paths.items() if p is not None}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        xp, yp = paths[f"x_{split}"], paths[f"y_{split}"]
        if x.ndim != 3:
            raise ValueError(f"{xp}: expected images of rank 3 [N, H, W], got shape {x.shape}")
        if y.ndim != 1:
            raise ValueError(f"{yp}: expected labels of rank 1 [N], got shape {y.shape}")
        if len(x) != len(y):
            raise ValueError(f"{xp} has {len(x)} images but {yp} has {len(y)} labels")
    label = name or ("fashion-mnist" if "fashion" in str(directory).lower() else "mnist")
    return _make(
        label,
        arrays["x_train"][:, None], arrays["y_train"],
        arrays["x_test"][:, None], arrays["y_test"],
        scale=255.0,
    )


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only plain containers and NumPy arrays: a data file cannot run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),  # how Python 3 writes bytes at pickle protocol 2
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


_CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
_CIFAR_TEST = "test_batch"


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch: images ``[n, 3, 32, 32]`` uint8 and labels ``[n]``."""
    try:
        # The official batches were pickled by Python 2; "bytes" keeps their keys as bytes.
        batch = _ArrayUnpickler(io.BytesIO(_read_bytes(path)), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: not a readable CIFAR-10 python batch ({exc})") from exc
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(batch).__name__}")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise ValueError(f"{path}: CIFAR-10 batch needs keys 'data' and 'labels', has "
                         f"{sorted(batch)}")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch["labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: 'data' must have shape [n, 3072], got {data.shape}")
    if len(labels) != len(data):
        raise ValueError(f"{path}: {len(data)} images but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{path}: labels must be in 0..9, got {labels.min()}..{labels.max()}")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(directory: str | Path) -> Dataset:
    """CIFAR-10 python batches from ``directory`` (or its ``cifar-10-batches-py`` child).

    Returns images ``[N, 3, 32, 32]`` scaled to ``[0, 1]``.
    """
    directory = Path(directory)
    if (directory / "cifar-10-batches-py").is_dir():
        directory = directory / "cifar-10-batches-py"
    missing = [n for n in [*_CIFAR_TRAIN, _CIFAR_TEST] if not (directory / n).is_file()]
    if missing:
        raise ValueError(f"{directory}: missing CIFAR-10 batch file(s) {missing}")
    train = [_read_cifar_batch(directory / n) for n in _CIFAR_TRAIN]
    xte, yte = _read_cifar_batch(directory / _CIFAR_TEST)
    xtr = np.concatenate([x for x, _ in train])
    ytr = np.concatenate([y for _, y in train])
    return _make("cifar10", xtr, ytr, xte, yte, scale=255.0)


def load_dataset(directory: str | Path | None = None) -> Dataset:
    """The embedded digits when ``directory`` is None, else MNIST-style IDX or CIFAR-10."""
    if directory is None:
        return load_digits()
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"--data {directory}: not a directory")
    if _find_idx(directory, _MNIST_FILES["x_train"]) is not None:
        return load_mnist(directory)
    if (directory / "cifar-10-batches-py").is_dir() or (directory / _CIFAR_TEST).is_file():
        return load_cifar10(directory)
    raise ValueError(
        f"--data {directory}: found neither MNIST/Fashion-MNIST IDX files "
        f"({_MNIST_FILES['x_train']}[.gz], ...) nor CIFAR-10 python batches "
        f"({_CIFAR_TEST}, data_batch_1..5)"
    )
