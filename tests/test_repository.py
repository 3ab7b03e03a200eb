"""The repository stands alone and its documents stay true: CI runs the README's test command,
nothing names a file outside the repository, every command is documented with an example, and
the committed shell completions are what the app generates."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from imgdb.cli.app import app
from imgdb.completions import SHELLS, completion_script

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _commands() -> list[str]:
    """Every command path of the app, e.g. 'ingest', 'fit pca', 'index build'."""
    import typer.main

    group = typer.main.get_command(app)
    out = []
    for name, cmd in group.commands.items():  # type: ignore[attr-defined]
        sub = getattr(cmd, "commands", None)
        out += [f"{name} {s}" for s in sub] if sub else [name]
    return out


def test_ci_runs_the_readme_test_command() -> None:
    block = README.split("```bash", 1)[1].split("```", 1)[0]
    lines = [ln.strip() for ln in block.splitlines() if ln.strip() and not ln.startswith("#")]
    assert len(lines) == 2, lines  # the demo, then the tests
    ci = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()
          if ln.strip() and not ln.startswith("#")]
    assert ci[-1] == lines[1]
    assert "pytest" in lines[1] and "imgdb.demo" in lines[0]


@pytest.mark.parametrize("folder", ["imgdb", "tests", "docs", "benchmarks", ".ci"])
def test_nothing_names_a_file_outside_the_repository(folder: str) -> None:
    outside = re.compile(r"DESIGN\.md|\.\./shared|/work/shared|shared/(data|seeds|hooks)")
    found = []
    files = [ROOT / "README.md"] if folder == "imgdb" else []
    for path in [*(ROOT / folder).rglob("*"), *files]:
        if path.is_file() and path.suffix in (".py", ".md", ".toml", ".txt", "") \
                and "data" not in path.relative_to(ROOT).parts[1:2]:
            text = path.read_text(errors="replace")
            if path.name != "test_repository.py":
                found += [f"{path.relative_to(ROOT)}: {m.group(0)}" for m in outside.finditer(text)]
    assert not found


def test_every_command_is_documented_with_an_example() -> None:
    commands = _commands()
    assert {"ingest", "info", "check", "repair", "merge", "fit pca", "index build", "query",
            "eval", "serve", "explain"} <= set(commands)
    missing = [c for c in commands if not re.search(rf"^imgdb {re.escape(c)}\b", README, re.M)]
    assert not missing, f"README has no example line starting 'imgdb <command>' for {missing}"


@pytest.mark.parametrize("shell", sorted(SHELLS))
def test_committed_completions_are_current(shell: str) -> None:
    committed = (ROOT / "completions" / SHELLS[shell]).read_text()
    assert committed == completion_script(shell), \
        "regenerate: python -m imgdb.completions completions/"


def test_no_private_name_is_imported_across_modules() -> None:
    """A module's `_names` are its own: what another module needs is public (named, documented),
    whether imported by name or reached as an attribute of an imported module or class."""
    import ast

    found = []
    for path in sorted((ROOT / "imgdb").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                found += [f"{path.relative_to(ROOT)}:{node.lineno} {a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
        tree = ast.parse(path.read_text())
        imported = {(a.asname or a.name).split(".")[0] for node in ast.walk(tree)
                    if isinstance(node, (ast.Import, ast.ImportFrom)) for a in node.names}
        found += [f"{path.relative_to(ROOT)}:{node.lineno} {node.value.id}.{node.attr}"
                  for node in ast.walk(tree)
                  if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                  and node.value.id in imported and node.attr.startswith("_")
                  and not node.attr.startswith("__")
                  and f"{node.value.id}.{node.attr}" not in DOCUMENTED]
    assert found == []


#: Standard-library names that begin with an underscore yet are documented, public API.
DOCUMENTED = {"os._exit"}


def test_benchmarks_and_tests_import_only_what_imgdb_has() -> None:
    """Every `from imgdb... import name` in benchmarks/ and tests/ (also inside functions, which
    only run on a GPU or in a long benchmark) names a module and attribute that exist."""
    import ast
    import importlib

    missing = []
    for path in sorted([*(ROOT / "benchmarks").glob("*.py"), *(ROOT / "tests").glob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and \
                    (node.module or "").split(".")[0] == "imgdb":
                where = f"{path.relative_to(ROOT)}:{node.lineno}"
                try:
                    module = importlib.import_module(node.module)
                except ImportError:
                    missing.append(f"{where} {node.module}")
                    continue
                missing += [f"{where} {node.module}.{a.name}" for a in node.names
                            if not hasattr(module, a.name)
                            and importlib.util.find_spec(f"{node.module}.{a.name}") is None]
    assert missing == []


#: The packages of imgdb by layer, lowest first (README "Architecture"): a module imports only
#: its own package and packages of lower layers.
LAYERS = (
    ("", "errors", "numeric", "digest"),
    ("store", "features"),
    ("codebooks", "ingest"),
    ("retrieval",),
    ("evaluation", "inventory", "serve"),
    ("cli", "demo"),
    ("__main__", "completions"),
)


def _imgdb_imports(path: Path, module: str) -> list[tuple[str, int]]:
    """(imported imgdb module, line) of every import in a file, also inside functions."""
    import ast

    out = []
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out += [(n, node.lineno) for n in names if n == "imgdb" or n.startswith("imgdb.")]
    return out


def test_no_lower_layer_imports_a_higher_one() -> None:
    """The picture of the README's architecture section, held against the code."""
    layer = {pkg: i for i, names in enumerate(LAYERS) for pkg in names}
    root = Path(__file__).resolve().parent.parent / "imgdb"
    bad, unknown = [], set()
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        own = module.split(".")[1] if "." in module else ""
        for target, line in _imgdb_imports(path, module):
            other = target.split(".")[1] if "." in target else ""
            for pkg in (own, other):
                if pkg not in layer:
                    unknown.add(pkg)
            if own != other and own in layer and other in layer and layer[other] >= layer[own]:
                bad.append(f"{path.relative_to(root.parent)}:{line} imports {target}")
    assert not unknown, f"packages missing from LAYERS (and the README): {sorted(unknown)}"
    assert not bad, "imports of a package on the same or a higher layer:\n" + "\n".join(bad)


