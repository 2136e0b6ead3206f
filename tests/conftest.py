"""Shared test fixtures. Tests run from the repository root with HF_HUB_OFFLINE=1."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # stage scripts import as modules: importlib.import_module("02_make_grid")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def toy_tiny(tmp_path_factory):
    """A tiny toy world built once per session through 00_make_toy.py's command line:
    returns the root holding data/toy and models/toy-llava."""
    root = tmp_path_factory.mktemp("toy")
    run = subprocess.run([sys.executable, str(ROOT / "00_make_toy.py"), "--tiny", "--root", str(root)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    return root
