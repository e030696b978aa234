"""Errors a user can cause and fix. The command line prints them as one line, without a traceback."""


class AnitalkerError(Exception):
    """An error with a message that says what went wrong and what to do."""


class CheckpointError(AnitalkerError):
    """A checkpoint file or folder is missing, unreadable, unsafe or of the wrong kind."""
