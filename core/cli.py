"""The command line every entry script shares.

    python <script> CONFIG [--set section.key=value ...] [--out DIR] [--resume] [--print-config] [--validate]

A UserError (bad config, path, data, layer name, ...) prints one line on stderr and exits with code 2; Ctrl-C saves
the run's state and exits with code 130, after which ``--resume`` continues it.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Optional

from .errors import UserError, exit_on_interrupt, unknown_name


def parse_args(stage: str, argv: Optional[list[str]]) -> argparse.Namespace:
    wants_help = any(arg in ("-h", "--help") for arg in (sys.argv[1:] if argv is None else argv))
    parser = argparse.ArgumentParser(description=f"instill {stage} stage: run one YAML config",
                                     epilog=config_sections(stage) if wants_help else None,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML config file (a run directory's config.yaml replays that run)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.optimizer.lr=0.01 (repeatable)")
    parser.add_argument("--out", help="run directory (overrides output_dir)")
    parser.add_argument("--resume", action="store_true", help="continue the unfinished run in the run directory")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--validate", action="store_true", help="check the config and exit")
    return parser.parse_args(argv)


def config_sections(stage: str) -> str:
    """The help text's epilog: the stage config's sections with their keys, and where to find registry entries."""
    from pydantic import BaseModel

    from .config import Component
    from .stages import stage_module

    lines = [f"config sections (see README.md and docs/design.md; instill list {'|'.join(KINDS)} shows what "
             "names a config can use, with their options):"]
    for name, field in stage_module(stage).Config.model_fields.items():
        kinds = [field.annotation, *getattr(field.annotation, "__args__", ())]
        section = next((k for k in kinds if isinstance(k, type) and issubclass(k, BaseModel)), None)
        if section is not None and issubclass(section, Component):
            keys = "name: <registered name>, then that entry's options (instill list)"
        elif section is not None:
            keys = ", ".join(section.model_fields)
        else:
            keys = " ".join(filter(None, [_type_name(field.annotation), field.description]))
        lines.append(f"  {name}: {keys}" if keys else f"  {name}")
    return "\n".join(lines)


# What ``instill list KIND`` shows: the registry of each kind, by module and name (imported when listed).
REGISTRIES = {"models": ("registry", "MODELS"), "datasets": ("registry", "DATASETS"), "rules": ("registry", "RULES"),
              "similarities": ("compare.similarity", "SIMILARITIES"), "mask_methods": ("subnetworks.masks",
                                                                                     "MASK_METHODS"),
              "stitch_targets": ("stitching.stitch", "TARGETS"), "stitch_inits": ("stitching.init", "INITS"),
              "stitch_masks": ("stitching.init", "MASKS"), "compare_measures": ("compare.measures", "MEASURES")}
KINDS = (*REGISTRIES, "measures", "conditions", "configs")


def list_entries(kind: str) -> str:
    """``instill list KIND``: each entry of a registry with its options and one line of help."""
    if kind == "measures":
        return "\n".join(_measures_listing())
    if kind == "conditions":
        return "\n".join(_conditions_listing())
    if kind == "configs":
        return "\n".join(_configs_listing())
    if kind not in REGISTRIES:
        raise unknown_name("kind", kind, KINDS)
    return "\n".join(_registry_listing(_registry(kind)))


def _registry(kind: str):
    import importlib

    module, name = REGISTRIES[kind]
    return getattr(importlib.import_module(f".{module}", __package__), name)


def _first_line(doc: Optional[str]) -> str:
    return " ".join((doc or "").strip().split("\n\n")[0].split()).replace("``", "")


def _type_name(annotation) -> str:
    """``list[int]``, ``Optional[float]``, ``'relu'|'gelu'``: constraints (ge=1, ...) left out."""
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is typing.Literal:
        return "|".join(repr(a) for a in args)
    if origin is typing.Union:
        inner = [_type_name(a) for a in args if a is not type(None)]
        return f"Optional[{', '.join(inner)}]" if len(inner) < len(args) else " | ".join(inner)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation).replace("typing.", ""))


def _registry_listing(registry, indent: str = "") -> list[str]:
    lines = []
    for entry in registry.entries():
        help_line = _first_line(entry.doc).removeprefix(f"{entry.name}:").strip()  # a doc that opens with the name
        lines.append(f"{indent}{entry.name}: {help_line}")
        for key, field in entry.params.model_fields.items():
            kind_name = _type_name(field.annotation)
            default = "required" if field.is_required() else f"= {field.get_default(call_default_factory=True)!r}"
            lines.append(f"{indent}    {key}: {kind_name} {default}")
    return lines


CONFIGS = Path(__file__).resolve().parent.parent / "configs"  # the shipped configs, in a clone of the repository


def _configs_listing() -> list[str]:
    """Each shipped config (sweeps and paper-scale ones included) with the first sentence of its header comment."""
    if not CONFIGS.is_dir():
        raise UserError("instill list configs: the shipped configs come with a clone of the repository; this "
                        "installation has none")
    return [f"{path.relative_to(CONFIGS.parent)}: {_purpose(path)}" for path in sorted(CONFIGS.rglob("*.yaml"))]


def _purpose(path: Path, limit: int = 110) -> str:
    """The first sentence of a config's header comment (its opening ``#`` lines), at most ``limit`` characters."""
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line.lstrip("#").strip())
    text = re.sub(r"[:.]?\s*python \S+\.py \S+\.yaml:?", ".", " ".join(header))  # the command that runs it: known
    end = re.search(r"(?<! al)(?<!e\.g)\.\s(?=[A-Z(])", text)  # a sentence's end, not "et al. " or "e.g. "
    text = (text[: end.start() + 1] if end else text) or "(no header comment)"
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def _measures_listing() -> list[str]:
    from .compare.measures import MEASURES

    return (_registry_listing(_registry("similarities"))
            + ["compare stage only (compare.measures; every similarity above is one too):"]
            + _registry_listing(MEASURES, indent="    "))


