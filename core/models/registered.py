"""Importing this module registers every shipped model with ``instill.registry.MODELS``."""

from . import vision  # noqa: F401
from . import gpt2  # noqa: F401
from . import deep, sequence  # noqa: F401
from . import zoo  # noqa: F401
