"""Every command the README shows runs as shown.

The digits commands of "Running a config" run for real in a scratch directory, cut short with
``--set train.epochs=1``; the replay command must reproduce its run exactly. Commands whose runs take minutes (the
main job, the math and vision transfers, the guidance presets, torchrun) are checked with ``--validate`` in the
same process: their config loads and validates, which is all a command line can get wrong before training starts.
Commands with placeholders (``<base run>``) are checked for their sub-command's ``--help``. The sweep files the
README runs are cut the same way (every point: one epoch of at most a few steps), so the report after them has real
points to read.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from instill.cli import main as stage_main
from tests.conftest import REPO

CUT_SHORT = ["--set", "train.epochs=1"]
CUT_SWEEP = {"train.epochs": 1, "train.max_steps": 3}
VALIDATE_ONLY = {"instill.reproduce"}  # every claim's preset: an hour; `make reproduce` is validated the same way
RUN_FOR_REAL = "configs/vision_base_digits.yaml"
# Commands whose config names run directories that the README says to make first (with a command that takes
# minutes): their --validate stops at the first missing one, with this line.
NEEDS_RUNS_FIRST = {"python stitch.py configs/stitch_transfer.yaml":
                    "stitch.end.run: checkpoints/vision_shapes_convnet_base does not exist"}


def readme_commands() -> list[str]:
    """Shell commands of the README's bash blocks, then the ones its text quotes inline, comments cut off."""
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        commands += [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]
    commands += re.findall(r"`((?:python|make) [^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    return list(dict.fromkeys(commands))


def stage_of(script: str) -> str:
    return re.search(r'entry\("(\w+)"\)', (REPO / script).read_text()).group(1)


def run(command: str, capsys) -> tuple[int, str]:
    """Run one README command in the current directory; returns (exit code, what it printed)."""
    argv = shlex.split(command, comments=True)
    while "=" in argv[0]:  # an environment setting before the command (OMP_NUM_THREADS=1 python ...)
        argv = argv[1:]
    if argv[0] == "make":
        target = argv[1]
        if target == "test":  # this very suite
            return 0, ""
        recipe = re.search(rf"^{target}:.*\n\t(.*)", (REPO / "Makefile").read_text(), flags=re.M).group(1)
        for name, default in re.findall(r"^(\w+) \?= *(.*)$", (REPO / "Makefile").read_text(), flags=re.M):
            recipe = recipe.replace(f"$({name})", default)  # the Makefile's defaults (PY, SEEDS, SCALE, ...)
        recipe = re.sub(r"\$\(if \$\(filter [^)]*\)[^)]*\)", "local", recipe)  # SCALE=cpu's executor
        return run(recipe.replace("$(PY)", "python") + " --validate", capsys)
    if argv[0] == "torchrun":  # its script and arguments, validated in one process
        argv = ["python", *[a for a in argv[1:] if not a.startswith("--nproc")]] + ["--validate"]
    if argv[0] == "instill":  # the console script, in this process
        return _run_console(argv[1:] if "<" not in command else argv[1:2] + ["--help"], capsys)
    assert argv[0] == "python", command
    if argv[1] == "-m":
        if "<" in command:  # placeholders: the sub-command exists and documents itself
            argv = argv[:4] + ["--help"]
        elif argv[2] in VALIDATE_ONLY or "--grid" in argv:  # a --grid sweep of a whole preset: minutes; its
            argv = argv + ["--validate"]                      # files are tests/test_sweep.py's to check
        code = _run_module(argv[2], argv[3:])
    elif argv[1].endswith(".py") and (REPO / argv[1]).read_text().count("entry("):
        args = argv[2:]
        if args[0].startswith("checkpoints/") and not Path(args[0]).exists():
            return 0, "replays a run that the README's `make demo` makes: not made here"
        if args[0] == RUN_FOR_REAL and "--validate" not in args and "--print-config" not in args:
            args = args + CUT_SHORT
        elif args[0].startswith("configs/") and not {"--validate", "--print-config"} & set(args):
            args = args + ["--validate"]
        code = stage_main(stage_of(argv[1]), args)
    elif argv[1] == "-c":  # a one-liner the README quotes (`python -c "import torch"`): run it as a process
        proc = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True, timeout=300)
        return proc.returncode, proc.stdout + proc.stderr
    else:  # a command this test does not know how to check must fail it, not end it early with a skip
        raise AssertionError(f"tests/test_readme.py does not know how to run: {command}")
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _run_console(args: list[str], capsys) -> tuple[int, str]:
    """``instill args``: the console script's main, in this process."""
    from instill.cli import console_main

    try:
        console_main(args)
        code = 0
    except SystemExit as exit_:
        code = exit_.code or 0
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _run_module(module: str, args: list[str]) -> int:
    """``python -m module args``, in this process."""
    import runpy
    import sys

    saved = sys.argv
    sys.argv = [module, *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=False)
        return 0
    except SystemExit as exit_:
        return exit_.code or 0
    finally:
        sys.argv = saved


def test_readme_lists_the_commands_this_test_knows():
    commands = readme_commands()
    assert any("--set train.epochs=5 --set model.channels=[16,32]" in c for c in commands)
    assert "make demo" in commands and any(c.startswith("python guide.py") for c in commands)


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")
def test_every_readme_command_runs_as_shown(tmp_path, monkeypatch, capsys):
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    for sweep_file in (tmp_path / "configs" / "sweeps").glob("*.yaml"):
        spec = yaml.safe_load(sweep_file.read_text())
        spec["sweep"]["set"] = {**spec["sweep"].get("set", {}), **CUT_SWEEP}
        sweep_file.write_text(yaml.safe_dump(spec))
    shutil.copy(REPO / "reproduce.yaml", tmp_path / "reproduce.yaml")  # make reproduce reads the manifest
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "fixtures").symlink_to(REPO / "tests" / "fixtures")  # weights the README names
    monkeypatch.chdir(tmp_path)
    for command in readme_commands():
        if command.startswith("python bench/") or command in ("make bench", "make gpu-check"):
            continue  # benchmarks time themselves; `make bench` runs them
        if command.startswith("python examples/"):
            assert (REPO / command.split()[1]).is_file()  # tests/test_api.py runs each example end to end
            continue
        code, out = run(command, capsys)
        if "--resume" in command:  # the run before it finished: the one-line refusal, exit code 2
            assert code == 2, command
            continue
        if command in NEEDS_RUNS_FIRST:  # --validate checks the run directories it names: not made here
            assert code == 2 and NEEDS_RUNS_FIRST[command] in out, f"{command}: exit code {code}\n{out}"
            continue
        assert code == 0, f"{command}: exit code {code}\n{out}"
        if "checkpoints/vision_base_digits/config.yaml" in command:
            assert Path("checkpoints/vision_base_digits-replay-1/replay.json").is_file()
            assert "matches the original exactly" in out, out
    assert Path("checkpoints/vision_base_digits-2/summary.json").is_file()  # the --set run: a new run beside it
    assert Path("checkpoints/vision_base_digits/curves.png").is_file()
