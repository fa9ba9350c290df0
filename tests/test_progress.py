"""Progress lines with the time left, per stage and per sweep, in any output (a log file as well as a terminal)."""

from __future__ import annotations

import re

from instill.run import time_left
from tests.conftest import run_cli


def test_time_left_from_the_rate_so_far():
    assert time_left(10.0, 1, 4) == "~30 s left"
    assert time_left(60.0, 1, 11) == "~10 min left"
    assert time_left(3600.0, 1, 3) == "~2.0 h left"
    assert time_left(5.0, 0, 3) == time_left(5.0, 3, 3) == ""  # nothing to go on; nothing left


def test_training_and_sub_runs_print_the_time_left_when_stdout_is_not_a_terminal(workdir, capsys):
    assert run_cli("base", "configs/tiny_digits.yaml", "--set", "train.epochs=3") == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if " epoch " in line]  # captured: not a tty
    assert len(rows) == 3
    assert all(re.search(r"\| ~\d+ s left$", row) for row in rows[:2]) and "left" not in rows[2]


def test_a_sweep_says_how_many_points_are_done_and_the_time_left(workdir, capsys):
    from instill.sweep import main as sweep_main

    assert sweep_main(["configs/tiny_digits.yaml", "--stage", "base", "--grid", "reproducibility.random_seed=1,2",
                       "--set", "reproducibility.reproduce=true", "--set", "train.epochs=1", "--executor",
                       "local", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"random_seed=1: finished \([\d.]+ s\) \| 1 of 2 done, ~\d+ s left in this sweep", out), out
    assert re.search(r"random_seed=2: finished \([\d.]+ s\) \| 2 of 2 done\n", out), out
