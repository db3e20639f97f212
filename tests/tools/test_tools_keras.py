"""Keras conventions: arrays as Keras stores them, against a NumPy re-implementation of Keras."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import normlab.nn as nlnn
from normlab.tools import (
    batchnorm_from_keras,
    from_keras,
    keras_config,
    keras_momentum_to_torch,
    to_keras,
    torch_momentum_to_keras,
)

C = 5


def keras_inference(x, gamma, beta, mean, var, epsilon=1e-3, axis=-1):
    """Keras BatchNormalization(training=False): what tf.nn.batch_normalization computes."""
    shape = [1] * x.ndim
    shape[axis] = -1
    inv = 1.0 / np.sqrt(var.reshape(shape) + epsilon)
    if gamma is not None:
        inv = inv * gamma.reshape(shape)
    offset = -mean.reshape(shape) * inv
    if beta is not None:
        offset = offset + beta.reshape(shape)
    return x * inv + offset


def keras_train_step(x, moving_mean, moving_var, momentum, axis=-1):
    """Keras' moving-average update: moments are *biased* (divide by the element count)."""
    axes = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    mean, var = x.mean(axis=axes), x.var(axis=axes)  # ddof=0
    return (
        moving_mean * momentum + mean * (1 - momentum),
        moving_var * momentum + var * (1 - momentum),
    )


def _keras_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "gamma": rng.normal(1, 0.3, C).astype(np.float32),
        "beta": rng.normal(0, 0.3, C).astype(np.float32),
        "moving_mean": rng.normal(0, 1, C).astype(np.float32),
        "moving_variance": rng.uniform(0.2, 2, C).astype(np.float32),
    }


# (id, center, scale, how the weights are handed over)
FORMATS = [
    ("list", True, True, "list"),
    ("list-no-center", False, True, "list"),
    ("list-no-scale", True, False, "list"),
    ("list-no-affine", False, False, "list"),
    ("npz-keras2-names", True, True, "npz"),
]


def _handover(arrays, center, scale, how, tmp_path):
    keep = {"gamma": scale, "beta": center, "moving_mean": True, "moving_variance": True}
    if how == "list":  # layer.get_weights() order
        return [arrays[k] for k in ("gamma", "beta", "moving_mean", "moving_variance") if keep[k]]
    path = tmp_path / "bn.npz"  # names as in a Keras 2 h5 file: "<layer>/<weight>:0"
    np.savez(path, **{f"batch_normalization/{k}:0": v for k, v in arrays.items() if keep[k]})
    return np.load(path)


@pytest.mark.parametrize("backend", ["normlab", "torch"])
@pytest.mark.parametrize("layout", [(-1, (2, 4, 3, C)), (1, (2, C, 4, 3)), (-1, (6, C))])
@pytest.mark.parametrize("fid,center,scale,how", FORMATS, ids=[f[0] for f in FORMATS])
def test_converted_layer_matches_keras_inference(
    fid, center, scale, how, layout, backend, tmp_path
):
    axis, shape = layout
    arrays = _keras_arrays()
    weights = _handover(arrays, center, scale, how, tmp_path)
    dim = {2: 1, 4: 2}[len(shape)]
    layer = batchnorm_from_keras(
        weights, dim=dim, axis=axis, backend=backend, center=center, scale=scale, epsilon=1e-3
    )
    x = np.random.default_rng(1).normal(2, 3, shape)
    expect = keras_inference(
        x,
        arrays["gamma"] if scale else None,
        arrays["beta"] if center else None,
        arrays["moving_mean"],
        arrays["moving_variance"],
        epsilon=1e-3,
        axis=axis,
    )
    with torch.no_grad():
        got = layer(torch.tensor(x, dtype=torch.float32)).double().numpy()
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-5)


