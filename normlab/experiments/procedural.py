"""A generated image data set harder than the digits: ``shapes``, procedural 16x16 shapes.

The 8x8 digits are so easy that every model reaches 95-98% and differences between
placements or batch sizes sit within a few test images. ``shapes`` is built to leave room:
ten classes of procedural shapes and textures (disc, ring, square, square outline,
triangle, plus, bar, stripes, checkerboard, pair of dots), each drawn at a random
position, scale and rotation, with a random contrast, background level, illumination
ramp and pixel noise, small distractor blobs, and one image in ten dark on light.

The per-image brightness and contrast differ a lot from image to image, as they do in
photographs: a norm that uses per-sample statistics (GroupNorm, LayerNorm, InstanceNorm)
removes them, while BatchNorm's batch statistics are noisy at small batches -- the
situation of the GroupNorm paper's batch-size claim.

Everything is drawn from one :class:`numpy.random.Generator` seeded by ``seed``, with
NumPy arrays over all images at once (the default 12,000 take about a second), so the
same seed gives the same images on every machine.

How hard it is (measured 2026-12-01, seeds 0-2): the lab's 3 x 100 ReLU MLP reaches
20-36% test accuracy in 1,500 steps (shapes move and turn, which an MLP must learn pixel
by pixel), the 3-block CNN 70-85% in a few epochs; a per-class pixel template scores
about 14%, chance is 10%.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from normlab.experiments.data import Dataset, _make

__all__ = ["CLASSES", "GENERATED", "load_shapes", "make_shapes", "save_samples"]

#: Class names, in label order.
CLASSES: tuple[str, ...] = (
    "disc", "ring", "square", "square outline", "triangle",
    "plus", "bar", "stripes", "checkerboard", "two dots",
)

SIZE = 16  # image side in pixels: a 3-block CNN (strides 1, 2, 2) ends on 4x4 maps
N_TRAIN, N_TEST = 10_000, 2_000

# A shape's signed distance (< 0 inside) from local coordinates u, v, in units of its
# radius: each shape has radius about 1 before scaling.
_Sdf = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _box(u: np.ndarray, v: np.ndarray, hu: float, hv: float) -> np.ndarray:
    return np.maximum(np.abs(u) - hu, np.abs(v) - hv)


def _triangle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # An equilateral triangle is the intersection of three half-planes; their normals are
    # 120 degrees apart.
    d = np.full_like(u, -np.inf)
    for k in range(3):
        a = np.pi / 2 + 2 * np.pi * k / 3
        d = np.maximum(d, u * np.cos(a) + v * np.sin(a) - 0.5)
    return d


def _texture(pattern: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """A texture seen through a disc of radius 1: inside where both say so."""
    return np.maximum(np.hypot(u, v) - 1.0, pattern)


_SHAPES: tuple[_Sdf, ...] = (
    lambda u, v: np.hypot(u, v) - 0.9,
    lambda u, v: np.abs(np.hypot(u, v) - 0.75) - 0.25,
    lambda u, v: _box(u, v, 0.8, 0.8),
    lambda u, v: np.abs(_box(u, v, 0.75, 0.75)) - 0.22,
    _triangle,
    lambda u, v: np.minimum(_box(u, v, 0.28, 1.0), _box(u, v, 1.0, 0.28)),
    lambda u, v: _box(u, v, 1.05, 0.3),
    # Stripes of period 0.8 (2.4-5 pixels); |sin| - 0.5 < 0 on half of each period.
    lambda u, v: _texture(0.35 * (np.abs(np.sin(np.pi * u / 0.8)) - 0.5), u, v),
    lambda u, v: _texture(0.35 * np.sin(np.pi * u / 0.7) * np.sin(np.pi * v / 0.7), u, v),
    lambda u, v: np.minimum(np.hypot(u - 0.6, v), np.hypot(u + 0.6, v)) - 0.38,
)


def make_shapes(n: int, seed: int = 0, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images ``[n, 1, size, size]`` float32 in ``[0, 1]`` and labels ``[n]`` int64.

    Classes are balanced (``n // 10`` each, the remainder to the first classes) and
    shuffled; the same ``seed`` gives the same arrays.
    """
    if n < 1 or size < 8:
        raise ValueError(f"need n >= 1 and size >= 8, got n={n}, size={size}")
    rng = np.random.default_rng(seed)
    k = len(CLASSES)
    labels = rng.permutation(np.arange(n) % k).astype(np.int64)
    s = size / 16  # every length below is in pixels of a 16x16 image
    radius = rng.uniform(3.5, 6.5, n) * s
    margin = 0.45 * radius  # the centre stays far enough in that most of the shape shows
    cx = rng.uniform(margin, size - margin)
    cy = rng.uniform(margin, size - margin)
    theta = rng.uniform(0, 2 * np.pi, n)
    grid = np.arange(size, dtype=np.float64) + 0.5
    x = grid[None, None, :] - cx[:, None, None]
    y = grid[None, :, None] - cy[:, None, None]
    cos, sin = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    r = radius[:, None, None]
    u, v = (cos * x + sin * y) / r, (-sin * x + cos * y) / r
    mask = np.empty((n, size, size))
    for label, sdf in enumerate(_SHAPES):
        i = labels == label
        # Signed distance in pixels through a one-pixel ramp: anti-aliased edges, so a
        # shape moved by a fraction of a pixel changes the image a little, not by jumps.
        mask[i] = np.clip(0.5 - sdf(u[i], v[i]) * r[i], 0.0, 1.0)
    # Distractors: 0-3 blobs of 1-1.6 pixels radius, smaller than any shape's strokes.
    for _ in range(3):
        present = rng.random(n) < 0.3
        bx, by = rng.uniform(0, size, n), rng.uniform(0, size, n)
        br = rng.uniform(1.0, 1.6, n) * s
        d = np.hypot(grid[None, None, :] - bx[:, None, None],
                     grid[None, :, None] - by[:, None, None])
        blob = np.clip(br[:, None, None] + 0.5 - d, 0.0, 1.0) * present[:, None, None]
        mask = np.maximum(mask, blob * rng.uniform(0.4, 1.0, n)[:, None, None])
    # Appearance: background level, contrast, polarity, an illumination ramp, noise. Per
    # image, and wide, so brightness and contrast say nothing about the class.
    background = rng.uniform(0.1, 0.6, n)[:, None, None]
    contrast = rng.uniform(0.3, 0.7, n)[:, None, None]
    polarity = np.where(rng.random(n) < 0.9, 1.0, -1.0)[:, None, None]
    ramp_angle = rng.uniform(0, 2 * np.pi, n)[:, None, None]
    ramp = rng.uniform(0.0, 0.25, n)[:, None, None] * (
        np.cos(ramp_angle) * (grid[None, None, :] / size - 0.5)
        + np.sin(ramp_angle) * (grid[None, :, None] / size - 0.5))
    noise = rng.standard_normal((n, size, size)) * rng.uniform(0.02, 0.05, n)[:, None, None]
    images = background + ramp + polarity * contrast * mask + noise
    return np.clip(images, 0.0, 1.0).astype(np.float32)[:, None], labels


