"""The two exceptions that reach users as one line and a non-zero exit, never a traceback: ``UserError`` (bad input,
exit 2) and ``Interrupted`` (a stop signal after the last step was saved, exit 128 + signal)."""


class UserError(Exception):
    """Bad input or a refused operation. The message names the file, line or flag at fault."""


class Interrupted(Exception):
    """SIGINT/SIGTERM reached a command that saved its state first; the message says how to continue."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
