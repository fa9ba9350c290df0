"""`make gpu-check`'s CPU quick mode runs, measures each paper-shaped system and names every target it checks."""

import json


def test_gpu_check_quick_mode_names_every_target(tmp_path, capsys):
    from bench import gpu_check

    out = tmp_path / "gpu-check.json"
    result = gpu_check.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text())["targets"] == result["targets"]
    printed = capsys.readouterr().out
    listed = {(row["source"], row["key"]) for row in result["targets"]}
    assert listed == {(t.source, t.key) for t in gpu_check.TARGETS}
    assert {t.source.split(":")[1] for t in gpu_check.TARGETS if t.source.startswith("bench:")} <= set(
        gpu_check.BENCHES)
    for target in gpu_check.TARGETS:
        assert target.key in printed and target.source in printed
    for name in gpu_check.PAPER:  # every system ran (no error) and reports a positive rate
        output = result["outputs"][f"paper:{name}"]
        assert "error" not in output
        assert all(v > 0 for k, v in output.items() if k.endswith("_per_s") or k.startswith(("images_per_s",
                                                                                              "tokens_per_s")))
    assert all(row["met"] is None for row in result["targets"])  # toy sizes: nothing claimed