def load_shapes(seed: int = 0, n_train: int = N_TRAIN, n_test: int = N_TEST) -> Dataset:
    """The ``shapes`` data set: train and test drawn from one seeded stream (disjoint draws).

    ``describe()`` names it as generated, with its seed and sizes, so every result stored
    or reported on it says which data it rests on.
    """
    x, y = make_shapes(n_train + n_test, seed)
    data = _make("shapes", x[:n_train], y[:n_train], x[n_train:], y[n_train:], scale=1.0)
    source = (f"generated by normlab.experiments.procedural, seed {seed}, "
              f"{SIZE}x{SIZE}")
    return Dataset(data.name, data.x_train, data.y_train, data.x_test, data.y_test,
                   data.num_classes, source=source)


#: Data sets ``load_dataset`` (and ``--data NAME``) can generate, by name.
GENERATED: dict[str, Callable[[], Dataset]] = {"shapes": load_shapes}


def save_samples(path: str | Path, per_class: int = 8, seed: int = 0) -> Path:
    """A PNG grid of ``per_class`` images of each class (one row per class, named)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, y = make_shapes(per_class * len(CLASSES) * 3, seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(len(CLASSES), per_class, figsize=(per_class * 0.9 + 1.4, 9.5),
                             squeeze=False)
    for label, row in enumerate(axes):
        picks = np.flatnonzero(y == label)[:per_class]
        for ax, i in zip(row, picks, strict=False):
            ax.imshow(x[i, 0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].set_ylabel(f"{label}: {CLASSES[label]}", rotation=0, ha="right", va="center",
                          fontsize=9)
    fig.suptitle(f"shapes: {SIZE}x{SIZE} procedural images, seed {seed}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=80, format="png")
    plt.close(fig)
    return path


if __name__ == "__main__":  # python -m normlab.experiments.procedural [PNG]: the docs' grid
    import sys

    print(save_samples(sys.argv[1] if len(sys.argv) > 1 else "docs/lab/shapes_samples.png"))
