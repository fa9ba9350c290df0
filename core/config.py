"""Typed YAML configs: validation, ``extends:``, ``--set`` overrides and the resolved snapshot.

Every run reads one YAML file. Sections are pydantic models with ``extra="forbid"``, so an unknown key, a wrong
type, a value out of range or a missing required value stops the run before anything is written, with one line
that names the file, the key and (for a typo) the nearest valid key. Dataset and model options are the keyword
arguments of their registered builders (``instill.registry``); stages add their own sections by subclassing
``RunConfig``.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from .errors import UserError, did_you_mean
from .registry import DATASETS, MODELS, RULES, Registry, describe_error


class Section(BaseModel):
    """A config section: unknown keys are errors, values are re-validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Reproducibility(Section):
    reproduce: bool = Field(False, description="true: use random_seed; false: draw a seed from os.urandom")
    random_seed: Optional[int] = Field(None, ge=0, lt=2**63, description="the seed replayed when reproduce is true")
    deterministic: bool = Field(True, description="deterministic kernels (bit-identical replays on the CPU)")

    @model_validator(mode="after")
    def _seed_when_reproducing(self):
        if self.reproduce and self.random_seed is None:
            raise ValueError("reproduce: true needs random_seed")
        return self


class Component(BaseModel):
    """``{name: <registered name>, <builder keyword>: value, ...}``: checked against the builder's signature."""

    model_config = ConfigDict(extra="allow")
    registry: ClassVar[Registry]
    name: str

    @model_validator(mode="after")
    def _validate_params(self):
        try:
            params = self.registry.validate(self.name, dict(self.model_extra or {}))
        except UserError as err:  # unknown name
            raise ValueError(str(err)) from None
        self.__pydantic_extra__ = params
        return self

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class DataConfig(Component):
    registry: ClassVar[Registry] = DATASETS


class ModelConfig(Component):
    registry: ClassVar[Registry] = MODELS


