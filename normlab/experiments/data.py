"""Data sets for the lab: an embedded default and loaders for files a user downloads.

Every loader returns a :class:`Dataset` holding images as float32 ``[N, C, H, W]`` in
``[0, 1]`` and labels as int64 ``[N]``. Models that want vectors call
:meth:`Dataset.flat`.

The default, :func:`load_digits`, is scikit-learn's bundled 8x8 handwritten digits
(1,797 images, 10 classes). It ships inside the scikit-learn wheel, so it needs no
network and no download step, it is real handwriting rather than a synthetic
distribution, and it is small enough that a 4-layer MLP trains to ~97% test accuracy in
seconds on two CPU cores, which is what keeps ``normlab demo`` under a minute.

``--data shapes`` generates a harder set instead (:mod:`normlab.experiments.procedural`:
10,000 + 2,000 seeded procedural 16x16 images of ten shapes and textures), for claims the
digits are too easy to show; its :meth:`Dataset.describe` says it is generated and by
which seed.

For real-sized runs, ``--data DIR`` reads:

* MNIST or Fashion-MNIST IDX files (``train-images-idx3-ubyte`` etc., gzipped or not);
* CIFAR-10 "python version" batches (``data_batch_1`` .. ``data_batch_5``, ``test_batch``).

A wrong or truncated file raises ``ValueError`` naming the file and what is wrong. So
does one that would take far more memory than its format allows: an IDX header decides
how much is read (gzip is decompressed no further), and a CIFAR-10 pickle may neither
exceed a real batch's size by much nor build more bytes than it holds.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import pickle
import pickletools
import struct
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

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
    #: Where the data came from, when it is not a file (a generator, its seed): said by
    #: :meth:`describe`, so every stored result and report names the data it rests on.
    source: str = ""

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
        return replace(self, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)

    def describe(self) -> str:
        """One line: name, sizes, image shape, and the source of generated data."""
        c, h, w = self.image_shape
        text = (
            f"{self.name}: {len(self.y_train)} train / {len(self.y_test)} test images, "
            f"{c}x{h}x{w}, {self.num_classes} classes"
        )
        return f"{text} ({self.source})" if self.source else text


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
# Images are rank 3 and labels rank 1; nothing in the IDX family goes past 4.
_IDX_MAX_RANK = 4
# The largest IDX file in common use, EMNIST ByClass's training images, holds 547 MB
# (MNIST's holds 47 MB). The header alone decides how much a file may make us allocate.
_IDX_MAX_BYTES = 1 << 30
_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 20


def _read_upto(stream: BinaryIO, n: int) -> bytearray:
    """Up to ``n`` bytes of ``stream``, fewer only at its end; grown as data actually arrives."""
    buf = bytearray()
    while len(buf) < n:
        chunk = stream.read(min(n - len(buf), _CHUNK))
        if not chunk:
            break
        buf += chunk
    return buf


def _read_idx_stream(path: Path, stream: BinaryIO, size: int | None) -> np.ndarray:
    """Parse IDX from ``stream``; ``size`` is the file's length, or None when gzipped."""
    head = bytes(_read_upto(stream, 4))
    if len(head) < 4:
        raise ValueError(f"{path}: truncated IDX file ({len(head)} bytes, header needs 4)")
    if head[0] != 0 or head[1] != 0 or head[2] not in _IDX_TYPES:
        raise ValueError(
            f"{path}: not an IDX file (magic bytes {head.hex()}; expected 0000 then a "
            f"type code in {sorted(hex(k) for k in _IDX_TYPES)} and a rank)"
        )
    dtype, ndim = _IDX_TYPES[head[2]], head[3]
    if not 1 <= ndim <= _IDX_MAX_RANK:
        raise ValueError(f"{path}: IDX rank {ndim} not supported (expected 1..{_IDX_MAX_RANK})")
    header = 4 + 4 * ndim
    dims = bytes(_read_upto(stream, 4 * ndim))
    if len(dims) < 4 * ndim:
        raise ValueError(f"{path}: truncated IDX header (rank {ndim} needs {header} bytes)")
    shape = struct.unpack(f">{ndim}I", dims)
    nbytes = math.prod(shape) * dtype.itemsize  # Python ints: no wrap-around
    if nbytes > _IDX_MAX_BYTES:
        raise ValueError(
            f"{path}: IDX header declares shape {shape} of {dtype.name}, {nbytes} bytes; "
            f"over the {_IDX_MAX_BYTES}-byte limit for one IDX file"
        )
    expected = header + nbytes
    if size is not None and size != expected:  # a plain file: refuse before reading it
        if size < expected:
            raise ValueError(
                f"{path}: truncated IDX data (shape {shape} needs {expected} bytes, file has "
                f"{size})"
            )
        raise ValueError(
            f"{path}: {size - expected} unexpected trailing bytes after IDX data of shape "
            f"{shape}"
        )
    payload = _read_upto(stream, nbytes)
    if len(payload) < nbytes:
        raise ValueError(
            f"{path}: truncated IDX data (shape {shape} needs {expected} bytes, file has "
            f"{header + len(payload)})"
        )
    if stream.read(1):  # one byte past the declared end is enough to know; read no more
        raise ValueError(
            f"{path}: unexpected trailing bytes after IDX data of shape {shape} (the "
            f"header declares {expected} bytes)"
        )
    values = np.frombuffer(payload, dtype=dtype).reshape(shape)
    return values.astype(dtype.newbyteorder("="), copy=False)  # native byte order, writable


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (``.gz`` or not) into an array of its stored type and shape.

    Gzip is recognised by its magic bytes and decompressed only as far as the header says.
    """
    path = Path(path)
    with path.open("rb") as f:
        if f.read(2) == _GZIP_MAGIC:
            f.seek(0)
            try:
                with gzip.GzipFile(fileobj=f) as stream:
                    return _read_idx_stream(path, stream, None)
            except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
                raise ValueError(f"{path}: corrupt or truncated gzip data ({exc})") from exc
        f.seek(0)
        return _read_idx_stream(path, f, os.fstat(f.fileno()).st_size)


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


# A published batch is 31,035,704 bytes (pickled by Python 2); Python 3 re-pickling one at
# protocol 2 makes about 47 MB. Past this a file is not a CIFAR-10 batch.
_CIFAR_MAX_BYTES = 64 << 20
# A real batch is about 30,000 pickle opcodes (90,000 when Python 3 writes protocol 2).
# One opcode byte can make an object of up to ~200 bytes (an empty set), so the count
# bounds what a file of many tiny opcodes can allocate.
_PICKLE_MAX_OPS = 200_000
_CIFAR_PIXELS = 3 * 32 * 32
_NP_SCALAR = np.uint8(0).__reduce__()[0]  # numpy's scalar constructor, wherever it lives
_NDARRAY = object()  # what a pickle's ``numpy.ndarray`` becomes: named, never called


def _read_capped(path: Path, cap: int) -> bytes:
    """The file's bytes, gunzipped when gzip (by magic); ValueError past ``cap`` bytes."""
    with path.open("rb") as f:
        gzipped = f.read(2) == _GZIP_MAGIC
        f.seek(0)
        data: bytes | bytearray
        if gzipped:
            try:
                with gzip.GzipFile(fileobj=f) as stream:
                    data = _read_upto(stream, cap + 1)
            except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
                raise ValueError(f"{path}: corrupt or truncated gzip data ({exc})") from exc
        else:
            size = os.fstat(f.fileno()).st_size
            if size > cap:
                raise ValueError(f"{path}: {size} bytes, over the {cap}-byte limit for one "
                                 "file (a CIFAR-10 batch is about 31 MB)")
            data = f.read(size + 1)  # read(n) allocates n bytes before it reads any
    if len(data) > cap:
        raise ValueError(f"{path}: over {cap} bytes{' once gunzipped' if gzipped else ''}, "
                         "the limit for one file (a CIFAR-10 batch is about 31 MB)")
    return bytes(data)


