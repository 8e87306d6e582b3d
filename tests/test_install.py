"""install.py against a stand-in WebUI venv (torch 2.14.1 + a conflicting transformers 4.46.1).

What a user's launch does: the WebUI runs install.py with its own Python. Checked here: the
WebUI venv's ``pip freeze`` is unchanged, the worker venv reuses its torch (none in the worker's
own site-packages) and imports diffsynth with transformers 5, a second run is a no-op well under
a second, damage is detected and repaired, and a tiny end-to-end job runs in the built venv.

The stand-in host venv is cached in ``$I2L_TEST_CACHE`` (default ``<repo>/.cache/i2l-test``;
about 6 GB, 1-2 min to make from the machine's local torch wheels); the worker venv is built
fresh in a temporary folder each run (about 1 min; pip's cache makes later runs faster).
"""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from helpers import ROOT
from i2l_ext.envsetup import layout

HOST_SPEC = ["torch==2.14.1", "torchvision==0.29.1", "transformers==4.46.1"]
CACHE = os.path.abspath(os.environ.get("I2L_TEST_CACHE") or os.path.join(ROOT, ".cache", "i2l-test"))
BASE_PYTHON = os.environ.get("I2L_TEST_BASE_PYTHON") or getattr(sys, "_base_executable", None) or sys.executable


