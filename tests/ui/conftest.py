"""Browser tests of the tab: the standalone app (``python -m i2l_ext serve``) in a subprocess,
driven by Playwright through Debian's Chromium, running real jobs on the tiny model set.

Each test runs once per gradio: the app runs under $I2L_GRADIO3_PYTHON and $I2L_GRADIO4_PYTHON
(environments from tests/ui/requirements-gradio3.txt / -gradio4.txt); a gradio whose interpreter
is not given is skipped, unless the test runner's own Python has that gradio (or $I2L_UI_PYTHON
names one interpreter for both). Screenshots go to test-artifacts/ui/gradio-<version>/ (or
$I2L_ARTIFACTS/ui/...), with the app's log beside them.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import chromium, slow_worker
from ui_helpers import start_app, stop_app

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_versions: dict[str, str | None] = {}


def _gradio_version(python: str) -> str | None:
    if python not in _versions:
        try:
            out = subprocess.run([python, "-c", "import gradio; print(gradio.__version__)"], capture_output=True,
                                 text=True, timeout=120)
            _versions[python] = out.stdout.strip() if out.returncode == 0 else None
        except (OSError, subprocess.TimeoutExpired):
            _versions[python] = None
    return _versions[python]


def _python_for(major: str) -> str | None:
    for cand in (os.environ.get("I2L_UI_PYTHON"), os.environ.get(f"I2L_GRADIO{major}_PYTHON"), sys.executable):
        if cand and os.path.exists(cand):
            v = _gradio_version(cand)
            if v and v.split(".")[0] == major:
                return cand
    return None


@pytest.fixture(scope="module", params=["3", "4"], ids=["gradio3", "gradio4"])
def ui_python(request) -> str:
    py = _python_for(request.param)
    if py is None:
        pytest.skip(f"no Python with gradio {request.param}.x: set I2L_GRADIO{request.param}_PYTHON "
                    f"(see tests/ui/requirements-gradio{request.param}.txt)")
    return py


@pytest.fixture(scope="module")
def gradio_version(ui_python) -> str:
    return _gradio_version(ui_python)


@pytest.fixture(scope="module")
def artifacts(gradio_version) -> str:
    base = os.environ.get("I2L_ARTIFACTS") or os.path.join(ROOT, "test-artifacts")
    d = os.path.join(base, "ui", f"gradio-{gradio_version}")
    os.makedirs(d, exist_ok=True)
    return d


@pytest.fixture(scope="session")
def browser():
    with chromium() as b:
        yield b


@pytest.fixture(scope="module")
def app(ui_python, tmp_path_factory, tiny_models, worker_python, artifacts):
    """The app as a user starts it. Its worker waits 1 s before writing: with a standby worker ready
    since launch a tiny job is over in a few tenths of a second, quicker than a page polls it, and
    the tests watch its progress."""
    d = str(tmp_path_factory.mktemp("app"))
    python, env = slow_worker(worker_python, 1)
    a = start_app(ui_python, d, tiny_models, python, artifacts, "main", extra_env=env)
    yield a
    stop_app(a)


@pytest.fixture(scope="module")
def slow_app(ui_python, tmp_path_factory, tiny_models, worker_python, artifacts):
    """An app whose worker pauses before writing (so a job can be caught mid-run), in Chinese."""
    d = str(tmp_path_factory.mktemp("slow-app"))
    python, env = slow_worker(worker_python, 60)
    a = start_app(ui_python, d, tiny_models, python, artifacts, "slow", lang="zh_CN", extra_env=env)
    yield a
    stop_app(a)


@pytest.fixture
def page(browser):
    ctx = browser.new_context(viewport={"width": 1400, "height": 1600})
    pg = ctx.new_page()
    pg.set_default_timeout(30_000)
    yield pg
    ctx.close()


@pytest.fixture
def sample_images(tmp_path):
    from PIL import Image
    d = tmp_path / "inputs"
    d.mkdir()
    paths = []
    for i in range(3):
        im = Image.new("RGB", (96 + 16 * i, 64), (40 * i, 120, 200 - 30 * i))
        for x in range(0, im.width, 8):
            for y in range(0, 64, 8):
                if (x + y) // 8 % 2:
                    im.putpixel((x, y), (x * 2 % 256, y * 3 % 256, 90))
        p = d / f"img{i}.png"
        im.save(p)
        paths.append(str(p))
    txt = d / "notes.txt"
    txt.write_text("not an image")
    return {"images": paths, "text": str(txt), "dir": str(d)}

