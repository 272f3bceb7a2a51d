"""The one exception type that reaches users: a one-line message and a non-zero exit, never a traceback."""


class UserError(Exception):
    """Bad input or a refused operation. The message names the file, line or flag at fault."""
