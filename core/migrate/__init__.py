"""Bring your original setup: the original code bases' configs, run snapshots, checkpoints and command lines, run
in instill.

* ``instilling``: the YAML configs and run snapshots of the subnetwork-transfer code (Rock-Z/instilling-inductive-
  bias). A stage script given one translates it (``translated_if_original``, called where configs are loaded).
* ``flags``: the command lines of the flag-driven originals (drfrankenstein, Wide-Network-Alignment, Guidance).
* ``imports``: HF Trainer checkpoint folders and NeuroSurgeon mask files, imported as instill runs when needed.
* ``convert``: ``instill convert``, which writes a translation as an instill YAML with a comment per key.

docs/migrating.md tables every key and flag.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any


def translated_if_original(raw: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """``raw`` as is, or, for a config in an original's schema, the instill config it translates to."""
    from .instilling import SOURCE, is_original, translate

    if not is_original(raw):
        return raw
    translation = translate(raw, path)
    print(f"{path}: a {SOURCE} config, translated for the {translation.stage} stage "
          f"(instill convert {path} shows where each key went)", file=sys.stderr, flush=True)
    return translation.config
