"""Registries of named builders (datasets, models) whose keyword arguments are the config's keys.

A builder is a function ``build(ctx, *, key: type = default, ...)``. Its first positional argument carries what the
run supplies (seed, input shape, class count); every keyword-only parameter becomes a typed, validated config key.
So a builder's signature is the single source of its options: the config validator, the error messages and the
``--print-config`` output all read it.

Your own code, three ways, each validated exactly like the built-in entries:

- By import path in a config: ``model: {name: "mypkg.nets:MyNet", width: 64}``. The module is imported when the
  config names it (from the installed packages, ``PYTHONPATH``, or else the working directory). A function
  ``build(ctx, *, ...)`` is a builder as above. A class (or a function without a leading positional parameter)
  takes its options from all its named parameters; those named after a fact of the run are filled in instead
  (models: ``input_shape``, ``num_classes``, ``vocab_size``, ``seq_len`` from the dataset's ``info``; datasets:
  ``seed``, ``cache_dir``).
- By entry point: a package declares ``[project.entry-points."instill.models"] tiny = "mypkg.nets:build_tiny"``
  (or ``instill.datasets``) and every script knows ``name: tiny``.
- By ``MODELS.register("name")`` / ``DATASETS.register("name")`` in code imported before the stage runs.

The config snapshot keeps the name, so a replay imports the very same code path; ``env.json`` records which file
and package version each outside entry came from.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from .errors import UserError, did_you_mean, unknown_name


@dataclass(frozen=True)
class Entry:
    name: str
    build: Callable[..., Any]
    params: type[BaseModel]
    doc: str
    check: Optional[Callable[..., None]] = None  # the entry's own input checks, without building (see check)
    label: Optional[str] = None  # the entry's name in words, for figures (``register(label=...)``)


class OptionsOf:
    """The options of an entry that is an object wrapping a function (``StitchTarget(loss, ...)``): the wrapped
    function's keyword-only parameters, read from the attribute ``field`` (``__signature__ = OptionsOf("loss")``).
    So wrapping a function in its kind's object keeps the options the function declares."""

    def __init__(self, field: str):
        self.field = field

    def __get__(self, obj: Any, owner: Any = None) -> Optional[inspect.Signature]:
        if obj is None:  # the class itself: its constructor's signature, as usual
            return None
        wrapped = getattr(obj, self.field)
        return inspect.signature(wrapped, eval_str=True) if callable(wrapped) else inspect.Signature()


_REGISTRIES: list["Registry"] = []  # every registry made, for label_of


def label_of(name: str) -> Optional[str]:
    """The words a registered entry called ``name`` gave for figures (``register(label=...)``), in any registry
    whose module is imported; None when none did."""
    return next((r._entries[name].label for r in _REGISTRIES if name in r._entries and r._entries[name].label),
                None)


