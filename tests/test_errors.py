"""The one helper that spells "did you mean" suggestions."""
from instill.errors import did_you_mean, nearest


def test_did_you_mean_names_the_closest_or_nothing():
    assert did_you_mean("widht", ["width", "depth"]) == " (did you mean 'width'?)"
    assert did_you_mean("zzz", ["width", "depth"]) == ""


def test_nearest_orders_best_first_and_honours_n_and_cutoff():
    assert nearest("layr1", {"layer2": 2, "fc": 3, "layer1": 1}) == ["layer1", "layer2"]
    assert nearest("layer1", ["layer1.0", "layer2", "fc"], n=1) == ["layer1.0"]
    assert nearest("l", ["layer1"], cutoff=0.9) == []
