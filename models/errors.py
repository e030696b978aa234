"""Errors a user can cause and fix, and the interrupt that stops a command. The command line prints each
as one line, without a traceback."""
import signal


class AnitalkerError(Exception):
    """An error with a message that says what went wrong and what to do."""


class CheckpointError(AnitalkerError):
    """A checkpoint file or folder is missing, unreadable, unsafe or of the wrong kind."""


class Interrupted(BaseException):
    """SIGINT (Ctrl-C) or SIGTERM stopped the command. A BaseException, like KeyboardInterrupt, so that only
    cleanup code sees it on its way out: partial files are removed and the command exits 128 + signum."""

    def __init__(self, signum: int = signal.SIGINT, note: str = ""):
        super().__init__(signum, note)
        self.signum, self.note = int(signum), note

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        name = signal.Signals(self.signum).name
        return f"interrupted by {name}" + (f": {self.note}" if self.note else "")
