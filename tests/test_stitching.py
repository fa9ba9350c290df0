"""Model stitching: the split runs nothing outside the cuts, self-stitching with the identity is exact, the streaming
least squares equal lstsq on all rows, transforms connect maps and tokens, masks and inits do what they say, and the
stitch stage writes its files or refuses bad input with one line and nothing written."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from instill.errors import UserError
from instill.registry import MODELS
from instill.stitching.init import init_matrix, initialise, make_mask
from instill.stitching.stitch import Head, LinearStats, Side, StitchedNet, StitchTransform, Tail, freeze, layout_of
from tests.conftest import run_cli

DIGITS = {"input_shape": (1, 8, 8), "num_classes": 10}


def _side(t: torch.Tensor) -> Side:
    shape = tuple(t.shape[1:])
    return Side(shape, layout_of(shape))


def _self_stitch(model: nn.Module, layer: str, x: torch.Tensor) -> tuple[StitchedNet, float]:
    head, tail = Head(model, layer), Tail(model, layer)
    a = head(x)
    transform = StitchTransform(_side(a), _side(a))
    transform.set_matrix(torch.eye(transform.d_in), None)
    stitched = StitchedNet(head, transform, tail)
    with torch.no_grad():
        return stitched, float((stitched(x) - model(x)).abs().max())


class Residual(nn.Module):
    """A residual block: a cut inside it has a skip connection around it, so the tail cannot drop the input."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.inner = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 10)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = h + self.bn(self.inner(h))
        return self.head(h.mean((2, 3)))


class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(64, 16), nn.Linear(16, 16), nn.Linear(16, 10)

    def forward(self, x):
        h = self.a(x.flatten(1))
        if h.sum() > 1e9:
            h = h * 2
        return self.head(torch.relu(self.b(h)))


@pytest.mark.parametrize("name, params, layers", [
    ("convnet", {"channels": [8, 16], "strides": [1, 2]}, ["layers.0", "layers.0.0", "layers.1", "layers.1.1", "pool"]),
    ("fcn", {"depth": 2, "width": 16, "batch_norm": True}, ["layers.0", "layers.0.1", "layers.1"]),
])
def test_self_stitch_with_identity_gives_own_logits(name, params, layers):
    torch.manual_seed(0)
    model = freeze(MODELS.build(name, DIGITS, params))
    x = torch.randn(16, 1, 8, 8)
    for layer in layers:
        stitched, diff = _self_stitch(model, layer, x)
        assert stitched.head.traced and stitched.tail.traced, layer
        assert diff <= 1e-5, (layer, diff)


def test_split_runs_nothing_outside_the_cuts():
    torch.manual_seed(0)
    model = freeze(MODELS.build("convnet", DIGITS, {"channels": [8, 16, 16], "strides": [1, 2, 1]}))
    calls = []
    for name, module in model.named_modules():
        if name and not list(module.children()):
            module.register_forward_hook(lambda m, a, o, name=name: calls.append(name))
    head, tail = Head(model, "layers.1"), Tail(model, "layers.1")
    a = head(torch.randn(2, 1, 8, 8))
    assert calls == ["layers.0.0", "layers.0.1", "layers.0.2", "layers.1.0", "layers.1.1", "layers.1.2"]
    calls.clear()
    tail(a)
    assert calls == ["layers.2.0", "layers.2.1", "layers.2.2", "pool", "head"]


def test_hook_fallback_for_skip_connections_and_untraceable_models():
    torch.manual_seed(0)
    residual = freeze(Residual())
    x = torch.randn(8, 1, 8, 8)
    stitched, diff = _self_stitch(residual, "inner", x)
    assert stitched.head.traced and not stitched.tail.traced and diff <= 1e-6
    _, diff = _self_stitch(residual, "stem", x)  # before the block: a clean cut
    assert diff <= 1e-6
    branchy = freeze(Branchy())
    stitched, diff = _self_stitch(branchy, "b", x)
    assert not stitched.head.traced and not stitched.tail.traced and diff <= 1e-6


def test_resnet20_splits_at_blocks_and_falls_back_inside_them():
    torch.manual_seed(0)
    model = freeze(MODELS.build("resnet20", {"input_shape": (3, 32, 32), "num_classes": 10}, {}))
    x = torch.randn(4, 3, 32, 32)
    inside, diff_inside = _self_stitch(model, "layer2.1.bn1", x)
    block, diff_block = _self_stitch(model, "layer2.1", x)
    assert not inside.tail.traced and block.tail.traced and block.head.traced
    assert max(diff_inside, diff_block) <= 1e-5


