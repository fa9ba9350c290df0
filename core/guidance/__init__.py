"""Guidance ("training the untrainable"): train a network with a representational-alignment loss towards a guide.

- ``loss``: layer maps and the alignment loss (``AlignmentLoss``);
- ``guide``: the guide stage (``guide.py``);
- ``api``: this system's part of the Python API (``alignment_loss``).
"""
