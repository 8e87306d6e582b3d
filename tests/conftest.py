"""Shared fixtures: the worker interpreter, a tiny model set, sample images."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from helpers import ROOT, make_image  # noqa: E402


def _worker_python() -> str | None:
    for cand in (os.environ.get("I2L_TEST_WORKER_PYTHON"), os.path.join(ROOT, ".venv-worker", "bin", "python"),
                 os.path.join(ROOT, ".venv-worker", "Scripts", "python.exe")):
        if cand and os.path.exists(cand):
            return cand
    return None


@pytest.fixture(scope="session")
def worker_python() -> str:
    py = _worker_python()
    if py is None:
        pytest.fail("No worker interpreter: set I2L_TEST_WORKER_PYTHON or run `python install.py` (see README).")
    return py


@pytest.fixture(scope="session")
def tiny_models(worker_python, tmp_path_factory) -> str:
    """A tiny random-weight model set in the real layout, written once per test session."""
    cached = os.environ.get("I2L_TINY_MODELS")
    marker = os.path.join(cached or "", "i2l-tiny.json")
    if cached and os.path.exists(marker):
        with open(marker, encoding="utf-8") as f:
            if "provider" in json.load(f):          # a set written before the marker named it is not used
                return cached
    d = str(tmp_path_factory.mktemp("tiny-models"))
    subprocess.run([worker_python, "-m", "i2l_ext.testing.tiny", d], check=True, cwd=ROOT,
                   env=dict(os.environ, PYTHONPATH=ROOT))
    return d


@pytest.fixture
def images(tmp_path):
    """Three small valid RGB images."""
    d = tmp_path / "inputs"
    d.mkdir()
    return [make_image(d / f"img{i}.png", size=(80 + 16 * i, 64), color=(40 * i, 120, 200 - 30 * i)) for i in range(3)]


@pytest.fixture
def lora_dir(tmp_path):
    d = tmp_path / "Lora"
    d.mkdir()
    return str(d)
