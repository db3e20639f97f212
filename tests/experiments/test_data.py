"""Loaders on small files written in the real formats, including corrupt ones."""

from __future__ import annotations

import codecs
import functools
import gzip
import os
import pickle
import re
import struct
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from normlab.experiments.data import (
    load_cifar10,
    load_dataset,
    load_digits,
    load_mnist,
    read_idx,
)

IDX_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D,
             np.float64: 0x0E}


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of ``array``, written from the format's description."""
    header = struct.pack(">BBBB", 0, 0, IDX_CODES[array.dtype.type], array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_mnist(directory: Path, n_train: int = 6, n_test: int = 4, gz: bool = False,
                seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for name, a in arrays.items():
        data = idx_bytes(a)
        if gz:
            (directory / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (directory / name).write_bytes(data)
    return arrays


@pytest.mark.parametrize(
    "array",
    [
        np.arange(24, dtype=np.uint8).reshape(2, 3, 4),
        np.array([-3, 0, 7], dtype=np.int8),
        np.array([[-300, 2], [5, 32000]], dtype=np.int16),
        np.array([1, -(2**31), 2**31 - 1], dtype=np.int32),
        np.linspace(-1, 1, 6, dtype=np.float32).reshape(3, 2),
        np.array([np.pi, -np.e], dtype=np.float64),
    ],
    ids=lambda a: f"{a.dtype}-{a.ndim}d",
)
@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_read_idx_round_trip(tmp_path: Path, array: np.ndarray, gz: bool) -> None:
    data = idx_bytes(array)
    path = tmp_path / ("a.idx.gz" if gz else "a.idx")
    path.write_bytes(gzip.compress(data) if gz else data)
    out = read_idx(path)
    assert out.shape == array.shape and out.dtype == array.dtype
    np.testing.assert_array_equal(out, array)


GOOD = idx_bytes(np.arange(12, dtype=np.uint8).reshape(3, 4))
CORRUPT = {
    "empty": (b"", "truncated IDX file"),
    "bad-magic": (b"\x12\x34" + GOOD[2:], "not an IDX file"),
    "bad-type": (b"\x00\x00\x07\x02" + GOOD[4:], "not an IDX file"),
    "short-header": (GOOD[:9], "truncated IDX header"),
    "short-data": (GOOD[:-1], "truncated IDX data"),
    "trailing": (GOOD + b"\x00\x00", "unexpected trailing bytes"),
    "bad-gzip": (gzip.compress(GOOD)[:-12], "gzip"),
}


@pytest.mark.parametrize("name", list(CORRUPT))
def test_read_idx_rejects_corrupt_files(tmp_path: Path, name: str) -> None:
    data, message = CORRUPT[name]
    path = tmp_path / f"{name}.idx"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)  # the error names the file


# Each refusal below must stay under this much traced memory (numpy's buffers and the
# unpickler's tables are traced too); each crafted file asks the old loaders for 64 MiB+.
MEMORY_LIMIT = 16 << 20


def refuses(load: Callable[[], object], path: Path, match: str,
            limit: int = MEMORY_LIMIT) -> None:
    """``load()`` raises ValueError matching ``match``, naming ``path``, under ``limit`` bytes."""
    error: BaseException | None = None
    tracemalloc.start()
    try:
        load()
    except Exception as exc:  # judged below, after the memory it took
        error = exc
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < limit, f"{peak >> 20} MiB allocated, then {error!r:.300}"
    assert isinstance(error, ValueError), f"expected a ValueError, got {error!r:.300}"
    assert re.search(match, str(error)), f"{match!r} not in {str(error)!r:.300}"
    assert str(path) in str(error)  # the error names the file


def gzip_bytes(data: bytes, zeros: int = 0) -> bytes:
    """``data`` then ``zeros`` zero bytes, gzipped without holding the zeros in memory."""
    z = zlib.compressobj(1, zlib.DEFLATED, 31)  # wbits 31: the gzip container
    out = [z.compress(data)] + [z.compress(bytes(1 << 20)) for _ in range(zeros >> 20)]
    return b"".join([*out, z.flush()])


def idx_header(code: int, shape: tuple[int, ...]) -> bytes:
    return struct.pack(f">BBBB{len(shape)}I", 0, 0, code, len(shape), *shape)


def sparse(data: bytes, size: int) -> Callable[[Path], None]:
    """A writer of ``data`` padded to ``size`` bytes with a hole (no disk, no memory)."""
    def write(path: Path) -> None:
        path.write_bytes(data)
        os.truncate(path, size)
    return write


def plain(data: bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(data)


def gzipped(data: bytes, zeros: int = 0) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(gzip_bytes(data, zeros))


WRAPS = idx_header(0x08, (2**22, 2**21, 2**21))  # 2**64 elements: 0 in 64-bit arithmetic
IDX_BOMBS = {
    "gz-trailing-64MiB": (gzipped(GOOD, zeros=64 << 20), "unexpected trailing bytes"),
    "raw-trailing-256MiB": (sparse(GOOD, 256 << 20), "unexpected trailing bytes"),
    "gz-declares-100MB-holds-10B": (gzipped(idx_header(0x08, (100, 1000, 1000)) + bytes(10)),
                                    "truncated IDX data"),
    "raw-declares-100MB-holds-10B": (plain(idx_header(0x08, (100, 1000, 1000)) + bytes(10)),
                                     "truncated IDX data"),
    "dims-wrap": (plain(WRAPS), r"over the \d+-byte limit"),
    "gz-dims-wrap": (gzipped(WRAPS), r"over the \d+-byte limit"),
    "dims-over-limit": (plain(idx_header(0x0E, (60000, 2**16, 2**16))), "over the"),
    "rank-100": (plain(idx_header(0x08, (1,) * 100) + b"\x00"), "rank 100 not supported"),
    "rank-0": (plain(idx_header(0x08, ()) + b"\x00"), "rank 0 not supported"),
}


@pytest.mark.parametrize("name", list(IDX_BOMBS))
def test_read_idx_refuses_what_the_header_does_not_declare(tmp_path: Path, name: str) -> None:
    write, message = IDX_BOMBS[name]
    path = tmp_path / f"{name}.idx"
    write(path)
    refuses(lambda: read_idx(path), path, message)


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_load_mnist(tmp_path: Path, gz: bool) -> None:
    arrays = write_mnist(tmp_path / "mnist", gz=gz)
    data = load_mnist(tmp_path / "mnist")
    assert data.x_train.shape == (6, 1, 28, 28) and data.x_test.shape == (4, 1, 28, 28)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    expected = arrays["train-images-idx3-ubyte"][:, None].astype(np.float32) / 255
    np.testing.assert_allclose(data.x_train.numpy(), expected, rtol=1e-6)
    np.testing.assert_array_equal(data.y_test.numpy(), arrays["t10k-labels-idx1-ubyte"])
    assert load_dataset(tmp_path / "mnist").name == "mnist"


def test_load_mnist_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="missing IDX file"):
        load_mnist(tmp_path)
    arrays = write_mnist(tmp_path / "m")
    (tmp_path / "m" / "t10k-labels-idx1-ubyte").write_bytes(
        idx_bytes(arrays["t10k-labels-idx1-ubyte"][:3]))
    with pytest.raises(ValueError, match="has 4 images but .* has 3 labels"):
        load_mnist(tmp_path / "m")
    path = tmp_path / "m" / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte: truncated IDX data"):
        load_mnist(tmp_path / "m")


def cifar_batch(n: int, rng: np.random.Generator) -> dict[bytes, object]:
    """A batch as the official Python-2 pickles hold it: bytes keys, uint8 [n, 3072]."""
    return {
        b"batch_label": b"testing batch",
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"labels": [int(v) for v in rng.integers(0, 10, n)],
        b"filenames": [b"img.png"] * n,
    }


def write_cifar(directory: Path, n: int = 3) -> dict[str, dict[bytes, object]]:
    rng = np.random.default_rng(1)
    directory.mkdir(parents=True)
    batches = {name: cifar_batch(n, rng)
               for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]}
    for name, batch in batches.items():
        (directory / name).write_bytes(pickle.dumps(batch, protocol=2))
    return batches


def test_load_cifar10(tmp_path: Path) -> None:
    batches = write_cifar(tmp_path / "cifar-10-batches-py")
    data = load_dataset(tmp_path)  # finds the cifar-10-batches-py child
    assert data.name == "cifar10" and data.num_classes <= 10
    assert data.x_train.shape == (15, 3, 32, 32) and data.x_test.shape == (3, 3, 32, 32)
    # Each row is 1024 red, then 1024 green, then 1024 blue values, row-major 32 x 32.
    row = batches["data_batch_2"][b"data"][1]
    assert data.x_train[4, 1, 2, 5] == pytest.approx(row[1024 + 2 * 32 + 5] / 255)
    assert data.y_test.tolist() == batches["test_batch"][b"labels"]


class Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return (os.getcwd, ())


@pytest.mark.parametrize(
    "payload, message",
    [
        (lambda good: good[: len(good) // 2], "not a readable CIFAR-10 python batch"),
        (lambda good: pickle.dumps([1, 2, 3]), "expected a pickled dict"),
        (lambda good: pickle.dumps({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]}),
         r"must have shape \[n, 3072\]"),
        (lambda good: pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}),
         "2 images but 1 labels"),
        (lambda good: pickle.dumps({b"data": Evil(), b"labels": []}), "refusing to load"),
    ],
    ids=["truncated", "not-dict", "bad-shape", "label-count", "code"],
)
def test_load_cifar10_rejects_bad_batches(tmp_path: Path, payload, message: str) -> None:
    write_cifar(tmp_path / "c")
    path = tmp_path / "c" / "data_batch_3"
    path.write_bytes(payload(path.read_bytes()))
    with pytest.raises(ValueError, match=message) as info:
        load_cifar10(tmp_path / "c")
    assert "data_batch_3" in str(info.value)


