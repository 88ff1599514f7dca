"""Every Python code block of README.md and docs/**/*.md runs here, one test per block (sybil).

How: sybil parses each Markdown file into its ```` ```python ```` blocks and its
``<!-- skip: next "reason" -->`` comments. The blocks of one file run in order in one namespace (a
page is one script), inside a temporary folder that is the working directory, so ``"out/adapter"``
in a block lands there. A test for block k first runs the blocks before it that have not run yet,
so ``pytest -k`` can pick any one block. A block that cannot run here (a GPU, torchrun, a server,
a long training) is preceded by ``<!-- skip: next "why" -->``: reported as skipped with that reason.
Shell blocks (```` ```bash ````) are not run.

Mixed-adapter batches take the plain PyTorch path in these tests: the per-row C++ kernel would be
compiled at first use (~30 s on 2 cores), and ``tests/test_rowlora.py`` checks that both paths
give the same rows.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from unittest import SkipTest

import pytest
from sybil import Sybil
from sybil.parsers.markdown import PythonCodeBlockParser, SkipParser

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SYBIL = Sybil(parsers=[PythonCodeBlockParser(), SkipParser()])
SKIP = re.compile(r"<!--\s*skip:\s*(\w+)(.*?)-->", re.S)
FENCE = re.compile(r"^```(\w*)", re.M)
# What the blocks may use of lorakit: the top-level names, and these modules.
MODULES = {"builtin", "distributed", "train"}


def _is_code(example) -> bool:
    return example.region.evaluator is not None and type(example.parsed).__name__ != "tuple"


def _blocks() -> list:
    params = []
    for path in FILES:
        for i, example in enumerate(SYBIL.parse(path)):
            if _is_code(example):
                params.append(pytest.param(path, i, id=f"{path.relative_to(ROOT)}:{example.line}"))
    return params


class _Page:
    """One Markdown file: its examples, run in order in one namespace and one folder."""

    def __init__(self, path: Path, folder: Path) -> None:
        self.examples = list(SYBIL.parse(path))
        self.folder = folder
        self.done = 0          # examples run so far
        self.failed: int | None = None  # line of the first block that failed

    def run_to(self, index: int) -> None:
        while self.done <= index:
            example = self.examples[self.done]
            self.done += 1
            last = self.done - 1 == index
            if self.failed is not None:
                pytest.skip(f"an earlier block of this page failed (line {self.failed})")
            try:
                example.evaluate()
            except SkipTest:
                if last:
                    raise
            except BaseException:
                self.failed = example.line
                raise


@pytest.fixture(scope="session")
def pages(tmp_path_factory):
    return {}


@pytest.fixture
def plain_mixed_path():
    """The plain PyTorch path for lorakit.mixed while the docs run (see the module docstring)."""
    mod = None
    for name in ("lorakit.rowlora", "lorakit.batching.rowlora"):  # before / after the package restructure
        try:
            mod = importlib.import_module(name)
            break
        except ImportError:
            continue
    wanted = getattr(mod, "_wanted", True)
    if mod is not None:
        mod.use(False)
    yield
    if mod is not None:
        mod.use(wanted)


@pytest.mark.parametrize("path,index", _blocks())
def test_block(path, index, pages, tmp_path_factory, monkeypatch, plain_mixed_path):
    if path not in pages:
        pages[path] = _Page(path, tmp_path_factory.mktemp(path.stem))
    page = pages[path]
    monkeypatch.chdir(page.folder)
    page.run_to(index)


def test_every_skip_gives_its_reason():
    """A block is run, or skipped with a reason a reader sees in the page's source."""
    for path in FILES:
        for action, reason in SKIP.findall(path.read_text(encoding="utf-8")):
            assert action in ("next", "start", "end"), f"{path}: skip: {action}"
            if action != "end":
                assert re.fullmatch(r'\s*"[^"]{10,}"\s*', reason), f"{path}: skip: {action} without a reason"


def test_blocks_use_only_the_public_api():
    """Blocks name only lorakit's top-level names (lorakit.__all__) and a few modules, so they run the
    same before and after the package layout changes."""
    import lorakit
    allowed = set(lorakit.__all__) | MODULES
    for path in FILES:
        for example in SYBIL.parse(path):
            if not _is_code(example):
                continue
            source = str(example.parsed)
            used = set(re.findall(r"\blorakit\.(\w+)", source))
            used |= set(re.findall(r"from lorakit\.(\w+)", source))
            assert used <= allowed, f"{path}:{example.line}: not public: {sorted(used - allowed)}"


def test_fences_name_a_language():
    """Every fence says what it holds (python blocks run, the others are shown only)."""
    for path in FILES:
        opened = False
        for match in FENCE.finditer(path.read_text(encoding="utf-8")):
            if not opened:
                assert match.group(1), f"{path}: a code fence without a language"
            opened = not opened


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 300
