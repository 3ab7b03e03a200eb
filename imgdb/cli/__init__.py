"""The `imgdb` command line: parses options, calls the library, prints results. No computation.

- `app.py`: the Typer app, `run(argv) -> exit code` (every error one line on stderr) and `main`;
- `options.py`: every shared option once, as an `Annotated` alias with its parse-time check;
- `choices.py`: the fixed choices as Enums (listed by --help and shell completion);
- `render.py`: one renderer per result type; text (escaped) and --json from the same object;
- one module per command group: `ingest`, `store` (info, check, repair, models), `fit` (fit
  pca|codebook, encode), `index`, `query`, `evaluate` (eval); each has `register(app)`.

A new command: a module with its function(s) and `register(app)`, added to
`app.COMMAND_MODULES`. A new option: an alias in options.py (reuse a parser there).
"""

from .app import app, main, run, script

__all__ = ["app", "main", "run", "script"]
