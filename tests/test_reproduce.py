"""make reproduce: the manifest, the verdicts, and the report of a tiny manifest run for real."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from instill.reproduce import Claim, claim_result, load_manifest, main as reproduce_main, verdict

from .conftest import REPO

TINY_MANIFEST = """claims:
  - id: tiny_parity
    system: guidance (tiny)
    claim: an untrained RNN guide changes a tiny Transformer's parity accuracy
    config: configs/tiny_guide_parity.yaml
    stage: guide
    metric: test_acc
    treatment: {condition: guided_untrained}
    control: {condition: unguided}
    margin: 2.0
    paper: {treatment: 0.7849, control: 0.7198, source: Table 2}
    note: far too small to show anything
"""


def claim(**changes) -> Claim:
    base = dict(id="c", system="s", claim="x", config="a.yaml", stage="transfer", metric="test_acc",
                where={"n_disambiguation": 400}, treatment={"condition": "subnet"},
                control={"condition": "random_init"}, margin=0.1, paper={"treatment": 0.9, "control": 0.47,
                                                                          "source": "Fig. 2"})
    return Claim(**{**base, **changes})


def rows(values):
    """Finished result rows of points a-random_seed=S: {(seed, condition, n): test_acc}."""
    return [{"point": f"a-random_seed={seed}", "state": "finished", "seed": seed, "condition": cond,
             "n_disambiguation": n, "test_acc": acc} for (seed, cond, n), acc in values.items()]


def test_claim_result_per_seed_effects_mean_spread_and_verdict():
    data = rows({(1, "subnet", 400): 0.9, (1, "random_init", 400): 0.5, (1, "subnet", 100): 0.1,
                 (2, "subnet", 400): 0.8, (2, "random_init", 400): 0.6, (2, "random_init", 100): 0.9})
    data.append({"point": "a-random_seed=3", "state": "failed", "seed": 3, "error": "RuntimeError: boom"})
    data.append({"point": "other-random_seed=1", "state": "finished", "seed": 1, "condition": "subnet",
                 "n_disambiguation": 400, "test_acc": 0.0})  # another config's point: not this claim's
    result = claim_result(claim(), data, "a")
    assert [s["effect"] for s in result["per_seed"]] == pytest.approx([0.4, 0.2])
    assert result["effect"] == pytest.approx(0.3) and result["effect_std"] == pytest.approx(0.1414, abs=1e-4)
    assert result["treatment"] == pytest.approx(0.85) and result["n"] == 2
    assert result["verdict"] == "reproduced" and result["failed"] == ["a-random_seed=3: RuntimeError: boom"]
    assert claim_result(claim(margin=0.5), data, "a")["verdict"] == "not at this scale"
    assert claim_result(claim(), data, "nothing")["verdict"] == "not run"


@pytest.mark.parametrize("better, effect, expected", [
    ("higher", 0.2, "reproduced"), ("higher", -0.2, "contradicted"), ("higher", 0.05, "not at this scale"),
    ("lower", -0.2, "reproduced"), ("lower", 0.2, "contradicted"), ("lower", 0.0, "not at this scale"),
])
def test_verdict_follows_the_papers_direction(better, effect, expected):
    assert verdict(claim(better=better), effect) == expected


def test_shipped_manifest_names_every_headline_claim_and_existing_configs(monkeypatch):
    monkeypatch.chdir(REPO)
    manifest = load_manifest("reproduce.yaml")
    configs = {c.config for c in manifest.claims}
    assert {"configs/math_2l_transfer.yaml", "configs/fcn.yaml", "configs/convnet.yaml",
            "configs/guide_copy_paste.yaml", "configs/guide_parity.yaml", "configs/guide_deep_fcn.yaml",
            "configs/guide_lm.yaml"} <= configs
    assert all(c.paper_config for c in manifest.claims)


def test_tiny_manifest_runs_as_a_sweep_and_reports(workdir, capsys):
    Path("m.yaml").write_text(TINY_MANIFEST)
    assert reproduce_main(["--manifest", "m.yaml", "--seeds", "2", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "tiny_parity (cpu): not at this scale" in out
    sweep = Path("checkpoints/reproduce/cpu-seeds2")
    summaries = {}
    for seed in (1, 2):
        summary = json.loads((sweep / f"tiny_guide_parity-random_seed={seed}" / "summary.json").read_text())
        summaries[seed] = {r["condition"]: r["test_acc"] for r in summary["results"]}
    md = Path("reports/reproduce/index.md").read_text()
    assert "| tiny_parity | cpu | 0.7849 vs 0.7198 (effect 0.0651) |" in md and "not at this scale" in md
    for seed, accs in summaries.items():
        assert (f"seed {seed}: treatment {accs['guided_untrained']:.4g}, control {accs['unguided']:.4g}" in md)
    assert "note: far too small" in md and "![tiny_parity at cpu scale](tiny_parity-cpu.png)" in md
    assert Path("reports/reproduce/tiny_parity-cpu.png").is_file()
    html = Path("reports/reproduce/index.html").read_text()
    assert "<img src='tiny_parity-cpu.png'" in html and "not at this scale" in html
    # the report alone, again, from the same sweep
    assert reproduce_main(["--manifest", "m.yaml", "--seeds", "2", "--report-only"]) == 0
    assert Path("reports/reproduce/index.md").read_text() == md


@pytest.mark.parametrize("text, message", [
    (TINY_MANIFEST.replace("note:", "notes:"), "unknown key 'claims.0.notes'"),
    (TINY_MANIFEST.replace("tiny_guide_parity", "missing"), "config configs/missing.yaml does not exist"),
    (TINY_MANIFEST.replace("    treatment: {condition: guided_untrained}\n", ""), "missing required key"),
    ("claims: []", "claims"),
])
def test_bad_manifests_write_nothing_and_exit_2(workdir, capsys, text, message):
    Path("m.yaml").write_text(text)
    assert reproduce_main(["--manifest", "m.yaml"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not Path("checkpoints").exists() and not Path("reports").exists()


def test_unknown_claim_id_is_refused(workdir, capsys):
    Path("m.yaml").write_text(TINY_MANIFEST)
    assert reproduce_main(["--manifest", "m.yaml", "--claims", "tiny_parit"]) == 2
    assert "no claim 'tiny_parit'" in capsys.readouterr().err


STITCH_MANIFEST = """claims:
  - id: tiny_stitch
    system: stitching (tiny)
    claim: a trained stitch of two tiny ConvNets keeps more of the end model's accuracy than its least-squares init
    config: configs/tiny_stitch.yaml
    stage: stitch
    metric: test_rel_acc
    where: {front_layer: layers.1, end_layer: layers.1}
    treatment: {variant: after}
    control: {variant: ps_inv}
    margin: 5.0
    paper: {treatment: null, control: null, source: none}