def test_frozen_models_stay_in_eval_mode():
    model = freeze(MODELS.build("fcn", DIGITS, {"depth": 2, "width": 8, "batch_norm": True, "dropout": 0.5}))
    stitched, _ = _self_stitch(model, "layers.0", torch.randn(4, 1, 8, 8))
    stitched.train()
    assert stitched.transform.training
    assert not any(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())


def _rows(n=500, d_in=6, d_out=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, d_in, dtype=torch.float64)
    y = x @ torch.randn(d_in, d_out, generator=g, dtype=torch.float64) + torch.randn(n, d_out, generator=g,
                                                                                    dtype=torch.float64)
    return x, y


def _lstsq(x, y):
    xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    sol = torch.linalg.lstsq(xa, y, driver="gelsd").solution
    return sol[:-1].T, sol[-1]


@pytest.mark.parametrize("dead_channel", [False, True])
def test_streaming_least_squares_equal_lstsq_on_all_rows(dead_channel):
    x, y = _rows()
    if dead_channel:  # a ReLU channel that never fires: the normal equations are singular, minimum norm wins
        x[:, 2] = 0
    stats = LinearStats(6, 4)
    for chunk in range(0, len(x), 64):  # in batches, as the stage streams them
        stats.update(x[chunk:chunk + 64], y[chunk:chunk + 64])
    w, b = stats.solve()
    w_ref, b_ref = _lstsq(x, y)
    assert torch.allclose(w, w_ref, atol=1e-10) and torch.allclose(b, b_ref, atol=1e-10)
    residual = y - x @ w_ref.T - b_ref
    r2 = 1 - residual.pow(2).sum() / (y - y.mean(0)).pow(2).sum()
    assert stats.r2(w, b) == pytest.approx(float(r2), abs=1e-10)


def test_masked_least_squares_fit_each_output_on_its_kept_inputs():
    x, y = _rows(seed=1)
    stats = LinearStats(6, 4)
    stats.update(x, y)
    mask = make_mask("random_semi_match_legacy", 4, 6, torch.Generator().manual_seed(0))
    w, b = stats.solve(mask)
    for j in range(4):
        keep = mask[j].bool()
        w_ref, b_ref = _lstsq(x[:, keep], y[:, j:j + 1])
        assert torch.allclose(w[j, keep], w_ref[0], atol=1e-10) and float(b[j]) == pytest.approx(float(b_ref[0]))
        assert not w[j, ~keep].any()


def test_masks_and_inits():
    g = torch.Generator().manual_seed(0)
    perm = make_mask("random_permutation", 32, 32, g)
    assert (perm.sum(0) == 1).all() and (perm.sum(1) == 1).all()
    legacy = [make_mask("random_semi_match_legacy", 32, 32, torch.Generator().manual_seed(s)) for s in range(5)]
    assert all((m.sum(1) == 1).all() for m in legacy) and any((m.sum(0) > 1).any() for m in legacy)
    x, _ = _rows(d_in=5)
    y = torch.stack([x[:, 3], -x[:, 0], x[:, 1] + 0.01 * x[:, 4]], 1)
    stats = LinearStats(5, 3)
    stats.update(x, y)
    assert make_mask("semi_match", 3, 5, g, stats)[[0, 2], [3, 1]].all()
    assert make_mask("abs_semi_match", 3, 5, g, stats).argmax(1).tolist() == [3, 0, 1]
    w, b = init_matrix("procrustes", 3, 5, g, stats)
    assert torch.allclose(w @ w.T, torch.eye(3, dtype=w.dtype), atol=1e-10)
    assert torch.equal(init_matrix("perm", 4, 4, g)[0].sum(0), torch.ones(4))
    with pytest.raises(UserError, match="as many input as output"):
        init_matrix("identity", 3, 5, g)


def test_initialise_draws_the_mask_then_the_init_and_solves_least_squares_within_the_mask():
    side = Side((4, 2, 2), "map")
    transform = StitchTransform(side, side)
    assert initialise(transform, "perm", "random_permutation", torch.Generator().manual_seed(3)) is None
    g = torch.Generator().manual_seed(3)
    mask = make_mask("random_permutation", 4, 4, g)
    assert torch.equal(transform.mask, mask)
    assert torch.equal(transform.matrix(), (init_matrix("perm", 4, 4, g)[0] * mask).float())
    x, y = _rows(d_in=4)
    stats = LinearStats(4, 4)
    stats.update(x, y)
    w, b = initialise(transform, "ps_inv", "semi_match", torch.Generator().manual_seed(0), stats)
    mask = make_mask("semi_match", 4, 4, torch.Generator().manual_seed(0), stats)
    w_ref, b_ref = stats.solve(mask)
    assert torch.equal(w, w_ref) and torch.equal(b, b_ref)
    assert torch.equal(transform.matrix(), w.float() * mask) and torch.equal(transform.bias, b.float())


