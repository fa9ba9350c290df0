"""The training loop: NaN guard, schedules, accumulation, early stopping, evaluation cadence, devices."""

from __future__ import annotations

import math
import os
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from torch import nn

from instill.config import ScheduleConfig, TrainConfig
from instill.data import BatchLoader, Split
from instill.errors import UserError
from instill.run import Run
from instill.seeds import derive_seed
from instill.train import (DivergedError, Objective, classification_loss, evaluate_classification, fit, lr_factor,
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
    # 48 samples: batches of 32 and 16 against groups of 2 x 16 and a partial group of one 16 (its gradient is not
    # halved, and it counts as a step of the cosine schedule).
    data = toy_data(48)
    results = []
    for name, batch, accum in (("a", 32, 1), ("b", 16, 2)):
        torch.manual_seed(1)
        model = nn.Linear(4, 2)
        cfg = TrainConfig(epochs=1, batch_size=batch, grad_accum=accum, optimizer={"name": "SGD", "lr": 0.5},
                          schedule={"name": "cosine"})
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


def test_partial_accumulation_group_counts_in_the_schedule(tmp_path):
    data = toy_data(104)  # 13 batches of 8: 7 optimizer steps per epoch with grad_accum 2, the last on one batch
    cfg = TrainConfig(epochs=2, batch_size=8, grad_accum=2, optimizer={"name": "SGD", "lr": 0.1},
                      schedule={"name": "cosine"})
    result = fit(nn.Linear(4, 2), toy_objective(data), data, cfg, new_run(tmp_path), seed=0, device=CPU)
    assert result.steps == 14
    # Half-way through the schedule after the first epoch (the lr logged is the one the next step uses).
    assert result.history[0]["lr"] == pytest.approx(0.05)
    assert result.history[1]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_step_schedule_inside_the_loop(tmp_path):
    data = toy_data(64)  # 4 steps per epoch
    cfg = TrainConfig(epochs=3, batch_size=16, eval_unit="step", optimizer={"name": "SGD", "lr": 0.1},
                      schedule={"name": "step", "step_epochs": 1, "gamma": 0.5})
    result = fit(nn.Linear(4, 2), toy_objective(data), data, cfg, new_run(tmp_path), seed=0, device=CPU)
    assert [row["step"] for row in result.history] == list(range(1, 13))
    assert [row["lr"] for row in result.history] == pytest.approx([0.1 * 0.5 ** (s // 4) for s in range(1, 13)])


def test_grad_clip_bounds_the_update(tmp_path):
    data = toy_data(32)
    moves = {}
    for clip in (None, 0.01):
        torch.manual_seed(0)
        model = nn.Linear(4, 2)
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        objective = Objective(lambda m, b: (1000 * classification_loss(m(b[0]), b[1]), {}), lambda m: {"val_acc": 0.0})
        cfg = TrainConfig(epochs=1, max_steps=1, batch_size=32, grad_clip=clip, optimizer={"name": "SGD", "lr": 1.0})
        fit(model, objective, data, cfg, new_run(tmp_path, str(clip)), seed=0, device=CPU, restore_best=False)
        after = torch.cat([p.detach().flatten() for p in model.parameters()])
        moves[clip] = (after - before).norm().item()  # plain SGD at lr 1: the step is the (clipped) gradient
    assert moves[0.01] == pytest.approx(0.01, rel=1e-4)
    assert moves[None] > 10 * 0.01


def test_a_name_logged_by_some_batches_is_averaged_over_those(tmp_path):
    data = toy_data(96)  # 12 batches of 8; "sim" is logged by the first 3 only (as guidance for the first N steps)
    base = toy_objective(data)

    def loss(model, batch):
        value, _ = base.loss(model, batch)
        return value, ({"sim": 0.5} if objective.step < 3 else {})

    objective = Objective(loss, base.evaluate)
    result = fit(nn.Linear(4, 2), objective, data, TrainConfig(epochs=1, batch_size=8), new_run(tmp_path), seed=0,
                 device=CPU)
    assert result.history[0]["sim"] == 0.5


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
    # One process: the epoch's seeded permutation itself (the order shipped configs' results were measured with).
    single = torch.cat([y for _, y in BatchLoader(split, 3, shuffle=True, seed=1)])
    first_epoch = torch.Generator().manual_seed(derive_seed(1, 0, legacy="epoch"))
    assert single.tolist() == torch.randperm(10, generator=first_epoch).tolist()
    # Three ranks: DistributedSampler deals that same permutation out, leaving out the last 11 mod 3.
    odd = Split(torch.arange(11).float(), torch.arange(11))
    permutation = torch.cat([y for _, y in BatchLoader(odd, 4, shuffle=True, seed=5)]).tolist()
    for r in range(3):
        shard = torch.cat([y for _, y in BatchLoader(odd, 2, shuffle=True, seed=5, rank=r, world_size=3)])
        assert shard.tolist() == permutation[:9][r::3]
    loader = BatchLoader(split, 10, shuffle=True, seed=1)
    first = next(iter(loader))[1].tolist()
    loader.set_epoch(1)
    assert next(iter(loader))[1].tolist() != first and sorted(first) == list(range(10))


def _diverge_on_one_rank(rank: int, port: int, folder: str) -> None:
    """One of two gloo processes training the same toy model; rank 1's loss turns NaN at its third batch."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    # A short timeout: a rank left waiting in the gradient all-reduce fails the test instead of hanging it.
    torch_dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                  timeout=timedelta(seconds=30))
    try:
        data = toy_data()
        torch.manual_seed(0)
        cfg = TrainConfig(epochs=2, batch_size=16, progress=False)
        try:
            fit(nn.Linear(4, 2), toy_objective(data, nan_at_step=3 if rank == 1 else None), data, cfg,
                Run(Path(folder) / "r"), seed=0, device=CPU)
        except DivergedError as err:
            Path(folder, f"rank{rank}.txt").write_text(str(err))
    finally:
        torch_dist.destroy_process_group()


def test_a_loss_diverging_on_one_rank_stops_every_rank(tmp_path):
    (tmp_path / "r").mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_diverge_on_one_rank, args=(port, str(tmp_path)), nprocs=2, start_method="fork")
    assert "the loss became nan at step 3 (epoch 2)" in (tmp_path / "rank1.txt").read_text()
    assert "non-finite on another rank at step 3 (epoch 2)" in (tmp_path / "rank0.txt").read_text()
