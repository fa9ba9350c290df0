"""The code passes ruff with the configuration in pyproject.toml (pycodestyle, pyflakes; 120 columns)."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The package, the tests, the benchmarks and every entry script (math/, vision/, the top-level ones, examples/).
TARGETS = ["core", "tests", "bench", "math", "vision", "examples", "studies",
           *sorted(p.name for p in ROOT.glob("*.py"))]


def test_ruff_finds_nothing():
    pytest.importorskip("ruff", reason="ruff is not installed (pip install -r requirements.txt)")
    targets = [t for t in TARGETS if (ROOT / t).exists()]
    run = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", *targets],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
