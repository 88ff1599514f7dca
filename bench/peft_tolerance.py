"""How far lorakit's outputs are from PEFT's in tests/test_peft_compat.py (the figures README quotes).

    python bench/peft_tolerance.py            # the fast compatibility tests (~1 min)
    python bench/peft_tolerance.py --slow     # plus SmolLM2-135M all-linear (~3 min)

Runs the compatibility tests and records, for every comparison they make (``_close``: PEFT -> lorakit
and lorakit -> PEFT outputs, merged weights), max |lorakit - PEFT| and the largest magnitude of PEFT's
tensor; the tests allow 1e-5 x max(that magnitude, 1). Writes bench/results/peft_tolerance.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class Recorder:
    """A pytest plugin that wraps test_peft_compat._close and keeps (test, max |diff|, scale)."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float, float]] = []
        self.current = ""

    def pytest_collection_modifyitems(self, session, config, items):
        module = sys.modules["test_peft_compat"]
        original = module._close

        def close(actual, expected):
            err = (actual.double() - expected.double()).abs().max().item()
            self.rows.append((self.current, err, expected.abs().max().item()))
            original(actual, expected)

        module._close = close

    def pytest_runtest_setup(self, item):
        self.current = item.name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slow", action="store_true", help="include the SmolLM2-135M test")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import pytest

    recorder = Recorder()
    marks = [] if args.slow else ["-m", "not slow"]
    code = pytest.main(["-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_peft_compat.py"), *marks],
                       plugins=[recorder])
    lines = ["| test | comparisons | max abs diff | largest magnitude | max diff / max(magnitude, 1) |",
             "|---|---|---|---|---|"]
    tests: dict[str, list[tuple[float, float]]] = {}
    for name, err, scale in recorder.rows:
        tests.setdefault(name, []).append((err, scale))
    for name, rows in tests.items():
        err, scale = max(rows, key=lambda r: r[0] / max(r[1], 1.0))
        lines.append(f"| {name} | {len(rows)} | {err:.2e} | {scale:.3g} | {err / max(scale, 1.0):.2e} |")
    worst = max((e / max(s, 1.0) for _, e, s in recorder.rows), default=0.0)
    exact = sum(e == 0.0 for _, e, _ in recorder.rows)
    lines += ["", f"{len(recorder.rows)} comparisons, {exact} exactly equal; worst scale-relative difference "
              f"{worst:.2e} (tolerance 1e-5); pytest exit code {int(code)}."]
    text = "\n".join(lines) + "\n"
    print(text)
    out = ROOT / "bench" / "results" / "peft_tolerance.md"
    out.write_text(f"`python bench/peft_tolerance.py{' --slow' if args.slow else ''}`\n\n{text}")


if __name__ == "__main__":
    main()
