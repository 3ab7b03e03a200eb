"""Errors that reach the user as one sentence, never as a traceback.

The library speaks in its own terms; `cli/` turns these into exit codes and option names,
`serve/` into HTTP statuses with a JSON body:

- `UserError` (exit 1, HTTP 409): the request cannot be done (missing store, stale index, no
  weights...).
- `InvalidRequest` (exit 2, HTTP 400): a value of the request is wrong.
- The store's errors are user errors with a kind: locked, damaged, out of space.

An error names the request values it is about by their field names, never by a front end's
spelling of them: `field` is the one value the error belongs to (`rerank`, `k`), and a message
may mention others as `{name}` (listed in `mentions`). `render(spell)` writes them the front
end's way (the CLI: `--rerank`, `-k`; the API: the form field); `str()` gives the bare names.
"""

import re


class UserError(Exception):
    """A request that cannot be done; the message says what is wrong and what to do."""

    def __init__(self, message: str = "", field: str | None = None,
                 mentions: tuple[str, ...] = ()) -> None:
        self.template = str(message)
        self.field = field
        self.mentions = tuple(mentions)
        super().__init__(self.render())

    def render(self, spell=lambda name: name, with_field: bool = True) -> str:
        """The message with each mentioned `{field}` spelled by `spell` (and, when the error
        belongs to one field, that field first unless `with_field` is False)."""
        text = self.template
        if self.mentions:
            names = "|".join(re.escape(m) for m in self.mentions)
            text = re.sub(r"\{(" + names + r")\}", lambda m: spell(m.group(1)), text)
        return f"{spell(self.field)}: {text}" if self.field and with_field else text

    def with_field(self, field: str) -> "UserError":
        """The same error, naming the request field it came from (when it named none)."""
        if self.field is None:
            self.field = field
            self.args = (self.render(),)
        return self


class InvalidRequest(UserError):
    """A value of the request that is wrong, found after parsing (`field`: which one)."""


class StoreError(UserError):
    """The store is missing, foreign, locked or unusable."""


class NotAStore(StoreError):
    """The file is not an imgdb store at all (nothing to check or repair)."""


class StoreDamaged(StoreError):
    """Stored bytes fail their checksum or structure; `imgdb check` names it, `repair` mends it."""


class DiskFull(StoreError):
    """A write did not fit (free space, file-size limit); nothing committed was lost."""


def refuse(message: str, *mentions: str) -> InvalidRequest:
    """An `InvalidRequest` whose message mentions request fields as `{name}`."""
    return InvalidRequest(message, mentions=mentions)
