"""Find a subnetwork in your own trained model, save it, load it back and transplant it into a fresh model.

    python examples/masks.py [OUT_DIR] # writes OUT_DIR/mask.safetensors + mask.json (default: checkpoints/example_mask)
"""

import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import instill


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))


def accuracy(model: nn.Module, loader: DataLoader) -> float:
    model.eval()
    with torch.no_grad():
        hits = sum(int((model(x).argmax(1) == y).sum()) for x, y in loader)
    return hits / len(loader.dataset)


def train(model: nn.Module, loader: DataLoader, epochs: int, after_step=lambda: None) -> None:
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01)
    for _ in range(epochs):
        model.train()
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            after_step()  # a transplant keeps its frozen entries as they were


def main(out_dir: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(1024, 8)
    y = (x[:, 0] * x[:, 1] > 0).long()  # a task that needs the hidden layers
    loader = DataLoader(TensorDataset(x, y), batch_size=128, shuffle=True)

    model = make_model()
    train(model, loader, epochs=20)
    print(f"trained model: accuracy {accuracy(model, loader):.3f}")

    masked = instill.find_subnetwork(model, loader, layers=["Linear"], epochs=5, l0_lambda=1e-4, lr=0.05)
    meta = masked.save(out_dir)
    print(f"subnetwork: density {meta['density']:.3f}, accuracy {accuracy(masked, loader):.3f} -> {out_dir}")

    mask = instill.load_mask(out_dir, model)  # checks names, shapes and the base weights' hash
    start = instill.transplant("subnet", model, make_model(), mask)
    print(f"transplanted (frozen entries: {start.info['frozen_entries']}): accuracy "
          f"{accuracy(start.model, loader):.3f} before training")
    train(start.model, loader, epochs=2, after_step=start.after_step)
    print(f"after 2 epochs: accuracy {accuracy(start.model, loader):.3f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "checkpoints/example_mask")
