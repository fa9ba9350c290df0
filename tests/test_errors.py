"""The one helper that spells "did you mean" suggestions."""
from instill.errors import did_you_mean, nearest


def test_did_you_mean_names_the_closest_or_nothing():
    assert did_you_mean("widht", ["width", "depth"]) == " (did you mean 'width'?)"
    assert did_you_mean("zzz", ["width", "depth"]) == ""


def test_nearest_orders_best_first_and_honours_n_and_cutoff():
    assert nearest("layr1", {"layer2": 2, "fc": 3, "layer1": 1}) == ["layer1", "layer2"]
    assert nearest("layer1", ["layer1.0", "layer2", "fc"], n=1) == ["layer1.0"]
    assert nearest("l", ["layer1"], cutoff=0.9) == []


def test_each_set_of_choices_has_one_source():
    """Config sections take their choices from the library's types, so the two cannot drift apart."""
    from typing import get_args

    from instill.subnetworks.masks import MASK_METHODS, MaskConfig, make_method
    from instill.subnetworks import transfer as transfer_stage
    from instill.subnetworks.transplant import CONDITIONS, BatchNorm, NonMasked

    assert all(type(make_method(MaskConfig(layers=("*",), method=m))).__name__ for m in MASK_METHODS.names())
    fields = transfer_stage.TransferSection.model_fields
    assert get_args(fields["batch_norm"].annotation) == get_args(BatchNorm) == ("inherit", "reset", "freeze")
    assert get_args(fields["non_masked"].annotation) == get_args(NonMasked)
    assert set(transfer_stage.DEFAULT_CONDITIONS) < set(CONDITIONS)
