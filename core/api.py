"""instill's Python API: its systems on your own ``nn.Module`` and ``DataLoader``, without a config or a run directory.

Everything here is also importable from the top level (``import instill; instill.measure_similarity(x, y)``); the
package imports it lazily, so ``import instill`` costs nothing until a name is used. These names are the stable surface;
each system's folder (``instill.subnetworks``, ``instill.guidance``, ``instill.compare``, ``instill.stitching``,
``instill.align``) holds its part in its ``api.py`` and the details in its other modules, which may change.

Masks (subnetwork discovery and transfer, ``instill.subnetworks``)::

    masked = instill.find_subnetwork(model, loader, layers=["Linear"], epochs=5)   # a trained MaskedModel
    masked.save("my_mask")                                   # mask.safetensors + mask.json
    mask = instill.load_mask("my_mask", model)               # {parameter name: bool tensor}, checked
    start = instill.transplant("subnet", model, fresh, mask)  # train start.model; frozen entries stay fixed
    result = instill.ablate_subnetwork(model, mask, {"subtask": loader})  # NeuroSurgeon's ablation modes
    result.summary()["zero_ablate"]["subtask_acc"]["mean"]; result.plot("ablations.png")

Similarity (``instill.compare``)::

    instill.measure_similarity(x, y, "cka")                  # a 0-dim tensor; differentiable in x and y

Guidance (``instill.guidance``), an alignment loss for your own training loop::

    align = instill.alignment_loss(model, guide, [("layers.0", "conv1"), ("layers.1", "layer1")])
    for x, y in loader:
        loss = F.cross_entropy(model(x), y) + align(x)[0]    # the model's forward first, then the loss

Comparison (``instill.compare``), every selected layer of one model against every one of another::

    result = instill.compare_models(model_a, model_b, loader, layers_a=["type:Linear"])
    result.matrix("cka_minibatch"); result.heatmap("cka_minibatch", "cka.png")

Stitching (``instill.stitching``)::

    stitched, metrics = instill.stitch_models(front, end, "layers.1", "layers.1", loader, epochs=2)

Align learning rules (``instill.align``), in your own training loop::

    rule = instill.learning_rule("align_zero", model)         # built at the start of training: theta0 = model now
    for x, y in loader:
        optimizer.zero_grad(); rule.gradients(model, (x, y), instill.StepContext(lr=lr)); optimizer.step()

Models, as timm users expect (the registry configs name models from)::

    instill.list_models("*fcn*")                             # ['deep_fcn', 'fcn', 'wide_fcn']
    net = instill.create_model("convnet", input_shape=(1, 8, 8), num_classes=10, channels=[16, 32])

How the pieces fit and why they are built as they are: ``docs/design.md``.
"""

from .align.api import (AlignmentBaseline, GradientProvider, StepContext, alignment_scores, learning_rule,
                        learning_rules)
from .compare.api import Comparison, compare_models, measure_similarity, measures
from .errors import UserError
from .models.api import create_model, list_models
from .guidance.api import AlignmentLoss, FeatureCapture, LayerPair, alignment_loss, probe
from .stitching.api import StitchedNet, StitchTransform, stitch_models
from .subnetworks.api import (ABLATION_MODES, TRANSFER_CONDITIONS, Ablations, MaskConfig, MaskedModel, Transplant,
                              ablate_subnetwork, find_subnetwork, load_mask, mask_density, transplant)

__all__ = [
    # subnetworks: find a subnetwork, save and load it, test it by ablation, transplant it
    "MaskConfig", "MaskedModel", "find_subnetwork", "load_mask", "mask_density", "transplant", "Transplant",
    "TRANSFER_CONDITIONS", "ablate_subnetwork", "Ablations", "ABLATION_MODES",
    # similarity: a measure on two tensors
    "measure_similarity", "measures",
    # guidance: an alignment loss for your own training loop
    "alignment_loss", "AlignmentLoss", "LayerPair", "FeatureCapture", "probe",
    # comparison: a layer-by-layer matrix of two models over a data loader, with a heatmap
    "compare_models", "Comparison",
    # stitching: the front model up to a layer, a trained stitching transform, the end model from a layer on
    "stitch_models", "StitchedNet", "StitchTransform",
    # Align learning rules: a rule's gradients for your own model and batch, and the alignment scores
    "learning_rule", "learning_rules", "GradientProvider", "StepContext", "alignment_scores", "AlignmentBaseline",
    # models: any model a config can name, built for your inputs and classes
    "create_model", "list_models",
    "UserError",
]