class Registry:
    """Name -> builder, with a pydantic model of the builder's keyword-only parameters.

    Every kind of named thing is one such registry: datasets, models and learning rules here; similarity measures,
    compare measures, mask methods, stitch initialisations, masks and targets and transfer conditions next to the
    code that uses them. What a builder is depends on the kind (its module says); how it is named, validated, listed
    and added from outside (``@REGISTRY.register``, an import path ``pkg.module:object``, or an entry point of the
    registry's ``group``) is the same for all.
    """

    def __init__(self, kind: str, prepare: Optional[Callable[[Any], Any]] = None, *, group: Optional[str] = None,
                 builtins: Optional[dict[str, str]] = None, outside: Optional[Callable[[Any], Any]] = None,
                 aliases: Optional[dict[str, str]] = None):
        """
        Args:
            kind: what an entry is, in messages (``mask method``).
            prepare: turns what ``build()`` is given into what every builder receives.
            group: the entry-point group's name after ``instill.`` (default: the kind in plural, ``_`` for spaces).
            builtins: name -> module (relative to the package) that registers each shipped entry, imported when a
                config names it (``BUILTIN_MODULES``); None where the registry's module registers them itself.
            outside: turns an object named by import path or entry point into a builder (default: used as it is).
            aliases: old name -> current name, for names that recorded configs and run snapshots still use.
        """
        self.kind = kind
        self.prepare = prepare
        self._group = group or f"{kind.replace(' ', '_')}s"
        self._builtins = builtins
        self._outside = outside
        self.aliases = dict(aliases or {})
        self._entries: dict[str, Entry] = {}
        self._prefixes: dict[str, Entry] = {}
        _REGISTRIES.append(self)

    def register(self, name: str, *, prefix: bool = False, doc: Optional[str] = None,
                 check: Optional[Callable[..., None]] = None, label: Optional[str] = None):
        """Decorator. With ``prefix=True`` the entry serves every name ``name:<rest>`` (timm:resnet18); ``doc``
        replaces the object's docstring as its help text. ``check`` takes the builder's keyword arguments and
        raises a UserError for what the build would fail on (a missing folder, an unknown library model, a weights
        file of another architecture) at a fraction of its cost. ``label``: the name in words, as figures show it
        (``label_of``; default: the name with spaces)."""

        def wrap(fn):
            entry = Entry(name, fn, _params_model(name, fn), doc or _help_of(fn), check, label)
            (self._prefixes if prefix else self._entries)[name] = entry
            return fn

        return wrap

    @property
    def group(self) -> str:
        """The entry-point group through which packages add entries: ``instill.models``, ``instill.mask_methods``."""
        return f"instill.{self._group}"

    def _load_entry_points(self, wanted: str | None = None) -> bool:
        """Register the group's entry points (only ``wanted`` when given); True when ``wanted`` is now known."""
        from importlib.metadata import entry_points

        for point in entry_points(group=self.group):
            if point.name in self._entries or (wanted is not None and point.name != wanted):
                continue
            try:
                target = point.load()
            except Exception as err:  # a broken plug-in: say which package, do not guess
                raise UserError(f"{self.kind} {point.name!r}: cannot load entry point {point.value} of group "
                                f"{self.group} ({err.__class__.__name__}: {err})") from None
            self._entries[point.name] = self._outside_entry(point.name, target, origin=point.value)
        return wanted in self._entries

    def _outside_entry(self, name: str, target: Any, origin: str) -> Entry:
        if not callable(target):
            raise UserError(f"{self.kind} {name!r}: {origin} is not a class or function")
        build = self._outside(target) if self._outside is not None else target
        _OUTSIDE[f"{self.kind}:{name}"] = _origin_record(target, origin)
        return Entry(name, build, _params_model(name, build), _help_of(target))

    def entries(self) -> list[Entry]:
        """Every registered entry (prefixed ones as ``<prefix>:<name>``), by name; entry points included."""
        self._import_builtins()
        self._load_entry_points()
        return [self._entries[n] for n in sorted(self._entries)] + [
            dataclasses.replace(self._prefixes[p], name=f"{p}:<name>") for p in sorted(self._prefixes)]

    def names(self) -> list[str]:
        """Every name the registry answers to: shipped ones, the entry points of installed packages (named, not
        imported), and import paths used so far."""
        from importlib.metadata import entry_points

        self._import_builtins()
        named = set(self._entries) | {point.name for point in entry_points(group=self.group)}
        return sorted(named) + sorted(f"{p}:<name>" for p in self._prefixes)

    def known(self, name: str) -> str:
        """``name`` when it is an entry; otherwise the unknown-name line as a ValueError, which a config's field
        validator reports under its key."""
        try:
            self.get(name)
        except UserError as err:
            raise ValueError(str(err)) from None
        return name

    def get(self, name: str) -> Entry:
        """The entry ``name`` (or its alias, or an import path, or an entry point) names; a UserError otherwise."""
        name = self.aliases.get(name, name)
        if name not in self._entries and self._builtins is not None:
            _import_builtin(self._builtins, name)
        if name in self._entries:
            return self._entries[name]
        head = name.split(":", 1)[0]
        if ":" in name and head in self._prefixes:
            return self._prefixes[head]
        if _IMPORT_PATH.fullmatch(name):
            self._entries[name] = self._outside_entry(name, _import_object(name, self.kind), origin=name)
            return self._entries[name]
        if self._load_entry_points(name):
            return self._entries[name]
        raise unknown_name(self.kind, name, self.names() + list(self.aliases))

    def __iter__(self):
        """The names, as ``names()`` (so ``sorted(REGISTRY)`` and ``set(REGISTRY)`` read like the tuples they were)."""
        return iter(self.names())

    def __contains__(self, name: str) -> bool:
        try:
            self.get(name)
        except UserError:
            return False
        return True

    def _import_builtins(self) -> None:
        """Import the modules of every shipped entry of this registry (its own ``BUILTIN_MODULES`` table only)."""
        if self._builtins is not None:
            _import_table(self._builtins)

    def validate(self, name: str, params: dict[str, Any]) -> dict[str, Any]:
        """Validated, defaults-filled keyword arguments for ``name``; raises ValueError with a one-line reason."""
        entry = self.get(name)
        try:
            return entry.params.model_validate(params).model_dump()
        except ValidationError as err:
            raise ValueError(describe_error(err, entry.params)) from None

    def bound(self, name: str, wrapper: Any, field: str, options: Optional[dict[str, Any]]) -> Any:
        """``wrapper`` (the entry ``name`` as its kind's dataclass, wrapping a function in ``field``, see
        ``OptionsOf``) with ``options`` bound to that function, validated against its keyword-only parameters and
        defaults filled in; a UserError (one line, naming the valid options) otherwise."""
        try:
            chosen = self.validate(name, dict(options or {}))
        except ValueError as err:
            raise UserError(f"{self.kind} {name}: {err}") from None
        if not chosen:
            return wrapper
        return dataclasses.replace(wrapper, **{field: functools.partial(getattr(wrapper, field), **chosen)})

    def check(self, name: str, params: dict[str, Any]) -> None:
        """Run the entry's own checks (``register(check=...)``) without building it: ``--validate`` and every run
        before its directory exists."""
        entry = self.get(name)
        if entry.check is not None:
            entry.check(**self._keywords(entry, name, params))

    def _keywords(self, entry: Entry, name: str, params: dict[str, Any]) -> dict[str, Any]:
        kwargs = self.validate(name, params)
        if name != entry.name:  # prefixed entry: pass the part after the colon
            kwargs["name"] = name.split(":", 1)[1]
        return kwargs

    def build(self, name: str, ctx: Any, params: dict[str, Any]) -> Any:
        """The built object; a UserError when a library rejects the keywords a config passed through to it."""
        entry = self.get(name)
        kwargs = self._keywords(entry, name, params)
        if self.prepare is not None:
            ctx = self.prepare(ctx)
        try:
            return entry.build(ctx, **kwargs)
        except TypeError as err:
            if _rejected_keyword(err) not in _passed_through_keys(kwargs):  # a bug in the builder: keep the traceback
                raise
            raise UserError(f"{self.kind} {name}: {err}") from None


