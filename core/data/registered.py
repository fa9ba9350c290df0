"""Importing this module registers every shipped dataset with ``instill.registry.DATASETS``."""

from . import images  # noqa: F401
from . import folders, shapes  # noqa: F401
from . import arithmetic  # noqa: F401
from . import sequences  # noqa: F401
from . import natural  # noqa: F401
