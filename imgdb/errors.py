"""Errors that reach the user as one sentence, never as a traceback.

`UserError` (exit 1): the request cannot be done (missing store, stale index, no weights...).
`UsageError` (exit 2): the command line itself is wrong (a bad value the parser could not see).
The store's errors are user errors with a kind: locked, damaged, out of space.
"""


class UserError(Exception):
    """A request that cannot be done; the message says what is wrong and what to do."""


class UsageError(UserError):
    """A command-line value that is wrong (exit 2), found after parsing."""


class StoreError(UserError):
    """The store is missing, foreign, locked or unusable."""


class StoreDamaged(StoreError):
    """Stored bytes fail their checksum or structure; `imgdb check` names it, `repair` mends it."""


class DiskFull(StoreError):
    """A write did not fit (free space, file-size limit); nothing committed was lost."""
