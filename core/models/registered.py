"""Importing this module registers every shipped model with ``core.registry.MODELS``."""

from core.models import vision  # noqa: F401
from core.models import gpt2  # noqa: F401
from core.models import deep, sequence  # noqa: F401
