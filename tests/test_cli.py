"""Command-line conventions: fast start without torch, completions current and working."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from imgdb.completions import SHELLS, completion_script

ROOT = Path(__file__).resolve().parents[1]


def test_light_commands_do_not_import_torch(tmp_path: Path) -> None:
    code = ("import sys\nfrom imgdb.cli import main\nsys.argv = ['imgdb'] + sys.argv[1:]\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\nprint('ok')")
    for args in (["--help"], ["ingest", "--help"], ["info", "--db", str(tmp_path / "none.h5")],
                 ["index", "ls", "--db", str(tmp_path / "none.h5")],
                 ["models", "--db", str(tmp_path / "none.h5")], ["query", "--help"]):
        proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
        assert proc.stdout.strip().endswith("ok"), (args, proc.stdout, proc.stderr)


def test_help_lists_commands(cli) -> None:
    result = cli("--help")
    assert result.code == 0
    for command in ("ingest", "info", "check", "repair", "fit", "encode", "models", "index",
                    "query", "eval"):
        assert command in result.stdout


def test_every_command_has_help(cli) -> None:
    """Each command's --help works and shows its example (the app is assembled from the
    command modules' register functions)."""
    from imgdb.cli.app import app
    from typer.main import get_command

    group = get_command(app)
    paths = []
    for name, command in group.commands.items():
        subcommands = getattr(command, "commands", None)
        paths += [(name, sub) for sub in subcommands] if subcommands else [(name,)]
    assert len(paths) >= 13
    for path in paths:
        result = cli(*path, "--help")
        assert result.code == 0 and "Usage: imgdb " + " ".join(path) in result.stdout, path
        assert "Example: imgdb " in " ".join(result.stdout.split()), path


def test_committed_completions_are_current() -> None:
    for shell, name in SHELLS.items():
        committed = (ROOT / "completions" / name).read_text()
        assert committed == completion_script(shell), (
            f"completions/{name} is out of date: run python -m imgdb.completions completions/")


def test_bash_completion_answers() -> None:
    env = dict(os.environ, _IMGDB_COMPLETE="complete_bash", COMP_WORDS="imgdb ingest --back",
               COMP_CWORD="2")
    proc = subprocess.run([sys.executable, "-m", "imgdb"], env=env, capture_output=True, text=True)
    assert "--backbone" in proc.stdout.split()
    env.update(COMP_WORDS="imgdb in", COMP_CWORD="1")
    proc = subprocess.run([sys.executable, "-m", "imgdb"], env=env, capture_output=True, text=True)
    assert {"ingest", "info"} <= set(proc.stdout.split())
