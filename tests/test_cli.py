"""The command line: ``instill list``, ``--help`` of the entry points, and every command the README shows."""

from __future__ import annotations

import subprocess
import sys

from pathlib import Path

import pytest

from instill.cli import console_main, list_entries, main


@pytest.mark.parametrize("kind, expected", [
    ("models", ["convnet: A small ConvNet", "    channels: list[int] = [32, 64, 64]",
                "timm:<name>: any timm architecture"]),  # the name once, not "timm:<name>: timm:<name>:"
    ("datasets", ["digits: scikit-learn's 1,797 handwritten digits", "    limit: Optional[int] = None"]),
    ("measures", ["cka: Linear CKA", "pwcca: Projection-weighted CCA"]),
    ("conditions", ["    subnet: masked-in weights", "    sampled_complement: the same count",
                    "    guided_trained: task loss"]),
    ("rules", ["align_zero: Align-zero: the initial network's Jacobian", "fa: Feedback alignment", "backprop: "]),
    ("configs", ["configs/fcn.yaml: The README's main job, subtask induction into a fully connected network",
                 "configs/vision_base_digits.yaml: A small ConvNet on scikit-learn's 8x8 digits, about 98% test "
                 "accuracy in a few seconds on 2 CPU cores.",
                 "configs/sweeps/"]),
])
def test_instill_list_prints_entries_with_options_and_help(kind, expected):
    text = list_entries(kind).splitlines()
    for line in expected:
        assert any(row.startswith(line) for row in text), (line, text[:8])
    if kind == "configs":  # every shipped config, each with its purpose
        shipped = sorted(Path(__file__).resolve().parent.parent.joinpath("configs").rglob("*.yaml"))
        assert len(text) == len(shipped) and all("(no header comment)" not in row for row in text)


def test_instill_list_rejects_an_unknown_kind(capsys):
    with pytest.raises(SystemExit) as exit_:
        console_main(["list", "modles"])
    assert exit_.value.code == 2 and "unknown kind 'modles'" in capsys.readouterr().err


def test_instill_list_into_a_closed_pipe_ends_quietly():
    """``instill list models | head -1``: the reader goes away before we write; no BrokenPipeError traceback."""
    child = subprocess.Popen([sys.executable, "-c", "from instill.cli import console_main; console_main()",
                              "list", "models"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child.stdout.close()  # our read end closes before the child has imported anything, so its first write fails
    err = child.stderr.read().decode()
    assert child.wait(timeout=120) == 0 and err == "", err


@pytest.mark.parametrize("stage, section", [("base", "model: name: <registered name>"),
                                            ("ablate", "mask: "), ("transfer", "transfer: "),
                                            ("guide", "guidance: conditions, condition_options, guide")])
def test_help_shows_the_config_sections_and_points_to_instill_list(stage, section, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(stage, ["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "instill list" in out and f"\n  {section}" in out
    with pytest.raises(SystemExit):
        console_main(["--help"])
    assert "instill list" in capsys.readouterr().out
