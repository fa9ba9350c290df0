"""Train your own model with an Align learning rule (Boopathy & Fiete 2022) and score back-propagation's alignment.

    python examples/align.py
"""

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import instill


def mlp() -> nn.Sequential:
    torch.manual_seed(0)  # every rule starts from the same weights
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def train(rule: instill.GradientProvider, model: nn.Module, loader: DataLoader, lr: float, epochs: int) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            rule.gradients(model, (x, y), instill.StepContext(lr=lr))  # the rule fills .grad
            optimizer.step()


def main() -> None:
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16
    y = torch.tensor(digits.target)
    loader = DataLoader(TensorDataset(x[:1400], y[:1400]), batch_size=64, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    print("rules:", ", ".join(instill.learning_rules()))
    for name in ("backprop", "align_zero"):
        model = mlp()
        rule = instill.learning_rule(name, model)  # built at the start: theta0 is the model now
        train(rule, model, loader, lr=0.05, epochs=3)
        print(f"{name:>10}: test accuracy {accuracy(model, x[1400:], y[1400:]):.3f}")

    model = mlp()
    tracker = instill.alignment_scores(model, chance=["shuffled_weights"])  # back-propagation plus the baseline
    train(tracker, model, loader, lr=0.05, epochs=3)
    scores = tracker.scores(model)
    print("alignment of backprop's updates with align_zero's:",
          ", ".join(f"{key} {value:.3f}" for key, value in scores.items()))


if __name__ == "__main__":
    main()
