"""Compare two networks' layers on the same inputs with CKA and other measures.

    python examples/similarity.py
"""

import torch
from torch import nn

import instill


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 3))


def main() -> None:
    x = torch.randn(500, 10)
    a, b = make_model(1), make_model(2)
    layers = ["0", "2", "4"]  # module names, as in model.named_modules()
    with torch.no_grad(), instill.FeatureCapture(a, layers) as cap_a, instill.FeatureCapture(b, layers) as cap_b:
        a(x)
        b(x)
        feats_a, feats_b = cap_a.pop(), cap_b.pop()

    print("CKA between layers of two random networks (rows: network 1, columns: network 2)")
    print("      " + "".join(f"{name:>8}" for name in layers))
    for name_a in layers:
        row = [float(instill.measure_similarity(feats_a[name_a], feats_b[name_b], "cka")) for name_b in layers]
        print(f"{name_a:>6}" + "".join(f"{value:8.3f}" for value in row))

    rotation, _ = torch.linalg.qr(torch.randn(64, 64))
    h = feats_a["2"]
    for measure in ("cka", "rsa", "procrustes", "svcca"):
        value = float(instill.measure_similarity(h, h @ rotation, measure))
        print(f"{measure:>10}: layer 2 against a rotation of itself = {value:.3f}")


if __name__ == "__main__":
    main()
