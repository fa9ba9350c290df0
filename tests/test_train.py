"""The training loop: NaN guard, schedules, accumulation, early stopping, evaluation cadence, devices."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from core.config import ScheduleConfig, TrainConfig
from core.data import BatchLoader, Split
from core.errors import UserError
from core.run import Run
from core.train import (DivergedError, Objective, classification_loss, evaluate_classification, fit, lr_factor,
                        resolve_device)

CPU = torch.device("cpu")


def toy_data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return Split(x, (x[:, 0] > 0).long())


def toy_objective(data, nan_at_step=None):
    calls = {"n": 0}

    def loss(model, batch):
        calls["n"] += 1
        x, y = batch
        value = classification_loss(model(x), y)
        if nan_at_step is not None and calls["n"] >= nan_at_step:
            value = value * float("nan")
        return value, {}

    return Objective(loss, lambda m: evaluate_classification(m, {"val": data}, 256, CPU))


def new_run(tmp_path, name="r"):
    (tmp_path / name).mkdir()
    return Run(tmp_path / name)


def test_nan_loss_stops_naming_the_step_and_keeps_last_state(tmp_path):
    data = toy_data()
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    run = new_run(tmp_path)
    cfg = TrainConfig(epochs=5, batch_size=16)  # 4 steps per epoch; NaN on the 10th batch (epoch 3)
    with pytest.raises(DivergedError, match=r"step 10 \(epoch 3\)"):
        fit(model, toy_objective(data, nan_at_step=10), data, cfg, run, seed=0, device=CPU)
    state = torch.load(tmp_path / "r/state.pt", weights_only=False)
    assert state["step"] == 8 and state["epoch"] == 2  # the last good state: end of epoch 2
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert issubclass(DivergedError, UserError)


def test_schedules():
    constant = ScheduleConfig(name="constant", warmup_steps=4)
    assert [lr_factor(constant, s, 10, 100) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    step = ScheduleConfig(name="step", step_epochs=2, gamma=0.5)
    assert [lr_factor(step, s, 10, 100) for s in (0, 19, 20, 45)] == [1.0, 1.0, 0.5, 0.25]
    cosine = ScheduleConfig(name="cosine", min_lr_ratio=0.1)
    assert lr_factor(cosine, 0, 10, 100) == pytest.approx(1.0)
    assert lr_factor(cosine, 50, 10, 100) == pytest.approx(0.55)
    assert lr_factor(cosine, 100, 10, 100) == pytest.approx(0.1)


def test_gradient_accumulation_equals_a_larger_batch(tmp_path):
    data = toy_data(64)
    results = []
    for name, batch, accum in (("a", 32, 1), ("b", 16, 2)):
        torch.manual_seed(1)
        model = nn.Linear(4, 2)
        cfg = TrainConfig(epochs=1, batch_size=batch, grad_accum=accum, optimizer={"name": "SGD", "lr": 0.5})
        # The same examples per optimizer step: order the batches identically by disabling shuffling.
        original = BatchLoader._indices
        BatchLoader._indices = lambda self: torch.arange(len(self.split))
        try:
            fit(model, toy_objective(data), data, cfg, new_run(tmp_path, name), seed=0, device=CPU,
                restore_best=False)
        finally:
            BatchLoader._indices = original
        results.append(model.weight.detach().clone())
    assert torch.allclose(results[0], results[1], atol=1e-6)


def test_early_stop_on_target_and_step_cadence(tmp_path):
    data = toy_data(256)
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    cfg = TrainConfig(epochs=50, batch_size=32, eval_unit="step", eval_every=3, early_stop={"target": 0.9},
                      optimizer={"name": "Adam", "lr": 0.05})
    result = fit(model, toy_objective(data), data, cfg, new_run(tmp_path), seed=0, device=CPU)
    assert result.stop_reason == "target" and result.best["val_acc"] >= 0.9
    assert all(row["step"] % 3 == 0 for row in result.history)
    assert result.steps < 50 * 8


def test_patience_and_best_weights_restored(tmp_path):
    data = toy_data(128)
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    cfg = TrainConfig(epochs=40, batch_size=32, early_stop={"patience": 2}, select_metric="val_loss",
                      select_mode="min", optimizer={"name": "SGD", "lr": 0.01})
    result = fit(model, toy_objective(data), data, cfg, new_run(tmp_path), seed=0, device=CPU)
    final = evaluate_classification(model, {"val": data}, 256, CPU)
    assert final["val_loss"] == pytest.approx(result.best["val_loss"])


def test_unknown_select_metric_is_a_user_error(tmp_path):
    data = toy_data()
    cfg = TrainConfig(epochs=1, select_metric="val_accuracy")
    with pytest.raises(UserError, match="val_accuracy"):
        fit(nn.Linear(4, 2), toy_objective(data), data, cfg, new_run(tmp_path), seed=0, device=CPU)


def test_sequence_accuracy_ignores_unscored_positions():
    logits = torch.tensor([[[5.0, 0.0], [0.0, 5.0], [5.0, 0.0]]])  # predicts 0, 1, 0
    y = torch.tensor([[0, 0, -100]])
    model = lambda x: logits  # noqa: E731
    model.eval = lambda: None
    model.train = lambda mode=True: None
    model.training = False
    metrics = evaluate_classification(model, {"s": Split(torch.zeros(1, 3), y)}, 8, CPU)
    assert metrics["s_acc"] == 0.5
    assert math.isfinite(classification_loss(logits, y).item())


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device"):
            resolve_device("cuda")


def test_batch_loader_shards_and_reshuffles():
    split = Split(torch.arange(10).float(), torch.arange(10))
    shards = [list(torch.cat([y for _, y in BatchLoader(split, 2, shuffle=True, seed=1, rank=r, world_size=2)]))
              for r in range(2)]
    assert not set(shards[0]) & set(shards[1]) and len(shards[0]) == len(shards[1]) == 5
    loader = BatchLoader(split, 10, shuffle=True, seed=1)
    first = next(iter(loader))[1].tolist()
    loader.set_epoch(1)
    assert next(iter(loader))[1].tolist() != first and sorted(first) == list(range(10))