"""


def test_stitch_claims_read_one_row_per_layer_pair_and_variant(workdir, capsys):
    """A stitch point's result rows are its layer pairs x variants (front, end, before, after, ps_inv), so a claim
    compares the trained stitch with another variant of the same pair; the numbers are the pair's results.csv."""
    Path("m.yaml").write_text(STITCH_MANIFEST)
    assert reproduce_main(["--manifest", "m.yaml", "--seeds", "1", "--workers", "1"]) == 0
    assert "tiny_stitch (cpu): not at this scale" in capsys.readouterr().out
    pair = Path("checkpoints/reproduce/cpu-seeds1/tiny_stitch-random_seed=1/layers.1--layers.1")
    import csv

    with open(pair / "results.csv") as f:
        table = {(r["split"], r["variant"]): float(r["rel_acc"]) for r in csv.DictReader(f)}
    md = Path("reports/reproduce/index.md").read_text()
    after, ps_inv = table["test", "after"], table["test", "ps_inv"]
    assert f"seed 1: treatment {after:.4g}, control {ps_inv:.4g}, effect {after - ps_inv:.4g}" in md
    assert Path("reports/reproduce/tiny_stitch-cpu.png").is_file()


# data options that name local files or folders (the paper-scale data: CIFAR-10, ImageNet, WikiText-103)
DATA_PATH_KEYS = ("root", "path", "train_dir", "val_dir", "test_dir", "cue_conflict_dir")


def _upstream_configs(cfg) -> list[tuple[str, str]]:
    """The (config file, stage) pairs a stage config names as its upstream runs: a transfer's mask, an ablation's
    base, a guide's trained guide, a stitch's two models."""
    refs = []
    if getattr(cfg, "transfer", None) is not None:
        refs.append((cfg.transfer.mask, "ablate"))
    if isinstance(getattr(cfg, "base", None), str):
        refs.append((cfg.base, "base"))
    if getattr(cfg, "guidance", None) is not None and cfg.guidance.guide_run:
        refs.append((cfg.guidance.guide_run, "base"))
    if getattr(cfg, "stitch", None) is not None:
        refs += [(side.run, "base") for side in (cfg.stitch.front, cfg.stitch.end) if side.run]
    return [(path, stage) for path, stage in refs if path.endswith((".yaml", ".yml"))]


def test_every_paper_config_validates_through_its_stage(monkeypatch):
    """Each claim's paper-scale config, and every config it runs first, validates as its stage's config. Data the
    machine does not hold (CIFAR-10, ImageNet, WikiText-103 are never downloaded) fail in exactly one line that
    names the missing path; nothing else may fail."""
    from instill.errors import UserError
    from instill.stages import build_data, load_stage_config

    monkeypatch.chdir(REPO)
    manifest = load_manifest("reproduce.yaml")
    todo = [(c.paper_config, c.stage) for c in manifest.claims]
    seen, missing = set(), []
    while todo:
        config, stage = todo.pop()
        if (config, stage) in seen:
            continue
        seen.add((config, stage))
        assert config.startswith("configs/paper/"), config
        cfg = load_stage_config(config, stage)
        todo += _upstream_configs(cfg)
        data = cfg.data.model_dump() if cfg.data is not None else {}
        paths = [str(data[k]) for k in DATA_PATH_KEYS if data.get(k)]
        if not paths or all(Path(p).exists() for p in paths):
            continue  # generated data (or data that is here): the config's validation above is the check
        with pytest.raises(UserError) as err:
            build_data(cfg, 1)
        message = str(err.value)
        assert len(message.splitlines()) == 1 and any(p in message for p in paths), (config, message)
        missing.append(config)
    upstream = {"configs/paper/math_2l_base.yaml", "configs/paper/vision_resnet18_base.yaml",
                "configs/paper/vision_fcn_ablate.yaml", "configs/paper/guide_parity_rnn_base.yaml",
                "configs/paper/stitch_tiny10_base_a.yaml", "configs/paper/stitch_tiny10_base_b.yaml"}
    assert upstream <= {config for config, _ in seen}  # the whole chain: bases, ablations, trained guides
    assert "configs/paper/align_cifar.yaml" in missing  # CIFAR-10 is not shipped: the one-line error was seen
