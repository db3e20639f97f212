"""BatchNorm1d from scratch in a dozen lines, checked against normlab.BatchNorm1d.

Training mode normalizes each feature with the batch mean and *biased* variance, and
updates running estimates with the *unbiased* variance; eval mode uses the running
estimates. Run: python examples/batchnorm_from_scratch.py
"""

import torch
from torch import nn

import normlab


class ScratchBatchNorm1d(nn.Module):
    """y = (x - mean) / sqrt(var + eps) * gamma + beta, per feature of x [N, C]."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))  # gamma
        self.bias = nn.Parameter(torch.zeros(num_features))  # beta
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            mean = x.mean(dim=0)
            var = x.var(dim=0, unbiased=False)  # the batch is normalized with biased var
            n = x.shape[0]
            with torch.no_grad():  # ...but the running estimate gets the unbiased one
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var * n / (n - 1), self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias


torch.manual_seed(0)
ours, theirs = ScratchBatchNorm1d(8), normlab.BatchNorm1d(8)
x = torch.randn(32, 8) * 3 + 5  # a batch far from zero mean / unit variance

for step in range(3):  # a few training steps: outputs, gradients, running stats
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), theirs(xb)
    (ya * torch.arange(8.0)).sum().backward()
    (yb * torch.arange(8.0)).sum().backward()
    print(f"train step {step}: max |y diff| {(ya - yb).abs().max():.2e}, "
          f"max |dx diff| {(xa.grad - xb.grad).abs().max():.2e}")
    torch.testing.assert_close(ya, yb)
    torch.testing.assert_close(xa.grad, xb.grad)
    x = x + 0.5  # drift the data so the running statistics have something to track

torch.testing.assert_close(ours.running_mean, theirs.running_mean)
torch.testing.assert_close(ours.running_var, theirs.running_var)
print(f"running_mean {ours.running_mean[:3].tolist()} ... matches normlab")

ours.eval()
theirs.eval()
torch.testing.assert_close(ours(x), theirs(x))
print("eval mode (running statistics): outputs match normlab.BatchNorm1d")
