"""The floors of the source tree, read from the import statements themselves (ast, nothing is imported):

    app/      API, dashboard, CLI         may import everything below
    workers/  Celery, runner, sweeper     core, merging, models — never app (a worker image needs no API)
    core/     settings, database, store, job state and specs, the validation scorer
                                          merging, models
    merging/, models/                     pure PyTorch: none of app, workers, core

and a CLI command module (app/commands/*) is imported only by the CLI itself (app/cli.py) and by other
commands: library code that needs something a command has gets it from the library module it lives in.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("app", "core", "workers", "merging", "models", "migrations")

FORBIDDEN = {
    "workers": ("app",),
    "core": ("app", "workers"),
    "merging": ("app", "workers", "core"),
    "models": ("app", "workers", "core"),
}
COMMANDS = "app.commands"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, dotted name) for every import in the file, nested ones included. `from a import b` yields
    both `a` and `a.b` (b may be a module); relative imports are resolved against the file's package;
    `importlib.import_module("x...")` yields the literal start of its argument (f-strings included)."""
    tree = ast.parse(path.read_text(), str(path))
    package = _module_name(path)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            parts = node.module.split(".") if node.module else []
            if node.level:
                anchor = package.split(".")
                parts = anchor[: len(anchor) - (node.level - 1)] + parts
            if parts:
                found.append((node.lineno, ".".join(parts)))
            found += [(node.lineno, ".".join([*parts, a.name])) for a in node.names if a.name != "*"]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) \
                == "import_module" and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.JoinedStr):
                arg = arg.values[0] if arg.values else None
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                found.append((node.lineno, arg.value.rstrip(".")))
    return found


def _under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _offences(files: list[Path], forbidden) -> list[str]:
    """One line per offending import statement, naming the module it reaches (its shortest forbidden name)."""
    found = {}
    for p in files:
        for line, name in _imports(p):
            if forbidden(name):
                key = (str(p.relative_to(ROOT)), line)
                found[key] = min(found.get(key, name), name, key=len)
    return [f"{f}:{line} imports {name}" for (f, line), name in sorted(found.items())]


def _sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_every_floor_has_sources():
    # An empty walk (a renamed folder, a wrong ROOT) would make the checks below pass vacuously.
    for pkg in PACKAGES:
        assert list((ROOT / pkg).rglob("*.py")), f"{pkg}/ has no Python files under {ROOT}"


@pytest.mark.parametrize("floor", sorted(FORBIDDEN))
def test_floor_imports_nothing_above_it(floor):
    bad = _offences(sorted((ROOT / floor).rglob("*.py")),
                    lambda name: any(_under(name, above) for above in FORBIDDEN[floor]))
    assert not bad, f"{floor}/ must not import {', '.join(FORBIDDEN[floor])}:\n" + "\n".join(bad)


def test_only_the_cli_imports_commands():
    allowed = {ROOT / "app" / "cli.py"}
    files = [p for p in _sources() if p not in allowed and not p.is_relative_to(ROOT / "app" / "commands")]
    bad = _offences(files, lambda name: _under(name, COMMANDS))
    assert not bad, "library code imports a CLI command module:\n" + "\n".join(bad)


def test_the_reader_sees_every_import_form(tmp_path, monkeypatch):
    # The checks are only as good as _imports: each form a forbidden import could take must be seen.
    pkg = tmp_path / "workers"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "x.py").write_text(
        "import app.db\n"
        "from app import store\n"
        "from .. import app as a\n"
        "def f():\n"
        "    from app.commands.merge import validation_score\n"
        "    import importlib\n"
        "    importlib.import_module(f'app.commands.{f}')\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    names = {n for _, n in _imports(pkg / "x.py")}
    assert {"app.db", "app", "app.store", "app.commands.merge", "app.commands"} <= names


def test_a_worker_process_loads_no_api_module():
    # What a worker image runs, imported for real: the static walk above could miss an import made at runtime.
    code = ("import sys, workers.celery_app, workers.runner, workers.sweeper, workers.tasks; "
            "print(sorted(m for m in sys.modules if m == 'app' or m.startswith('app.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "RECMERGE_BROKER_URL": "memory://"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"a worker process imported API modules: {out.stdout.strip()}"
