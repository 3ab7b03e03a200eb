"""Shell completion scripts for bash, zsh and fish, generated from the typer app.

The scripts call back into `imgdb` for candidates, so they always know every command and option.
Regenerate the committed copies with: python -m imgdb.completions completions/
"""

from __future__ import annotations

import sys
from pathlib import Path

SHELLS = {"bash": "imgdb.bash", "zsh": "_imgdb", "fish": "imgdb.fish"}
PROG = "imgdb"
COMPLETE_VAR = "_IMGDB_COMPLETE"


def completion_script(shell: str) -> str:
    """The completion script typer generates for `shell`."""
    from typer._completion_shared import get_completion_script

    return get_completion_script(prog_name=PROG, complete_var=COMPLETE_VAR, shell=shell).rstrip() + "\n"


def write_completions(folder: Path) -> list[Path]:
    """Write one script per shell into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for shell, name in SHELLS.items():
        path = folder / name
        path.write_text(completion_script(shell))
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in write_completions(Path(sys.argv[1] if len(sys.argv) > 1 else "completions")):
        print(p)