def test_the_readme_draws_the_layers() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Architecture", 1)[1].split("\n## ", 1)[0]
    for names in LAYERS:
        for pkg in names:
            if pkg:
                assert pkg in section, f"the README's architecture section does not name {pkg}"


def test_no_library_module_speaks_the_command_line() -> None:
    """Outside cli/, errors name request fields, never command-line flags (`{k}` rendered by
    each front end, not `--k`); a whole command to run (`imgdb index build --db ...`) is the
    fix and may be quoted. No module outside cli/ names the command line's error type."""
    import ast
    import re

    errors = {"UserError", "InvalidRequest", "StoreError", "StoreDamaged", "DiskFull",
              "WeightsError", "RequestError", "refuse"}
    flag = re.compile(r"(?<![\w{-])--[a-z]")
    root = Path(__file__).resolve().parent.parent / "imgdb"
    bad = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent)
        if rel.parts[1] == "cli" or path.name == "demo.py":
            continue
        text = path.read_text(encoding="utf-8")
        if re.search(r"\bUsageError\b", text):
            bad.append(f"{rel}: names UsageError")
        for node in ast.walk(ast.parse(text)):
            if not (isinstance(node, ast.Call) and getattr(node.func, "id", None) in errors):
                continue
            words = " ".join(c.value for a in node.args for c in ast.walk(a)
                             if isinstance(c, ast.Constant) and isinstance(c.value, str))
            if flag.search(words) and not re.search(r"imgdb [a-z]+ ", words):
                bad.append(f"{rel}:{node.lineno}: {words[:80]!r}")
    assert not bad, "library errors that name command-line flags:\n" + "\n".join(bad)


def test_the_readme_prints_the_pooling_table() -> None:
    """The README's descriptor table is the pooling table itself (one source of names)."""
    from imgdb.features.poolings import markdown_table

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    assert markdown_table() in readme