def _help_of(target: Any) -> str:
    """An entry's help: its docstring, or for an object wrapping a function (``OptionsOf``) that function's,
    not the wrapper class's."""
    wraps = inspect.getattr_static(type(target), "__signature__", None)
    if isinstance(wraps, OptionsOf) and getattr(target, wraps.field, None) is not None:
        target = getattr(target, wraps.field)
    return inspect.getdoc(target) or ""


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
    try:
        parameters = inspect.signature(fn, eval_str=True).parameters.values()
    except (TypeError, ValueError):  # an entry that is an object without a signature takes no options
        parameters = []
    for p in parameters:
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
        msg = f"unknown key {key!r}" + did_you_mean(loc[-1], allowed)
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


_IMPORT_PATH = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")
# Parameters of an outside class filled from the run instead of the config (DatasetInfo and DataContext fields).
_FACTS = {"model": ("input_shape", "num_classes", "vocab_size", "seq_len"), "dataset": ("seed", "cache_dir")}
_OUTSIDE: dict[str, dict[str, Any]] = {}  # "<kind>:<name>" -> where its code came from (for env.json)


def outside_code() -> dict[str, dict[str, Any]]:
    """Where each entry used so far that is not instill's own came from: import path, file, package version."""
    return dict(_OUTSIDE)