def test_momentum_convention_against_keras_update():
    """torch momentum = 1 - Keras momentum gives the same moving mean over a few batches."""
    rng = np.random.default_rng(0)
    batches = [rng.normal(1, 2, (8, 3, 3, C)) for _ in range(4)]  # NHWC
    state, kwargs = from_keras([np.zeros(C), np.ones(C)], center=False, scale=False, momentum=0.9)
    assert kwargs["momentum"] == pytest.approx(0.1) and kwargs["eps"] == 1e-3
    bn = nn.BatchNorm2d(**kwargs).double()
    bn.load_state_dict(state)
    k_mean, k_var = np.zeros(C), np.ones(C)
    for x in batches:
        k_mean, k_var = keras_train_step(x, k_mean, k_var, 0.9)
        bn(torch.tensor(x).permute(0, 3, 1, 2))
    np.testing.assert_allclose(bn.running_mean.numpy(), k_mean, rtol=1e-6)
    # the variances differ by exactly the Bessel factor of each batch's contribution
    m = 8 * 3 * 3
    expect_torch = 0.9**4 * 1 + (k_var - 0.9**4) * m / (m - 1)
    np.testing.assert_allclose(bn.running_var.numpy(), expect_torch, rtol=1e-6)


def test_biased_unbiased_variance_conversion():
    """One Keras step with momentum 0 stores the biased var; torch momentum 1, the unbiased."""
    x = np.random.default_rng(3).normal(0, 2, (4, 2, 2, C))
    m = 4 * 2 * 2
    _, k_var = keras_train_step(x, np.zeros(C), np.ones(C), momentum=0.0)
    bn = nn.BatchNorm2d(C, momentum=1.0).double()
    bn(torch.tensor(x).permute(0, 3, 1, 2))
    state, _ = from_keras(
        [np.zeros(C), k_var], center=False, scale=False, variance="unbiased", count=m
    )
    np.testing.assert_allclose(state["running_var"].numpy(), bn.running_var.numpy(), rtol=1e-6)
    back = to_keras(bn, variance="biased", count=m)
    np.testing.assert_allclose(back[-1], k_var, rtol=1e-6)
    # as stored: the number is copied unchanged
    assert np.array_equal(
        from_keras([np.zeros(C), k_var], center=False, scale=False)[0]["running_var"].numpy(),
        k_var.astype(np.float32),
    )


@pytest.mark.parametrize("cls", [nn.BatchNorm2d, nlnn.BatchNorm2d])
def test_to_keras_round_trip_and_config(cls):
    bn = cls(C, eps=1e-4, momentum=0.02)
    arrays = _keras_arrays(5)
    state, _ = from_keras([arrays[k] for k in ("gamma", "beta", "moving_mean", "moving_variance")])
    bn.load_state_dict(state)
    out = to_keras(bn)
    for a, k in zip(out, ("gamma", "beta", "moving_mean", "moving_variance"), strict=True):
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a, arrays[k])
    cfg = keras_config(bn)
    assert cfg == dict(axis=-1, momentum=pytest.approx(0.98), epsilon=1e-4, center=True, scale=True)
    assert len(to_keras(cls(C, affine=False))) == 2
    assert keras_config(cls(C, affine=False))["center"] is False


def test_momentum_helpers_and_errors():
    assert keras_momentum_to_torch(0.99) == pytest.approx(0.01)
    assert torch_momentum_to_keras(0.1) == pytest.approx(0.9)
    with pytest.raises(ValueError, match="cumulative"):
        torch_momentum_to_keras(None)
    with pytest.raises(ValueError, match="momentum"):
        keras_momentum_to_torch(1.5)
    with pytest.raises(ValueError, match=r"4 arrays \['gamma', 'beta'"):
        from_keras([np.ones(C)] * 3)
    with pytest.raises(ValueError, match="count"):
        from_keras([np.ones(C)] * 4, variance="unbiased")
    with pytest.raises(ValueError, match="moving_variance"):
        from_keras({"gamma": np.ones(C), "moving_mean": np.zeros(C)})
    with pytest.raises(ValueError, match=r"\[C\]"):
        from_keras([np.ones(C)] * 2 + [np.zeros(C), np.ones(C + 1)])
    with pytest.raises(ValueError, match="track_running_stats"):
        to_keras(nn.BatchNorm2d(C, track_running_stats=False))
