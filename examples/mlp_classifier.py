"""A Linear -> BatchNorm1d -> ReLU classifier for handwritten digits, trained with Adam.

Uses scikit-learn's bundled 8x8 digits, so it needs no download and runs in seconds.
Run: python examples/mlp_classifier.py
"""

import torch
from sklearn.datasets import load_digits
from torch import nn

import normlab

torch.manual_seed(0)
torch.set_num_threads(1)  # a model this small runs fastest on one thread
digits = load_digits()
x = torch.tensor(digits.data, dtype=torch.float32) / 16.0  # [1797, 64] pixels in [0, 1]
y = torch.tensor(digits.target)  # [1797] labels 0..9
perm = torch.randperm(len(y))
train, test = perm[:1400], perm[1400:]

model = nn.Sequential(
    nn.Linear(64, 128, bias=False),  # no bias: BatchNorm subtracts the mean anyway
    normlab.BatchNorm1d(128),
    nn.ReLU(),
    nn.Linear(128, 64, bias=False),
    normlab.BatchNorm1d(64),
    nn.ReLU(),
    nn.Linear(64, 10),
)
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
loss_fn = nn.CrossEntropyLoss()

for epoch in range(1, 7):
    model.train()  # BatchNorm uses batch statistics and updates its running estimates
    for batch in train[torch.randperm(len(train))].split(64):
        loss = loss_fn(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()  # BatchNorm now uses the running estimates: one example at a time works
    with torch.no_grad():
        accuracy = (model(x[test]).argmax(1) == y[test]).float().mean()
    print(f"epoch {epoch:2d}: last batch loss {loss.item():.3f}, test accuracy {accuracy:.1%}")

assert accuracy > 0.9, "the classifier should learn the digits"