def test_low_rank_honours_its_init():
    side = Side((6, 4, 4), "map")
    transform = StitchTransform(side, side, rank=6)
    transform.set_matrix(torch.eye(6), None)
    assert torch.allclose(transform.matrix(), torch.eye(6), atol=1e-6)
    x, y = _rows(d_in=6, d_out=6)
    stats = LinearStats(6, 6)
    stats.update(x, y)
    u, v, b = stats.reduced_rank(2)
    w_full, b_full = stats.solve()
    assert torch.linalg.matrix_rank(u @ v) == 2
    fitted = x @ (u @ v).T + b
    best_two = torch.linalg.svd((x @ w_full.T + b_full) - (x @ w_full.T + b_full).mean(0)).S[:2].pow(2).sum()
    assert (fitted - fitted.mean(0)).pow(2).sum() == pytest.approx(float(best_two), rel=1e-8)
    assert stats.r2(u @ v, b) < stats.r2(w_full, b_full)


@pytest.mark.parametrize("front, end", [
    ((8, 6, 6), (5, 3, 3)),   # maps of different sizes: resized
    ((8, 4, 4), (16, 12)),    # CNN map -> 16 tokens of width 12
    ((8, 4, 4), (17, 12)),    # -> tokens with a class token
    ((17, 12), (8, 4, 4)),    # tokens with a class token -> map
    ((9, 12), (16, 6)),       # 3x3 tokens -> 4x4 tokens
])
def test_transforms_connect_maps_and_tokens(front, end):
    f, e = Side(front, layout_of(front)), Side(end, layout_of(end))
    transform = StitchTransform(f, e)
    a = torch.randn(3, *front)
    assert transform(a).shape == (3, *end)
    x, y = transform.fit_rows(a, torch.randn(3, *end))
    assert x.shape[1] == transform.d_in and y.shape[1] == transform.d_out and len(x) == len(y)


def test_unconnected_shapes_are_refused():
    with pytest.raises(UserError, match="no affine channel map connects"):
        StitchTransform(Side((16,), "vector"), Side((8, 4, 4), "map"))
    with pytest.raises(UserError, match="square grid"):
        StitchTransform(Side((8, 4, 4), "map"), Side((7, 12), "tokens"))
    flat = StitchTransform(Side((16,), "vector"), Side((8, 4, 4), "map"), kind="flatten", rank=3)
    assert flat(torch.randn(2, 16)).shape == (2, 8, 4, 4)


# ----------------------------------------------------------------------------------------------------- the stage

def _results(path: Path) -> list[dict[str, str]]:
    with open(path / "results.csv") as f:
        return list(csv.DictReader(f))


def test_stitch_sweep_writes_every_pair_and_the_matrix(workdir):
    assert run_cli("stitch", "configs/tiny_stitch.yaml") == 0
    root = Path("checkpoints/tiny_stitch")
    for pair in ("layers.0--layers.0", "layers.0--layers.1", "layers.1--layers.0", "layers.1--layers.1"):
        for name in ("transform_before", "transform_after", "transform_ps_inv"):
            assert (root / pair / f"{name}.safetensors").is_file()
        variants = [r["variant"] for r in _results(root / pair) if r["split"] == "val"]
        assert variants == ["front", "end", "before", "after", "ps_inv"]
    assert (root / "matrix.png").is_file()
    with open(root / "matrix.csv") as f:
        matrix = list(csv.DictReader(f))
    assert len(matrix) == 4 and all(0 <= float(r["raw_cka"]) <= 1 for r in matrix)


def test_self_stitch_stage_zero_epochs_keeps_the_logits(workdir):
    assert run_cli("stitch", "configs/tiny_stitch.yaml", "--set", "stitch.end.run=configs/tiny_stitch_a.yaml",
                   "--set", "stitch.front_layers=layers.1", "--set", "stitch.end_layers=layers.1",
                   "--set", "stitch.init=identity", "--set", "train.epochs=0", "--out", "checkpoints/self") == 0
    from safetensors.torch import load_file

    for name in ("transform_before", "transform_after"):  # still the identity: the logits are the model's own
        saved = load_file(f"checkpoints/self/{name}.safetensors")
        assert torch.equal(saved["weight"], torch.eye(16)) and not saved["bias"].any()
    rows = {(r["split"], r["variant"]): r for r in _results(Path("checkpoints/self"))}
    for variant in ("before", "after"):
        assert float(rows["val", variant]["agreement"]) == 1.0
        assert float(rows["val", variant]["kl_to_end"]) <= 1e-6
        assert float(rows["val", variant]["l2"]) == 0.0


