"""The command line every entry script shares.

    python <script> CONFIG [--set section.key=value ...] [--out DIR] [--resume] [--print-config] [--validate]

A UserError (bad config, path, data, layer name, ...) prints one line on stderr and exits with code 2; Ctrl-C saves
the run's state and exits with code 130, after which ``--resume`` continues it.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from .errors import UserError


def parse_args(stage: str, argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=f"instill {stage} stage: run one YAML config")
    parser.add_argument("config", help="YAML config file (a run directory's config.yaml replays that run)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.optimizer.lr=0.01 (repeatable)")
    parser.add_argument("--out", help="run directory (overrides output_dir)")
    parser.add_argument("--resume", action="store_true", help="continue the unfinished run in the run directory")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--validate", action="store_true", help="check the config and exit")
    return parser.parse_args(argv)


def main(stage: str, argv: Optional[list[str]] = None) -> int:
    args = parse_args(stage, argv)
    try:
        from . import dist  # torch: seconds of importing, during which Ctrl-C must not print a traceback
        from .config import to_yaml
        from .stages import Interrupted, execute, load_stage_config
    except KeyboardInterrupt:
        print("\ninterrupted before the run started: nothing written", file=sys.stderr)
        return 130
    try:
        cfg = load_stage_config(args.config, stage, args.overrides, args.out)
        if args.print_config:
            print(to_yaml(cfg), end="")
            return 0
        if args.validate:
            print(f"{args.config}: valid {stage} config")
            return 0
        execute(cfg, resume=args.resume, overrides=args.overrides if args.resume else [])
        return 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except Interrupted as err:
        if err.upstream and err.resumable:
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
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in STAGES:
        print(f"usage: instill {{{','.join(STAGES)}}} CONFIG [--set KEY=VALUE ...] [--out DIR] [--resume] "
              "[--print-config] [--validate]", file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    sys.exit(quiet_interrupt(main, argv[0], argv[1:]))