def _import_object(path: str, kind: str) -> Any:
    """The object ``module:attribute`` names; the working directory is searched last, as ``python -m`` does."""
    import importlib
    import os
    import sys

    module_name, _, attribute = path.partition(":")
    try:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name is None or not module_name.startswith(err.name) or os.getcwd() in sys.path:
                raise
            sys.path.append(os.getcwd())
            module = importlib.import_module(module_name)
    except Exception as err:  # the user's module: any failure to import it is theirs to see, in one line
        raise UserError(f"{kind} {path!r}: cannot import {module_name} ({err.__class__.__name__}: {err})") from None
    target = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            names = [n for n in vars(module) if not n.startswith("_")]
            raise UserError(f"{kind} {path!r}: {module_name} has no {attribute!r}" + did_you_mean(part, names))
        target = getattr(target, part)
    return target


def _is_builder(fn: Any) -> bool:
    """A function ``build(ctx, *, ...)``: a leading positional parameter without default, the rest keyword-only."""
    if inspect.isclass(fn) or not inspect.isfunction(fn):
        return False
    params = list(inspect.signature(fn).parameters.values())
    return bool(params) and params[0].kind in (inspect.Parameter.POSITIONAL_ONLY,
                                               inspect.Parameter.POSITIONAL_OR_KEYWORD) \
        and params[0].default is inspect.Parameter.empty \
        and all(p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.VAR_KEYWORD) for p in params[1:])


def _fact_filling_builder(target: Any, facts: tuple[str, ...]) -> Callable[..., Any]:
    """A builder for a class or plain function: its named parameters are the options, except the run's facts,
    which come from the context (a dataset's ``DatasetInfo``, or the DataContext)."""
    signature = inspect.signature(target, eval_str=True)
    named = [p for p in signature.parameters.values()
             if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    options = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in named if p.name not in facts]
    wanted_facts = [p.name for p in named if p.name in facts]

    def build(ctx, **kwargs):
        from_run = {fact: getattr(ctx, fact, None) for fact in wanted_facts}
        missing = [fact for fact, value in from_run.items() if value is None]
        if missing:
            raise UserError(f"{getattr(target, '__name__', target)} needs {', '.join(missing)}, which this run's "
                            f"data do not provide")
        return target(**from_run, **kwargs)

    ctx_param = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_ONLY)
    build.__signature__ = inspect.Signature([ctx_param, *options])
    build.__name__ = getattr(target, "__name__", "build")
    return build


def _origin_record(target: Any, origin: str) -> dict[str, Any]:
    import importlib.metadata as md

    module = inspect.getmodule(target)
    record = {"import_path": origin, "file": getattr(module, "__file__", None)}
    top = (getattr(module, "__name__", "") or "").split(".")[0]
    try:
        distributions = md.packages_distributions().get(top, [])
        if distributions:
            record["package"] = f"{distributions[0]} {md.version(distributions[0])}"
    except Exception:  # metadata of an odd installation: the file path still says where the code was
        pass
    return record


