"""What a translation of an original code base's config or command line produces, and how it is written.

A ``Translation`` holds the instill config (a plain mapping, validated later like any config file) and one
``Note`` per original key or flag: where it went (``target``, a dotted instill key) and why, or why it is not
honoured (``target`` None). ``to_yaml`` writes the config with each note as a comment above the section it went
into, and the keys that are not honoured in the header, so a converted file says where every original key went.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from ..errors import UserError


@dataclass
class Note:
    key: str  # the original's key (dotted) or flag
    target: Optional[str]  # the instill key it became; None: not honoured
    text: str = ""  # why, or how the semantics differ


@dataclass
class Translation:
    source: str  # which original, for the header ("Rock-Z/instilling-inductive-bias math/ablate.py")
    stage: str  # the instill stage the config is for
    config: dict[str, Any]
    notes: list[Note] = field(default_factory=list)

    def set(self, target: str, value: Any, key: str, text: str = "") -> None:
        """Put ``value`` at dotted ``target`` and note that original ``key`` went there."""
        node = self.config
        *sections, leaf = target.split(".")
        for part in sections:
            node = node.setdefault(part, {})
        node[leaf] = value
        self.note(key, target, text)

    def note(self, key: str, target: Optional[str], text: str = "") -> None:
        self.notes.append(Note(key, target, text))

    def drop(self, key: str, why: str) -> None:
        """Original ``key`` is not honoured, for the reason given (it does not change the results)."""
        self.notes.append(Note(key, None, why))

    def to_yaml(self) -> str:
        lines = [f"# Translated from {self.source} by `instill convert` (instill stage: {self.stage}).",
                 "# Not honoured (no effect on the results, or replaced as said):"]
        lines += [f"#   {n.key}: {n.text}" for n in self.notes if n.target is None] or ["#   (none)"]
        for section, value in self.config.items():
            for n in self.notes:
                if n.target is not None and n.target.split(".")[0] == section:
                    lines.append(f"# {n.key} -> {n.target}" + (f": {n.text}" if n.text else ""))
            flow = None if isinstance(value, dict) else False  # nested sections compact, a scalar as key: value
            lines.append(yaml.safe_dump({section: value}, sort_keys=False, default_flow_style=flow,
                                        width=120).rstrip())
        return "\n".join(lines) + "\n"


class Keys:
    """The keys of one section of an original config, handed out once each; ``rest`` says which were never read,
    so no key of the original is dropped silently."""

    def __init__(self, raw: Any, prefix: str):
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise UserError(f"{prefix}: expected a mapping, got {type(raw).__name__}")
        self.raw, self.prefix, self.read = raw, prefix, set()

    def __contains__(self, key: str) -> bool:
        return key in self.raw

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return self.raw.get(key, default)

    def need(self, key: str, why: str = "") -> Any:
        self.read.add(key)
        if key not in self.raw:
            raise UserError(f"{self.prefix}.{key}: missing; the original script needs it (it stops with a KeyError)"
                            + (f" ({why})" if why else ""))
        return self.raw[key]

    def key(self, key: str) -> str:
        return f"{self.prefix}.{key}"

    def rest(self) -> list[str]:
        return [k for k in self.raw if k not in self.read]


def refuse_unknown(section: Keys, what: str) -> None:
    """UserError naming the first key nobody translated: it could change the science, so it is never dropped."""
    left = section.rest()
    if left:
        raise UserError(f"{section.key(left[0])}: not translated ({what} does not know it); instill cannot honour "
                        "it, so the run is refused rather than run without it")
