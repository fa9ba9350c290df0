"""Comparison: how similar two networks' layers are.

- ``similarity``: similarity measures on two activation matrices (CKA, RSA, Procrustes, the CCA family);
- ``capture``: activation capture by module name (``FeatureCapture``, ``probe``), shared with guidance and stitching;
- ``measures``: every selected layer of one model against every one of another, streamed over a data loader
  (``compare_models``);
- ``stage``: the compare stage (``compare.py``);
- ``api``: this system's part of the Python API (``measure_similarity``, ``measures``, ``compare_models``).

``from instill.compare import compare_models, Comparison`` is the documented import; it loads ``measures`` on use.
"""

_LAZY = {"compare_models": "measures", "Comparison": "measures"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