# The module that registers each shipped entry: a config imports only the modules it names, so --validate and the
# start of a run stay cheap (tests/test_registry.py keeps this table equal to what the modules register).
BUILTIN_MODULES = {
    "dataset": {"digits": "data.images", "mnist5k": "data.images", "image_folder": "data.folders",
                "shapes": "data.shapes", "arithmetic": "data.arithmetic", "copy_paste": "data.sequences",
                "parity": "data.sequences", "grammar": "data.sequences", "text": "data.sequences",
                "crops": "data.natural", "cifar10": "data.natural", "cifar100": "data.natural",
                "add_task": "data.add", "legacy_add_data": "data.add"},
    "model": {"fcn": "models.vision", "convnet": "models.vision", "timm": "models.vision",
              "torchvision": "models.vision", "gpt2": "models.gpt2", "deep_fcn": "models.deep",
              "wide_fcn": "models.deep", "noresnet": "models.deep", "rnn": "models.sequence",
              "lstm": "models.sequence", "gru": "models.sequence", "transformer": "models.sequence",
              "rnn_classifier": "models.sequence", "transformer_classifier": "models.sequence",
              "tiny10": "models.zoo", "nbn_tiny10": "models.zoo", "lenet": "models.zoo", "resnet20": "models.zoo",
              "ntk_mlp": "align.ntk", "ntk_cnn": "align.ntk", "add_rnn": "align.ntk"},
    "learning rule": {"backprop": "steps", **dict.fromkeys(("align_zero", "align_ada", "align_prop", "fa", "dfa",
                                                           "last_layer"), "align.rules")},
    # each research system keeps its stage in its own folder (instill.stages.runner.STAGES)
    "stage": {"base": "stages.base", "ablate": "subnetworks.ablate", "transfer": "subnetworks.transfer",
              "guide": "guidance.guide", "compare": "compare.stage", "stitch": "stitching.stage",
              "align": "align.stage"},
}


def _import_builtin(table: dict[str, str], name: str) -> None:
    """Import the module that registers ``name`` (``timm:x``: the ``timm`` prefix's), or every module of the
    table when the name is not a shipped one (for the error message's list of known names)."""
    import importlib

    module = table.get(name) or table.get(name.split(":", 1)[0])
    if module is None:
        _import_table(table)
    else:
        importlib.import_module(f".{module}", __package__)


_TABLES_IMPORTED: set[int] = set()  # id() of each BUILTIN_MODULES table whose modules are all imported


def _import_table(table: dict[str, str]) -> None:
    """Import every module of one ``BUILTIN_MODULES`` table, once, by name (lazily: they pull in torch). Naming them
    rather than importing them keeps the registry (and the stage runner) below the systems that fill them."""
    import importlib

    if id(table) not in _TABLES_IMPORTED:
        _TABLES_IMPORTED.add(id(table))
        for module in sorted(set(table.values())):
            importlib.import_module(f".{module}", __package__)


def import_builtins() -> None:
    """Import every module that registers shipped entries of any kind (a sweep does it once before it forks its
    workers, so that no point pays for the imports)."""
    for table in BUILTIN_MODULES.values():
        _import_table(table)


def _dataset_info(info: Any) -> Any:
    """A model builder always receives a ``DatasetInfo``; a caller may give a mapping of its names."""
    from .dataset_info import DatasetInfo

    return DatasetInfo.of(info)


def _filling_facts(facts: tuple[str, ...]) -> Callable[[Any], Callable[..., Any]]:
    """How a dataset or model registry takes an outside object: a builder as it is, a class or plain function with
    the run's ``facts`` filled in (``_fact_filling_builder``)."""
    return lambda target: target if _is_builder(target) else _fact_filling_builder(target, facts)


DATASETS = Registry("dataset", builtins=BUILTIN_MODULES["dataset"], outside=_filling_facts(_FACTS["dataset"]))
MODELS = Registry("model", prepare=_dataset_info, builtins=BUILTIN_MODULES["model"],
                  outside=_filling_facts(_FACTS["model"]))
RULES = Registry("learning rule", group="rules", builtins=BUILTIN_MODULES["learning rule"])
