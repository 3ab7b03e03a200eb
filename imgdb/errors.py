"""Errors that reach the user as one sentence (exit 1), never as a traceback."""


class UserError(Exception):
    """A request that cannot be done; the message says what is wrong and what to do."""
