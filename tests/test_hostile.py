"""Hostile input across every stage and tool: each case is one bad config, bad file, non-finite model, read-only or
full disk, symlink, concurrent owner or signal, and each must end with its exit code, one line on stderr naming the
problem, and the working directory byte for byte as it was (nothing written, nothing touched).

Every case fails before a run trains (checks come first), so the module stays fast; the finished runs it needs are
trained once per module. Interrupted and killed runs themselves are tests/test_crash_resume.py's; the defects of
issue 21, one by one, tests/test_reliability.py's.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import pytest

from instill.report import main as report_main
from instill.reproduce import main as reproduce_main
from instill.run import LOCK_FILE, RunLock
from instill.subnetworks.neurosurgeon import main as neurosurgeon_main
from instill.sweep import SWEEP_LOCK
from instill.sweep import main as sweep_main
from tests.conftest import run_cli
from tests.test_reproduce import TINY_MANIFEST
from tests.test_run_safety import tmpfs

TINY = "configs/tiny_digits.yaml"
A, B = "checkpoints/tiny_stitch_a", "checkpoints/tiny_stitch_b"


@pytest.fixture(scope="module")
def finished(tiny_convnet_runs):
    """The two tiny ConvNet runs (digits) that stitch and compare read, and an ablate-ready copy: trained once."""
    return tiny_convnet_runs


def snapshot(root: Path) -> dict[str, object]:
    """Every path below ``root``: a file's bytes, a link's target, a folder's mode. Two records may
    change by design: a run's lock file names its last owner, and env.json's elapsed_s counts the seconds a failed
    --resume spent too."""
    out: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            key = str(path.relative_to(root))
            if path.is_symlink():
                out[key] = ("link", os.readlink(path))
            elif path.is_dir():
                out[key] = ("dir", path.stat().st_mode)
            elif path.name == LOCK_FILE:
                out[key] = "lock"
            elif path.name == "env.json":
                out[key] = {k: v for k, v in json.loads(path.read_text()).items() if k != "elapsed_s"}
            elif path.is_file():
                out[key] = path.read_bytes()
            else:
                out[key] = ("special", path.stat().st_mode)
    return out


# ------------------------------------------------------------------------------------------------ the setups


def write(path: str, text: str) -> Callable[[], None]:
    return lambda: (Path(path).parent.mkdir(parents=True, exist_ok=True), Path(path).write_text(text))


def edit(path: str, old: str, new: str) -> Callable[[], None]:
    return lambda: Path(path).write_text(Path(path).read_text().replace(old, new))


def runs(*extra: Callable[[], None]) -> Callable[..., None]:
    """Copy the finished runs into checkpoints/, then the extra setups."""
    def setup(finished_dir):
        shutil.copytree(finished_dir, "checkpoints")
        for step in extra:
            step()
    setup.needs_runs = True
    return setup


def poison(run_dir: str, value: float) -> Callable[[], None]:
    def setup():
        from safetensors.torch import load_file, save_file

        path = Path(run_dir) / "model.safetensors"
        weights = load_file(path)
        weights["layers.0.0.weight"][0] = value
        save_file(weights, path)
    return setup


def truncate(path: str, size: int = 40) -> Callable[[], None]:
    return lambda: Path(path).write_bytes(Path(path).read_bytes()[:size])


def symlink(target: str, link: str) -> Callable[[], None]:
    return lambda: os.symlink(target, link)


def fifo(path: str) -> Callable[[], None]:
    return lambda: os.mkfifo(path)


STITCH_A = "stitch:\n  front: {run: checkpoints/tiny_stitch_a}\n  end: {run: checkpoints/tiny_stitch_b}\n" \
           "  front_layers: [layers.0]\n  end_layers: [layers.0]\n"
STITCH = f"data: {{name: digits, limit: 300}}\n{STITCH_A}train: {{epochs: 1, progress: false}}\n"
COMPARE = ("data: {name: digits, limit: 300}\ncompare:\n  model_a: {run: checkpoints/tiny_stitch_a}\n"
           "  model_b: {run: checkpoints/tiny_stitch_b}\n  layers_a: [layers.0]\n  measures: [cka_minibatch]\n")
ABLATE = ("base: checkpoints/tiny_stitch_a\ndata: {name: digits, limit: 300}\nmodel: null\n"
          "mask: {layers: [Conv2d], method: magnitude, prune_fraction: 0.5}\ntrain: {epochs: 1}\n")
SWEEP = "sweep:\n  config: configs/tiny_digits.yaml\n  stage: base\n  grid: {train.epochs: [1]}\n"


def stage(name: str, *args: str) -> Callable[[], int]:
    return lambda: run_cli(name, *args)


# (id, setup or None, command, exit code, fragment of the one line)
CASES = [
    # --- bad configs, every stage
    ("base-missing-config", None, stage("base", "configs/none.yaml"), 2, "configs/none.yaml"),
    ("base-unknown-key", None, stage("base", TINY, "--set", "train.epoch=2"), 2, "did you mean 'epochs'?"),
    ("base-wrong-type", None, stage("base", TINY, "--set", "train.epochs=two"), 2, "train.epochs"),
    ("base-negative-epochs", None, stage("base", TINY, "--set", "train.epochs=-1"), 2, "train.epochs"),
    ("base-unknown-model", None, stage("base", TINY, "--set", "model.name=fcnn"), 2, "fcnn"),
    ("base-unknown-dataset", None, stage("base", TINY, "--set", "data.name=digitz"), 2, "digitz"),
    ("base-yaml-syntax", write("bad.yaml", "data: {name: digits\n"), stage("base", "bad.yaml"), 2, "bad.yaml"),
    ("base-empty-config", write("empty.yaml", ""), stage("base", "empty.yaml"), 2, "empty.yaml"),
    ("base-list-config", write("list.yaml", "- 1\n- 2\n"), stage("base", "list.yaml"), 2, "list.yaml"),
    ("base-binary-config", lambda: Path("bin.yaml").write_bytes(b"\xff\xfe\x00\x01"), stage("base", "bin.yaml"),
     2, "bin.yaml"),
    ("base-config-is-folder", lambda: Path("folder.yaml").mkdir(), stage("base", "folder.yaml"), 2, "folder.yaml"),
    ("base-config-fifo", fifo("fifo.yaml"), stage("base", "fifo.yaml"), 2, "not a regular file"),
    ("base-config-symlink-loop", symlink("loop.yaml", "loop.yaml"), stage("base", "loop.yaml"), 2,
     "Too many levels of symbolic links"),
    ("base-bad-set-syntax", None, stage("base", TINY, "--set", "train.epochs"), 2, "train.epochs"),
    ("base-resume-nothing", None, stage("base", TINY, "--resume", "--out", "checkpoints/x"), 2,
     "--resume: checkpoints/x does not exist"),
    ("ablate-unknown-method", runs(write("a.yaml", ABLATE.replace("magnitude", "magnitud"))), stage("ablate", "a.yaml"),
     2, "magnitud"),
    ("ablate-layers-match-nothing", runs(write("a.yaml", ABLATE.replace("[Conv2d]", "[Conv9d]"))),
     stage("ablate", "a.yaml"), 2, "Conv9d"),
    ("ablate-base-missing", write("a.yaml", ABLATE), stage("ablate", "a.yaml"), 2, "checkpoints/tiny_stitch_a"),
    ("transfer-unknown-condition", None, stage("transfer", "configs/tiny_shapes_transfer.yaml", "--set",
                                                "transfer.conditions=[subnett]"), 2, "subnett"),
    ("transfer-negative-n", None, stage("transfer", "configs/tiny_shapes_transfer.yaml", "--set",
                                         "transfer.n_disambiguation=[-1]"), 2, "n_disambiguation"),
    ("guide-unknown-condition", None, stage("guide", "configs/tiny_guide_digits.yaml", "--set",
                                             "guidance.conditions=[guided]"), 2, "guided"),
    ("guide-unknown-layer-map", None, stage("guide", "configs/tiny_guide_digits.yaml", "--set",
                                             "guidance.layer_map=diagonal"), 2, "diagonal"),
    ("align-unknown-rule", None, stage("align", "configs/tiny_align.yaml", "--set", "align.rules=[backprob]"), 2,
     "backprob"),
    ("align-zero-width", None, stage("align", "configs/tiny_align.yaml", "--set", "align.widths=[0]"), 2, "width"),
    ("stitch-unknown-layer", runs(write("s.yaml", STITCH.replace("front_layers: [layers.0]",
                                                                 "front_layers: [layers.9]"))),
     stage("stitch", "s.yaml"), 2, "layers.9"),
    ("stitch-unknown-init", runs(), stage("stitch", "s.yaml", "--set", "stitch.init=magic"), 2, "magic"),
    ("compare-unknown-measure", runs(write("c.yaml", COMPARE.replace("cka_minibatch", "ckaa"))),
     stage("compare", "c.yaml"), 2, "unknown measure 'ckaa'"),
    ("compare-unknown-layer", runs(write("c.yaml", COMPARE.replace("[layers.0]", "[layers.7]"))),
     stage("compare", "c.yaml"), 2, "layers.7"),
    ("compare-integer-layer", runs(write("c.yaml", COMPARE.replace("[layers.0]", "[0]"))),
     stage("compare", "c.yaml"), 2, "layer"),
    # --- bad files
    ("stitch-truncated-weights", runs(truncate(f"{A}/model.safetensors")), stage("stitch", "s.yaml"), 2,
     "model.safetensors is not a readable safetensors file"),
    ("compare-truncated-weights", runs(truncate(f"{B}/model.safetensors")), stage("compare", "c.yaml"), 2,
     "model.safetensors is not a readable safetensors file"),
    ("compare-garbage-model-json", runs(write(f"{A}/model.json", "{not json")), stage("compare", "c.yaml"), 2,
     "model.json: unreadable model description"),
    ("compare-weights-fifo", runs(lambda: os.remove(f"{A}/model.safetensors"), fifo(f"{A}/model.safetensors")),
     stage("compare", "c.yaml"), 2, "is not a regular file"),
    ("compare-unfinished-run", runs(lambda: os.remove(f"{A}/summary.json")), stage("compare", "c.yaml"), 2,
     "is not a finished run"),
    ("ablate-truncated-base", runs(truncate(f"{A}/model.safetensors")), stage("ablate", "a.yaml"), 2,
     "is not a readable safetensors file"),
    ("base-resume-garbage-state", runs(lambda: os.remove(f"{A}/summary.json"), write(f"{A}/state.pt", "garbage")),
     stage("base", "configs/tiny_stitch_a.yaml", "--resume"), 2, "cannot read saved state"),
    ("base-damaged-summary", runs(write(f"{A}/summary.json", '{"status": "fini')), stage("base", TINY, "--out", A),
     2, A),
    ("neurosurgeon-missing-file", runs(), lambda: neurosurgeon_main(["none.pt", "--base", A, "--out", "m"]), 2,
     "none.pt"),
    ("neurosurgeon-garbage-file", runs(write("g.pt", "garbage")),
     lambda: neurosurgeon_main(["g.pt", "--base", A, "--out", "m"]), 2, "g.pt"),
    # --- non-finite weights
    ("stitch-nan-front", runs(poison(A, float("nan"))), stage("stitch", "s.yaml"), 2,
     "weight 'layers.0.0.weight' holds NaN or inf"),
    ("stitch-inf-end", runs(poison(B, float("inf"))), stage("stitch", "s.yaml"), 2,
     "tiny_stitch_b/model.safetensors: weight 'layers.0.0.weight' holds NaN or inf"),
    ("compare-nan-a", runs(poison(A, float("nan"))), stage("compare", "c.yaml"), 2, "holds NaN or inf"),
    ("compare-neg-inf-b", runs(poison(B, float("-inf"))), stage("compare", "c.yaml"), 2, "holds NaN or inf"),
    ("ablate-nan-base", runs(poison(A, float("nan"))), stage("ablate", "a.yaml"), 2, "holds NaN or inf"),
    # --- read-only and full disks, file in the way
    ("base-out-below-file", write("afile", "x"), stage("base", TINY, "--out", "afile/run"), 2,
     "afile is a file, not a folder"),
    ("stitch-out-below-file", runs(write("afile", "x")), stage("stitch", "s.yaml", "--out", "afile/deeper/run"), 2,
     "afile is a file, not a folder"),
    ("sweep-out-below-file", write("afile", "x"), lambda: sweep_main(["sw.yaml", "--out", "afile/s"]), 2,
     "afile is a file, not a folder"),
    ("base-read-only", "ro", stage("base", TINY, "--out", "ro/run"), 2, "Read-only file system"),
    ("compare-read-only", "ro+runs", stage("compare", "c.yaml", "--out", "ro/c"), 2, "Read-only file system"),
    ("stitch-read-only", "ro+runs", stage("stitch", "s.yaml", "--out", "ro/s"), 2, "Read-only file system"),
    ("sweep-read-only", "ro", lambda: sweep_main(["sw.yaml", "--out", "ro/s"]), 2, "Read-only file system"),
    ("report-plot-read-only", "ro+runs", lambda: report_main(["checkpoints", "--plot", "--plot-dir", "ro/p"]), 2,
     "Read-only file system"),
    ("reproduce-read-only", "ro", lambda: reproduce_main(["--manifest", "m.yaml", "--out", "ro/r", "--workers", "1"]),
     2, "Read-only file system"),
    ("base-full-disk", "full", stage("base", TINY, "--out", "full/run"), 2, "No space left on device"),
    ("sweep-full-disk", "full", lambda: sweep_main(["sw.yaml", "--out", "full/s"]), 2, "No space left on device"),
    # --- symlinks and loops
    ("base-out-symlink-loop", symlink("out", "out"), stage("base", TINY, "--out", "out/run"), 2, "out"),
    ("stitch-front-symlink-loop", runs(symlink("loopdir", "loopdir"),
                                      edit("s.yaml", "checkpoints/tiny_stitch_a", "loopdir")),
     stage("stitch", "s.yaml"), 2, "loopdir"),
    ("compare-config-extends-loop", runs(write("c.yaml", "extends: c.yaml\n" + COMPARE)), stage("compare", "c.yaml"),
     2, "c.yaml"),
    # --- concurrent owners
    ("base-run-in-use", "locked-run", stage("base", "configs/tiny_stitch_a.yaml", "--out", "checkpoints/busy",
                                            "--resume"), 2, "is in use by process"),
    ("sweep-in-use", "locked-sweep", lambda: sweep_main(["sw.yaml", "--out", "busy"]), 2,
     "is owned by the sweep of process"),
    # --- sweeps and reproduce
    ("sweep-duplicate-seeds", write("dup.yaml", SWEEP.replace("{train.epochs: [1]}",
                                                              "{reproducibility.random_seed: [1, 1]}")),
     lambda: sweep_main(["dup.yaml"]), 2, "are identical"),
    ("sweep-unknown-key", write("bad.yaml", SWEEP.replace("train.epochs", "train.epoch")),
     lambda: sweep_main(["bad.yaml"]), 2, "did you mean 'epochs'?"),
    ("sweep-zero-workers", None, lambda: sweep_main(["sw.yaml", "--workers", "0"]), 2, "--workers must be at least 1"),
    ("reproduce-metric-typo", write("m2.yaml", TINY_MANIFEST.replace("metric: test_acc", "metric: tset_acc")),
     lambda: reproduce_main(["--manifest", "m2.yaml", "--validate"]), 2, "writes no metric 'tset_acc'"),
    ("reproduce-unknown-claim", None, lambda: reproduce_main(["--manifest", "m.yaml", "--claims", "nope"]), 2,
     "no claim 'nope'"),
    ("report-not-a-folder", None, lambda: report_main(["nowhere"]), 2, "nowhere is not a directory"),
]


@contextlib.contextmanager
def place(kind, finished_dir):
    """The read-only or full disk, or the owner, a case needs while it runs."""
    if kind is None or callable(kind):
        yield
        return
    if kind.endswith("+runs"):
        shutil.copytree(finished_dir, "checkpoints")
        kind = kind.removesuffix("+runs")
    if kind == "ro":
        with tmpfs(Path("ro"), "ro,size=64k"):
            yield
    elif kind == "full":
        with tmpfs(Path("full"), "size=4k"):
            Path("full/filler").write_bytes(b"x" * 4096)
            yield
    elif kind == "locked-run":
        shutil.copytree(finished_dir / "tiny_stitch_a", "checkpoints/busy")
        os.remove("checkpoints/busy/summary.json")
        lock = RunLock.take(Path("checkpoints/busy"), record=True)  # as a live run of another process holds it
        try:
            yield
        finally:
            lock.release()
    elif kind == "locked-sweep":
        Path("busy").mkdir()
        lock = RunLock.take(Path("busy"), create=True, file=SWEEP_LOCK)
        try:
            yield
        finally:
            lock.release()
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize("case_id, setup, command, code, fragment", CASES, ids=[c[0] for c in CASES])
def test_hostile_input_is_one_line_and_touches_nothing(workdir, finished, capsys, case_id, setup, command, code,
                                                       fragment):
    Path("s.yaml").write_text(STITCH)
    Path("c.yaml").write_text(COMPARE)
    Path("a.yaml").write_text(ABLATE)
    Path("sw.yaml").write_text(SWEEP)
    Path("m.yaml").write_text(TINY_MANIFEST)
    if callable(setup):
        if getattr(setup, "needs_runs", False):
            setup(finished)
        else:
            setup()
    with place(setup, finished):
        before = snapshot(workdir)
        capsys.readouterr()
        assert command() == code
        after = snapshot(workdir)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, f"{case_id}: {err}"
    assert fragment in err, f"{case_id}: {err}"
    changed = sorted(k for k in set(after) | set(before) if after.get(k) != before.get(k))
    assert not changed, f"{case_id}: changed {changed[:5]}"


def test_the_suite_covers_every_stage_and_tool():
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)
    kinds = {c[0].split("-")[0] for c in CASES}
    assert {"base", "ablate", "transfer", "guide", "align", "stitch", "compare", "sweep", "reproduce", "report",
            "neurosurgeon"} <= kinds
