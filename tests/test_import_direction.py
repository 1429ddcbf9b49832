"""Imports flow one way between pytest_attn's subpackages (ARCHITECTURE.md): each may import only
those listed below it here, and the layers under the plugin never import pytest, so measuring,
checking and reporting need no pytest session."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pytest_attn"
#: What each subpackage may import of pytest_attn (besides itself).
MAY_IMPORT = {
    "core": set(),
    "cases": {"core"},
    "env": {"core"},
    "check": {"core", "cases", "env"},
    "bench": {"core", "cases", "env", "check"},
    "report": {"core", "cases", "env", "check", "bench"},
    "cli": {"core", "cases", "env", "check", "bench", "report"},
    "plugin": {"core", "cases", "env", "check", "bench", "report"},
    "suite": {"core", "cases", "env", "check", "bench", "report", "plugin"},
}
WITHOUT_PYTEST = {"core", "cases", "env", "check", "bench", "report", "cli"}


def imports_of(path: Path) -> list[tuple[int, str]]:
    """Every module an import statement in ``path`` names (relative imports made absolute)."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            if module == "pytest_attn":  # from pytest_attn import core -> the subpackage itself
                found += [(node.lineno, f"pytest_attn.{alias.name}") for alias in node.names]
    return found


def violations(subpackage: str) -> list[str]:
    problems = []
    for path in sorted((PACKAGE / subpackage).rglob("*.py")):
        for line, module in imports_of(path):
            parts = module.split(".")
            where = f"{path.relative_to(PACKAGE.parent)}:{line}"
            if parts[0] == "pytest_attn" and len(parts) > 1 and parts[1] in MAY_IMPORT:
                if parts[1] != subpackage and parts[1] not in MAY_IMPORT[subpackage]:
                    problems.append(f"{where} imports {module}: {subpackage} may import only "
                                    f"{', '.join(sorted(MAY_IMPORT[subpackage])) or 'nothing of pytest_attn'}")
            elif module == "pytest_attn" and subpackage != "suite":
                problems.append(f"{where} imports the package root: import the subpackage that holds the name")
            if subpackage in WITHOUT_PYTEST and parts[0] in ("pytest", "_pytest"):
                problems.append(f"{where} imports {module}: {subpackage} must work without pytest")
    return problems


@pytest.mark.parametrize("subpackage", sorted(MAY_IMPORT))
def test_imports_flow_one_way(subpackage):
    assert (PACKAGE / subpackage / "__init__.py").exists()
    assert violations(subpackage) == []


def test_every_subpackage_is_ruled_and_says_what_it_holds():
    found = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert found == set(MAY_IMPORT)
    for name in found:
        doc = ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text()))
        assert doc and ("Imports" in doc or name in ("plugin", "suite")), name


def test_the_rule_catches_an_upward_import(tmp_path, monkeypatch):
    core = tmp_path / "pytest_attn" / "core"
    core.mkdir(parents=True)
    (core / "bad.py").write_text("import pytest\nfrom pytest_attn.check.harness import run_case\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", tmp_path / "pytest_attn")
    found = violations("core")
    assert len(found) == 2 and "may import only nothing" in found[1] and "without pytest" in found[0]
