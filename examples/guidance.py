"""Guide a deep network with a frozen, untrained guide in your own training loop ("Training the Untrainable").

    python examples/guidance.py
"""

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import instill


def deep_mlp(depth: int, width: int = 32) -> nn.Sequential:
    layers, features = [], 16
    for _ in range(depth):
        layers += [nn.Linear(features, width), nn.Tanh()]
        features = width
    return nn.Sequential(*layers, nn.Linear(features, 4))


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():  # an evaluation forward: the alignment loss ignores it
        return float((model(x).argmax(1) == y).float().mean())


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(512, 16)
    y = (x[:, :4].sum(1) > 0).long() + 2 * (x[:, 4:8].sum(1) > 0).long()
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True, drop_last=True)

    target = deep_mlp(depth=6)
    guide = deep_mlp(depth=2, width=64)  # untrained: its architecture is the prior
    align = instill.alignment_loss(target, guide, "uniform", sample=x[:8], target_layers=[nn.Linear],
                                   guide_layers=[nn.Linear])
    print("pairs:", ", ".join(f"{p.target}~{p.guide}" for p in align.pairs))
    optimizer = torch.optim.Adam(target.parameters(), lr=3e-3)
    for epoch in range(4):
        target.train()
        for xb, yb in loader:
            task = nn.functional.cross_entropy(target(xb), yb)  # the target's forward first ...
            alignment, sims = align(xb)                          # ... then the alignment loss
            optimizer.zero_grad()
            (task + alignment).backward()
            optimizer.step()
        mean_sim = sum(sims.values()) / len(sims)
        print(f"epoch {epoch + 1}: task loss {task.item():.3f}, alignment {alignment.item():.3f}, "
              f"mean CKA {mean_sim:.3f}, accuracy {accuracy(target, x, y):.3f}")
    align.close()


if __name__ == "__main__":
    main()
