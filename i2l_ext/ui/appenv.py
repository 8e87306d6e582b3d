"""The standalone app's own Python environment, for machines without a WebUI.

gradio can't share the worker's environment (gradio 4.40 needs huggingface_hub < 1, diffsynth
needs 2.x), so ``serve`` makes ``<extension>/.venv-app`` on first use, from
``requirements-app.txt``, and runs itself there. A stamp with the requirements' hash is written
only after a complete install, so a half-made environment is never used.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys

from ..contract import I2LError, T

REQUIREMENTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "requirements-app.txt")


def app_python(env_dir: str) -> str:
    if os.name == "nt":
        return os.path.join(env_dir, "Scripts", "python.exe")
    return os.path.join(env_dir, "bin", "python")


def _wanted() -> str:
    with open(REQUIREMENTS, "rb") as f:
        return hashlib.sha256(f.read() + sys.version.encode()).hexdigest()


def ensure_app_env(env_dir: str, log=print) -> str:
    """The interpreter of the app environment in ``env_dir`` (the ``app_env`` setting), made or
    updated if needed (pip output shown live)."""
    py = app_python(env_dir)
    stamp = os.path.join(env_dir, "i2l-app-stamp")
    want = _wanted()
    try:
        with open(stamp) as f:
            if f.read().strip() == want and os.path.exists(py):
                return py
    except OSError:
        pass
    log(f"Setting up the app's environment in {env_dir} (gradio; about 300 MB, once)")
    if os.path.exists(stamp):
        os.unlink(stamp)
    steps = ([sys.executable, "-m", "venv", env_dir],
             [py, "-m", "pip", "install", "--disable-pip-version-check", "-r", REQUIREMENTS])
    for cmd in steps:
        if cmd[0] == py and not os.path.exists(py):
            break
        rc = subprocess.call(cmd)
        if rc != 0:
            raise I2LError(I2LError.ENVIRONMENT, T("m_app_env_failed", command=" ".join(cmd)),
                           T("m_app_env_failed_fix", path=env_dir))
    with open(stamp, "w") as f:
        f.write(want)
    return py


def has_gradio() -> bool:
    import importlib.util
    return importlib.util.find_spec("gradio") is not None
