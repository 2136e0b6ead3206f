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
    """A tiny toy world and base built once per session through the command lines of 00_make_toy.py
    (the world) and 00_train_toy.py (the base): returns the root holding data/toy and models/toy-llava."""
    root = tmp_path_factory.mktemp("toy")
    for script in ("00_make_toy.py", "00_train_toy.py"):
        run = subprocess.run([sys.executable, str(ROOT / script), "--tiny", "--root", str(root)],
                             capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert run.returncode == 0, run.stdout + run.stderr
    return root
