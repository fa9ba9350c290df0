"""instill: give neural networks inductive biases they cannot learn on their own.

``import instill`` is cheap: the Python API (``instill.api``: ``find_subnetwork``, ``transplant``,
``measure_similarity``, ``alignment_loss``, ...) loads on first use of one of its names. The design:
``docs/design.md``.
"""

__version__ = "0.1.0"

# The names of instill.api.__all__ (a test keeps the two equal). Listed here so that looking up anything else,
# such as a submodule during ``from . import dist``, never imports the API.
_API_NAMES = frozenset({
    "MaskConfig", "MaskedModel", "find_subnetwork", "load_mask", "mask_density", "transplant", "Transplant",
    "TRANSFER_CONDITIONS", "measure_similarity", "measures", "alignment_loss", "AlignmentLoss", "LayerPair",
    "FeatureCapture", "probe", "UserError", "compare_models", "Comparison", "stitch_models", "StitchedNet",
    "StitchTransform", "learning_rule", "learning_rules", "GradientProvider", "StepContext", "alignment_scores",
    "AlignmentBaseline", "create_model", "list_models", "ablate_subnetwork", "Ablations", "ABLATION_MODES",
})


def __getattr__(name: str):
    if name in _API_NAMES:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'instill' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _API_NAMES)
