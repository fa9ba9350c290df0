"""``instill convert``: an original's config or command line, written as an instill config.

    instill convert ORIGINAL.yaml [-o OUT.yaml]
    instill convert --from drfrankenstein|wide-network-alignment|guidance [-o OUT.yaml] -- <original command line>

The translation is validated against its stage's schema before anything is written; ``-o`` never overwrites a
file (without it the YAML goes to stdout). Each translated key or flag gets a comment saying where it went, and
those not honoured are listed, with the reason, in the header.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from ..errors import UserError
from .translation import Translation


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    if "--" in argv:
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1:]
    else:
        command = []
    from .flags import ORIGINALS

    parser = argparse.ArgumentParser(
        prog="instill convert", description="Write an original code base's config or command line as an instill "
        "config, with a comment per key or flag (docs/migrating.md tables them).",
        epilog="forms: instill convert ORIGINAL.yaml [-o OUT.yaml]; instill convert --from ORIGINAL [-o OUT.yaml] "
               "-- <original command line>")
    parser.add_argument("config", nargs="?", help="a config in the Rock-Z/instilling-inductive-bias schema")
    parser.add_argument("--from", dest="original", choices=sorted(ORIGINALS),
                        help="translate the original command line given after --")
    parser.add_argument("-o", "--out", help="write the instill YAML here (a new file) instead of stdout")
    parser.add_argument("--env", help="drfrankenstein: its config/default.env (default: config/default.env if present)")
    args = parser.parse_args(argv)
    if (args.config is None) == (args.original is None):
        parser.error("give either ORIGINAL.yaml or --from ORIGINAL -- <command line>")
    if args.original is not None and not command:
        parser.error(f"--from {args.original}: give the original command line after --")
    return args, command


def translation_of(args: argparse.Namespace, command: list[str]) -> Translation:
    if args.original is not None:
        from .flags import translate_command

        return translate_command(args.original, command, env=args.env)
    from ..config import read_yaml
    from .instilling import is_original, translate

    raw = read_yaml(args.config)
    if not is_original(raw):
        raise UserError(f"{args.config}: not a config of the original code (no *_configs sections); instill configs "
                        "run as they are")
    return translate(raw, args.config)


def check(translation: Translation, source: str) -> None:
    """Validate the translation against its stage's config schema (nothing invalid is ever written)."""
    from ..config import validate
    from ..stages import get_stage

    validate(dict(translation.config), get_stage(translation.stage).Config, f"{source} (translated)")


def main(argv: Optional[list[str]] = None) -> int:
    args, command = parse(list(sys.argv[1:] if argv is None else argv))
    try:
        translation = translation_of(args, command)
        check(translation, args.config or f"--from {args.original}")
        text = translation.to_yaml()
        if args.out is None:
            sys.stdout.write(text)
            return 0
        if os.path.lexists(args.out):
            raise UserError(f"-o {args.out}: already exists (never overwritten); choose a new file")
        from ..files import atomic_write_text

        atomic_write_text(args.out, text)
        print(f"wrote {args.out} (instill stage {translation.stage})", file=sys.stderr)
        return 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