def _conditions_listing() -> list[str]:
    from .guidance.guide import CONDITION_HELP
    from .subnetworks.transplant import condition_help

    return (["transfer (transfer.conditions):"] + [f"    {c}: {h}" for c, h in condition_help().items()]
            + ["guide (guidance.conditions):"] + [f"    {c}: {h}" for c, h in CONDITION_HELP.items()])


def main(stage: str, argv: Optional[list[str]] = None) -> int:
    args = parse_args(stage, argv)
    with exit_on_interrupt():  # torch: seconds of importing, during which Ctrl-C must not print a traceback
        from . import dist
        from .config import to_yaml
        from .stages import Interrupted, execute, load_stage_config
        from .stages.runner import validate
    try:
        cfg = load_stage_config(args.config, stage, args.overrides, args.out)
        if args.print_config:
            print(to_yaml(cfg), end="")
            return 0
        if args.validate:
            notes = validate(cfg)
            print(f"{args.config}: valid {stage} config" + "".join(f"\n  note: {n}" for n in notes))
            return 0
        execute(cfg, resume=args.resume, overrides=args.overrides if args.resume else [])
        return 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except Interrupted as err:
        if err.finished:
            print(f"\ninterrupted after the run finished: {err.path} is complete"
                  + ("; rerun the same command to go on from it" if err.upstream else ""), file=sys.stderr)
        elif err.upstream and err.resumable:
            print(f"\ninterrupted: state of the upstream run saved in {err.path}; rerun the same command to "
                  "continue it", file=sys.stderr)
        elif err.resumable:
            print(f"\ninterrupted: state saved in {err.path}; continue with --resume --out {err.path}",
                  file=sys.stderr)
        else:
            print("\ninterrupted before any training state was saved: nothing to resume", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("\ninterrupted before the run started: nothing written", file=sys.stderr)
        return 130
    finally:
        dist.cleanup()


def entry(stage: str) -> None:
    sys.exit(quiet_interrupt(main, stage))


def quiet_interrupt(function, *args) -> int:
    """``function(*args)``'s exit code; Ctrl-C anywhere in it (an import, argument parsing) is one line, code 130."""
    try:
        return function(*args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


def console_main(argv: Optional[list[str]] = None) -> None:
    """``instill STAGE CONFIG [...]``: the console script; the same as the stage's entry script."""
    from .stages import STAGES

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "convert":  # an original's config or command line -> an instill config
        from .migrate.convert import main as convert

        sys.exit(quiet_interrupt(convert, argv[1:]))
    if argv and argv[0] == "list":
        try:
            if len(argv) != 2:
                raise UserError(f"usage: instill list {'|'.join(KINDS)}")
            print(list_entries(argv[1]), flush=True)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(err.exit_code)
        except BrokenPipeError:  # `instill list models | head`: the reader has all it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        sys.exit(0)
    if argv and argv[0] == "import-neurosurgeon":
        from .subnetworks.neurosurgeon import main as import_neurosurgeon

        sys.exit(quiet_interrupt(import_neurosurgeon, argv[1:]))
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in STAGES:
        asked = bool(argv) and argv[0] in ("-h", "--help")
        print(f"usage: instill {{{','.join(STAGES)}}} CONFIG [--set KEY=VALUE ...] [--out DIR] [--resume] "
              f"[--print-config] [--validate]\n       instill list {'|'.join(KINDS)}\n"
              "       instill import-neurosurgeon STATE_DICT --base RUN_DIR --out DIR\n"
              "       instill convert ORIGINAL.yaml [-o OUT.yaml] | --from ORIGINAL [-o OUT.yaml] -- COMMAND LINE\n"
              "`instill STAGE --help` shows a stage's config sections; README.md and docs/design.md explain them.",
              file=sys.stdout if asked else sys.stderr)
        sys.exit(0 if asked else 2)
    sys.exit(quiet_interrupt(main, argv[0], argv[1:]))
