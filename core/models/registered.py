"""Importing this module registers every shipped model with ``core.registry.MODELS``."""

from core.models import vision  # noqa: F401
