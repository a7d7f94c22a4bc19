"""Layering: no module of vila_edge/ below the builder imports it (lazy imports inside functions included),
so an engine directory runs where only the runtime's dependencies are installed."""

from __future__ import annotations

import ast
from pathlib import Path

import vila_edge

ROOT = Path(vila_edge.__file__).resolve().parent
# modules that build engines: the builder itself and the commands that build before they run
ABOVE_THE_BUILDER = ("builder/", "demo/", "cli.py", "bench/preset_engines.py")


def builder_imports(path: Path) -> list[str]:
    """The imports of vila_edge.builder (or of anything in it) in one source file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("vila_edge.builder")]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 0 and module.startswith("vila_edge.builder"):
                found.append(module)
            elif node.level == 0 and module == "vila_edge" and any(a.name == "builder" for a in node.names):
                found.append("vila_edge.builder")
            elif node.level > 0 and (module.startswith("builder") or any(a.name == "builder" for a in node.names)):
                found.append("." * node.level + module)
    return found


def below_the_builder() -> list[Path]:
    return [p for p in sorted(ROOT.rglob("*.py"))
            if not p.relative_to(ROOT).as_posix().startswith(ABOVE_THE_BUILDER)]


def test_no_module_below_the_builder_imports_it():
    offenders = [f"{p.relative_to(ROOT)}: imports {name}" for p in below_the_builder() for name in builder_imports(p)]
    assert offenders == []


def test_the_layer_check_covers_the_runtime_side_and_sees_imports():
    checked = {p.relative_to(ROOT).as_posix() for p in below_the_builder()}
    assert {"runtime.py", "engine_dir.py", "chat.py", "plan.py", "backends/__init__.py", "serve/engine.py",
            "serve/app.py", "bench/child.py", "bench/run.py", "bench/report.py", "bench/cli.py"} <= checked
    # the check finds what it looks for: the CLI builds (`vila-edge build`, chat's first use)
    assert "vila_edge.builder.build" in builder_imports(ROOT / "cli.py")
