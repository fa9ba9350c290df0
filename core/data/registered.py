"""Importing this module registers every shipped dataset with ``core.registry.DATASETS``."""

from core.data import images  # noqa: F401
from core.data import folders, shapes  # noqa: F401
from core.data import arithmetic  # noqa: F401
from core.data import sequences  # noqa: F401