@pytest.mark.parametrize("overrides, message", [
    (["stitch.front_layers=layers.7"], "unknown layer 'layers.7'"),
    (["stitch.end_layers=[head]"], "no affine channel map connects"),
    (["stitch.init=identity", "stitch.end_layers=layers.1", "stitch.front_layers=layers.0"],
     "stitch.init (layers.0 -> layers.1): stitch init identity needs as many input as output channels, got 8 -> 16"),
    (["stitch.measures=[ckaa]"], "unknown similarity 'ckaa'"),
    (["stitch.rank=2", "stitch.mask=semi_match"], "low-rank"),
    (["stitch.front.run=nowhere"], "nowhere is not a directory"),
    (["stitch.front_layers=layers.0.0.weight"], "is a parameter, not a module"),
    (["data.val_fraction=0.001", "stitch.measures=[cka_unbiased]"],
     "cka_unbiased needs at least 4 samples, the validation split gives 2"),
])
def test_stitch_bad_input(workdir, capsys, overrides, message):
    args = ["configs/tiny_stitch.yaml"]
    for item in overrides:
        args += ["--set", item]
    assert run_cli("stitch", *args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not Path("checkpoints/tiny_stitch").exists()


FIXTURES = Path(__file__).resolve().parent / "fixtures" / "drfrankenstein"


def _tiny10_args(*overrides: str) -> list[str]:
    args = ["configs/tiny_stitch_tiny10.yaml",
            "--set", f"stitch.front.weights={FIXTURES}/Tiny10/CIFAR10/in0-gn0/110000.pt",
            "--set", f"stitch.end.weights={FIXTURES}/Tiny10/CIFAR10/in10-gn10/110000.pt"]
    for item in overrides:
        args += ["--set", item]
    return args


def test_tiny10_fixtures_stitch_label_free_with_soft_targets(workdir):
    assert run_cli("stitch", *_tiny10_args()) == 0
    rows = {(r["split"], r["variant"]): r for r in _results(Path("checkpoints/tiny_stitch_tiny10"))}
    assert "acc" not in rows["val", "after"] or rows["val", "after"]["acc"] == ""
    # bn3 of two seeds is nearly linearly related: the least-squares stitch agrees with the end model more often
    # than the front model itself does, and training on the end model's soft targets brings the outputs closer
    assert float(rows["val", "ps_inv"]["agreement"]) > float(rows["val", "front"]["agreement"])
    assert float(rows["val", "after"]["kl_to_end"]) < float(rows["val", "before"]["kl_to_end"])
    assert float(rows["val", "after"]["cka"]) > 0.5


@pytest.mark.parametrize("overrides, message", [
    (["stitch.target=hard"], "needs labels"),
    ([f"stitch.end.weights={FIXTURES}/ResNet20_w1/in0-gn0/110000.pt"], "first mismatching key"),
    (["stitch.end_layers=bn9"], "did you mean 'bn8'"),
])
def test_tiny10_bad_input(workdir, capsys, overrides, message):
    assert run_cli("stitch", *_tiny10_args(*overrides)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not Path("checkpoints/tiny_stitch_tiny10").exists()


@pytest.mark.parametrize("overrides", [
    ["stitch.target=match", "stitch.init=procrustes"],
    ["stitch.target=soft_12", "stitch.temperature=2", "stitch.l1=0.01", "stitch.cka=-1"],
    ["stitch.mask=semi_match", "stitch.target=soft_1_plus_2"],
    ["stitch.rank=3", "stitch.target=soft_1"],
    ["stitch.transform=flatten", "stitch.end_layers=pool", "stitch.front_layers=layers.1"],
])
def test_stitch_options_run(workdir, overrides):
    args = ["configs/tiny_stitch.yaml", "--set", "stitch.front_layers=layers.1.1", "--set",
            "stitch.end_layers=layers.1.1", "--set", "stitch.measures=[cka]"]
    for item in overrides:
        args += ["--set", item]
    assert run_cli("stitch", *args) == 0
    rows = {(r["split"], r["variant"]) for r in _results(Path("checkpoints/tiny_stitch"))}
    assert {("val", "before"), ("val", "after"), ("val", "ps_inv"), ("test", "after")} <= rows


def test_stitch_replays_exactly(workdir):
    assert run_cli("stitch", "configs/tiny_stitch.yaml", "--set", "stitch.front_layers=layers.1.1", "--set",
                   "stitch.end_layers=layers.1.1", "--set", "stitch.cka=0.5",
                   "--set", "stitch.mask=abs_semi_match") == 0
    root = Path("checkpoints/tiny_stitch")
    assert run_cli("stitch", str(root / "config.yaml")) == 0  # the snapshot replays the run bit for bit
    replay = json.loads(Path("checkpoints/tiny_stitch-replay-1/replay.json").read_text())
    assert replay["matches"], replay
