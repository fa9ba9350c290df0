"""instill: give neural networks inductive biases they cannot learn on their own.

``import instill`` is cheap: the Python API (``instill.api``: ``find_subnetwork``, ``transplant``, ``similarity``,
``alignment_loss``, ...) loads on first use of one of its names. The design: ``docs/design.md``.
"""

__version__ = "0.1.0"

_API = "api"  # the submodule whose __all__ is the top-level API


def __getattr__(name: str):
    import importlib

    api = importlib.import_module(f".{_API}", __name__)
    if name in api.__all__:
        return getattr(api, name)
    raise AttributeError(f"module 'instill' has no attribute {name!r}")


def __dir__() -> list[str]:
    import importlib

    return sorted(set(globals()) | set(importlib.import_module(f".{_API}", __name__).__all__))
