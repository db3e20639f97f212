"""A Dense -> BatchNorm -> Activation binary classifier: 20 inputs, 64 and 32 hidden
units, one sigmoid output -- the Keras-style model, written with normlab.

Keras' BatchNormalization(momentum=0.99) corresponds to momentum=0.01 here: Keras gives
the weight of the old running value, torch the weight of the new batch statistic.
Run: python examples/binary_classifier.py
"""

import torch
from sklearn.datasets import make_classification
from torch import nn

import normlab

torch.manual_seed(0)
torch.set_num_threads(1)  # a model this small runs fastest on one thread
features, labels = make_classification(
    n_samples=2000, n_features=20, n_informative=10, random_state=0
)
x = torch.tensor(features, dtype=torch.float32)  # [2000, 20]
y = torch.tensor(labels, dtype=torch.float32)  # [2000] of 0.0 / 1.0
x_train, y_train, x_test, y_test = x[:1600], y[:1600], x[1600:], y[1600:]

model = nn.Sequential(
    nn.Linear(20, 64),  # Dense(64)
    normlab.BatchNorm1d(64, momentum=0.01),  # BatchNormalization(momentum=0.99)
    nn.ReLU(),  # Activation("relu")
    nn.Linear(64, 32),
    normlab.BatchNorm1d(32, momentum=0.01),
    nn.ReLU(),
    nn.Linear(32, 1),
    nn.Sigmoid(),  # probability of class 1
)
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
loss_fn = nn.BCELoss()

for epoch in range(1, 11):
    model.train()
    for batch in torch.randperm(len(y_train)).split(64):
        loss = loss_fn(model(x_train[batch]).squeeze(1), y_train[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    if epoch % 5 == 0:
        model.eval()
        with torch.no_grad():
            accuracy = ((model(x_test).squeeze(1) > 0.5).float() == y_test).float().mean()
        print(f"epoch {epoch:2d}: loss {loss.item():.3f}, test accuracy {accuracy:.1%}")

assert accuracy > 0.8, "the classifier should beat chance by a wide margin"
