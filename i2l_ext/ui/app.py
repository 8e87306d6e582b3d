"""The standalone app: the same tab in a page of its own, for people without a WebUI."""
from __future__ import annotations

import os

from .. import i18n
from ..config import default_config


def make_controller(lora_dir: str | None = None, models_dir: str | None = None, worker_python: str | None = None,
                    offline: bool | None = None):
    from .tab import Controller
    cfg = default_config(lora_dir=lora_dir and os.path.abspath(os.path.expanduser(lora_dir)),
                         models_dir=models_dir and os.path.abspath(os.path.expanduser(models_dir)),
                         worker_python=worker_python, offline=offline, host="standalone")
    os.makedirs(cfg.lora_dir, exist_ok=True)
    return Controller(cfg, None, host="standalone")


def serve(host: str = "127.0.0.1", port: int = 7870, lora_dir: str | None = None, models_dir: str | None = None,
          worker_python: str | None = None, offline: bool | None = None, lang: str | None = None,
          open_browser: bool = False) -> int:
    i18n.set_language(lang)
    from . import compat, create_tab
    ctl = make_controller(lora_dir, models_dir, worker_python, offline)
    demo = create_tab(ctl, standalone_assets=True)
    compat.queue(demo, 8)
    print(f"Image to LoRA: LoRAs go to {ctl.config.lora_dir}; models from {ctl.config.models_dir}", flush=True)
    ctl.service.standby()          # the worker's code imported while the page is being opened
    try:
        demo.launch(server_name=host, server_port=port, inbrowser=open_browser, share=False, show_api=False,
                    allowed_paths=[ctl.config.lora_dir], prevent_thread_lock=False)
    except KeyboardInterrupt:
        pass
    finally:
        ctl.service.shutdown()
    return 0