class Reduce:
    """Pickles as ``func(*args)`` then (with ``state``) BUILD: pass shared arguments and
    the pickler writes them once and refers back to them from its memo."""

    def __init__(self, *reduce_value: object) -> None:
        self.reduce_value = reduce_value

    def __reduce__(self) -> tuple[object, ...]:
        return self.reduce_value


def batch_of(data: object, labels: object) -> bytes:
    return pickle.dumps({b"data": data, b"labels": labels}, protocol=2)


@functools.cache
def cifar_bombs() -> dict[str, tuple[Callable[[Path], None], str, int]]:
    """name -> (writer, message, memory limit), built once."""
    big_text = ("x" * 100_000, "latin1")
    swapped = np.arange(50_000, dtype=">u2").__reduce__()  # numpy copies swapped data
    void = np.void(b"x" * 100_000).__reduce__()
    row = [0] * 3072
    reconstruct, ndarray_args, _ = swapped
    over = "not a readable CIFAR-10 python batch"
    return {
        # Each writes ~0.1-2 MB that the old loader turned into 64 MiB or more.
        "encode-one-text-1000x": (plain(batch_of(
            [Reduce(codecs.encode, big_text) for _ in range(1000)], [])),
            "builds more bytes than the file holds", MEMORY_LIMIT),
        "scalar-one-buffer-1000x": (plain(batch_of(
            [Reduce(*void) for _ in range(1000)], [])),
            "builds more bytes than the file holds", MEMORY_LIMIT),
        "swapped-array-one-state-1000x": (plain(batch_of(
            [Reduce(*swapped) for _ in range(1000)], [])),
            "'data' must be a uint8 NumPy array, got list", MEMORY_LIMIT),
        "data-one-row-4000x": (plain(batch_of([row] * 4000, [0] * 4000)),
                               "'data' must be a uint8 NumPy array, got list", MEMORY_LIMIT),
        "labels-one-list-100x": (plain(batch_of(np.zeros((100, 3072), np.uint8),
                                                [[0] * 100_000] * 100)),
                                 "labels must be integers", MEMORY_LIMIT),
        "ndarray-called": (plain(batch_of(Reduce(np.ndarray, ((1000, 10_000), np.dtype("O"))),
                                          [])), over, MEMORY_LIMIT),
        "reconstruct-1e8": (plain(batch_of(Reduce(reconstruct, (ndarray_args[0], (10**8,),
                                                                 b"b")), [])),
                            "'data' must be a uint8 NumPy array", MEMORY_LIMIT),
        "bad-codec": (plain(batch_of(Reduce(codecs.encode, ("abc", "no-such-codec")), [])),
                      "codec 'no-such-codec'", MEMORY_LIMIT),
        "memo-index-2**24": (plain(b"\x80\x02Nr" + struct.pack("<I", 1 << 24) + b"."),
                             "memo index 16777216", MEMORY_LIMIT),
        "binbytes8-declares-256MiB": (plain(b"\x80\x04\x8e" + struct.pack("<Q", 1 << 28) + b"."),
                                      over, MEMORY_LIMIT),
        "300k-empty-sets": (plain(b"\x80\x04" + b"\x8f" * 300_000 + b"."),
                            "more than 200000 pickle opcodes", MEMORY_LIMIT),
        "sparse-65MiB": (sparse(b"", 65 << 20), "over the 67108864-byte limit", MEMORY_LIMIT),
        # Refused only once the 64 MiB cap is read past, so the limit sits above the cap.
        "gzip-72MiB": (gzipped(b"", zeros=72 << 20), "once gunzipped", 96 << 20),
    }


