"""Compare every layer of one network with every layer of another over a data loader, and draw the heatmap.

    python examples/compare.py [heatmap.png]
"""

import sys

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import instill


def mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def train(model: nn.Module, loader: DataLoader, epochs: int = 3) -> nn.Module:
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    return model


def main() -> None:
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16
    y = torch.tensor(digits.target)
    loader = DataLoader(TensorDataset(x, y), batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(0))
    a, b = train(mlp(1), loader), train(mlp(2), loader)  # same architecture, two seeds

    result = instill.compare_models(a, b, DataLoader(TensorDataset(x, y), batch_size=256), layers_a=["type:Linear"],
                                    measures=["cka_minibatch", "cka", "l2"], labels=("seed 1", "seed 2"))
    print("minibatch CKA of the linear layers (rows: seed 1, columns: seed 2)")
    print("      " + "".join(f"{name:>8}" for name in result.layers_b))
    for name, row in zip(result.layers_a, result.matrix("cka_minibatch")):
        print(f"{name:>6}" + "".join(f"{value:8.3f}" for value in row))
    same = instill.compare_models(a, a, [x], layers_a=["type:Linear"], measures=["cka"])
    print(f"a model against itself, layer 2: cka = {same.value('cka', '2', '2'):.3f}")
    if len(sys.argv) > 1:
        result.heatmap("cka_minibatch", sys.argv[1])
        print(f"heatmap written to {sys.argv[1]}")


if __name__ == "__main__":
    main()
