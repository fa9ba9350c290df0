"""The one exception type for mistakes a user made (config, paths, data, layer names).

Entry scripts catch it, print its message as one line on stderr and exit with code 2. Anything else that escapes
is a bug in instill and keeps its traceback.
"""


import importlib
import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Optional


class UserError(ValueError):
    """Bad input from the user: printed as one line, exit code 2, nothing written."""

    exit_code = 2


@contextmanager
def under_key(key: str):
    """Name the config key a library call was given: a ``UserError`` raised inside comes out as ``key: message``.

    Library functions never name YAML keys in their messages (their caller may not be a config at all); the stage
    that passes a config value into one wraps the call in ``with under_key("align.score_layers"):``.

    Args:
        key: the dotted config key (or a section, or a label such as ``stitch: a -> b``).

    Raises:
        UserError: the one raised inside, its message prefixed with ``key``.
    """
    try:
        yield
    except UserError as err:
        raise UserError(f"{key}: {err}") from None


def nearest(name: str, choices, n: int = 3, cutoff: float = 0.6) -> list[str]:
    """The known names closest to a misspelt ``name``, best first (the one place that spells suggestions).

    Args:
        name: what the user wrote.
        choices: the names that exist (any iterable of strings).
        n: at most this many suggestions.
        cutoff: similarity in [0, 1] below which a name is not suggested.

    Returns:
        Up to ``n`` names from ``choices``; empty when none is close.
    """
    import difflib

    return difflib.get_close_matches(name, list(choices), n=n, cutoff=cutoff)


def did_you_mean(name: str, choices, n: int = 1, cutoff: float = 0.6) -> str:
    """`` (did you mean 'x'?)`` for the closest known names (``'x' or 'y'`` for up to ``n``), or ``""`` when none
    is close.

    Args:
        name: what the user wrote.
        choices: the names that exist.
        n: at most this many suggestions.
        cutoff: as in ``nearest``.

    Returns:
        The suffix to append to an error message.
    """
    hints = nearest(name, choices, n=n, cutoff=cutoff)
    return f" (did you mean {' or '.join(repr(h) for h in hints)}?)" if hints else ""


def unknown_name(kind: str, name: str, known, *, where: str = "", suggestions: int = 1, limit: int = 12,
                 cutoff: float = 0.6) -> UserError:
    """The one wording of an unknown name: ``unknown <kind> 'x'<where> (did you mean 'y'?); known: a, b, c``.

    Args:
        kind: what the name should have named (``similarity``, ``mask method``, ``layer``).
        name: what the user wrote.
        known: the names that exist, in the order to list them (a set is sorted); the first ``limit`` are listed,
            then how many more there are.
        where: where the name was looked up (`` in Tiny10``).
        suggestions: at most this many close names are suggested.
        cutoff: how close a suggestion must be (``nearest``).

    Returns:
        The UserError to raise (a pydantic validator raises a ValueError with its text).
    """
    known = sorted(known) if isinstance(known, (set, frozenset)) else list(dict.fromkeys(known))
    return UserError(f"unknown {kind} {name!r}{where}" + did_you_mean(name, known, suggestions, cutoff)
                     + known_names(known, limit))


def known_names(known, limit: int = 12) -> str:
    """``; known: a, b, c, ... (+N)``: the end of ``unknown_name``'s wording, for messages about patterns."""
    known = list(known)
    shown = ", ".join(known[:limit]) + (f", ... (+{len(known) - limit})" if len(known) > limit else "")
    return f"; known: {shown}" if known else ""


def exit_code_of(body, interrupted: str = "interrupted") -> int:
    """Run ``body()`` as a command: its exit code, a UserError as its one line on stderr and its code, Ctrl-C as
    ``interrupted`` on stderr and 130 (the one place the command-line tools turn these into exit codes).

    Args:
        body: a callable with no arguments returning an exit code.
        interrupted: the line printed after Ctrl-C (say how to resume, where one can).

    Returns:
        The exit code.
    """
    try:
        return body()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"\n{interrupted}", file=sys.stderr)
        return 130


@contextmanager
def exit_on_interrupt(message: str = "interrupted before the run started: nothing written"):
    """Ctrl-C inside the block ends the process at once with ``message`` on stderr and code 130. A
    KeyboardInterrupt raised in the middle of importing torch or numpy leaves half-initialised modules whose next
    import (by the interpreter's own shutdown, say) fails with a traceback, so the signal must never become an
    exception there. Outside the main thread, or where SIGINT is ignored (a background job) or has someone else's
    handler, the block runs untouched."""
    def leave(signum, frame):
        os.write(2, f"\n{message}\n".encode())
        os._exit(130)

    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    previous = signal.signal(signal.SIGINT, leave)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run_module(name: str) -> None:
    """``python -m instill.NAME``: import the module (the importable copy, not runpy's ``__main__`` one, in which
    pydantic would not resolve the module's postponed annotations) with Ctrl-C ending the process quietly, then exit
    with its ``main()``'s code; ``main`` itself turns Ctrl-C into a line and 130 as every command does."""
    with exit_on_interrupt("interrupted"):
        main = importlib.import_module(name).main
    sys.exit(main())


def install_hint(extra: Optional[str], package: str) -> str:
    """The command that installs an optional package where this instill runs: from a clone (a source checkout,
    editable install) ``pip install -e '.[extra]'`` (the checkout's path when the working directory is elsewhere);
    otherwise the package itself, since the ``instill-torch`` distribution is not on the package index. ``extra``
    None: a package every installation has (a broken environment: install the checkout again)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # core/ sits in the checkout's root
    if os.path.isfile(os.path.join(root, "pyproject.toml")):
        where = "." if os.path.abspath(os.getcwd()) == root else os.path.relpath(root)
        if where.count("..") > 2:  # far away: an absolute path reads better than ../../../..
            where = root
        return f"pip install -e '{where}[{extra}]'" if extra else f"pip install -e '{where}'"
    return f"pip install {package}"


def require(package: str, extra: Optional[str], feature: str) -> None:
    """A UserError naming ``feature``, the missing ``package`` and the command that installs it, when it is not
    installed (found without importing it)."""
    import importlib.util

    if importlib.util.find_spec(package) is None:
        raise UserError(f"{feature} needs the {package} package, which is not installed "
                        f"({install_hint(extra, package)})")
