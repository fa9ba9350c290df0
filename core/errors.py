"""The one exception type for mistakes a user made (config, paths, data, layer names).

Entry scripts catch it, print its message as one line on stderr and exit with code 2. Anything else that escapes
is a bug in instill and keeps its traceback.
"""


class UserError(ValueError):
    """Bad input from the user: printed as one line, exit code 2, nothing written."""

    exit_code = 2


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


def did_you_mean(name: str, choices) -> str:
    """`` (did you mean 'x'?)`` for the closest known name, or ``""`` when none is close.

    Args:
        name: what the user wrote.
        choices: the names that exist.

    Returns:
        The suffix to append to an error message.
    """
    hint = nearest(name, choices, n=1)
    return f" (did you mean {hint[0]!r}?)" if hint else ""


def exit_code_of(body, interrupted: str = "interrupted") -> int:
    """Run ``body()`` as a command: its exit code, a UserError as its one line on stderr and its code, Ctrl-C as
    ``interrupted`` on stderr and 130 (the one place the command-line tools turn these into exit codes).

    Args:
        body: a callable with no arguments returning an exit code.
        interrupted: the line printed after Ctrl-C (say how to resume, where one can).

    Returns:
        The exit code.
    """
    import sys

    try:
        return body()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"\n{interrupted}", file=sys.stderr)
        return 130
