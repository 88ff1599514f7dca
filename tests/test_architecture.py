"""The package's architecture as tests: the import-linter contracts of pyproject.toml (every import points
down a layer), no source file over 600 lines, and a cheap ``import lorakit``."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "lorakit"


def test_import_contracts_of_pyproject_are_kept():
    importlinter = pytest.importorskip("importlinter")
    from importlinter.cli import lint_imports

    assert importlinter  # the contracts live in pyproject.toml ([tool.importlinter])
    code = lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True)
    assert code == 0, "an import points up a layer or into the package root; run `lint-imports` for the report"


def test_every_module_is_in_a_layer_of_the_contract():
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
    listed = {name.strip() for layer in config["layers"] for name in layer.split("|")}
    present = {p.stem for p in SRC.glob("*.py") if p.stem != "__init__"} | \
              {p.parent.name for p in SRC.glob("*/__init__.py")}
    assert present == listed


def test_no_source_file_is_over_600_lines():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > 600}
    assert not long


def test_import_lorakit_does_not_import_torch():
    code = "import sys, lorakit; assert 'torch' not in sys.modules, 'torch imported'; lorakit.LoraConfig; " \
           "assert 'torch' in sys.modules and 'lorakit.api' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_public_name_resolves_and_submodules_are_reachable():
    import lorakit

    for name in lorakit.__all__:
        assert getattr(lorakit, name) is not None, name
    assert lorakit.distributed.fully_shard_model and lorakit.quant.merge_requantized
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        lorakit.nope  # noqa: B018


def test_no_module_imports_the_package_root():
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph("lorakit", cache_dir=None)
    importers = sorted(m for m in graph.find_modules_that_directly_import("lorakit") if m != "lorakit")
    assert not importers, f"{importers} import the package root; import from lorakit.api or the submodule instead"


def test_every_import_inside_lorakit_names_a_module_that_exists():
    """A relative import that resolves to no module (``from .train import x`` in a subpackage) is invisible to
    import-linter and fails only when its function runs: find them all statically."""
    import ast
    import importlib.util

    missing = []
    for path in SRC.rglob("*.py"):
        package = list(path.relative_to(SRC.parent).with_suffix("").parts)[:-1]  # the module's package
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package[:len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                if importlib.util.find_spec(target) is None:
                    missing.append(f"{path.relative_to(SRC)}:{node.lineno} {target}")
                elif node.module is None:  # from . import x: each x a module or a name of the package
                    for alias in node.names:
                        if importlib.util.find_spec(f"{target}.{alias.name}") is None and \
                                not hasattr(importlib.import_module(target), alias.name):
                            missing.append(f"{path.relative_to(SRC)}:{node.lineno} {target}.{alias.name}")
    assert not missing
