"""Model stitching: the first layers of one trained network, a trained 1x1 stitching layer, the rest of another.

    python examples/stitch.py
"""

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import instill


def convnet(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 10))


def train(model: nn.Module, loader: DataLoader, epochs: int = 4) -> nn.Module:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    return model.eval()


def main() -> None:
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16  # (n, 1, 8, 8)
    y = torch.tensor(digits.target)
    train_set, test_set = TensorDataset(x[:1400], y[:1400]), TensorDataset(x[1400:], y[1400:])
    loader = DataLoader(train_set, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    front, end = train(convnet(1), loader), train(convnet(2), loader)

    for init in ("random", "ps_inv"):
        stitched, metrics = instill.stitch_models(front, end, "1", "1", loader, init=init, epochs=3, lr=1e-2,
                                                  eval_loader=DataLoader(test_set, batch_size=256))
        print(f"init {init:>6}: test accuracy {metrics['before_acc']:.3f} before training, {metrics['acc']:.3f} "
              f"after (end model alone {metrics['end_acc']:.3f}); agreement with the end model "
              f"{metrics['agreement']:.3f}")
    print("stitching layer:", tuple(stitched.transform.matrix().shape), "(end channels x front channels)")


if __name__ == "__main__":
    main()