def _check_pickle_ops(data: bytes) -> None:
    """Refuse a pickle whose opcodes alone would make the unpickler allocate far past its size.

    CPython's unpickler sizes its memo table by the largest index a PUT names (a 15-byte
    pickle with ``LONG_BINPUT 0x0FFFFFFF`` takes 4 GB), while a real pickler numbers its
    memo entries 0, 1, 2, ..., never past the opcodes written so far. It also allocates a
    string's declared length before reading it (``BINBYTES8`` of 8 GB in a 111-byte
    file takes 8 GB); pickletools only reads what is there, so such a file fails here.
    """
    for count, (op, arg, pos) in enumerate(pickletools.genops(data), 1):
        if count > _PICKLE_MAX_OPS:
            raise pickle.UnpicklingError(f"more than {_PICKLE_MAX_OPS} pickle opcodes")
        if op.name in ("PUT", "BINPUT", "LONG_BINPUT") and arg > count:
            raise pickle.UnpicklingError(
                f"memo index {arg} at byte {pos} is past the {count} opcodes before it")


class _ArrayState:
    """A NumPy array as it unpickles: ``_reconstruct(ndarray, ...)``, then a BUILD state.

    NumPy's own ``__setstate__`` copies the data for byte-swapped or small arrays, so one
    memoized state built again and again would be copied each time; here the array is a
    read-only view of the pickled bytes, made only after their length matches the shape.
    """

    array: np.ndarray | None = None

    def __setstate__(self, state: object) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise pickle.UnpicklingError("malformed NumPy array state")
        shape, dtype, fortran, raw = state[-4:]  # (version,) shape, dtype, is_fortran, data
        if not (isinstance(shape, tuple) and all(type(d) is int and d >= 0 for d in shape)):
            raise pickle.UnpicklingError("malformed NumPy array shape")
        if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(raw, bytes):
            raise pickle.UnpicklingError("only NumPy arrays of plain numbers are allowed")
        count = math.prod(shape)
        if len(raw) != count * dtype.itemsize:
            raise pickle.UnpicklingError(
                f"NumPy array data is {len(raw)} bytes, shape {shape} of {dtype} needs "
                f"{count * dtype.itemsize}")
        flat = np.frombuffer(raw, dtype=dtype, count=count)
        self.array = flat.reshape(shape, order="F" if fortran else "C")


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers, NumPy arrays, dtypes and scalars, and protocol-2 bytes.

    A data file cannot run code: only the names below resolve, and each to a function of
    ours that checks its arguments before building anything.
    """

    def __init__(self, data: bytes) -> None:
        # The official batches were pickled by Python 2; "bytes" keeps their keys as bytes.
        super().__init__(io.BytesIO(data), encoding="bytes")
        # Each byte a genuine pickle's constructors make was spelled out once in the stream.
        # Memo references let a crafted one hand the same text to a constructor thousands
        # of times, so making more bytes than the file holds is refused.
        self._budget = len(data)
        self._classes: dict[tuple[str, str], object] = {
            ("numpy.core.multiarray", "_reconstruct"): self._reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): self._reconstruct,
            ("numpy", "ndarray"): _NDARRAY,
            ("numpy", "dtype"): np.dtype,
            ("numpy.core.multiarray", "scalar"): self._scalar,
            ("numpy._core.multiarray", "scalar"): self._scalar,
            ("_codecs", "encode"): self._encode,  # how Python 3 writes bytes at protocol 2
        }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._classes:
            raise pickle.UnpicklingError(f"refusing to load {module:.60}.{name:.60}")
        return self._classes[module, name]

    def _spend(self, n: int) -> None:
        self._budget -= n
        if self._budget < 0:
            raise pickle.UnpicklingError(
                "it builds more bytes than the file holds (memo references reused)")

    def _encode(self, text: object, encoding: object = "utf-8", errors: object = "strict",
                ) -> bytes:
        if encoding not in ("latin1", "latin-1") or errors != "strict":
            raise pickle.UnpicklingError(
                f"refusing _codecs.encode with codec {encoding!r:.40} and errors "
                f"{errors!r:.40} (Python 3 writes bytes with 'latin1')")
        if not isinstance(text, str):
            raise pickle.UnpicklingError(f"_codecs.encode of {type(text).__name__}, not str")
        self._spend(len(text))
        return text.encode("latin-1")

    def _scalar(self, dtype: object, *args: object) -> object:
        if not isinstance(dtype, np.dtype) or dtype.hasobject:
            raise pickle.UnpicklingError("only NumPy scalars of plain numbers are allowed")
        self._spend(dtype.itemsize)
        return _NP_SCALAR(dtype, *args)

    @staticmethod
    def _reconstruct(subtype: object, shape: object, typecode: object) -> _ArrayState:
        if subtype is not _NDARRAY:
            raise pickle.UnpicklingError("_reconstruct of anything but numpy.ndarray")
        return _ArrayState()


_CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
_CIFAR_TEST = "test_batch"


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch: images ``[n, 3, 32, 32]`` uint8 and labels ``[n]``."""
    raw = _read_capped(path, _CIFAR_MAX_BYTES)
    try:
        _check_pickle_ops(raw)
        batch = _ArrayUnpickler(raw).load()
    except Exception as exc:  # crafted bytes can raise almost anything: all mean a bad file
        raise ValueError(f"{path}: not a readable CIFAR-10 python batch "
                         f"({type(exc).__name__}: {str(exc)[:200]})") from exc
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(batch).__name__}")
    batch = {k.decode("latin-1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        keys = sorted(k[:40] if isinstance(k, str) else type(k).__name__ for k in batch)
        raise ValueError(f"{path}: CIFAR-10 batch needs keys 'data' and 'labels', has "
                         f"{keys[:20]}")
    # Only checked types are converted: np.asarray on a list of memo references to one
    # row would make a copy of the row per reference.
    data = batch["data"].array if isinstance(batch["data"], _ArrayState) else None
    if data is None or data.dtype != np.uint8:
        got = (f"{data.dtype} array" if data is not None else "an array with no data"
               if isinstance(batch["data"], _ArrayState) else type(batch["data"]).__name__)
        raise ValueError(f"{path}: 'data' must be a uint8 NumPy array, got {got}")
    if data.ndim != 2 or data.shape[1] != _CIFAR_PIXELS:
        raise ValueError(f"{path}: 'data' must have shape [n, 3072], got {data.shape}")
    labels = batch["labels"]
    if isinstance(labels, _ArrayState) and labels.array is not None and labels.array.ndim == 1:
        labels = labels.array.tolist()
    if not isinstance(labels, (list, tuple)):
        raise ValueError(f"{path}: 'labels' must be a list, got {type(labels).__name__}")
    if len(labels) != len(data):
        raise ValueError(f"{path}: {len(data)} images but {len(labels)} labels")
    kinds = {type(v).__name__ for v in labels if not isinstance(v, (int, np.integer))}
    if kinds:
        raise ValueError(f"{path}: labels must be integers, got {sorted(kinds)[:5]}")
    if labels and (min(labels) < 0 or max(labels) > 9):
        raise ValueError(f"{path}: labels must be in 0..9, got {min(labels)}..{max(labels)}")
    return data.reshape(-1, 3, 32, 32), np.array(labels, dtype=np.int64)


def load_cifar10(directory: str | Path) -> Dataset:
    """CIFAR-10 python batches from ``directory`` (or its ``cifar-10-batches-py`` child).

    Returns images ``[N, 3, 32, 32]`` scaled to ``[0, 1]``.
    """
    directory = Path(directory)
    if (directory / "cifar-10-batches-py").is_dir():
        directory = directory / "cifar-10-batches-py"
    missing = [n for n in [*_CIFAR_TRAIN, _CIFAR_TEST] if not (directory / n).is_file()]
    if missing:
        have = len(_CIFAR_TRAIN) + 1 - len(missing)
        raise ValueError(
            f"{directory}: incomplete CIFAR-10 folder ({have} of the 6 batch files): "
            f"missing {', '.join(missing)}; extract the whole cifar-10-python.tar.gz here"
        )
    train = [_read_cifar_batch(directory / n) for n in _CIFAR_TRAIN]
    xte, yte = _read_cifar_batch(directory / _CIFAR_TEST)
    xtr = np.concatenate([x for x, _ in train])
    ytr = np.concatenate([y for _, y in train])
    return _make("cifar10", xtr, ytr, xte, yte, scale=255.0)


def load_dataset(directory: str | Path | None = None) -> Dataset:
    """The embedded digits when ``directory`` is None; a generated set when it names one
    (``"shapes"``) and no such path exists; else MNIST-style IDX or CIFAR-10 files."""
    if directory is None:
        return load_digits()
    from normlab.experiments.procedural import GENERATED  # it imports this module

    path = Path(directory)
    if not path.exists() and str(directory) in GENERATED:
        return GENERATED[str(directory)]()
    directory = path
    if not directory.is_dir():
        raise ValueError(f"--data {directory}: not a directory, nor the name of a generated "
                         f"data set ({', '.join(sorted(GENERATED))})")
    if _find_idx(directory, _MNIST_FILES["x_train"]) is not None:
        return load_mnist(directory)
    # Any one CIFAR-10 batch file marks a CIFAR folder, so a partial one is told which
    # files it lacks rather than that no data was found.
    if (directory / "cifar-10-batches-py").is_dir() or any(
        (directory / n).is_file() for n in [*_CIFAR_TRAIN, _CIFAR_TEST]
    ):
        return load_cifar10(directory)
    raise ValueError(
        f"--data {directory}: found neither MNIST/Fashion-MNIST IDX files "
        f"({_MNIST_FILES['x_train']}[.gz], ...) nor CIFAR-10 python batches "
        f"({_CIFAR_TEST}, data_batch_1..5)"
    )
