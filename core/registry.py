"""Registries of named builders (datasets, models) whose keyword arguments are the config's keys.

A builder is a function ``build(ctx, *, key: type = default, ...)``. Its first positional argument carries what the
run supplies (seed, input shape, class count); every keyword-only parameter becomes a typed, validated config key.
So a builder's signature is the single source of its options: the config validator, the error messages and the
``--print-config`` output all read it.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
from dataclasses import dataclass
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from .errors import UserError


@dataclass(frozen=True)
class Entry:
    name: str
    build: Callable[..., Any]
    params: type[BaseModel]
    doc: str


class Registry:
    """Name -> builder, with a pydantic model of the builder's keyword-only parameters."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}
        self._prefixes: dict[str, Entry] = {}

    def register(self, name: str, *, prefix: bool = False):
        """Decorator. With ``prefix=True`` the entry serves every name ``name:<rest>`` (timm:resnet18)."""

        def wrap(fn):
            entry = Entry(name, fn, _params_model(name, fn), inspect.getdoc(fn) or "")
            (self._prefixes if prefix else self._entries)[name] = entry
            return fn

        return wrap

    def entries(self) -> list[Entry]:
        """Every registered entry (prefixed ones as ``<prefix>:<name>``), by name."""
        _import_builtins()
        return [self._entries[n] for n in sorted(self._entries)] + [
            dataclasses.replace(self._prefixes[p], name=f"{p}:<name>") for p in sorted(self._prefixes)]

    def names(self) -> list[str]:
        return sorted(self._entries) + sorted(f"{p}:<name>" for p in self._prefixes)

    def get(self, name: str) -> Entry:
        _import_builtins()
        if name in self._entries:
            return self._entries[name]
        head = name.split(":", 1)[0]
        if ":" in name and head in self._prefixes:
            return self._prefixes[head]
        hint = difflib.get_close_matches(name, self.names(), n=1)
        raise UserError(
            f"unknown {self.kind} {name!r}"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
            + f"; known: {', '.join(self.names())}"
        )

    def validate(self, name: str, params: dict[str, Any]) -> dict[str, Any]:
        """Validated, defaults-filled keyword arguments for ``name``; raises ValueError with a one-line reason."""
        entry = self.get(name)
        try:
            return entry.params.model_validate(params).model_dump()
        except ValidationError as err:
            raise ValueError(describe_error(err, entry.params)) from None

    def build(self, name: str, ctx: Any, params: dict[str, Any]) -> Any:
        """The built object; a UserError when a library rejects the keywords a config passed through to it."""
        entry = self.get(name)
        kwargs = self.validate(name, params)
        if name != entry.name:  # prefixed entry: pass the part after the colon
            kwargs["name"] = name.split(":", 1)[1]
        try:
            return entry.build(ctx, **kwargs)
        except TypeError as err:
            if _rejected_keyword(err) not in _passed_through_keys(kwargs):  # a bug in the builder: keep the traceback
                raise
            raise UserError(f"{self.kind} {name}: {err}") from None


_BINDING_ERROR = re.compile(r"(?:unexpected keyword argument|multiple values for (?:keyword )?argument) '(\w+)'")


def _rejected_keyword(err: TypeError) -> str | None:
    """The keyword a call refused (unknown, or given twice), when ``err`` is such a call's error."""
    match = _BINDING_ERROR.search(str(err))
    return match.group(1) if match else None


def _passed_through_keys(kwargs: dict[str, Any]) -> set[str]:
    """Keys of the free-form mappings among a builder's arguments (``kwargs: {...}``, handed on to a library
    unchecked). The builder's declared keywords are not among them: those were validated, so passing them on
    wrongly is the builder's bug."""
    return {key for value in kwargs.values() if isinstance(value, dict) for key in value}


def _params_model(name: str, fn) -> type[BaseModel]:
    fields = {}
    for p in inspect.signature(fn, eval_str=True).parameters.values():
        if p.kind is not inspect.Parameter.KEYWORD_ONLY or p.name == "name":
            continue
        annotation = p.annotation if p.annotation is not inspect.Parameter.empty else Any
        fields[p.name] = (annotation, ... if p.default is inspect.Parameter.empty else p.default)
    return create_model(f"{name}_params", __config__=ConfigDict(extra="forbid"), **fields)


def describe_error(err: ValidationError, model: type[BaseModel] | None = None, prefix: str = "") -> str:
    """One line for the first problem in ``err``: the dotted key, what went wrong, the nearest valid key."""
    first = err.errors()[0]
    loc = [str(part) for part in first["loc"]]
    key = ".".join([prefix] + loc if prefix else loc) or "<root>"
    if first["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        allowed = _allowed_keys(model, loc[:-1])
        hint = difflib.get_close_matches(loc[-1], allowed, n=1)
        msg = f"unknown key {key!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
        return msg + (f"; allowed: {', '.join(sorted(allowed))}" if allowed else "")
    if first["type"] == "missing":
        return f"missing required key {key!r}"
    message = first["msg"].removeprefix("Value error, ")
    got = first.get("input")
    shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
    return f"{key}: {message}{shown}"


def _allowed_keys(model: type[BaseModel] | None, loc: list[str]) -> list[str]:
    """Field names of the (nested) model at ``loc``, walking through BaseModel-typed fields."""
    for part in loc:
        field_types = _field_types(model)
        model = field_types.get(part)
    return list(_field_types(model))


def _field_types(model: Any) -> dict[str, Any]:
    """Field name -> annotation of a pydantic model or a dataclass; empty for anything else."""
    if isinstance(model, type) and issubclass(model, BaseModel):
        return {name: field.annotation for name, field in model.model_fields.items()}
    if dataclasses.is_dataclass(model):
        return {f.name: f.type for f in dataclasses.fields(model)}
    return {}


_BUILTINS_IMPORTED = False


def _import_builtins() -> None:
    """Import the modules that register the shipped datasets and models (lazily: they pull in torch)."""
    global _BUILTINS_IMPORTED
    if not _BUILTINS_IMPORTED:
        _BUILTINS_IMPORTED = True
        from .data import registered as _data  # noqa: F401
        from .models import registered as _models  # noqa: F401


DATASETS = Registry("dataset")
MODELS = Registry("model")
