"""The one exception type for mistakes a user made (config, paths, data, layer names).

Entry scripts catch it, print its message as one line on stderr and exit with code 2. Anything else that escapes
is a bug in instill and keeps its traceback.
"""


class UserError(ValueError):
    """Bad input from the user: printed as one line, exit code 2, nothing written."""

    exit_code = 2
