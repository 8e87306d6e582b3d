"""Where things are: the models folder, the Lora folder, the worker interpreter.

Inside a WebUI the host decides (``i2l_ext.hosts``); elsewhere, environment variables, then the
layout around the extension (a clone inside ``<webui>/extensions/`` uses that WebUI's folders),
then ``~/.i2l``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

EXT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Config:
    models_dir: str
    lora_dir: str
    worker_python: str | None = None      # None: the worker environment made by install.py
    search_dirs: list[str] = field(default_factory=list)
    offline: bool = False
    host: str = "standalone"              # a1111 | forge | neo | reforge | standalone | cli
    job_timeout: float = 3600.0
    start_timeout: float = 600.0
    idle_timeout: float = 600.0           # a warm worker idle this long is shut down (0: at once)
    keep_warm: bool = True
    prewarm: bool = True                  # start the worker and read weights when the tab opens
    standby: bool = True                  # keep a worker with its code imported (no GPU, no weights) ready
    gpu_hold: float = 10.0                # s a job's weights stay on the GPU for the next job (0: park at once)
    gpu_hold_gb: float = 10.0             # at most this much of them (and never more than free VRAM allows)
    worker_env: dict = field(default_factory=dict)   # extra environment for the worker process


def webui_root_around(ext_root: str = EXT_ROOT) -> str | None:
    """The WebUI folder if this extension sits in ``<webui>/extensions/<name>``."""
    parent = os.path.dirname(ext_root)
    if os.path.basename(parent) in ("extensions", "extensions-builtin"):
        root = os.path.dirname(parent)
        if os.path.isdir(os.path.join(root, "models")):
            return root
    return None


def default_models_dir() -> str:
    if os.environ.get("I2L_MODELS_DIR"):
        return os.path.abspath(os.environ["I2L_MODELS_DIR"])
    root = webui_root_around()
    if root:
        return os.path.join(root, "models", "i2L")
    return os.path.join(os.path.expanduser("~"), ".i2l", "models")


def default_lora_dir() -> str:
    if os.environ.get("I2L_LORA_DIR"):
        return os.path.abspath(os.environ["I2L_LORA_DIR"])
    root = webui_root_around()
    if root:
        return os.path.join(root, "models", "Lora")
    return os.path.join(os.path.expanduser("~"), ".i2l", "Lora")


def default_config(**overrides) -> Config:
    cfg = Config(models_dir=default_models_dir(), lora_dir=default_lora_dir(),
                 worker_python=os.environ.get("I2L_PYTHON") or None,
                 offline=os.environ.get("I2L_OFFLINE", "") not in ("", "0", "false", "no"))
    for k, v in overrides.items():
        if v is not None:
            setattr(cfg, k, v)
    return cfg