CIFAR_BOMBS = list(cifar_bombs())


@pytest.mark.parametrize("name", CIFAR_BOMBS)
def test_load_cifar10_refuses_amplifying_batches(tmp_path: Path, name: str) -> None:
    write, message, limit = cifar_bombs()[name]
    write_cifar(tmp_path / "c")
    path = tmp_path / "c" / "data_batch_3"
    write(path)
    refuses(lambda: load_cifar10(tmp_path / "c"), path, message, limit)


def python2_batch(data: np.ndarray, labels: list[int]) -> bytes:
    """A batch as Python 2's cPickle wrote the published files: protocol 2, str as
    SHORT_BINSTRING/BINSTRING, memo numbered from 1 -- written opcode by opcode."""
    def s(b: bytes) -> bytes:
        return (b"U" + bytes([len(b)]) if len(b) < 256 else b"T" + struct.pack("<i", len(b))) + b

    def i(v: int) -> bytes:
        return b"J" + struct.pack("<i", v)

    dtype = b"cnumpy\ndtype\n" + s(b"u1") + i(0) + i(1) + b"\x87R"
    dtype += b"(" + i(3) + s(b"|") + b"NNN" + i(-1) + i(-1) + i(0) + b"tb"
    array = b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + i(0) + b"\x85"
    array += s(b"b") + b"\x87R(" + i(1) + i(len(data)) + i(3072) + b"\x86" + dtype
    array += b"\x89" + s(data.tobytes()) + b"tb"
    label_list = b"](" + b"".join(i(v) for v in labels) + b"e"
    return b"\x80\x02}q\x01(" + s(b"data") + array + s(b"labels") + label_list + b"u."


