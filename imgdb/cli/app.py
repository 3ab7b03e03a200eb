"""The `imgdb` Typer app and its entry point: every user mistake ends as one line on stderr.

Exit codes: 0 done, 1 the request cannot be done (`UserError`), 2 bad usage (a value the parser
refused, or an `InvalidRequest` found later), 130 interrupted. Anything else is a bug: one line that
says so (`--debug` shows the traceback).

Commands live in one module per group (ingest, store, fit, index, query, evaluate, serve);
each has a `register(app)` that adds its commands. Heavy imports (torch, the network code) happen inside
the commands that need them, so `imgdb --help`, `imgdb info` and friends start fast.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated, Sequence

import typer

from ..errors import InvalidRequest, UserError
from . import evaluate, fit, index, ingest, query, serve, store
from .render import escape

app = typer.Typer(
    name="imgdb",
    help="Image retrieval with pooled CNN descriptors: ingest photos into an HDF5 store, "
         "fit PCA-whitening, build indexes, query, evaluate.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich" if sys.stdout.isatty() else None,  # plain help when piped
)

#: The command groups, in the order `imgdb --help` lists them.
COMMAND_MODULES = (ingest, store, fit, index, query, evaluate, serve)

_STATE = {"debug": False}


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")]
          = False) -> None:
    _STATE["debug"] = debug


for _module in COMMAND_MODULES:
    _module.register(app)

# typer's exceptions come from click (or, in newer typer, its vendored copy): find the classes
_CLICK_ERRORS = tuple(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
_USAGE_ERRORS = tuple(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
_INTERRUPTED = "interrupted; what was committed is kept, rerun the command to finish"


def _error(message: str) -> None:
    typer.echo("error: " + escape(str(message)), err=True)


#: how the command line spells a request field the library names (others: --field-name)
FLAGS = {"k": "-k", "ids": "--id", "images": "IMAGE", "model": "--pca",
         "descriptors": "--descriptor"}


def flag(field: str) -> str:
    """The command-line option of a request field (`search_k` -> `--search-k`)."""
    return FLAGS.get(field, "--" + field.replace("_", "-"))


def _message(exc: UserError) -> str:
    """A library error in the command line's words (request fields as its options)."""
    return exc.render(flag)


def _usage_error(exc: Exception) -> int:
    """A parse error as one line: what is wrong and where to read about it."""
    ctx = getattr(exc, "ctx", None)
    if type(exc).__name__ == "NoArgsIsHelpError":  # `imgdb fit`: the group's help, as asked
        exc.show()  # type: ignore[attr-defined]
        return 2
    message = exc.format_message().replace("Value error, ", "")  # type: ignore[attr-defined]
    where = ctx.command_path if ctx is not None else "imgdb"
    _error(f"{message.rstrip('.')} (see: {where} --help)")
    return 2


def run(argv: Sequence[str] | None = None) -> int:
    """Run one command line (default: sys.argv[1:]) and return its exit code; errors are one
    line on stderr, never a traceback (unless --debug)."""
    _STATE["debug"] = False
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        result = app(args=args, prog_name="imgdb", standalone_mode=False)
    except UserError as exc:
        if _STATE["debug"]:
            raise
        _error(_message(exc))
        return 2 if isinstance(exc, InvalidRequest) else 1
    except typer.Exit as exc:
        return int(exc.exit_code or 0)
    except typer.Abort:
        _error("aborted")
        return 130
    except KeyboardInterrupt:
        typer.echo(_INTERRUPTED, err=True)
        return 130
    except _USAGE_ERRORS as exc:
        return _usage_error(exc)
    except _CLICK_ERRORS as exc:  # e.g. a file click could not open
        _error(exc.format_message())  # type: ignore[attr-defined]
        return int(getattr(exc, "exit_code", 1) or 1)
    except Exception as exc:  # a bug: say so in one line
        if type(exc).__name__ in ("Exit", "Abort") and hasattr(exc, "exit_code"):
            return int(exc.exit_code or 0)
        if _STATE["debug"]:
            raise
        first = (str(exc).splitlines() or [""])[0]
        _error(f"unexpected {type(exc).__name__}: {first} (a bug in imgdb; rerun with --debug "
               f"for details)")
        return 1
    if isinstance(result, int) and result:
        if result == 130:  # typer turns Ctrl-C into Exit(130); click returns that code
            typer.echo(_INTERRUPTED, err=True)
        return result
    return 0


def main() -> None:
    """Entry point of the `imgdb` script (as a function of a program: it ends with SystemExit)."""
    _tolerant_streams()
    sys.exit(run())


def script() -> None:
    """The `imgdb` script and `python -m imgdb`: `main`, except that a finished query ends the
    process at once (`_exit_now`); a caller of `main` in its own program keeps its process."""
    if sys.argv[1:2] != ["query"]:
        main()
    _tolerant_streams()
    _exit_now(run())


def _tolerant_streams() -> None:
    """A terminal that cannot show a character gets \\uXXXX, not an error."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
        except (AttributeError, ValueError):
            pass


def _exit_now(code: int) -> None:
    """End a finished read-only command without tearing the interpreter down: freeing the
    modules and arrays of numpy, h5py and ONNX Runtime one by one takes a cold query 0.06-0.1 s
    after its answer is printed. A query writes nothing (its --html page is closed by then),
    so only the output streams need flushing."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader that stopped early (| head)
            pass
    os._exit(code)