def _run(cmd, timeout=900, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture(scope="module")
def host_python():
    """A WebUI-like venv: its own torch, and a transformers the worker can't use."""
    venv = os.path.join(CACHE, "host-venv")
    py = layout.venv_python(venv)
    marker = os.path.join(venv, ".i2l-test-ready")
    if not (os.path.isfile(marker) and open(marker).read() == " ".join(HOST_SPEC)):
        shutil.rmtree(venv, ignore_errors=True)
        os.makedirs(CACHE, exist_ok=True)
        r = _run([BASE_PYTHON, "-m", "venv", venv])
        assert r.returncode == 0, r.stderr
        r = _run([py, "-m", "pip", "install", "-q", *HOST_SPEC], timeout=1800)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        with open(marker, "w") as f:
            f.write(" ".join(HOST_SPEC))
    return py


def freeze(py):
    r = _run([py, "-m", "pip", "freeze", "--all"])
    assert r.returncode == 0, r.stderr
    return r.stdout


def install_py(host_py, env_dir, *args, timeout=1200, **env):
    e = {k: v for k, v in os.environ.items() if not k.startswith("I2L_")}
    e.update(I2L_WORKER_ENV=env_dir, I2L_INSTALL_TTY="0", PYTHONPATH=os.path.dirname(host_py), **env)
    t0 = time.perf_counter()
    r = _run([host_py, os.path.join(ROOT, "install.py"), *args], timeout=timeout, env=e, cwd=os.path.dirname(host_py))
    return r, time.perf_counter() - t0


def env_cli(host_py, env_dir, *args, timeout=1200):
    e = {k: v for k, v in os.environ.items() if not k.startswith("I2L_")}
    e["I2L_INSTALL_TTY"] = "0"
    return _run([host_py, "-m", "i2l_ext", "env", *args, "--env", env_dir], timeout=timeout, env=e, cwd=ROOT)


def test_install_py_builds_worker_env_without_touching_the_host(host_python, tmp_path):
    env_dir = str(tmp_path / "worker-env")
    before = freeze(host_python)
    assert "transformers==4.46.1" in before

    # 1. first launch: builds the worker env, reusing the host's torch
    r, took = install_py(host_python, env_dir)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-3000:]
    print(f"\nfirst install: {took:.1f} s")
    assert "reusing the WebUI's torch 2.14.1" in r.stdout
    assert "Worker environment ready" in r.stdout and "downloaded" in r.stdout
    assert freeze(host_python) == before, "install.py changed the WebUI's venv"

    wpy = layout.venv_python(env_dir)
    stamp = json.load(open(os.path.join(env_dir, layout.STAMP_NAME)))
    site = stamp["site_packages"]
    assert stamp["torch"]["mode"] == "host"
    assert not any(n == "torch" or n.startswith("torch-") for n in os.listdir(site)), "torch was installed twice"
    host_site = os.path.dirname(os.path.dirname(os.path.dirname(host_python)))
    code = ("import json, torch, transformers, diffsynth, torchvision; print(json.dumps({'torch': torch.__file__, "
            "'transformers': transformers.__version__, 'tf_file': transformers.__file__}))")
    r2 = _run([wpy, "-c", code], env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert r2.returncode == 0, r2.stderr[-3000:]
    got = json.loads(r2.stdout.strip().splitlines()[-1])
    assert got["torch"].startswith(host_site)                     # the host's torch ...
    assert got["transformers"].startswith("5.") and got["tf_file"].startswith(env_dir)   # ... our transformers
    st = json.load(open(os.path.join(env_dir, layout.STATUS_NAME)))
    assert st["ok"] is True and st["state"] == "ready" and st["python"] == wpy

    # 2. next launch: nothing changed -> no pip, well under a second for the whole process
    r, took = install_py(host_python, env_dir)
    assert r.returncode == 0 and r.stdout == "", r.stdout
    print(f"no-op install.py: {took:.3f} s")
    assert took < 1.0
    assert freeze(host_python) == before

    # 3. status from the CLI (host Python, as the repair command runs it)
    r = env_cli(host_python, env_dir, "status", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["state"] == "ready"

    # 4. a lost stamp (an interrupted upgrade looks like this): install.py makes it whole again
    os.remove(os.path.join(env_dir, layout.STAMP_NAME))
    r = env_cli(host_python, env_dir, "status", "--json")
    assert r.returncode == 1 and json.loads(r.stdout)["state"] in ("missing", "interrupted", "failed")
    r, took = install_py(host_python, env_dir)
    assert r.returncode == 0, r.stdout[-5000:]
    print(f"re-stamp after a lost stamp: {took:.1f} s")
    assert "Updating" in r.stdout and os.path.isfile(os.path.join(env_dir, layout.STAMP_NAME))

    # 5. a broken package: detected without running anything; the repair action rebuilds from scratch
    shutil.rmtree(os.path.join(site, "diffsynth"))
    marker = os.path.join(site, "left-over-from-before.txt")
    open(marker, "w").close()
    r = env_cli(host_python, env_dir, "status", "--json")
    st = json.loads(r.stdout)
    assert r.returncode == 1 and st["state"] == "damaged" and "diffsynth" in st["error"]
    t0 = time.perf_counter()
    r = env_cli(host_python, env_dir, "repair")
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-3000:]
    print(f"repair (rebuild from scratch): {time.perf_counter() - t0:.1f} s")
    assert "Rebuilding" in r.stdout and not os.path.exists(marker)
    r = env_cli(host_python, env_dir, "status", "--json", "--verify")
    assert r.returncode == 0 and json.loads(r.stdout)["verify"]["ok"], r.stdout
    r, took = install_py(host_python, env_dir)
    assert r.returncode == 0 and r.stdout == "" and took < 1.0
    assert freeze(host_python) == before

    # 7. the tiny end-to-end job in the built environment
    tiny = os.path.join(ROOT, "i2l_ext", "testing", "tiny.py")
    if not os.path.isfile(tiny):
        pytest.skip("i2l_ext/testing/tiny.py not present yet")
    pytest.importorskip("PIL", reason="the host side of a job needs Pillow in the test runner")
    models = str(tmp_path / "tiny-models")
    r = _run([wpy, "-m", "i2l_ext.testing.tiny", models], env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    from helpers import make_image
    from i2l_ext.settings import Settings
    from i2l_ext.envsetup import find_worker_python
    from i2l_ext.service import JobRequest, Service
    imgs = [make_image(tmp_path / f"i{i}.png", color=(60 * i, 100, 200)) for i in range(2)]
    lora = tmp_path / "Lora"
    lora.mkdir()
    worker = find_worker_python(env_dir=env_dir)
    assert worker == wpy
    svc = Service(Settings(models_dir=models, lora_dir=str(lora), worker_python=worker, host="cli",
                            keep_warm_minutes=0))
    try:
        job = svc.run(JobRequest(images=imgs, name="from_env", variant="style"))
    finally:
        svc.shutdown()
    assert job.state == "done", job.error
    assert os.path.isfile(lora / "from_env.safetensors")