@pytest.mark.parametrize("flavour", ["python2", "protocol2", "protocol3", "protocol4"])
def test_load_cifar10_pickle_flavours(tmp_path: Path, flavour: str) -> None:
    batches = write_cifar(tmp_path / "c")
    for name, batch in batches.items():
        data, labels = batch[b"data"], batch[b"labels"]
        (tmp_path / "c" / name).write_bytes(
            python2_batch(data, labels) if flavour == "python2"
            else pickle.dumps(batch, protocol=int(flavour[-1])))
    out = load_cifar10(tmp_path / "c")
    expected = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)])
    np.testing.assert_allclose(out.x_train.numpy().reshape(15, -1), expected / 255, rtol=1e-6)
    assert out.y_test.tolist() == batches["test_batch"][b"labels"]


def test_load_dataset_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="found neither MNIST"):
        load_dataset(tmp_path)
    with pytest.raises(ValueError, match="not a directory"):
        load_dataset(tmp_path / "missing")


def test_digits_split_is_stratified_and_seeded() -> None:
    data = load_digits()
    assert data.x_train.shape[1:] == (1, 8, 8) and data.num_classes == 10
    assert len(data.y_train) + len(data.y_test) == 1797
    assert float(data.x_train.min()) == 0.0 and float(data.x_train.max()) == 1.0
    counts = torch.bincount(data.y_test, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38  # ~20% of each class's ~180 images
    again = load_digits()
    assert torch.equal(data.y_test, again.y_test) and torch.equal(data.x_train, again.x_train)
    sub = data.subset(100, 50, seed=3)
    assert len(sub.y_train) == 100 and len(sub.y_test) == 50


@pytest.mark.parametrize("keep", [["data_batch_1"], ["data_batch_1", "data_batch_2", "test_batch"],
                                  ["test_batch"]], ids="+".join)
@pytest.mark.parametrize("nested", [False, True], ids=["flat", "cifar-10-batches-py"])
def test_partial_cifar_folder_names_the_missing_files(tmp_path: Path, keep: list[str],
                                                      nested: bool) -> None:
    folder = tmp_path / "cifar-10-batches-py" if nested else tmp_path / "c"
    write_cifar(folder)
    every = [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]
    for name in every:
        if name not in keep:
            (folder / name).unlink()
    with pytest.raises(ValueError, match="incomplete CIFAR-10 folder") as info:
        load_dataset(tmp_path if nested else folder)
    message = str(info.value)
    assert "found neither" not in message
    assert f"({len(keep)} of the 6 batch files)" in message
    for name in every:
        # Each missing file named, each present one not ("data_batch_1" is a prefix of none).
        assert (name in message.split("missing", 1)[1]) == (name not in keep), message