class OptimizerConfig(Section):
    name: str = Field("AdamW", description="any torch.optim optimizer class name")
    lr: float = Field(1e-3, gt=0)
    kwargs: dict[str, Any] = Field(default_factory=dict, description="further keyword arguments of the optimizer")

    @field_validator("name")
    @classmethod
    def _known_optimizer(cls, name: str) -> str:
        import torch.optim

        known = [n for n, obj in vars(torch.optim).items() if isinstance(obj, type) and n[0].isupper()
                 and issubclass(obj, torch.optim.Optimizer) and n != "Optimizer"]
        if name not in known:
            raise ValueError(f"unknown optimizer {name!r}" + did_you_mean(name, known))
        return name

    @field_validator("kwargs")
    @classmethod
    def _accepted_by_optimizer(cls, kwargs: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        """Run the optimizer's own argument checks: a bad argument fails here, before any run starts.

        torch's optimizers check their arguments before they look at the parameters; an empty parameter list then
        stops the constructor ("empty parameter list"), before its first parameter group imports torch._dynamo
        (about 1.5 s, which ``--validate`` would otherwise spend)."""
        if "name" not in info.data or "lr" not in info.data:  # already reported as an error of its own
            return kwargs
        import torch

        try:
            getattr(torch.optim, info.data["name"])([], lr=info.data["lr"], **kwargs)
        except ValueError as err:
            if "empty parameter list" in str(err):  # every argument passed the optimizer's checks
                return kwargs
            raise ValueError(f"{info.data['name']} rejects these arguments (ValueError: {err})") from None
        except Exception as err:  # only torch's checks of these arguments run here: whatever fails is about them
            raise ValueError(f"{info.data['name']} rejects these arguments ({err.__class__.__name__}: {err})") from None
        return kwargs


class ScheduleConfig(Section):
    name: Literal["constant", "step", "cosine", "linear"] = Field(
        "constant", description="linear: decay to 0 at the last step after warm-up (the HF Trainer's default)")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up from 0 over this many optimizer steps")
    step_epochs: int = Field(1, ge=1, description="step schedule: multiply by gamma every this many epochs")
    gamma: float = Field(0.1, gt=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine: final lr as a fraction of lr")


class EarlyStopConfig(Section):
    patience: Optional[int] = Field(None, ge=1, description="stop after this many evaluations without improvement")
    target: Optional[float] = Field(None, description="stop once the selection metric reaches this value")


Ties = Literal["first", "last"]


class TrainConfig(Section):
    epochs: int = Field(10, ge=0)
    max_steps: Optional[int] = Field(None, ge=1, description="stop after this many optimizer steps")
    batch_size: int = Field(64, ge=1, description="a last, smaller batch is used unless drop_last; a training set "
                                                   "with no full batch under drop_last is refused")
    eval_batch_size: int = Field(1024, ge=1)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    grad_clip: Optional[float] = Field(None, gt=0, description="clip the global gradient norm to this value")
    grad_accum: int = Field(1, ge=1, description="optimizer step every this many batches")
    drop_last: bool = Field(False, description="skip the last, smaller batch of each epoch")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16: autocast on CUDA (ignored on the CPU)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: Optional[int] = Field(None, ge=1, description="torch CPU threads (default: torch's choice)")
    eval_every: int = Field(1, ge=1)
    eval_unit: Literal["epoch", "step"] = "epoch"
    select_metric: str = Field("val_acc", description="metric that picks the best checkpoint and early stopping")
    select_mode: Literal["max", "min"] = "max"
    select_ties: Ties = Field(
        "first", description="on a tie of the selection metric, keep the first best or take the later one")
    early_stop: EarlyStopConfig = Field(default_factory=EarlyStopConfig)
    progress: bool = Field(True, description="tqdm progress bars (shown on a terminal only)")
    rule: str = Field("backprop", description="how a step's gradients are produced: a learning rule (instill list "
                                              "rules; yours by import path or entry point)")

    rule_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="options of learning rules, by rule name: {dfa: {feedback: pooled}} "
                                          "(instill list rules shows each rule's options)")

    @field_validator("rule")
    @classmethod
    def _known_rule(cls, name: str) -> str:
        return RULES.known(name)

    @field_validator("rule_options")
    @classmethod
    def _known_rule_options(cls, options: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return options_by_name(RULES, options)

    def rule_builder_options(self, rule: Optional[str] = None) -> dict[str, Any]:
        """The options configured for ``rule`` (default: ``self.rule``)."""
        return dict(self.rule_options.get(rule or self.rule, {}))


def options_by_name(registry: Registry, options: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """A ``<kind>_options`` mapping (``{entry name: {option: value}}``, as ``train.rule_options``) checked against
    each entry's signature; raises ValueError naming an unknown entry or option (with the valid ones)."""
    for name, values in options.items():
        registry.known(name)
        try:
            registry.validate(name, values)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
    return options


class LoggingConfig(Section):
    """Optional sinks fed with the rows of metrics.jsonl (``instill.loggers``); neither package is required."""

    tensorboard: bool = Field(False, description="TensorBoard event files in <run>/tensorboard/")
    wandb: bool = Field(False, description="a Weights & Biases run in offline mode in <run>/wandb/")
    wandb_project: str = Field("instill", description="the W&B project name recorded in the offline run")


class RunConfig(Section):
    """Sections every stage has. Stages subclass it to add their own."""

    stage: str
    name: Optional[str] = Field(None, description="run name (default: the config file's stem)")
    output_dir: Optional[str] = Field(None, description="run directory (default: checkpoints/<name>)")
    reproducibility: Reproducibility = Field(default_factory=Reproducibility)
    data: DataConfig
    model: Optional[ModelConfig] = Field(None, description="required where the stage builds a fresh model")
    train: TrainConfig = Field(default_factory=TrainConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)


# ---------------------------------------------------------------------------------------------------------------
# Loading


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-3`` as a string; a config means the number."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def read_yaml(path: str | Path, components: dict[str, Registry] | None = None) -> dict[str, Any]:
    """The mapping in a YAML file, with ``extends:`` resolved (paths relative to the including file).

    Args:
        path: the YAML file.
        components: dotted paths of the sections that name a registry entry (``component_paths``): where a file
            names another entry than the file it extends, the parent's options that the new entry does not take
            are dropped (and named on stderr), as ``--set <section>.name=...`` does.
    Returns:
        The merged mapping.
    Raises:
        UserError: a missing, unreadable or invalid file, or an ``extends:`` cycle.
    """
    return _read_with_extends(Path(path), chain=(), components=components or {})


def _read_with_extends(path: Path, chain: tuple[Path, ...], components: dict[str, Registry]) -> dict[str, Any]:
    resolved = Path(os.path.realpath(path))  # unlike Path.resolve, never raises on a symlink loop
    if resolved in chain:
        raise UserError(f"{path}: extends: forms a cycle ({' -> '.join(str(p) for p in chain + (path,))})")
    raw = _parse_yaml_file(path)
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    if not isinstance(parent, str):
        raise UserError(f"{path}: extends: expected a file path, got {parent!r}")
    base = _read_with_extends(path.parent / parent, chain + (resolved,), components)
    for section, registry in components.items():
        old, new = _node_at(base, section), _node_at(raw, section)
        if old is not None and new is not None and "name" in new:
            keep = {f"{section}.{k}" for k in new}  # what this file sets itself stays
            _switch_component(old, section, new["name"], registry, keep, f"{path}: extends: {parent}:")
    return deep_merge(base, raw)


def _node_at(raw: dict[str, Any], dotted: str) -> dict[str, Any] | None:
    """The mapping at a dotted section path, or None where there is none."""
    node: Any = raw
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else None


def _switch_component(node: dict[str, Any], section: str, name: Any, registry: Registry, keep: set[str],
                      where: str) -> None:
    """Before ``node`` (a component section) names entry ``name`` instead of its own: drop its options that
    ``name`` does not take, except the dotted keys in ``keep``, and say which on stderr. Nothing is dropped when
    the name stays or is no known entry (validation names the latter)."""
    if node.get("name", name) == name:
        return
    takes = _options_of(registry, name)
    if takes is None:
        return
    dropped = [k for k in node if k != "name" and f"{section}.{k}" not in keep and k not in takes]
    for option in dropped:
        del node[option]
    if dropped:
        import sys

        print(f"{where} dropped {', '.join(f'{section}.{k}' for k in dropped)} (options of {node['name']})",
              file=sys.stderr)


def _parse_yaml_file(path: Path) -> dict[str, Any]:
    from .files import NotRegularFile, read_regular_bytes

    try:
        text = read_regular_bytes(path).decode()  # only a regular file: reading a FIFO would wait forever
    except FileNotFoundError:
        raise UserError(f"{path}: config file not found") from None
    except NotRegularFile:
        raise UserError(f"{path}: cannot read config file (not a regular file)") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read config file ({err.strerror or err})") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: cannot read config file (not UTF-8 text: {err.reason} at byte {err.start})") from None
    try:
        raw = parse_yaml(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"{path}: invalid YAML{where}: {problem}") from None
    if raw is None:
        raise UserError(f"{path}: config file is empty")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    return raw


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` on top of ``base``; nested mappings merge key by key, anything else replaces."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def component_paths(schema: type[BaseModel], prefix: str = "") -> dict[str, Registry]:
    """Dotted paths of the sections of ``schema`` that name a registry entry (``model``, ``data``, a guide, ...),
    with that registry."""
    import typing

    paths: dict[str, Registry] = {}
    for name, field in schema.model_fields.items():
        candidates = [field.annotation, *typing.get_args(field.annotation)]
        for kind in candidates:
            if isinstance(kind, type) and issubclass(kind, Component):
                paths[prefix + name] = kind.registry
            elif isinstance(kind, type) and issubclass(kind, Section):
                paths.update(component_paths(kind, f"{prefix}{name}."))
    return paths


def _options_of(registry: Registry, name: Any) -> set[str] | None:
    """The option names of entry ``name``, or None when it is no known entry (validation will say so)."""
    try:
        return set(registry.get(str(name)).params.model_fields)
    except UserError:
        return None


def apply_overrides(raw: dict[str, Any], overrides: list[str], source: str = "--set",
                    components: dict[str, Registry] | None = None) -> dict[str, Any]:
    """Apply ``section.key=value`` strings; values are parsed as YAML, so they are typed like the file.

    Setting ``<component>.name`` (for the dotted paths in ``components``) to another entry drops the options the
    file gave the previous entry that the new one does not take, and says which on stderr; options set by earlier
    overrides stay.
    """
    components = components or {}
    raw = copy.deepcopy(raw)
    overridden: set[str] = set()
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"{source} {item!r}: expected section.key=value")
        try:
            value = parse_yaml(text)
        except yaml.YAMLError:
            raise UserError(f"{source} {item!r}: the value is not valid YAML") from None
        key = key.strip()
        section, _, leaf = key.rpartition(".")
        node = _section_node(raw, key, f"{source} {item!r}")
        if leaf == "name" and section in components:
            _switch_component(node, section, value, components[section], overridden, f"{source} {item}:")
        node[leaf] = value
        overridden.add(key)
    return raw


def apply_values(raw: dict[str, Any], values: dict[str, Any], source: str) -> dict[str, Any]:
    """Set already-typed values by dotted key (``{"train.optimizer.lr": 0.01}``), as ``--set`` does for text.

    Args:
        raw: the config mapping (not modified).
        values: dotted key -> value.
        source: what to name in an error (a sweep point, ...).
    Returns:
        A new mapping with the values set.
    Raises:
        UserError: a key walks through a value that is not a section.
    """
    raw = copy.deepcopy(raw)
    for key, value in values.items():
        _set_dotted(raw, key, copy.deepcopy(value), f"{source} {key!r}")
    return raw


def _set_dotted(raw: dict[str, Any], key: str, value: Any, where: str) -> None:
    _section_node(raw, key, where)[key.rpartition(".")[2]] = value


def _section_node(raw: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    """The mapping that holds dotted ``key``'s last part, its sections created on the way."""
    node = raw
    for part in key.split(".")[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"{where}: {part!r} is a value, not a section")
        node = child
    return node


def validate(raw: dict[str, Any], schema: type[RunConfig], source: str) -> RunConfig:
    """The typed config, or a UserError naming ``source`` and the first offending key."""
    try:
        return schema.model_validate(raw)
    except ValidationError as err:
        raise UserError(f"{source}: {describe_error(err, schema)}") from None
    except UserError as err:  # a section's own check (a library dataclass validating itself)
        raise UserError(f"{source}: {err}") from None


# Translators of configs in another schema (the original code bases' YAML), imported by name when a config is read:
# they sit in a higher layer of the package (instill.migrate) and import from this module, never the other way.
TRANSLATOR_MODULES = ("migrate",)


def _translated(raw: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """``raw``, or the instill config a translator makes of a file in another schema."""
    import importlib

    for name in TRANSLATOR_MODULES:
        raw = importlib.import_module(f".{name}", __package__).translated_if_original(raw, path)
    return raw


def load_config(path: str | Path, schema: type[RunConfig], stage: str, overrides: list[str] = (),
                values: Optional[dict[str, Any]] = None) -> RunConfig:
    """Read, merge, override and validate a config for ``stage``; fill ``name`` and ``output_dir``.

    ``overrides`` are ``--set`` strings; ``values`` typed values by dotted key (a sweep point's), applied after them.
    """
    components = component_paths(schema)
    raw = _translated(read_yaml(path, components), path)
    raw = apply_overrides(raw, list(overrides), components=components)
    if values:
        raw = apply_values(raw, values, str(path))
    declared = raw.setdefault("stage", stage)
    if declared != stage:
        raise UserError(f"{path}: stage: this config is for stage {declared!r}, but this script runs {stage!r}")
    cfg = validate(raw, schema, str(path))
    if cfg.name is None:
        cfg.name = Path(path).stem
    if cfg.output_dir is None:
        cfg.output_dir = os.path.join("checkpoints", cfg.name)
    return cfg


def to_yaml(cfg: BaseModel) -> str:
    """The resolved config as YAML, in declaration order."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
