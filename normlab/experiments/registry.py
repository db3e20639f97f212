"""What each experiment claims and runs: plain metadata, cheap to import (no torch).

The CLI builds its help text from this table; :mod:`normlab.experiments.catalog` holds
the code, keyed by the same names.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["EXPERIMENTS", "ExperimentInfo"]


@dataclass(frozen=True)
class ExperimentInfo:
    """Name, title, the claim under test, and what is trained to test it."""

    name: str
    title: str
    claim: str
    setup: str


EXPERIMENTS: dict[str, ExperimentInfo] = {
    e.name: e
    for e in [
        ExperimentInfo(
            "bn-paper",
            "The BN paper's Figure 1",
            "With BatchNorm a sigmoid MLP trains much faster, and the distribution of a "
            "sigmoid's input stays stable instead of drifting during training.",
            "MLP with 3 hidden layers of 100 sigmoid units, with and without BatchNorm; "
            "SGD, batch 60. Plots test accuracy vs steps and the 15/50/85th percentiles of "
            "one last-layer sigmoid input over training.",
        ),
        ExperimentInfo(
            "learning-rate",
            "Learning-rate sweep",
            "BatchNorm lets a network train at learning rates that make the plain network "
            "stall or diverge.",
            "ReLU MLP (3 x 100), plain SGD, learning rates 0.01 .. 10, with and without "
            "BatchNorm; final test accuracy vs learning rate.",
        ),
        ExperimentInfo(
            "init",
            "Weight-initialization sweep",
            "BatchNorm makes training insensitive to the scale of the initial weights.",
            "ReLU MLP (4 x 100), weights N(0, (scale * He std)^2) for scale 0.01 .. 100, "
            "with and without BatchNorm; final test accuracy vs scale.",
        ),
        ExperimentInfo(
            "batch-size",
            "Batch-size sweep (the GroupNorm paper's Figure 1)",
            "BatchNorm degrades at small batches, where GroupNorm, LayerNorm and "
            "InstanceNorm, which do not average over the batch, do not.",
            "Small CNN (3 conv blocks) with BatchNorm / GroupNorm / LayerNorm / "
            "InstanceNorm, batch sizes 2 .. 64 at a fixed number of epochs and a "
            "learning rate scaled linearly with the batch; test error vs batch size.",
        ),
        ExperimentInfo(
            "sequences",
            "BatchNorm on padded variable-length sequences",
            "BatchNorm's statistics take the padding in, so what it computes depends on how "
            "padded the batch is; with a mask (statistics over the valid steps) it does not, "
            "and LayerNorm never did.",
            "Noisy waveforms of 10-100 steps (3 classes by frequency), zero-padded to 100; "
            "Conv1d(5) -> norm -> ReLU twice, mean over valid steps, linear; BatchNorm1d, "
            "BatchNorm1d + mask, LayerNorm, none; SGD with momentum, batch 32. Test accuracy "
            "in eval mode, and with batch statistics on test batches padded to 100 and to 200 "
            "steps.",
        ),
        ExperimentInfo(
            "placement",
            "Where BatchNorm goes",
            "BatchNorm belongs between the affine layer and its activation; on the input "
            "or output layer it helps less or hurts.",
            "ReLU MLP (3 x 100): no norm; BN before the activation; BN after it; BN before "
            "plus BN on the inputs; BN before plus BN on the logits. Accuracy vs steps.",
        ),
        ExperimentInfo(
            "gradients",
            "Vanishing gradients in a deep sigmoid MLP",
            "Without BatchNorm the gradient fades layer by layer on its way back through a "
            "deep sigmoid network (the first layer's gradient more than 10x smaller than the "
            "last's); with BatchNorm it reaches the first layer intact.",
            "MLP with 12 hidden layers of 64 sigmoids, with and without BatchNorm, PyTorch's "
            "default init and a large (saturating) init; plain SGD. Per-layer norm of dL/dW "
            "over training (log scale), and the share of saturated sigmoids (sigmoid' < 0.01) "
            "per layer.",
        ),
        ExperimentInfo(
            "train-eval",
            "Training vs inference statistics",
            "A BatchNorm network must infer with its running statistics (model.eval()): with "
            "batch statistics, small test batches cost accuracy and a single sample cannot be "
            "normalized at all; statistics re-estimated on a shifted test distribution "
            "recover accuracy the running statistics lose.",
            "ReLU MLP (3 x 100) with BatchNorm, SGD, batch 64. Over training: test accuracy "
            "in eval mode and with batch statistics on test batches of 64, 8 and 2 (and 1, "
            "which BatchNorm1d refuses in train mode); at the end, the same on a shifted test "
            "set (lower contrast, brighter), with statistics re-estimated on it, and on "
            "single-class batches.",
        ),
        ExperimentInfo(
            "regularization",
            "BatchNorm as a regularizer",
            "BatchNorm narrows the gap between training and test accuracy and lessens the "
            "need for dropout.",
            "ReLU MLP (3 x 256), with and without BatchNorm, with and without dropout 0.5 "
            "(2 x 2), SGD with momentum, a reduced training set so the network can overfit; "
            "train and test accuracy (eval mode) and their gap over training.",
        ),
    ]
}
