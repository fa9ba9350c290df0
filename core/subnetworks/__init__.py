"""Subnetworks (subtask induction): find a masked subnetwork of a trained model, then transplant it into fresh ones.

- ``masks``: mask methods over any named weights, ``MaskedModel``, mask artifacts (``mask.safetensors``);
- ``neurosurgeon``: masks that NeuroSurgeon 0.1.0 saved, imported as instill mask artifacts;
- ``transplant``: copying a mask's weights into a fresh model, and the transfer conditions (baselines);
- ``ablate`` and ``transfer``: the two stages (``math/ablate.py`` / ``vision/vision_ablate.py`` and the transfer
  scripts);
- ``api``: this system's part of the Python API (``find_subnetwork``, ``load_mask``, ``transplant``, ...).
"""
